"""knn_eval.py: protocols against slow references, probes, few-shot subsets, layer shapes, end to end."""
import hashlib
import json
import math
import os
import pickle
import socket
import struct
import subprocess
import sys
import tarfile
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from util import HERE, expect_exit, free_port, random_init_knn, run_script, tmpdir
import common
import deepcluster
import imagenet_mnist as im
import knn_eval
import simclr
import visualize


# kNN
# ================================================================================================================
def test_knn_predict_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    train, labels, test = torch.randn(300, 16, generator=g), torch.randint(0, 5, (300,), generator=g), torch.randn(
        40, 16, generator=g)
    for k, t in [(1, 0.1), (10, 0.07), (200, 0.1), (500, 1.0)]:
        got = knn_eval.knn_predict(train, labels, test, 5, k=k, temperature=t)
        tn, qn = F.normalize(train, dim=1), F.normalize(test, dim=1)
        for i in range(40):
            sims = [(float(qn[i] @ tn[j]), j) for j in range(300)]
            sims.sort(reverse=True)
            votes = [0.0] * 5
            for s, j in sims[:min(k, 300)]:
                votes[labels[j]] += math.exp(s / t)
            assert got[i].item() == max(range(5), key=lambda c: votes[c]), (k, t, i)
    # chunking does not change the result
    a = knn_eval.knn_scores(train, labels, test, 5, chunk=7)
    assert torch.allclose(a, knn_eval.knn_scores(train, labels, test, 5, chunk=1000))

# knn_eval.py
# ================================================================================================================
# ================================================================================================================
# knn_eval.py: protocols against slow references, probes, few-shot subsets, layer shapes, end to end, bad input
# ================================================================================================================
def test_knn_eval_weighted_knn_top5_and_1nn_match_brute_force():
    g = torch.Generator().manual_seed(1)
    train, labels, test = torch.randn(200, 8, generator=g), torch.randint(0, 7, (200,), generator=g), torch.randn(
        30, 8, generator=g)
    k, t = 100, 0.1  # every class gets votes (no ties at zero for the top-5)
    sim, idx = knn_eval.knn_neighbours(train, test, k, chunk=7)  # chunked: same as one pass
    scores = knn_eval.knn_votes(sim, idx, labels, 7, k, t)
    assert torch.allclose(scores, knn_eval.knn_scores(train, labels, test, 7, k, t))
    nn1 = knn_eval.nn1_predict(train, labels, test)
    top1, top5 = knn_eval.topk_accuracy(scores, labels[:30])
    tn, qn = F.normalize(train, dim=1), F.normalize(test, dim=1)
    hits1 = hits5 = 0
    for i in range(30):
        s = sorted(((float(qn[i] @ tn[j]), j) for j in range(200)), reverse=True)
        assert nn1[i].item() == labels[s[0][1]].item()  # 1-NN: the label of the most similar training image
        votes = [0.0] * 7
        for sij, j in s[:k]:
            votes[labels[j]] += math.exp(sij / t)
        ranked = sorted(range(7), key=lambda c: -votes[c])
        assert max(abs(votes[c] - scores[i, c].item()) for c in range(7)) < 1e-3 * max(votes)
        hits1 += ranked[0] == labels[i].item()
        hits5 += sum(votes[c] > votes[labels[i]] for c in range(7)) < 5
    assert abs(top1 - 100 * hits1 / 30) < 1e-6 and abs(top5 - 100 * hits5 / 30) < 1e-6
    assert knn_eval.topk_accuracy(scores[:, :5], labels[:30] % 5)[1] is None  # top-5 of 5 classes: not reported


def test_knn_eval_logreg_is_the_optimum_and_probe_separable_vs_random_labels():
    g = torch.Generator().manual_seed(0)
    # the fit is the minimum of the regularised objective: its gradient vanishes (slow reference in float64)
    x, y = torch.randn(300, 6, generator=g), torch.randint(0, 3, (300,), generator=g)
    lin = knn_eval.fit_logreg(x, y, 3, l2=0.01, steps=200)
    W, b = lin.weight.detach().double().requires_grad_(), lin.bias.detach().double().requires_grad_()
    loss = sum(-torch.log_softmax(W @ x[i].double() + b, 0)[y[i]] for i in range(300)) / 300 + 0.005 * (W ** 2).sum()
    gw, gb = torch.autograd.grad(loss, [W, b])
    assert gw.abs().max() < 1e-4 and gb.abs().max() < 1e-4, (gw.abs().max(), gb.abs().max())
    # linearly separable classes: near-perfect; random labels: chance
    C, D = 5, 32
    means = torch.randn(C, D, generator=g) * 3
    ytr, yte = torch.randint(0, C, (1000,), generator=g), torch.randint(0, C, (1000,), generator=g)
    xtr, xte = means[ytr] + torch.randn(1000, D, generator=g), means[yte] + torch.randn(1000, D, generator=g)
    top1, _, l2 = knn_eval.linear_probe(xtr, ytr, xte, yte, C, [1e-4, 1e-2], steps=50)
    assert top1 > 97 and l2 in (1e-4, 1e-2), top1
    top1, _, _ = knn_eval.linear_probe(xtr, torch.randint(0, C, (1000,), generator=g), xte,
                                       torch.randint(0, C, (1000,), generator=g), C, [1e-4, 1e-2], steps=50)
    assert abs(top1 - 100 / C) < 6, top1


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
    assert knn_eval.light_augment(torch.rand(4, 3, 16, 16, device=meta), 16).device == meta
    sim, idx = knn_eval.knn_neighbours(torch.randn(50, 8, device=meta), torch.randn(5, 8, device=meta), 10)
    assert knn_eval.knn_votes(sim, idx, torch.randint(0, 3, (50,), device=meta), 3, 10, 0.1).device == meta


def _ckpt(d, name="resnet18", **kw):
    torch.manual_seed(0)
    enc = common.build_backbone(name, **kw)
    path = os.path.join(d, "last.pt")
    common.save_checkpoint(path, method="simclr", args={"data": "shapes", "shapes_n": [300, 100]}, epoch=3, step=9,
                           backbone={"name": name, "kwargs": kw}, encoder=enc.state_dict(), img_size=32, data="shapes")
    return path


FAST = ["--l2-grid", "1e-4,1e-2", "--probe-steps", "30", "--shots", "10,20,50", "--device", "cpu", "--k", "20"]


def test_knn_eval_end_to_end_checkpoint_random_init_pixels():
    d = tmpdir()
    path = _ckpt(d, width=4, small_stem=True)
    r = knn_eval.main(["--ckpt", path] + FAST)  # data, sizes: the checkpoint's
    assert r["data"] == "shapes" and r["train_images"] == 300 and r["extractions"] == 2  # once per split
    protos = [row["protocol"] for row in r["rows"]]
    assert protos == ["weighted kNN", "1-NN", "linear probe"] + ["few-shot linear probe"] * 2 + ["chance"], protos
    assert [row.get("labels_per_class") for row in r["rows"][3:5]] == [10, 20]  # 50/class > 30 images: skipped
    assert all(0 <= row["top1"] <= 100 for row in r["rows"]) and r["rows"][1]["top5"] is None
    saved = json.load(open(os.path.join(d, "eval-shapes.json")))  # next to the checkpoint
    assert saved["rows"] == r["rows"] and "| weighted kNN |" in saved["table"]
    # the same weights as --random-init with the same seed give the same numbers
    r2 = knn_eval.main(["--random-init", "--data", "shapes", "--shapes-n", "300", "100", "--width", "4",
                        "--out", d] + FAST)
    assert [x["top1"] for x in r2["rows"]] == [x["top1"] for x in r["rows"]]
    r3 = knn_eval.main(["--pixels", "--data", "shapes", "--shapes-n", "300", "100", "--protocols", "knn,1nn",
                        "--out", os.path.join(d, "px.json")] + FAST)
    assert len(r3["rows"]) == 3 and os.path.exists(os.path.join(d, "px.json"))


def test_knn_eval_alexnet_layers_mlp_and_supervised_baseline():
    d = tmpdir()
    base = ["--data", "shapes", "--shapes-n", "200", "100", "--width", "4", "--out", d] + FAST
    r = knn_eval.main(["--random-init", "--backbone", "alexnet", "--protocols", "layers", "--mlp-epochs", "2"] + base)
    assert [x["setting"].split(",")[0] for x in r["rows"][:6]] == ["conv1", "conv2", "conv3", "conv4", "conv5",
                                                                     "frozen conv1-5"]
    assert "chance 10.0" in r["rows"][0]["setting"] and r["extractions"] == 2
    s = knn_eval.main(["--supervised", "--labels-per-class", "10", "--sup-steps", "15", "--sup-batch-size", "32", "--protocols", "knn",
                       "--log-every", "1000"] + base)
    assert s["rows"][0]["protocol"] == "supervised from scratch" and s["rows"][1]["protocol"] == "weighted kNN"
    enc, ckpt = common.load_encoder(os.path.join(d, "supervised.pt"))
    assert len(ckpt["labelled_indices"]) == 100 and ckpt["method"] == "supervised"
    # light augmentation: a translated window of the reflect-padded image (a constant image stays constant)
    x = torch.rand(4, 3, 16, 16)
    y = knn_eval.light_augment(x, 16)
    assert y.shape == x.shape and torch.allclose(knn_eval.light_augment(torch.full_like(x, 0.3), 16), 0.3 + 0 * x)
    assert not torch.equal(y, x) or not torch.equal(knn_eval.light_augment(x, 16), x)


def test_knn_eval_bad_input_errors():
    d = tmpdir()
    base = FAST + ["--out", d]
    expect_exit(lambda: knn_eval.main(["--ckpt", os.path.join(d, "missing.pt")] + base), "checkpoint not found")
    torch.save({"state_dict": {}}, os.path.join(d, "other.pt"))
    expect_exit(lambda: knn_eval.main(["--ckpt", os.path.join(d, "other.pt")] + base), "not a checkpoint of this project")
    torch.save({"format": common.CKPT_FORMAT, "backbone": {"name": "resnet18", "kwargs": {"width": 4}},
                "encoder": {"junk": torch.zeros(1)}}, os.path.join(d, "broken.pt"))
    expect_exit(lambda: knn_eval.main(["--ckpt", os.path.join(d, "broken.pt")] + base), "cannot be rebuilt")
    # an ImageNet-stem AlexNet cannot take 32 px images; a 1-channel input does not fit a 3-channel stem
    path = _ckpt(d, "alexnet", width=4, small=False)
    expect_exit(lambda: knn_eval.main(["--ckpt", path, "--img-size", "32"] + base), "32px images do not fit")
    enc = common.build_backbone("resnet18", width=4, small_stem=True)
    expect_exit(lambda: knn_eval.check_input_fits(enc, 1, 32, "--data x"), "1-channel images do not fit")
    sh = ["--random-init", "--data", "shapes", "--shapes-n", "50", "20", "--width", "4"]
    expect_exit(lambda: knn_eval.main(sh + base + ["--protocols", "knn,svm"]), "--protocols")
    expect_exit(lambda: knn_eval.main(sh + base + ["--labels-per-class", "5"]), "--labels-per-class needs --supervised")
    expect_exit(lambda: knn_eval.main(sh + base + ["--k", "0"]), "--k >= 1")
    expect_exit(lambda: knn_eval.main(["--supervised", "--labels-per-class", "100"] + sh[1:] + base), "fewer labelled")
    r = run_script("knn_eval.py", "--ckpt", os.path.join(d, "missing.pt"), "--device", "cpu")
    assert r.returncode == 1 and r.stderr.strip() == f"error: checkpoint not found: {os.path.join(d, 'missing.pt')}"
