"""imagenet_mnist.py: digits on backgrounds, pairs that share only what they should, eval set, end to end."""
import contextlib
import io
import json
import os
import struct

import numpy as np
import torch
import torch.nn as nn

from util import expect_exit, precision
import common
import imagenet_mnist as im


def write_fake_mnist(root, n_train=60, n_test=30):
    """MNIST idx files under root/MNIST/raw with labels 0..9 in turn; each class is a distinct, clearly drawn
    stroke pattern (1: vertical bar, 7: top bar + diagonal, others: a box with c dots) with a little jitter."""
    from PIL import Image, ImageDraw
    raw = os.path.join(root, "MNIST", "raw")
    os.makedirs(raw, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in [("train", n_train), ("t10k", n_test)]:
        labels = np.arange(n) % 10
        imgs = np.zeros((n, 28, 28), np.uint8)
        for i, c in enumerate(labels):
            im_ = Image.new("L", (28, 28), 0)
            dr = ImageDraw.Draw(im_)
            o = rng.integers(-2, 3, 2)
            if c == 1:
                dr.line([(14 + o[0], 4 + o[1]), (14 + o[0], 24 + o[1])], fill=255, width=4)
            elif c == 7:
                dr.line([(6 + o[0], 5 + o[1]), (22 + o[0], 5 + o[1])], fill=255, width=4)
                dr.line([(22 + o[0], 5 + o[1]), (10 + o[0], 24 + o[1])], fill=255, width=4)
            else:
                dr.rectangle([6 + o[0], 6 + o[1], 21 + o[0], 21 + o[1]], outline=255, width=2)
                for k in range(c):
                    dr.point((8 + 2 * k, 14), fill=255)
            imgs[i] = np.asarray(im_)
        open(os.path.join(raw, f"{prefix}-images-idx3-ubyte"), "wb").write(
            struct.pack(">IIII", 2051, n, 28, 28) + imgs.tobytes())
        open(os.path.join(raw, f"{prefix}-labels-idx1-ubyte"), "wb").write(
            struct.pack(">II", 2049, n) + labels.astype(np.uint8).tobytes())
    return root


def test_imagenet_mnist_load_digits_sorted_and_resized(tmp_path):
    d = write_fake_mnist(str(tmp_path))
    imgs, labels = im.load_digits(d, [7, 1, 3], True, 14)
    assert imgs.shape == (18, 1, 14, 14) and imgs.dtype == torch.uint8
    assert labels.tolist() == [0] * 6 + [1] * 6 + [2] * 6  # position in --digits, sorted
    # class 0 is the digit 7 of the files: its top rows are bright, the vertical "1" (class 1) is not
    assert imgs[:6, 0, 2:4].float().mean() > imgs[6:12, 0, 2:4].float().mean() + 30


def test_imagenet_mnist_paste_digits_matches_slice_assignment():
    torch.manual_seed(0)
    for size, dsz in [(32, 16), (20, 20), (9, 3)]:
        digits = torch.rand(5, 1, dsz, dsz)
        corners = torch.randint(0, size - dsz + 1, (5, 2))
        got = im.paste_digits(digits, size, corners)
        ref = torch.zeros(5, 1, size, size)
        for i in range(5):
            x0, y0 = corners[i].tolist()
            ref[i, :, y0:y0 + dsz, x0:x0 + dsz] = digits[i]
        assert torch.allclose(got, ref, atol=1e-5), (size, dsz, (got - ref).abs().max())
    # compose: background + digit, clipped to [0, 1], digits only add
    bg = torch.rand(4, 3, 16, 16)
    dig = torch.full((4, 1, 8, 8), 255, dtype=torch.uint8)
    x = im.compose(bg, dig, generator=torch.Generator().manual_seed(1))
    assert x.max() <= 1 and (x >= bg - 1e-6).all() and ((x == 1).flatten(1).sum(1) >= 3 * 64).all()


def test_imagenet_mnist_pairs_share_only_what_they_should():
    """The shared factor is the same image in both views; the other one is drawn independently for each view, so it
    agrees as often as chance: with 10 equally frequent digit classes P(same digit class) = 1/10 in the background
    setting (the old sampler forced another class: 0), and P(same background image) = 1/n in the digit setting."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(10).repeat_interleave(7)  # 70 digit images, 10 classes, sorted as load_digits returns
    n_bg, N = 5, 20000
    idx = torch.randint(0, n_bg, (N,), generator=gen)
    bg1, bg2, dg1, dg2 = im.sample_pairs("background", idx, n_bg, len(labels), gen)
    assert torch.equal(bg1, idx) and torch.equal(bg2, bg1)  # the same background image
    same_digit = (labels[dg1] == labels[dg2]).float().mean().item()
    assert abs(same_digit - 0.1) < 0.01, same_digit  # 3 standard errors = 0.0064
    assert (dg1 == dg2).float().mean().item() < 0.03 and len(set(dg2.tolist())) == 70
    bg1, bg2, dg1, dg2 = im.sample_pairs("digit", idx, n_bg, len(labels), gen)
    assert torch.equal(bg1, idx) and torch.equal(dg1, dg2)  # the same digit image
    same_bg = (bg1 == bg2).float().mean().item()
    assert abs(same_bg - 1 / n_bg) < 0.015, same_bg  # 3 standard errors = 0.0085
    assert bg2.min() == 0 and bg2.max() == n_bg - 1 and len(set(dg1.tolist())) == 70
    bg1, bg2, dg1, dg2 = im.sample_pairs("both", idx, n_bg, len(labels), gen)
    assert torch.equal(bg1, bg2) and torch.equal(dg1, dg2) and len(set(dg1.tolist())) == 70
    # the composed views: what is shared is the same image in both, before each view's own augmentation
    bgs = torch.randint(0, 256, (n_bg, 3, 16, 16), dtype=torch.uint8, generator=gen)
    digs = torch.randint(0, 256, (70, 1, 8, 8), dtype=torch.uint8, generator=gen)
    torch.manual_seed(0)
    v1, v2 = im.make_views("both", idx[:8], bgs, digs, 16, 0.3, 0.5, torch.device("cpu"))
    assert v1.shape == v2.shape == (8, 3, 16, 16) and not torch.equal(v1, v2)  # independent augmentations


def test_imagenet_mnist_eval_set_is_seeded_and_labelled(tmp_path):
    bg = common.make_shapes(40, 16, seed=0)
    d = write_fake_mnist(str(tmp_path))
    digits = im.load_digits(d, [1, 7], False, 8)
    a, ya = im.make_eval_split(bg, *digits, seed=3)
    b, yb = im.make_eval_split(bg, *digits, seed=3)
    c, yc = im.make_eval_split(bg, *digits, seed=4)
    assert torch.equal(a.images, b.images) and torch.equal(ya, yb)
    assert not torch.equal(a.images, c.images)
    assert a.images.shape == (40, 3, 16, 16) and a.images.dtype == torch.uint8
    assert torch.equal(a.labels, bg.labels) and set(ya.tolist()) == {0, 1}
    assert (a.images.int() >= bg.images.int() - 1).all()  # the digit only adds light
    # --max-images: a seeded subset, in the original order, with its labels
    s1, s2 = im.subset(bg, 10, seed=0), im.subset(bg, 10, seed=0)
    assert len(s1) == 10 and torch.equal(s1.images, s2.images) and im.subset(bg, 100, 0) is bg
    rows = [next(i for i in range(40) if torch.equal(bg.images[i], x)) for x in s1.images]
    assert rows == sorted(rows) and torch.equal(s1.labels, bg.labels[rows])


def test_imagenet_mnist_bad_input_errors(tmp_path):
    d, few, broken = (str(tmp_path / name) for name in ("mnist", "few", "broken"))
    write_fake_mnist(d)
    write_fake_mnist(few, n_train=5, n_test=5)  # labels 0..4 only
    write_fake_mnist(broken)
    open(os.path.join(broken, "MNIST", "raw", "train-images-idx3-ubyte"), "wb").write(b"\x00\x00")
    torch.save({"format": common.CKPT_FORMAT, "method": "simclr", "args": {}}, os.path.join(d, "s.pt"))
    base = ["--backgrounds", "shapes", "--shapes-n", "64", "16", "--img-size", "16", "--width", "4",
            "--device", "cpu", "--out", str(tmp_path / "run"), "--mnist-dir", d, "--epochs", "1", "--batch-size", "32"]
    cases = [  # (flags added to base, words the one-line error must contain)
        (["--digits", "3"], ["--digits", "at least two"]),
        (["--digits", "3", "3"], ["--digits"]),
        (["--digits", "1", "12"], ["--digits", "0-9"]),
        (["--digit-scale", "1.5"], ["--digit-scale"]),
        (["--epochs", "0"], ["--epochs"]),
        (["--temperature", "0"], ["--temperature"]),  # SimCLR's flags, checked by simclr.check_args
        (["--crop-min-scale", "1.5"], ["--crop-min-scale"]),
        (["--max-images", "-1"], ["--max-images"]),
        (["--batch-size", "128"], ["larger than the dataset"]),
        (["--backgrounds", "no-such-set"], ["unknown dataset"]),
        (["--resume", os.path.join(d, "missing.pt")], ["checkpoint not found"]),
        (["--resume", os.path.join(d, "s.pt")], ["simclr checkpoint"]),
        (["--mnist-dir", few, "--digits", "1", "8"], ["no images of digit 8"]),
        (["--mnist-dir", broken], ["could not download or read MNIST"]),
    ]
    for flags, words in cases:
        expect_exit(lambda: im.main(base + flags), *words)
    expect_exit(lambda: im.main(base + ["--digits", "5"]), "--digits needs at least two different classes")
    # the command line (one error line, exit status 1): test_structure.py runs every script


class _Seen(Exception):
    pass


def test_imagenet_mnist_channels_last_flag_acts(tmp_path):
    """--channels-last on/off decides the memory format of the training views and the model (checked at the first
    training forward call, which is stopped there: oneDNN's channels_last crashes on some AVX2 CPUs)."""
    d = write_fake_mnist(str(tmp_path / "mnist"))
    base = ["--backgrounds", "shapes", "--shapes-n", "64", "32", "--img-size", "16", "--width", "4", "--shared",
            "digit", "--device", "cpu", "--mnist-dir", d, "--batch-size", "32", "--epochs", "1"]
    seen = []

    def hook(module, inputs):
        if isinstance(module, common.ResNet) and module.training:
            seen.append((inputs[0].is_contiguous(memory_format=torch.channels_last),
                         module.conv1.weight.is_contiguous(memory_format=torch.channels_last)))
            raise _Seen
    handle = nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        for i, flag in enumerate(["on", "off"]):
            try:
                with contextlib.redirect_stdout(io.StringIO()), precision("off", flag):
                    im.main(base + ["--channels-last", flag, "--out", str(tmp_path / f"run{i}")])
            except _Seen:
                pass
    finally:
        handle.remove()
    assert seen == [(True, True), (False, False)], seen


def test_imagenet_mnist_end_to_end_all_settings_and_resume(tmp_path):
    """The whole experiment on tiny data: three settings, random init, table files; then a resumed setting."""
    d, out, two = (str(tmp_path / name) for name in ("mnist", "run", "run2"))
    write_fake_mnist(d, 60, 30)
    base = ["--backgrounds", "shapes", "--shapes-n", "64", "32", "--img-size", "16", "--width", "4",
            "--device", "cpu", "--mnist-dir", d, "--batch-size", "32", "--knn-k", "20", "--log-every", "1000",
            "--warmup-epochs", "1"]  # a warm-up of the first epoch: its lr is the same in 1- and 2-epoch runs
    s = im.main(base + ["--epochs", "1", "--out", out])
    assert set(s["rows"]) == {"digit", "background", "both", "random"}
    for row in s["rows"].values():
        assert 0 <= row["digit_error"] <= 100 and 0 <= row["background_error"] <= 100
    assert set(s["paper_pattern"]) == {"digit_views_best_for_digits", "background_views_better_for_backgrounds",
                                       "both_background_dominates"}
    md = open(os.path.join(out, "table.md")).read()
    assert md.count("\n") == 6 and "| digit, background |" in md and "| random init |" in md
    assert json.load(open(os.path.join(out, "table.json")))["digit"]["epochs"] == 1
    enc, ck = common.load_encoder(os.path.join(out, "digit", "last.pt"))  # checkpoints load as encoders
    assert ck["setting"] == "digit" and ck["epoch"] == 1 and ck["step"] == 2
    assert ck["args"]["jitter_strength"] == 0.5 and ck["args"]["warmup_epochs"] == 1  # resolved defaults are saved
    # resuming one setting to 2 epochs == 2 epochs in one go
    a = im.main(base + ["--shared", "both", "--epochs", "2", "--out", two])
    b = im.main(["--resume", os.path.join(out, "both", "last.pt"), "--epochs", "2", "--shared", "both"])
    m1 = [json.loads(x) for x in open(os.path.join(two, "both", "metrics.jsonl"))]
    m2 = [json.loads(x) for x in open(os.path.join(out, "both", "metrics.jsonl"))]
    assert [r["epoch"] for r in m2] == [1, 2]
    assert all(abs(x["loss"] - y["loss"]) < 1e-4 for x, y in zip(m1, m2)), (m1, m2)
    assert abs(a["rows"]["both"]["digit_error"] - b["rows"]["both"]["digit_error"]) < 1e-6
    # the random-init row is every setting's starting encoder: the same in every run
    assert a["rows"]["random"] == b["rows"]["random"] == s["rows"]["random"]
