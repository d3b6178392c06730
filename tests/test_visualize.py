"""visualize.py: activations, maximisation, views, recipes, every sub-command, flags that act, bad input."""
import contextlib
import io
import json
import os

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from util import expect_exit
import common
import deepcluster
import dino
import byol
import moco
import rotnet
import simclr
import visualize


def _tiny_ckpt(d, name="resnet18", method="simclr", **kw):
    """A checkpoint of a random-init network (what load_encoder reads), on the tiny shapes dataset."""
    torch.manual_seed(0)
    kw = kw or ({"width": 8, "small_stem": True} if name == "resnet18" else {"width": 4, "sobel": True, "small": True})
    enc = common.build_backbone(name, **kw)
    path = os.path.join(d, f"{method}-{name}.pt")
    common.save_checkpoint(path, method=method, args={"data": "shapes", "shapes_n": [24, 16], "seed": 0,
                                                      "crop_min_scale": 0.2, "jitter_strength": 0.5},
                           epoch=1, step=1, backbone={"name": name, "kwargs": kw}, encoder=enc.state_dict(),
                           rng=common.all_rng_states(), img_size=32, data="shapes")
    return path


def _stages_reference(enc, x):
    """Layers 1..5 by hand: AlexNet conv_features, ResNet stem ReLU then layer1..layer4."""
    if isinstance(enc, common.AlexNet):
        return enc.conv_features(x)
    h = enc.relu(enc.bn1(enc.conv1(x)))
    outs = [h]
    h = enc.maxpool(h)
    for layer in (enc.layer1, enc.layer2, enc.layer3, enc.layer4):
        h = layer(h)
        outs.append(h)
    return outs


def _check_png(path, size):
    im = Image.open(path)
    im.load()
    assert abs(im.size[0] - size[0]) <= 1 and abs(im.size[1] - size[1]) <= 1, (path, im.size, size)
    gray = np.asarray(im.convert("L"), dtype=np.float32)
    assert gray.std() > 5 and (gray < 128).mean() > 0.01, path  # not blank


def test_visualize_activations_and_top_k_match_direct_computation():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (13, 3, 32, 32), dtype=torch.uint8)
    x = common.normalize(common.to_float(images))
    for name, kw in [("resnet18", {"width": 8, "small_stem": True}), ("alexnet", {"width": 4, "small": True}),
                     ("alexnet", {"width": 4, "small": True, "sobel": False})]:
        enc = common.build_backbone(name, **kw).eval()
        with torch.no_grad():
            ref = [o.mean((2, 3)) for o in _stages_reference(enc, x)]
        for layer in range(1, 6):  # batches of 5: the last one is partial
            got = visualize.compute_activations(enc, images, layer, batch_size=5, log=lambda *a: None)
            assert got.shape == ref[layer - 1].shape and torch.allclose(got, ref[layer - 1], atol=1e-5), (name, layer)
            assert (got >= 0).all()
    # top-k: a plain sort of each filter's column
    acts = torch.rand(40, 7, generator=torch.Generator().manual_seed(1))
    vals, idx = visualize.top_k_images(acts, [3, 0, 6], 5)
    for row, f in enumerate([3, 0, 6]):
        order = sorted(range(40), key=lambda i: -acts[i, f].item())[:5]
        assert idx[row].tolist() == order and torch.equal(vals[row], acts[order, f])
    assert visualize.top_k_images(acts, [1], 100)[1].shape == (1, 40)  # k is capped at the number of images
    # a generic network: each trainable conv is a layer, seen through a ReLU
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh(), nn.Conv2d(4, 2, 3), nn.Flatten())
    got = visualize.compute_activations(net, images, 2, log=lambda *a: None)
    with torch.no_grad():
        assert torch.allclose(got, torch.relu(net[2](net[1](net[0](x)))).mean((2, 3)), atol=1e-6)


def test_visualize_maximize_increases_activation():
    for name, kw, layer in [("resnet18", {"width": 8, "small_stem": True}, 3),
                            ("alexnet", {"width": 4, "small": True}, 2)]:
        torch.manual_seed(0)
        enc = common.build_backbone(name, **kw).eval()
        img, hist = visualize.maximize_activation(enc, layer, 1, 32, steps=15, lr=0.1, blur_every=4)
        assert len(hist) == 16 and img.shape == (3, 32, 32) and 0 <= img.min() and img.max() <= 1
        assert hist[-1] > 2 * hist[0] + 1e-3, (name, hist[0], hist[-1])
        # what it reports is the filter's activation on the returned image (after re-normalisation)
        with torch.no_grad():
            a = visualize.layer_output(enc, common.normalize(img[None]), layer)[0, 1].mean().item()
        assert abs(a - hist[-1]) < 1e-3 * max(1, abs(a)), (a, hist[-1])


def test_visualize_view_similarity_pca_and_filter_tiles():
    torch.manual_seed(0)
    enc = common.build_backbone("resnet18", width=8, small_stem=True).eval()
    v1, v2 = torch.randn(6, 3, 32, 32), torch.randn(6, 3, 32, 32)
    sim, acc = visualize.view_similarity(enc, v1, v2)
    with torch.no_grad():
        h1, h2 = enc(v1), enc(v2)
    for i in range(6):
        for j in range(6):
            cos = (h1[i] @ h2[j] / (h1[i].norm() * h2[j].norm())).item()
            assert abs(sim[i, j].item() - cos) < 1e-5
    assert abs(acc - sum(int(sim[i].argmax() == i) for i in range(6)) / 6) < 1e-6
    sim, acc = visualize.view_similarity(nn.Flatten(), v1, v1)  # identical views: every match is right
    assert acc == 1.0 and torch.allclose(sim.diagonal(), torch.ones(6))
    sim, acc = visualize.view_similarity(nn.Flatten(), v1, v1.roll(1, 0))  # shuffled pairs: none is
    assert acc == 0.0
    # PCA: the two leading principal directions of an exact SVD (up to sign)
    gen = torch.Generator().manual_seed(0)
    f = torch.randn(300, 20, generator=gen) * torch.linspace(5, 0.1, 20) + 3
    xy, ratio = visualize.pca_2d(f)
    c = (f - f.mean(0)).double().numpy()
    u, s, vt = np.linalg.svd(c, full_matrices=False)
    ref = c @ vt[:2].T
    assert np.allclose(np.abs(xy.numpy()), np.abs(ref), atol=1e-3)
    assert np.allclose(ratio.numpy(), s[:2] ** 2 / (s ** 2).sum(), atol=1e-4)
    # filter tiles: colour for RGB weights, the Sobel layer's two channels in gray side by side
    w = torch.randn(5, 3, 3, 3)
    t = visualize.filter_tiles(w)
    assert t.shape == (5, 3, 3, 3) and torch.allclose(t.amin((1, 2, 3)), torch.zeros(5))
    assert torch.allclose(t.amax((1, 2, 3)), torch.ones(5))
    t = visualize.filter_tiles(torch.randn(4, 2, 5, 5))
    assert t.shape == (4, 3, 5, 11) and torch.equal(t[:, 0], t[:, 2]) and (t[..., 5] == 1).all()


def test_visualize_recipes_are_the_methods_own_functions():
    """RECIPES is a plain dict of each method's augmentation; a view equals the method's function called with the
    checkpoint's flags under the same seed; other methods get DeepCluster's crop + flip, and say so."""
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    saved = {"jitter_strength": 0.5, "crop_min_scale": 0.2}
    for method, ref in [("simclr", lambda: simclr.simclr_augment(x, 24, 0.5, 0.2)),
                        ("deepcluster", lambda: deepcluster.deepcluster_augment(x, 24, 0.2)),
                        ("rotnet", lambda: rotnet.rotnet_augment(x, 24)),
                        ("byol", lambda: byol.byol_augment(x, 24, **byol.VIEW1, min_scale=0.2)),
                        ("moco", lambda: moco.moco_augment(x, 24, 0.2, 0.5)),
                        ("dino", lambda: dino.dino_augment(x, 24, (0.3, 0.9)))]:
        aug, name = visualize.augmentation(method, dict(saved, global_scale=[0.3, 0.9]))
        assert name.startswith(f"{method}.{method}_augment") and "crop_min_scale 0.2" in name, name
        torch.manual_seed(3)
        got = aug(x, 24)
        torch.manual_seed(3)
        assert got.shape == (4, 3, 24, 24) and torch.equal(got, ref())
    # simclr.py saves jitter_strength None for its size-dependent default (0.5 below 96 px)
    aug, _ = visualize.augmentation("simclr", {"jitter_strength": None})
    torch.manual_seed(3)
    got = aug(x, 24)
    torch.manual_seed(3)
    assert torch.equal(got, simclr.simclr_augment(x, 24, 0.5, 0.08))
    aug, name = visualize.augmentation("no-such-method")
    assert name.startswith("random resized crop + horizontal flip") and aug(x, 16).shape == (4, 3, 16, 16)
    torch.manual_seed(3)
    got = aug(x, 16)
    torch.manual_seed(3)
    assert torch.equal(got, deepcluster.deepcluster_augment(x, 16))


def test_visualize_every_subcommand_writes_a_png(tmp_path):
    d = str(tmp_path)
    res, alex = _tiny_ckpt(d), _tiny_ckpt(d, "alexnet", "deepcluster")
    cpu = ["--device", "cpu", "--out", d]
    _check_png(visualize.main(["filters", "--ckpt", res] + cpu), (600, 650))  # 8 filters 3x3 in a 3x3 grid
    _check_png(visualize.main(["filters", "--ckpt", alex] + cpu), (600, 540))  # 6 Sobel filters 5x(5+1+5)
    _check_png(visualize.main(["filters", "--ckpt", alex, "--random-init"] + cpu), (600, 540))
    _check_png(visualize.main(["top-images", "--ckpt", alex, "--layer", "5", "--filters", "0", "3", "--k", "4"]
                              + cpu), (520, 240))
    _check_png(visualize.main(["maximize", "--ckpt", res, "--layer", "2", "--filter", "0", "1", "--steps", "5"]
                              + cpu), (340, 220))
    _check_png(visualize.main(["views", "--ckpt", res, "--n", "4"] + cpu), (650, 340))
    _check_png(visualize.main(["views", "--ckpt", res, "--ckpt2", alex, "--n", "4"] + cpu), (1290, 340))
    _check_png(visualize.main(["augment", "--data", "shapes", "--shapes-n", "8", "8", "--n", "3", "--views", "2"]
                              + cpu), (300, 320))
    _check_png(visualize.main(["embedding", "--ckpt", res] + cpu), (600, 500))
    run = os.path.join(d, "run")
    os.makedirs(run)
    with open(os.path.join(run, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps({"epoch": e, "loss": 5 / e, "knn_top1": 10.0 * e}) + "\n" for e in range(1, 5))
    _check_png(visualize.main(["curves", "--run", run, os.path.join(run, "metrics.jsonl"), "--out", d]), (800, 300))
    log = os.path.join(d, "byol-run.log")  # a training script's saved output: per-step points
    with open(log, "w") as f:
        f.write("cifar10: 50000 training images at 32px\n"
                "epoch 1/2 step 20/40 loss 2.5 collapse_std 0.8 | 90 img/s | ETA 0:01:00\n"
                "epoch 1/2 step 40/40 loss 1.5 collapse_std 0.6 | 90 img/s | ETA 0:00:30\n"
                "epoch 1 loss 2.0 collapse_std 0.7 img_per_s 90.1 knn_top1 31.5\n"
                "epoch 2/2 step 20/40 loss 1.0 collapse_std 0.5 | 91 img/s | ETA 0:00:15\n"
                "summary {\"knn_top1\": 31.5}\n")
    rows = visualize.read_log(log)
    assert rows == [{"epoch": 0.5, "loss": 2.5, "collapse_std": 0.8}, {"epoch": 1.0, "loss": 1.5, "collapse_std": 0.6},
                    {"epoch": 1, "img_per_s": 90.1, "knn_top1": 31.5}, {"epoch": 1.5, "loss": 1.0, "collapse_std": 0.5}]
    _check_png(visualize.main(["curves", "--run", log, run, "--out", d]), (1200, 600))  # 4 metrics
    paths = []
    for i, name in enumerate(["simclr", "deepcluster"]):  # knn_eval.py's JSON
        rows = [{"protocol": "few-shot linear probe", "labels_per_class": n, "top1": 20.0 + 5 * i + n / 10}
                for n in (10, 50, 100, 500)] + [{"protocol": "linear probe", "top1": 70.0}]
        paths.append(os.path.join(d, f"{name}.json"))
        json.dump({"encoder": name, "data": "cifar10", "rows": rows}, open(paths[-1], "w"))
    points, label = visualize.read_fewshot(paths[0])
    assert list(points) == [10, 50, 100, 500] and points[50] == [25.0] and label == "simclr (cifar10)"
    _check_png(visualize.main(["fewshot", "--json"] + paths + ["--out", d]), (600, 400))
    assert sorted(f for f in os.listdir(d) if f.endswith(".png")) == [
        "augment-simclr.png", "curves.png", "embedding.png", "fewshot.png", "filters.png", "maximize-layer2.png",
        "top-images-layer5.png", "views.png"]


def _encoder_batches(fn):
    """Batch sizes of every forward call of a whole ResNet while fn() runs (a global forward pre-hook)."""
    sizes = []

    def hook(module, inputs):
        if isinstance(module, common.ResNet):
            sizes.append(inputs[0].shape[0])
    handle = nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            fn()
    finally:
        handle.remove()
    return sizes


def _argparse_rejects(argv):
    """visualize.main(argv) must stop in argparse (exit status 2: an unknown flag for that sub-command)."""
    try:
        with contextlib.redirect_stderr(io.StringIO()) as err:
            visualize.main(argv)
    except SystemExit as e:
        assert e.code == 2 and "unrecognized arguments" in err.getvalue(), (argv, e.code, err.getvalue())
        return
    raise AssertionError(f"{argv} was accepted")


def test_visualize_flags_act_or_are_absent(tmp_path):
    """--max-images and --batch-size change what top-images and embedding compute; the sub-commands where they
    would do nothing (views and augment take --n) do not accept them; curves and fewshot take no --device/--seed."""
    d = str(tmp_path)
    res = _tiny_ckpt(d)  # shapes 24 / 16 images
    cpu = ["--device", "cpu", "--out", d]
    top = ["top-images", "--ckpt", res, "--layer", "2", "--k", "3"] + cpu
    assert _encoder_batches(lambda: visualize.main(top)) == [1, 16]  # the filter check, then all 16 test images
    assert _encoder_batches(lambda: visualize.main(top + ["--max-images", "5", "--batch-size", "2"])) == [1, 2, 2, 1]
    assert _encoder_batches(lambda: visualize.main(top + ["--split", "train", "--batch-size", "10"])) == [1, 10, 10, 4]
    emb = ["embedding", "--ckpt", res] + cpu
    assert _encoder_batches(lambda: visualize.main(emb)) == [16]
    assert _encoder_batches(lambda: visualize.main(emb + ["--max-images", "7", "--batch-size", "3"])) == [3, 3, 1]
    assert _encoder_batches(lambda: visualize.main(["views", "--ckpt", res, "--n", "5"] + cpu)) == [5, 5]
    # the seed picks the images and the augmentations: the same seed draws the same figure
    aug = ["augment", "--data", "shapes", "--shapes-n", "8", "8", "--n", "2", "--views", "2"] + cpu
    png = [open(visualize.main(aug + ["--seed", s]), "rb").read() for s in ("0", "0", "1")]
    assert png[0] == png[1] and png[0] != png[2]
    for argv in [["views", "--ckpt", res, "--max-images", "4"], ["views", "--ckpt", res, "--batch-size", "4"],
                 ["augment", "--data", "shapes", "--max-images", "4"],
                 ["augment", "--data", "shapes", "--batch-size", "4"],
                 ["curves", "--run", d, "--device", "cpu"], ["fewshot", "--json", "x.json", "--seed", "1"],
                 ["filters", "--ckpt", res, "--max-images", "4"], ["maximize", "--ckpt", res, "--split", "train"]]:
        _argparse_rejects(argv + ["--out", d])


def test_visualize_bad_input_errors(tmp_path):
    d = str(tmp_path)
    res = _tiny_ckpt(d)
    cpu = ["--device", "cpu", "--out", d]
    json.dump({"rows": [{"protocol": "weighted kNN", "top1": 50.0}]}, open(os.path.join(d, "knn.json"), "w"))
    open(os.path.join(d, "bad.json"), "w").write("{not json")
    open(os.path.join(d, "bad.log"), "w").write("Traceback (most recent call last):\n")
    os.makedirs(os.path.join(d, "empty-run"))
    open(os.path.join(d, "empty-run", "metrics.jsonl"), "w").close()
    cases = [  # (command line, words the one-line error must contain)
        (["top-images", "--ckpt", res, "--layer", "6"], ["--layer 6 is out of range", "1..5"]),
        (["maximize", "--ckpt", res, "--layer", "0"], ["--layer 0 is out of range"]),
        (["top-images", "--ckpt", res, "--layer", "1", "--filters", "0", "8"],
         ["filter id(s) [8] out of range", "0..7"]),
        (["maximize", "--ckpt", res, "--layer", "5", "--filter", "-1"], ["[-1] out of range"]),
        (["maximize", "--ckpt", res, "--steps", "0"], ["--steps must be at least 1"]),
        (["top-images", "--ckpt", res, "--k", "0"], ["--k must be at least 1"]),
        (["top-images", "--ckpt", res, "--max-images", "0"], ["--max-images must be at least 1"]),
        (["embedding", "--ckpt", res, "--batch-size", "0"], ["--batch-size must be at least 1"]),
        (["views", "--ckpt", res, "--n", "1"], ["--n must be at least 2"]),
        (["augment", "--data", "shapes", "--views", "0"], ["--n and --views must be at least 1"]),
        (["filters", "--ckpt", os.path.join(d, "missing.pt")], ["checkpoint not found"]),
        (["curves", "--run", d], ["no metrics.jsonl"]),
        (["curves", "--run", os.path.join(d, "empty-run")], ["has no epochs"]),
        (["curves", "--run", os.path.join(d, "missing.log")], ["no such log file"]),
        (["curves", "--run", os.path.join(d, "bad.log")], ["has no progress or epoch lines"]),
        (["fewshot", "--json", os.path.join(d, "knn.json")], ["no few-shot rows"]),
        (["fewshot", "--json", os.path.join(d, "bad.json")], ["cannot read"]),
    ]
    for argv, words in cases:
        run_on = cpu if argv[0] not in ("curves", "fewshot") else ["--out", d]
        expect_exit(lambda: visualize.main(argv + run_on), *words)
    no_conv = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))
    expect_exit(lambda: visualize.first_conv(no_conv), "has no conv layers")
    expect_exit(lambda: visualize.compute_activations(no_conv, torch.zeros(2, 3, 8, 8, dtype=torch.uint8), 1),
                "has no conv layers")
    enc = common.build_backbone("resnet18", width=8, small_stem=True)
    expect_exit(lambda: visualize.compute_activations(enc, torch.zeros(0, 3, 8, 8, dtype=torch.uint8), 1),
                "empty dataset")
    expect_exit(lambda: visualize.main(["maximize", "--ckpt", res, "--layer", "9"] + cpu),
                "--layer 9 is out of range: this ResNet has layers 1..5")
    # the command line (one error line, exit status 1): test_structure.py runs every script


def test_visualize_method_figures_write_pngs(tmp_path):
    """cpc-grid (the first test image of --data), deepcluster-nmi, rotnet-per-class and imagenet-mnist-bars (what a
    run saved): each writes its PNG into --out, a folder or the .png file itself."""
    d = str(tmp_path)
    grid = visualize.main(["cpc-grid", "--data", "shapes", "--shapes-n", "8", "8", "--out", d])
    assert grid == os.path.join(d, "cpc-grid.png") and os.path.getsize(grid) > 10_000
    _check_png(grid, (1000, 500))
    path = os.path.join(d, "sub", "grid.png")  # a .png --out is the file; its folder is made
    assert visualize.main(["cpc-grid", "--data", "shapes", "--shapes-n", "8", "8", "--patch-size", "16",
                           "--pred-steps", "2", "--out", path]) == path
    _check_png(path, (1000, 500))
    with open(os.path.join(d, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps({"epoch": e, "loss": 1.0, "nmi_prev": None if e == 1 else 0.5 + 0.1 * e,
                                 "nmi_labels": 0.2 * e}) + "\n" for e in range(1, 4))
    _check_png(visualize.main(["deepcluster-nmi", "--run", d, "--out", d]), (450, 300))
    json.dump({"method": "rotnet", "test_rotation_acc_per_class": {c: i / 10 for i, c in enumerate(common.SHAPES)}},
              open(os.path.join(d, "summary.json"), "w"))
    _check_png(visualize.main(["rotnet-per-class", "--run", d, "--out", d]), (450, 300))
    json.dump({s: {"digit_error": 10.0 + i, "background_error": 50.0 - 10 * i} for i, s in
               enumerate(["digit", "background", "both", "random"])}, open(os.path.join(d, "table.json"), "w"))
    _check_png(visualize.main(["imagenet-mnist-bars", "--run", os.path.join(d, "table.json"), "--out", d]),
               (600, 320))
    assert sorted(f for f in os.listdir(d) if f.endswith(".png")) == [
        "cpc-grid.png", "deepcluster-nmi.png", "imagenet-mnist-bars.png", "rotnet-per-class.png"]


def test_visualize_draws_what_the_runs_print(tmp_path):
    """deepcluster.py, rotnet.py and imagenet_mnist.py end by printing the visualize.py command of their figure;
    that command, run as printed, draws it from the run folder."""
    from test_imagenet_mnist import write_fake_mnist
    import imagenet_mnist
    d = str(tmp_path)
    write_fake_mnist(os.path.join(d, "mnist"), 60, 30)
    tiny = ["--data", "shapes", "--shapes-n", "64", "32", "--width", "4", "--epochs", "2", "--device", "cpu",
            "--log-every", "1000"]
    runs = [(deepcluster.main, tiny + ["--batch-size", "16", "--k", "4", "--pca-dim", "8"], "nmi.png"),
            (rotnet.main, tiny + ["--batch-size", "16"], "rotation_per_class.png"),
            (imagenet_mnist.main, ["--backgrounds", "shapes", "--shapes-n", "64", "32", "--img-size", "16",
                                   "--width", "4", "--epochs", "1", "--batch-size", "32", "--knn-k", "20",
                                   "--shared", "digit", "--mnist-dir", os.path.join(d, "mnist"), "--device", "cpu",
                                   "--log-every", "1000"], "bars.png")]
    for i, (main, argv, png) in enumerate(runs):
        out = os.path.join(d, f"run{i}")
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            main(argv + ["--out", out])
        lines = [x for x in printed.getvalue().splitlines() if x.startswith("figure: python visualize.py ")]
        assert len(lines) == 1 and not os.path.exists(os.path.join(out, png)), (printed.getvalue()[-500:], lines)
        assert visualize.main(lines[0].split()[3:]) == os.path.join(out, png)
        _check_png(os.path.join(out, png), Image.open(os.path.join(out, png)).size)


def test_visualize_method_figures_bad_input(tmp_path):
    d = str(tmp_path)
    json.dump({"rows": []}, open(os.path.join(d, "other.json"), "w"))
    with open(os.path.join(d, "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"epoch": 1, "loss": 1.0}) + "\n")
    shapes = ["cpc-grid", "--data", "shapes", "--shapes-n", "8", "8"]
    cases = [  # (command line, words the one-line error must contain)
        (shapes + ["--patch-size", "5"], ["--patch-size 5 with --patch-stride 2 does not fit the 32px image"]),
        (shapes + ["--pred-steps", "7"], ["--pred-steps 7 is too large for the 7x7 grid"]),
        (["deepcluster-nmi", "--run", os.path.join(d, "missing")], ["no metrics.jsonl"]),
        (["deepcluster-nmi", "--run", d], ["has no NMI values"]),
        (["rotnet-per-class", "--run", os.path.join(d, "missing")], ["cannot read run file", "summary.json"]),
        (["rotnet-per-class", "--run", os.path.join(d, "other.json")], ["has no test_rotation_acc_per_class"]),
        (["imagenet-mnist-bars", "--run", d], ["cannot read run file", "table.json"]),
        (["imagenet-mnist-bars", "--run", os.path.join(d, "other.json")], ["has no settings"]),
    ]
    for argv, words in cases:
        expect_exit(lambda: visualize.main(argv + ["--out", d]), *words)
    for argv in [["deepcluster-nmi", "--run", d, "--device", "cpu"], ["rotnet-per-class", "--run", d, "--seed", "1"],
                 ["imagenet-mnist-bars", "--run", d, "--n", "2"], shapes + ["--ckpt", "x.pt"]]:
        _argparse_rejects(argv + ["--out", d])
    # the command line (one error line, exit status 1): test_structure.py runs every script
