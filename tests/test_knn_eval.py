"""knn_eval.py: protocols against slow references, probes, few-shot subsets, layer shapes, the encoder's device,
flags that act, end to end, bad input."""
import contextlib
import io
import json
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from util import expect_exit, precision
import common
import knn_eval


def _args(*flags):
    """knn_eval's parsed and checked flags (what main() hands to the protocol functions)."""
    args = knn_eval.get_args(["--random-init", *flags])[1]
    knn_eval.check_args(args)
    return args


# ================================================================================================================
# 1-2. weighted kNN and 1-NN
# ================================================================================================================
def test_knn_predict_matches_brute_force():
    gen = torch.Generator().manual_seed(0)
    train, labels, test = torch.randn(300, 16, generator=gen), torch.randint(0, 5, (300,), generator=gen), torch.randn(
        40, 16, generator=gen)
    for k, t in [(1, 0.1), (10, 0.07), (200, 0.1), (500, 1.0)]:
        got = common.knn_predict(train, labels, test, 5, k=k, temperature=t)
        tn, qn = F.normalize(train, dim=1), F.normalize(test, dim=1)
        for i in range(40):
            sims = [(float(qn[i] @ tn[j]), j) for j in range(300)]
            sims.sort(reverse=True)
            votes = [0.0] * 5
            for s, j in sims[:min(k, 300)]:
                votes[labels[j]] += math.exp(s / t)
            assert got[i].item() == max(range(5), key=lambda c: votes[c]), (k, t, i)
    # chunking does not change the result
    a = common.knn_scores(train, labels, test, 5, chunk=7)
    assert torch.allclose(a, common.knn_scores(train, labels, test, 5, chunk=1000))


def test_knn_eval_weighted_knn_top5_and_1nn_match_brute_force():
    """eval_knn (the protocol main() runs): its weighted-kNN top-1/top-5 and its 1-NN top-1 (the same votes with
    k = 1) equal a per-query brute-force loop, with and without the kNN protocol beside the 1-NN."""
    gen = torch.Generator().manual_seed(1)
    train, labels = torch.randn(200, 8, generator=gen), torch.randint(0, 7, (200,), generator=gen)
    test, test_y = train[:30] + 0.8 * torch.randn(30, 8, generator=gen), labels[:30]  # 1-NN right for some
    k, t = 100, 0.1  # every class gets votes (no ties at zero for the top-5)
    sim, idx = common.knn_neighbours(train, test, k, chunk=7)  # chunked: same as one pass
    scores = common.knn_votes(sim, idx, labels, 7, k, t)
    assert torch.allclose(scores, common.knn_scores(train, labels, test, 7, k, t))
    knn_row, nn1_row = knn_eval.eval_knn(train, labels, test, test_y, 7, _args("--k", "100", "--temperature", "0.1"))
    assert knn_eval.eval_knn(train, labels, test, test_y, 7, _args("--protocols", "1nn")) == [nn1_row]
    tn, qn = F.normalize(train, dim=1), F.normalize(test, dim=1)
    hits1 = hits5 = nn1_hits = 0
    for i in range(30):
        s = sorted(((float(qn[i] @ tn[j]), j) for j in range(200)), reverse=True)
        nn1_hits += labels[s[0][1]].item() == test_y[i].item()  # 1-NN: the label of the most similar training image
        votes = [0.0] * 7
        for sij, j in s[:k]:
            votes[labels[j]] += math.exp(sij / t)
        ranked = sorted(range(7), key=lambda c: -votes[c])
        assert max(abs(votes[c] - scores[i, c].item()) for c in range(7)) < 1e-3 * max(votes)
        hits1 += ranked[0] == test_y[i].item()
        hits5 += sum(votes[c] > votes[test_y[i]] for c in range(7)) < 5
    assert 0 < nn1_hits < 30, nn1_hits
    assert (knn_row["protocol"], knn_row["setting"]) == ("weighted kNN", "k=100, τ=0.1, cosine")
    assert abs(knn_row["top1"] - 100 * hits1 / 30) < 1e-4 and abs(knn_row["top5"] - 100 * hits5 / 30) < 1e-4
    assert nn1_row["protocol"] == "1-NN" and abs(nn1_row["top1"] - 100 * nn1_hits / 30) < 1e-4
    assert knn_eval.topk_accuracy(scores[:, :5], test_y % 5)[1] is None  # top-5 of 5 classes: not reported


# ================================================================================================================
# 3-4. linear and few-shot probes
# ================================================================================================================
def test_knn_eval_logreg_is_the_optimum_and_probe_separable_vs_random_labels():
    gen = torch.Generator().manual_seed(0)
    # the fit is the minimum of the regularised objective: its gradient vanishes (slow reference in float64)
    x, y = torch.randn(300, 6, generator=gen), torch.randint(0, 3, (300,), generator=gen)
    lin = knn_eval.fit_logreg(x, y, 3, l2=0.01, steps=200)
    W, b = lin.weight.detach().double().requires_grad_(), lin.bias.detach().double().requires_grad_()
    loss = sum(-torch.log_softmax(W @ x[i].double() + b, 0)[y[i]] for i in range(300)) / 300 + 0.005 * (W ** 2).sum()
    gw, gb = torch.autograd.grad(loss, [W, b])
    assert gw.abs().max() < 1e-4 and gb.abs().max() < 1e-4, (gw.abs().max(), gb.abs().max())
    # linearly separable classes: near-perfect; random labels: chance
    C, D = 5, 32
    means = torch.randn(C, D, generator=gen) * 3
    ytr, yte = torch.randint(0, C, (1000,), generator=gen), torch.randint(0, C, (1000,), generator=gen)
    xtr, xte = means[ytr] + torch.randn(1000, D, generator=gen), means[yte] + torch.randn(1000, D, generator=gen)
    top1, _, l2 = knn_eval.linear_probe(xtr, ytr, xte, yte, C, [1e-4, 1e-2], steps=50)
    assert top1 > 97 and l2 in (1e-4, 1e-2), top1
    top1, _, _ = knn_eval.linear_probe(xtr, torch.randint(0, C, (1000,), generator=gen), xte,
                                       torch.randint(0, C, (1000,), generator=gen), C, [1e-4, 1e-2], steps=50)
    assert abs(top1 - 100 / C) < 6, top1
    # the protocol functions: --l2-grid is the grid searched (a one-value grid is that value), --shots the subsets
    args = _args("--l2-grid", "0.5", "--probe-steps", "20", "--shots", "10,300")
    row, = knn_eval.eval_linear(xtr, ytr, xte, yte, C, args)
    assert row["l2"] == 0.5 and row["setting"].startswith("all 1000 labels, L2 0.5") and row["top1"] > 90
    rows = knn_eval.eval_fewshot(xtr, ytr, xte, yte, C, args)  # 300 per class: more than a class has, skipped
    assert [(r["labels_per_class"], r["l2"]) for r in rows] == [(10, 0.5)] and rows[0]["top1"] > 80, rows


def test_knn_eval_few_shot_subsets_exact_reproducible_and_heldout_split():
    labels = torch.arange(1000) % 7
    labels[labels == 6] = 5  # class 5 has twice as many images, class 6 none -> 6 classes
    a = knn_eval.per_class_indices(labels, 20, seed=3)
    assert torch.equal(a, knn_eval.per_class_indices(labels, 20, seed=3))  # same seed, same subset
    assert not torch.equal(a, knn_eval.per_class_indices(labels, 20, seed=4))
    assert torch.bincount(labels[a]).tolist() == [20] * 6 and len(a.unique()) == 120
    assert knn_eval.per_class_indices(labels, 200, seed=0) is None  # classes have 142-143 images
    assert knn_eval.per_class_indices(labels, 10, seed=0, num_classes=7) is None  # a class with no images
    tr, va = knn_eval.heldout_split(labels, 0.1, seed=0)
    assert len(set(tr.tolist()) & set(va.tolist())) == 0 and len(tr) + len(va) == 1000
    counts = torch.bincount(labels[va])
    assert all(abs(counts[c].item() - 0.1 * (labels == c).sum().item()) <= 1 for c in range(6))
    tr, va = knn_eval.heldout_split(torch.zeros(20, dtype=torch.long), 0.1)  # 20 images of one class: 2 held out
    assert len(va) == 2 and len(tr) == 18


# ================================================================================================================
# 5. AlexNet per-layer features; the encoder's device
# ================================================================================================================
def test_knn_eval_alexnet_layer_probe_shapes_32_and_224():
    for size, small in [(32, True), (224, False)]:
        net = common.build_backbone("alexnet", width=16, small=small).eval()
        layers = knn_eval.AlexNetLayers(net, size, layer_dim=256)
        x = torch.rand(2, 3, size, size)
        with torch.no_grad():
            out, maps = layers(x), net.conv_features(x)
        c = [m[0].out_channels for m in net.convs]
        assert out.shape == (2, sum(layers.sizes)) and len(layers.sizes) == 6
        for l in range(5):  # C_l p^2 with the grid p chosen so that C_l p^2 ~ 256
            p = math.isqrt(layers.sizes[l] // c[l])
            assert layers.sizes[l] == c[l] * p * p and 0.25 * 256 <= layers.sizes[l] <= 4 * 256, (size, l, p)
        assert layers.sizes[5] == c[4] * (16 if small else 36)  # what fc6 sees
        p = math.isqrt(layers.sizes[2] // c[2])  # conv3's part of the concatenation is its pooled map
        start = sum(layers.sizes[:2])
        assert torch.allclose(out[:, start:start + layers.sizes[2]], F.adaptive_avg_pool2d(maps[2], p).flatten(1))


def test_knn_eval_setup_follows_the_encoder_device():
    """Issue 11 defect 1: every tensor knn_eval creates follows the encoder's device. With the encoder on `meta`
    (a non-CPU device on any machine), the per-layer probe set-up (its probe pass), the input check, the supervised
    baseline's augmentation and the neighbour votes run, and their outputs stay on `meta`."""
    meta = torch.device("meta")
    cpu_sizes = knn_eval.AlexNetLayers(common.build_backbone("alexnet", width=4, small=True), 32, 64).sizes
    net = common.build_backbone("alexnet", width=4, small=True).to(meta)
    layers = knn_eval.AlexNetLayers(net, 32, layer_dim=64)  # crashed: its probe batch was built on the CPU
    assert layers.sizes == cpu_sizes
    out = layers(torch.zeros(2, 3, 32, 32, device=meta))
    assert out.device == meta and out.shape == (2, sum(cpu_sizes))
    knn_eval.check_input_fits(net, 3, 32, "--data x")
    assert common.light_augment(torch.rand(4, 3, 16, 16, device=meta), 16).device == meta
    sim, idx = common.knn_neighbours(torch.randn(50, 8, device=meta), torch.randn(5, 8, device=meta), 10)
    assert common.knn_votes(sim, idx, torch.randint(0, 3, (50,), device=meta), 3, 10, 0.1).device == meta


# ================================================================================================================
# end to end, flags, bad input
# ================================================================================================================
def _ckpt(d, name="resnet18", seed=None, **kw):
    torch.manual_seed(0)
    enc = common.build_backbone(name, **kw)
    path = os.path.join(d, "last.pt")
    args = {"data": "shapes", "shapes_n": [300, 100], **({"seed": seed} if seed is not None else {})}
    common.save_checkpoint(path, method="simclr", args=args, epoch=3, step=9,
                           backbone={"name": name, "kwargs": kw}, encoder=enc.state_dict(), img_size=32, data="shapes")
    return path


CPU, KNN = ["--device", "cpu"], ["--k", "20"]
PROBES = ["--l2-grid", "1e-4,1e-2", "--probe-steps", "30"]
FAST = CPU + KNN + PROBES + ["--shots", "10,20,50"]  # every protocol but layers


def test_knn_eval_end_to_end_checkpoint_random_init_pixels(tmp_path):
    d = str(tmp_path)
    path = _ckpt(d, width=4, small_stem=True)
    r = knn_eval.main(["--ckpt", path] + FAST)  # data, sizes: the checkpoint's
    assert r["data"] == "shapes" and r["train_images"] == 300 and r["extractions"] == 2  # once per split
    protos = [row["protocol"] for row in r["rows"]]
    assert protos == ["weighted kNN", "1-NN", "linear probe"] + ["few-shot linear probe"] * 2 + ["chance"], protos
    assert [row.get("labels_per_class") for row in r["rows"][3:5]] == [10, 20]  # 50/class > 30 images: skipped
    assert all(0 <= row["top1"] <= 100 for row in r["rows"]) and r["rows"][1]["top5"] is None
    assert r["rows"][0]["setting"].startswith("k=20,") and {"knn_s", "linear_s", "extract_s"} <= set(r)
    saved = json.load(open(os.path.join(d, "eval-shapes.json")))  # next to the checkpoint
    assert saved["rows"] == r["rows"] and "| weighted kNN |" in saved["table"]
    # the same weights as --random-init with the same seed give the same numbers
    r2 = knn_eval.main(["--random-init", "--data", "shapes", "--shapes-n", "300", "100", "--width", "4",
                        "--out", d] + FAST)
    assert [x["top1"] for x in r2["rows"]] == [x["top1"] for x in r["rows"]]
    # --pixels; --batch-size and --log-every: a progress line every 2 of the 3 batches of each split, and the last
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        r3 = knn_eval.main(["--pixels", "--data", "shapes", "--shapes-n", "300", "100", "--protocols", "knn,1nn",
                            "--out", os.path.join(d, "px.json"), "--batch-size", "40", "--log-every", "2"] + CPU + KNN)
    assert len(r3["rows"]) == 3 and os.path.exists(os.path.join(d, "px.json"))
    progress = [line.split(" batches")[0] for line in out.getvalue().splitlines() if " batches |" in line]
    assert progress == ["memory split: features 2/8", "memory split: features 4/8", "memory split: features 6/8",
                        "memory split: features 8/8", "test split: features 2/3", "test split: features 3/3"], progress


def test_knn_eval_reads_a_shapes_checkpoint_with_the_runs_seed(tmp_path):
    """shapes draws its images from --seed: a checkpoint trained with --seed 1 is evaluated on the seed-1 images
    unless --seed is given again (it used to take knn_eval's default seed 0, i.e. other images)."""
    path = _ckpt(str(tmp_path), seed=1, width=4, small_stem=True)
    knn = ["--protocols", "knn"] + CPU + KNN
    top1 = lambda extra: knn_eval.main(["--ckpt", path] + knn + extra)["rows"][0]["top1"]
    default, one, zero = top1([]), top1(["--seed", "1"]), top1(["--seed", "0"])
    assert default == one and default != zero, (default, one, zero)


def test_knn_eval_alexnet_layers_mlp_and_supervised_baseline(tmp_path):
    d = str(tmp_path)
    base = ["--data", "shapes", "--shapes-n", "200", "100", "--width", "4", "--out", d] + CPU
    r = knn_eval.main(["--random-init", "--backbone", "alexnet", "--protocols", "layers", "--mlp-epochs", "2",
                       "--layer-dim", "64"] + base + PROBES)
    assert [x["setting"].split(",")[0] for x in r["rows"][:6]] == ["conv1", "conv2", "conv3", "conv4", "conv5",
                                                                     "frozen conv1-5"]
    dims = [int(x["setting"].split(", ")[1].split("-d")[0]) for x in r["rows"][:5]]
    assert all(16 <= n <= 256 for n in dims), dims  # --layer-dim 64: each conv map pooled to about 64 features
    assert "chance 10.0" in r["rows"][0]["setting"] and r["extractions"] == 2 and "layers_s" in r
    s = knn_eval.main(["--supervised", "--labels-per-class", "10", "--sup-steps", "15", "--sup-batch-size", "32",
                       "--protocols", "knn", "--log-every", "1000"] + base + KNN)
    assert s["rows"][0]["protocol"] == "supervised from scratch" and s["rows"][1]["protocol"] == "weighted kNN"
    assert s["rows"][0]["setting"] == "10 labels/class, 15 steps"
    enc, ckpt = common.load_encoder(os.path.join(d, "supervised.pt"))
    assert len(ckpt["labelled_indices"]) == 100 and ckpt["method"] == "supervised"
    # light augmentation: a translated window of the reflect-padded image (a constant image stays constant)
    x = torch.rand(4, 3, 16, 16)
    y = common.light_augment(x, 16)
    assert y.shape == x.shape and torch.allclose(common.light_augment(torch.full_like(x, 0.3), 16), 0.3 + 0 * x)
    assert not torch.equal(y, x) or not torch.equal(common.light_augment(x, 16), x)


class _Seen(Exception):
    pass


def test_knn_eval_channels_last_and_amp_flags_act(tmp_path):
    """--channels-last decides the memory format of the evaluated encoder and of the supervised baseline's model and
    inputs; --amp its autocast. Checked at the first forward call, which is stopped there (oneDNN's channels_last
    crashed on some AVX2 CPUs)."""
    seen = []

    def hook(module, inputs):
        if isinstance(module, common.ResNet):
            seen.append((module.training, inputs[0].is_contiguous(memory_format=torch.channels_last),
                         module.conv1.weight.is_contiguous(memory_format=torch.channels_last),
                         torch.is_autocast_enabled("cpu")))
            raise _Seen
    base = ["--data", "shapes", "--shapes-n", "50", "20", "--width", "4", "--out", str(tmp_path)] + CPU
    handle = nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        for flags, amp, layout in [(["--random-init", "--channels-last", "on"], "off", "on"),
                                   (["--random-init", "--channels-last", "off"], "off", "off"),
                                   (["--supervised", "--labels-per-class", "2", "--channels-last", "on", "--amp",
                                     "bf16"], "bf16", "on"),
                                   (["--supervised", "--labels-per-class", "2", "--channels-last", "off", "--amp",
                                     "off"], "off", "off")]:
            try:
                with contextlib.redirect_stdout(io.StringIO()), precision(amp, layout):
                    knn_eval.main(flags + base)
            except _Seen:
                pass
    finally:
        handle.remove()
    # the encoder's first forward is the input check (eval mode, blank NCHW batch); then the supervised training step
    assert seen == [(False, False, True, False), (False, False, False, False), (True, True, True, True),
                    (True, False, False, False)], seen


def test_knn_eval_flags_that_would_not_act_are_rejected(tmp_path):
    """A flag written on the command line that this run would ignore stops it with an error naming the flag."""
    path = _ckpt(str(tmp_path), width=4, small_stem=True)
    cases = [  # (command line, words of the error)
        (["--random-init", "--protocols", "linear", "--k", "5"], ["--k", "knn protocol"]),
        (["--random-init", "--protocols", "1nn", "--temperature", "0.5"], ["--temperature", "knn protocol"]),
        (["--random-init", "--protocols", "knn", "--shots", "10"], ["--shots", "fewshot"]),
        (["--random-init", "--protocols", "knn,1nn", "--l2-grid", "1e-3"], ["--l2-grid", "linear"]),
        (["--random-init", "--protocols", "knn", "--val-fraction", "0.2"], ["--val-fraction"]),
        (["--random-init", "--protocols", "knn", "--probe-steps", "5"], ["--probe-steps"]),
        (["--random-init", "--layer-dim", "64"], ["--layer-dim", "layers"]),  # a ResNet: no per-layer probes
        (["--random-init", "--backbone", "alexnet", "--protocols", "knn", "--mlp-hidden", "8"], ["--mlp-hidden"]),
        (["--random-init", "--protocols", "layers"], ["--protocols layers", "AlexNet", "resnet18"]),
        (["--random-init", "--labels-per-class", "5"], ["--labels-per-class", "--supervised"]),
        (["--random-init", "--sup-steps", "5"], ["--sup-steps", "--supervised"]),
        (["--ckpt", path, "--width", "8"], ["--width", "checkpoint"]),
        (["--ckpt", path, "--backbone", "alexnet"], ["--backbone"]),
        (["--pixels", "--width", "8"], ["--width"]),
        (["--random-init", "--no-sobel"], ["--no-sobel", "AlexNet"]),
        (["--pixels", "--amp", "off"], ["--amp", "--pixels"]),
        (["--pixels", "--channels-last", "off"], ["--channels-last", "--pixels"]),
        (["--random-init", "--data", "data/cifar10", "--shapes-n", "9", "9"], ["--shapes-n", "shapes"]),
        (["--random-init", "--imagenette-size", "320px"], ["--imagenette-size"]),
        (["--random-init", "--data-dir", str(tmp_path)], ["--data-dir"]),
    ]
    for argv, words in cases:
        expect_exit(lambda: knn_eval.main(argv + CPU), *words)


def test_knn_eval_bad_input_errors(tmp_path):
    d = str(tmp_path)
    missing, other, broken = (os.path.join(d, f) for f in ("missing.pt", "other.pt", "broken.pt"))
    torch.save({"state_dict": {}}, other)
    torch.save({"format": common.CKPT_FORMAT, "backbone": {"name": "resnet18", "kwargs": {"width": 4}},
                "encoder": {"junk": torch.zeros(1)}}, broken)
    alexnet224 = _ckpt(d, "alexnet", width=4, small=False)  # an ImageNet-stem AlexNet cannot take 32 px images
    sh = ["--random-init", "--data", "shapes", "--shapes-n", "50", "20", "--width", "4"]
    cases = [  # (command line, words of the error)
        (["--ckpt", missing], ["checkpoint not found"]),
        (["--ckpt", other], ["not a checkpoint of this project"]),
        (["--ckpt", broken], ["cannot be rebuilt"]),
        (["--ckpt", alexnet224, "--img-size", "32"], ["32px images do not fit"]),
        (sh + ["--protocols", "knn,svm"], ["--protocols", "svm"]),
        (sh + ["--protocols", ","], ["--protocols", "none"]),
        (sh + ["--k", "0"], ["--k >= 1"]),
        (sh + ["--temperature", "0"], ["--temperature > 0"]),
        (sh + ["--shots", "0,10"], ["--shots >= 1"]),
        (sh + ["--shots", "ten"], ["comma-separated numbers"]),
        (sh + ["--l2-grid", ","], ["--l2-grid"]),
        (sh + ["--val-fraction", "1"], ["--val-fraction"]),
        (sh + ["--batch-size", "0"], ["--batch-size >= 1"]),
        (sh + ["--log-every", "0"], ["--log-every >= 1"]),
        (["--supervised", "--labels-per-class", "0"] + sh[1:], ["--labels-per-class >= 1"]),
        (["--supervised", "--sup-steps", "0"] + sh[1:], ["--sup-steps >= 1"]),
        (["--supervised", "--labels-per-class", "100"] + sh[1:], ["fewer labelled"]),
    ]
    for argv, words in cases:
        expect_exit(lambda: knn_eval.main(argv + CPU + ["--out", d]), *words)
    enc = common.build_backbone("resnet18", width=4, small_stem=True)  # a 1-channel input, a 3-channel stem
    expect_exit(lambda: knn_eval.check_input_fits(enc, 1, 32, "--data x"), "1-channel images do not fit")
    # the command line (one error line, exit status 1): test_structure.py runs every script


def test_knn_eval_nin_layer_probes_list_its_four_blocks(tmp_path):
    """--protocols layers on a NIN (rotnet.py --backbone nin): a linear probe on each of block1 ... block4, each
    block's output average-pooled to about --layer-dim features, then the MLP probe on block 2's whole map (the
    RotNet paper's non-linear classifier on the second block)."""
    net = common.build_backbone("nin", width=4).eval()
    layers = knn_eval.NINLayers(net, 32, layer_dim=64)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        out, maps = layers(x), net.block_features(x)
    assert layers.names == ["block1", "block2", "block3", "block4", "frozen block1-2"]
    assert len(layers.sizes) == 5 and layers.sizes[4] == 12 * 8 * 8 and out.shape == (2, sum(layers.sizes))
    assert torch.allclose(out[:, -layers.sizes[4]:], maps[1].flatten(1))
    r = knn_eval.main(["--random-init", "--backbone", "nin", "--width", "4", "--data", "shapes", "--shapes-n", "100",
                       "50", "--protocols", "layers", "--mlp-epochs", "1", "--layer-dim", "64", "--out",
                       str(tmp_path)] + CPU + PROBES)
    assert [x["setting"].split(",")[0] for x in r["rows"][:5]] == layers.names and r["rows"][5]["protocol"] == "chance"
    assert [x["protocol"] for x in r["rows"][:5]] == ["layer linear probe"] * 4 + ["MLP probe"]


def test_knn_eval_features_head_needs_a_moco_checkpoint(tmp_path):
    """--features head reads a moco.py checkpoint's projection head; on another method's checkpoint, or without
    --ckpt, it stops with one line."""
    d = str(tmp_path)
    path = _ckpt(d, width=4, small_stem=True)  # a simclr checkpoint
    expect_exit(lambda: knn_eval.main(["--ckpt", path, "--features", "head"] + CPU + KNN), "--features head",
                "simclr checkpoint", "moco.py")
    expect_exit(lambda: knn_eval.main(["--random-init", "--features", "head", "--data", "shapes", "--shapes-n", "50",
                                       "20", "--width", "4"] + CPU), "--features", "--ckpt")
