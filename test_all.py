"""Every test of the project. Runs on a CPU in minutes, offline, on data the tests make themselves.

    python test_all.py                 # ends with "N passed, N failed"; exit status 1 if any failed
    python test_all.py nt_xent resume  # only tests whose name contains one of these words
    python -m pytest test_all.py       # the same tests under pytest
"""
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
import tempfile
import time
import traceback

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import common  # noqa: E402
import deepcluster  # noqa: E402
import imagenet_mnist as im  # noqa: E402
import knn_eval  # noqa: E402
import simclr  # noqa: E402
import visualize  # noqa: E402

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", min(2, os.cpu_count() or 1))))


def tmpdir():
    return tempfile.mkdtemp(prefix="ssl-test-")


def expect_exit(fn, *words):
    """fn() must stop with SystemExit whose one-line message contains every word."""
    try:
        fn()
    except SystemExit as e:
        msg = str(e.code)
        assert "\n" not in msg and msg.startswith("error:"), msg
        for w in words:
            assert w in msg, f"{w!r} not in {msg!r}"
        return msg
    raise AssertionError("expected SystemExit")


def run_script(*args, timeout=600, env=None):
    return subprocess.run([sys.executable, *args], cwd=HERE, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def random_init_knn(data, backbone="resnet18", seed=0, **kw):
    torch.manual_seed(seed)
    enc = common.build_backbone(backbone, **kw)
    return knn_eval.knn_monitor(enc, data, torch.device("cpu"))


# ================================================================================================================
# SimCLR loss
# ================================================================================================================
def nt_xent_reference(z1, z2, tau):
    """Slow and obvious: one anchor at a time, eq. 1 of the paper."""
    z = torch.cat([z1, z2]).double()
    n2 = z.shape[0]
    sim = lambda a, b: (a @ b) / (a.norm() * b.norm())  # noqa: E731
    total = 0.0
    for i in range(n2):
        j = (i + n2 // 2) % n2
        den = sum(torch.exp(sim(z[i], z[k]) / tau) for k in range(n2) if k != i)
        total = total - torch.log(torch.exp(sim(z[i], z[j]) / tau) / den)
    return total / n2


def test_nt_xent_matches_per_anchor_reference():
    g = torch.Generator().manual_seed(0)
    for n, d, tau in [(1, 3, 0.5), (4, 8, 0.1), (7, 5, 1.0), (16, 32, 0.2)]:
        z1, z2 = torch.randn(n, d, generator=g) * 3, torch.randn(n, d, generator=g)
        got = simclr.nt_xent_loss(z1.double(), z2.double(), tau)
        ref = nt_xent_reference(z1, z2, tau)
        assert torch.allclose(got, ref, atol=1e-10), (n, d, tau, got, ref)


def test_nt_xent_gradient_matches_reference():
    z1, z2 = torch.randn(5, 6, dtype=torch.double, requires_grad=True), torch.randn(5, 6, dtype=torch.double)
    g1, = torch.autograd.grad(simclr.nt_xent_loss(z1, z2, 0.3), z1)
    g2, = torch.autograd.grad(nt_xent_reference(z1, z2, 0.3), z1)
    assert torch.allclose(g1, g2, atol=1e-10)


def test_nt_xent_all_equal_is_log_2n_minus_1():
    for n in (1, 3, 10):
        z = torch.ones(n, 4)
        assert abs(simclr.nt_xent_loss(z, z.clone(), 0.5).item() - math.log(2 * n - 1)) < 1e-5


def test_nt_xent_perfect_pairs_low_loss_and_accuracy():
    z1 = torch.eye(8) * 10
    assert simclr.nt_xent_loss(z1, z1, 0.05).item() < 1e-3
    assert simclr.contrastive_accuracy(z1, z1) == 1.0
    assert simclr.contrastive_accuracy(z1, torch.roll(z1, 1, 0)) == 0.0


# ================================================================================================================
# Augmentations
# ================================================================================================================
def test_augmentations_shapes_ranges_and_identity():
    torch.manual_seed(0)
    x = torch.rand(6, 3, 20, 24)
    for f in [lambda t: common.random_resized_crop(t, 16), common.random_flip, common.color_jitter,
              common.random_grayscale, lambda t: common.gaussian_blur(t, 5, p=1.0), common.solarize]:
        y = f(x)
        assert y.min() >= 0 and y.max() <= 1 and torch.isfinite(y).all()
        assert y.shape[:2] == x.shape[:2]
    assert common.random_resized_crop(x, 16).shape == (6, 3, 16, 16)
    # p = 0 leaves images untouched; the full crop at the same size is the identity
    assert torch.equal(common.color_jitter(x, p=0.0), x) and torch.equal(common.random_grayscale(x, p=0.0), x)
    sq = torch.rand(2, 3, 16, 16)
    assert torch.allclose(common.random_resized_crop(sq, 16, scale=(1, 1), ratio=(1, 1)), sq, atol=1e-5)
    # hue round trip: rgb -> hsv -> rgb is the identity
    assert torch.allclose(common._hsv_to_rgb(*common._rgb_to_hsv(x)), x, atol=1e-5)
    # grayscale p=1 gives equal channels; solarize p=1 inverts above 0.5; flip p=1 mirrors
    g = common.random_grayscale(x, p=1.0)
    assert torch.allclose(g[:, 0], g[:, 1]) and torch.allclose(g[:, 1], g[:, 2])
    assert torch.allclose(common.solarize(x, p=1.0), torch.where(x >= 0.5, 1 - x, x))
    assert torch.equal(common.random_flip(x, p=1.0), x.flip(-1))
    # normalize / denormalize are inverse
    assert torch.allclose(common.denormalize(common.normalize(x)), x, atol=1e-6)


def test_augmentations_random_per_image():
    torch.manual_seed(1)
    x = torch.rand(1, 3, 32, 32).repeat(64, 1, 1, 1)  # 64 copies of one image
    for f in [lambda t: common.random_resized_crop(t, 32), lambda t: common.color_jitter(t, p=1.0),
              lambda t: common.gaussian_blur(t, 7, p=1.0), lambda t: simclr.simclr_augment((t * 255).byte(), 32)]:
        y = f(x)
        distinct = len({tuple(v.flatten()[:50].tolist()) for v in y})
        assert distinct > 50, distinct
    # the coin flips are per image too: about half flipped
    flipped = (common.random_flip(x) == x.flip(-1)).flatten(1).all(1).float().mean()
    assert 0.25 < flipped < 0.75


def test_crop_scale_respected():
    torch.manual_seed(0)
    # an image whose left half is 0 and right half 1: a crop of area <= 10% at full size is mostly one colour
    x = torch.zeros(200, 1, 64, 64)
    x[..., 32:] = 1
    y = common.random_resized_crop(x.expand(-1, 3, -1, -1), 64, scale=(0.01, 0.05))
    pure = ((y.mean((1, 2, 3)) < 0.05) | (y.mean((1, 2, 3)) > 0.95)).float().mean()
    assert pure > 0.6, pure


# ================================================================================================================
# Datasets
# ================================================================================================================
def make_folder(root, classes=("a", "b", "c"), n=6, size=(40, 30), mode="RGB"):
    for ci, c in enumerate(classes):
        os.makedirs(os.path.join(root, c), exist_ok=True)
        for i in range(n):
            arr = np.full((size[1], size[0], 3), 40 * ci + i, np.uint8)
            im = Image.fromarray(arr)
            im = im.convert(mode)
            im.save(os.path.join(root, c, f"{i}.{'png' if mode != 'RGB' else 'jpg'}"))


def test_folder_dataset_train_val_and_conversion():
    d = tmpdir()
    make_folder(os.path.join(d, "ds", "train"), n=5)
    make_folder(os.path.join(d, "ds", "val"), n=2, mode="L")  # grayscale images are converted to RGB
    data = common.load_dataset(os.path.join(d, "ds"), os.path.join(d, "cache"), img_size=16, workers=0,
                               log=lambda *a: None)
    assert data.train.images.shape == (15, 3, 16, 16) and data.train.images.dtype == torch.uint8
    assert data.test.images.shape == (6, 3, 16, 16)
    assert data.train.labels.tolist() == [0] * 5 + [1] * 5 + [2] * 5
    assert data.test.classes == ["a", "b", "c"] and data.num_classes == 3
    # the second load reads the decoded cache (and gives the same images)
    again = common.load_dataset(os.path.join(d, "ds"), os.path.join(d, "cache"), img_size=16, workers=0)
    assert torch.equal(again.train.images, data.train.images)
    assert len(os.listdir(os.path.join(d, "cache", "cache"))) == 2


def test_folder_dataset_single_tree_split_is_deterministic():
    d = tmpdir()
    make_folder(os.path.join(d, "tree"), n=20)
    a = common.load_dataset(os.path.join(d, "tree"), d, img_size=8, workers=0)
    b = common.load_dataset(os.path.join(d, "tree"), d, img_size=8, workers=0)
    assert len(a.train) == 54 and len(a.test) == 6 and a.test.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert torch.equal(a.test.images, b.test.images)


def test_large_images_are_memory_mapped_and_loaded_by_workers():
    d = tmpdir()
    make_folder(os.path.join(d, "big", "train"), n=4, size=(130, 120))
    make_folder(os.path.join(d, "big", "test"), n=1, size=(130, 120))
    data = common.load_dataset(os.path.join(d, "big"), d, img_size=112, workers=2)
    assert isinstance(data.train.images, torch.Tensor) and data.train.images.shape == (12, 3, 112, 112)
    loader = common.make_loader(data.train, 5, shuffle=True, workers=2)
    assert loader.num_workers == 2
    seen = torch.cat([y for _, y in loader])
    assert sorted(seen.tolist()) == sorted(data.train.labels.tolist())


def test_default_img_size_of_a_folder():
    d = tmpdir()
    make_folder(os.path.join(d, "f"), n=10, size=(40, 30))
    assert common.load_dataset(os.path.join(d, "f"), d, workers=0).img_size == 30


def make_tgz(src_dir, arcname, path):
    with tarfile.open(path, "w:gz") as t:
        t.add(src_dir, arcname=arcname)
    return hashlib.md5(open(path, "rb").read()).hexdigest()


def test_imagenette_download_verify_extract_from_file_url():
    d = tmpdir()
    src = os.path.join(d, "src")
    make_folder(os.path.join(src, "train"), classes=("n01440764", "n02102040"), n=3, size=(60, 50))
    make_folder(os.path.join(src, "val"), classes=("n01440764", "n02102040"), n=2, size=(60, 50))
    archive = os.path.join(d, "imagenette2-160.tgz")
    md5 = make_tgz(src, "imagenette2-160", archive)
    data_dir = os.path.join(d, "data")
    # a wrong checksum is refused
    expect_exit(lambda: common.load_dataset("imagenette", data_dir, img_size=32, workers=0, url="file://" + archive,
                                            md5="0" * 32, log=lambda *a: None), "could not download", "md5")
    data = common.load_dataset("imagenette", data_dir, img_size=32, workers=0, url="file://" + archive, md5=md5,
                               log=lambda *a: None)
    assert data.train.images.shape == (6, 3, 32, 32) and data.test.images.shape == (4, 3, 32, 32)
    assert data.test.classes == ["n01440764", "n02102040"]
    assert os.path.isdir(os.path.join(data_dir, "imagenette2-160", "train"))
    # a plain local path works as the URL too, and an extracted copy is reused without downloading
    again = common.load_dataset("imagenette", data_dir, img_size=32, workers=0, url="/nonexistent/imagenette2-160.tgz")
    assert torch.equal(again.train.images, data.train.images)
    assert set(common.IMAGENETTE) == {"160px", "320px", "full"}
    assert all(u.startswith("https://") and len(m) == 32 for u, m in common.IMAGENETTE.values())


def test_torchvision_datasets_cifar_mnist_stl10_from_local_files():
    """cifar10/100, mnist and stl10 through torchvision's classes, on files written in their formats here
    (their md5 checks are bypassed: these are not the real archives)."""
    import torchvision.datasets as tvd
    d = tmpdir()
    rng = np.random.default_rng(0)
    # CIFAR-10 and -100: pickled batches
    c10 = os.path.join(d, "cifar10", "cifar-10-batches-py")
    os.makedirs(c10)
    for name in ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]:
        pickle.dump({"data": rng.integers(0, 255, (4, 3072), dtype=np.uint8), "labels": [0, 1, 2, 3]},
                    open(os.path.join(c10, name), "wb"))
    pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, open(os.path.join(c10, "batches.meta"), "wb"))
    c100 = os.path.join(d, "cifar100", "cifar-100-python")
    os.makedirs(c100)
    for name in ["train", "test"]:
        pickle.dump({"data": rng.integers(0, 255, (5, 3072), dtype=np.uint8), "fine_labels": [0, 1, 2, 3, 99]},
                    open(os.path.join(c100, name), "wb"))
    pickle.dump({"fine_label_names": [f"f{i}" for i in range(100)]}, open(os.path.join(c100, "meta"), "wb"))
    # MNIST: idx files
    raw = os.path.join(d, "mnist", "MNIST", "raw")
    os.makedirs(raw)
    for prefix, n in [("train", 6), ("t10k", 3)]:
        open(os.path.join(raw, f"{prefix}-images-idx3-ubyte"), "wb").write(
            struct.pack(">IIII", 2051, n, 28, 28) + rng.integers(0, 255, n * 784, dtype=np.uint8).tobytes())
        open(os.path.join(raw, f"{prefix}-labels-idx1-ubyte"), "wb").write(
            struct.pack(">II", 2049, n) + bytes(range(n)))
    # STL-10: binary files
    stl = os.path.join(d, "stl10", "stl10_binary")
    os.makedirs(stl)
    for name, n in [("train", 3), ("test", 2), ("unlabeled", 4)]:
        rng.integers(0, 255, n * 3 * 96 * 96, dtype=np.uint8).tofile(os.path.join(stl, f"{name}_X.bin"))
        if name != "unlabeled":
            np.arange(1, n + 1, dtype=np.uint8).tofile(os.path.join(stl, f"{name}_y.bin"))
    open(os.path.join(stl, "class_names.txt"), "w").write("\n".join(f"s{i}" for i in range(10)))
    import torchvision.datasets.cifar as tv_cifar
    saved = tvd.CIFAR10._check_integrity, tvd.STL10._check_integrity, tv_cifar.check_integrity
    tvd.CIFAR10._check_integrity = tvd.STL10._check_integrity = lambda self: True  # CIFAR100 inherits
    tv_cifar.check_integrity = lambda *a, **k: True
    try:
        c = common.load_dataset("cifar10", d)
        assert c.train.images.shape == (20, 3, 32, 32) and c.test.images.shape == (4, 3, 32, 32)
        assert c.train is c.memory and c.num_classes == 10 and c.test.labels.tolist() == [0, 1, 2, 3]
        c = common.load_dataset("cifar100", d, img_size=16)
        assert c.train.images.shape == (5, 3, 16, 16) and c.num_classes == 100 and c.test.labels[-1] == 99
        m = common.load_dataset("mnist", d)
        assert m.train.images.shape == (6, 3, 28, 28) and torch.equal(m.train.images[:, 0], m.train.images[:, 2])
        assert m.test.labels.tolist() == [0, 1, 2]
        s = common.load_dataset("stl10", d)
        assert len(s.train) == 7 and len(s.memory) == 3 and len(s.test) == 2 and s.img_size == 96
        assert s.memory.labels.tolist() == [0, 1, 2] and (s.train.labels == -1).sum() == 4
        assert len(common.load_dataset("stl10-unlabeled", d).train) == 4
    finally:
        tvd.CIFAR10._check_integrity, tvd.STL10._check_integrity, tv_cifar.check_integrity = saved


def test_shapes_dataset_is_deterministic_and_balanced():
    a, b = common.make_shapes(300, 32, seed=3), common.make_shapes(300, 32, seed=3)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, common.make_shapes(300, 32, seed=4).images)
    assert a.images.shape == (300, 3, 32, 32) and a.labels.bincount().min() > 10 and len(a.classes) == 10
    data = common.load_dataset("shapes", shapes_n=(50, 20), img_size=24)
    assert data.train.images.shape == (50, 3, 24, 24) and len(data.test) == 20


def test_bad_dataset_input_errors():
    d = tmpdir()
    expect_exit(lambda: common.load_dataset("imagenet-1k", d), "unknown dataset", "cifar10", "shapes")
    expect_exit(lambda: common.load_dataset(os.path.join(d, "nope"), d), "not found", "nope")
    os.makedirs(os.path.join(d, "empty"))
    expect_exit(lambda: common.load_dataset(os.path.join(d, "empty"), d), "no class sub-folders", "empty")
    os.makedirs(os.path.join(d, "noimg", "cat"))
    expect_exit(lambda: common.load_dataset(os.path.join(d, "noimg"), d), "has no images", "cat")
    make_folder(os.path.join(d, "broken"), n=2)
    open(os.path.join(d, "broken", "a", "bad.jpg"), "wb").write(b"not a jpeg")
    expect_exit(lambda: common.load_dataset(os.path.join(d, "broken"), d, img_size=8, workers=0),
                "cannot read image", "bad.jpg")
    make_folder(os.path.join(d, "onlytrain", "train"), n=2)
    expect_exit(lambda: common.load_dataset(os.path.join(d, "onlytrain"), d), "neither val/ nor test/")
    expect_exit(lambda: common.load_dataset("shapes", shapes_n=(0, 5)), "--shapes-n")
    expect_exit(lambda: common.load_dataset("shapes", img_size=4), "too small")
    expect_exit(lambda: common.download_imagenette(d, "90px"), "unknown Imagenette size")
    expect_exit(lambda: common.make_loader(common.make_shapes(10), 64, shuffle=True, drop_last=True), "larger than")


def test_loader_shards_are_disjoint_and_cover_the_data():
    split = common.make_shapes(40, 8)
    seen = []
    for rank in range(2):
        loader = common.make_loader(split, 5, shuffle=True, seed=1, rank=rank, world=2)
        loader.sampler.sampler.set_epoch(3)
        seen.append(torch.cat([y for _, y in loader]).shape[0])
        idx = [i for b in loader.sampler for i in b]
        assert len(idx) == 20
        if rank == 0:
            first = set(idx)
        else:
            assert not first & set(idx) and len(first | set(idx)) == 40
    # a new epoch, a new order; the same epoch, the same order
    loader = common.make_loader(split, 40, shuffle=True, seed=1)
    loader.sampler.sampler.set_epoch(0)
    o0 = list(loader.sampler)[0]
    loader.sampler.sampler.set_epoch(1)
    o1 = list(loader.sampler)[0]
    loader.sampler.sampler.set_epoch(0)
    assert o0 != o1 and o0 == list(loader.sampler)[0]


# ================================================================================================================
# Backbones, device, checkpoints
# ================================================================================================================
def test_backbone_output_shapes():
    for size in (32, 96, 224):
        for name, kw in [("resnet18", {"width": 8}), ("resnet50", {"width": 8}), ("alexnet", {"width": 8}),
                         ("alexnet", {"width": 8, "sobel": False})]:
            small = size <= 64
            kw = dict(kw, **({"small": small} if name == "alexnet" else {"small_stem": small}))
            m = common.build_backbone(name, **kw).eval()
            h = m(torch.randn(2, 3, size, size))
            assert h.shape == (2, m.feature_dim), (name, size, h.shape)
    assert common.build_backbone("resnet18").feature_dim == 512 and common.build_backbone("resnet50").feature_dim == 2048
    a = common.build_backbone("alexnet", small=True)
    assert a.feature_dim == 4096 and [c[0].out_channels for c in a.convs] == [96, 256, 384, 384, 256]
    feats = a.conv_features(torch.randn(1, 3, 32, 32))
    assert len(feats) == 5 and feats[4].shape[1] == 256 and all((f >= 0).all() for f in feats)
    # the Sobel layer is fixed and sees edges only: a constant image gives zero gradients inside
    sob = common.Sobel()
    assert not any(p.requires_grad for p in sob.parameters())
    assert sob(torch.ones(1, 3, 8, 8))[..., 1:-1, 1:-1].abs().max() < 1e-6
    # width 64 with the ImageNet stem is torchvision's resnet18, parameter for parameter
    import torchvision
    ours, theirs = common.build_backbone("resnet18"), torchvision.models.resnet18()
    assert [p.shape for p in ours.parameters()] == [p.shape for p in theirs.parameters()][:-2]
    expect_exit(lambda: common.build_backbone("vit"), "unknown backbone")
    expect_exit(lambda: common.build_backbone("resnet18", width=0), "--width")


def test_device_and_amp_selection():
    assert common.get_device("cpu").type == "cpu"
    assert common.get_device("auto").type in ("cpu", "cuda", "mps")
    autocast, scaler = common.setup_amp("auto", torch.device("cpu"))
    assert not scaler.is_enabled()
    with autocast():
        assert torch.get_autocast_dtype("cpu") is not None and not torch.is_autocast_enabled("cpu")
    if not torch.cuda.is_available():
        expect_exit(lambda: common.get_device("cuda"), "no CUDA device")
        expect_exit(lambda: common.setup_amp("fp16", torch.device("cpu")), "--amp fp16 needs a CUDA device")
    common.seed_everything(5)
    a = (torch.rand(3), np.random.rand(), __import__("random").random())
    common.seed_everything(5)
    assert torch.equal(a[0], torch.rand(3)) and a[1] == np.random.rand()


def test_checkpoint_round_trip_atomic_and_errors():
    d = tmpdir()
    enc = common.build_backbone("resnet18", width=4, small_stem=True).eval()
    path = os.path.join(d, "last.pt")
    common.save_checkpoint(path, method="simclr", args={}, epoch=1, step=10,
                           backbone={"name": "resnet18", "kwargs": {"width": 4, "small_stem": True}},
                           encoder=enc.state_dict(), rng=common.all_rng_states())
    assert os.listdir(d) == ["last.pt"]  # no temporary file left behind
    enc2, ckpt = common.load_encoder(path)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(enc(x), enc2(x)) and ckpt["epoch"] == 1 and not enc2.training
    expect_exit(lambda: common.load_encoder(os.path.join(d, "missing.pt")), "not found")
    torch.save({"state_dict": enc.state_dict()}, os.path.join(d, "other.pt"))
    expect_exit(lambda: common.load_encoder(os.path.join(d, "other.pt")), "not a checkpoint of this project")
    open(os.path.join(d, "junk.pt"), "w").write("hello")
    expect_exit(lambda: common.load_encoder(os.path.join(d, "junk.pt")), "not a readable")


def test_runlog_metrics_and_curves():
    d = tmpdir()
    import argparse
    log = common.RunLog(d, argparse.Namespace(a=1))
    for e in range(1, 4):
        log.epoch(epoch=e, loss=1.0 / e, knn_top1=10.0 * e)
    assert len(open(os.path.join(d, "metrics.jsonl")).readlines()) == 3
    im = Image.open(os.path.join(d, "curves.png"))
    assert im.size[0] > 300 and np.asarray(im.convert("L")).std() > 5
    common.RunLog(d, argparse.Namespace(a=1), start_epoch=2)  # resuming from epoch 2 drops epoch 3
    assert [json.loads(x)["epoch"] for x in open(os.path.join(d, "metrics.jsonl"))] == [1, 2]
    assert json.load(open(os.path.join(d, "args.json"))) == {"a": 1}
    assert common.fmt_time(3725) == "1:02:05"


# ================================================================================================================
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


# ================================================================================================================
# SimCLR: optimizer, distributed, end to end
# ================================================================================================================
def test_lars_excludes_bias_and_bn_and_adapts_weights():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    groups = simclr.param_groups(model, 0.1)
    assert [len(g["params"]) for g in groups] == [1, 3] and groups[1]["weight_decay"] == 0.0
    opt = simclr.LARS(groups, lr=1.0, momentum=0.0)
    w0, b0 = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    for p in model.parameters():
        p.grad = torch.ones_like(p) * 100
    opt.step()
    dw = model[0].weight.detach() - w0  # trust ratio: |step| = eta * |w| for the weight
    assert abs(dw.norm().item() - 0.001 * w0.norm().item()) < 1e-6
    assert torch.allclose(model[0].bias.detach() - b0, torch.full_like(b0, -100.0))  # plain SGD for the bias


def test_warmup_cosine_schedule():
    f = [simclr.warmup_cosine(s, 100, 10) for s in range(100)]
    assert abs(f[0] - 0.1) < 1e-9 and f[9] == 1.0 and f[10] == 1.0 and f[-1] < 0.01
    assert all(a >= b for a, b in zip(f[10:], f[11:]))


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _ddp_worker(rank, world, port, x, out_dir):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = simclr.SimCLR(common.build_backbone("resnet18", width=4, small_stem=True), 16, 8).double()
    model = common.convert_sync_batchnorm(model, torch.device("cpu"))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    n = x.shape[0] // (2 * world)
    v1, v2 = x[:x.shape[0] // 2], x[x.shape[0] // 2:]
    z1, z2 = ddp(v1[rank * n:(rank + 1) * n]), ddp(v2[rank * n:(rank + 1) * n])
    z1, z2 = common.all_gather_with_grad(z1), common.all_gather_with_grad(z2)
    loss = simclr.nt_xent_loss(z1, z2, 0.5)
    loss.backward()
    if rank == 0:
        torch.save({"loss": loss.item(), "grads": [p.grad for p in model.parameters() if p.requires_grad],
                    "running_mean": model.encoder.bn1.running_mean.clone()}, os.path.join(out_dir, "ddp.pt"))
    dist.destroy_process_group()


def test_distributed_two_process_gloo_matches_single_process():
    """2 processes with half the global batch each, all-gathered negatives and global BatchNorm, must give the loss
    and gradients of one process on the whole batch."""
    import torch.multiprocessing as mp
    d = tmpdir()
    torch.manual_seed(1)
    x = torch.randn(16, 3, 16, 16, dtype=torch.double)  # views 1 then views 2 of 8 images
    mp.spawn(_ddp_worker, args=(2, free_port(), x, d), nprocs=2, join=True)
    got = torch.load(os.path.join(d, "ddp.pt"))
    torch.manual_seed(0)
    model = simclr.SimCLR(common.build_backbone("resnet18", width=4, small_stem=True), 16, 8).double()
    loss = simclr.nt_xent_loss(model(x[:8]), model(x[8:]), 0.5)
    loss.backward()
    assert abs(loss.item() - got["loss"]) < 1e-5, (loss.item(), got["loss"])
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    for a, b in zip(grads, got["grads"]):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), (a - b).abs().max()
    # the running statistics are those of the global batch as well
    assert torch.allclose(model.encoder.bn1.running_mean, got["running_mean"], atol=1e-6)


def test_simclr_torchrun_two_processes_on_cpu():
    d = tmpdir()
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port",
                        str(free_port()), "simclr.py", "--data", "shapes", "--shapes-n", "128", "64", "--epochs", "1",
                        "--width", "4", "--batch-size", "64", "--device", "cpu", "--out", d, "--knn-every", "1"],
                       cwd=HERE, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.load(open(os.path.join(d, "summary.json")))
    assert summary["world_size"] == 2 and summary["knn_top1"] is not None
    assert "2 process(es)" in r.stdout
    ckpt = torch.load(os.path.join(d, "last.pt"), weights_only=False)
    assert len(ckpt["rng"]) == 2 and ckpt["step"] == 2  # 128 images / 64 per step


def test_simclr_compile_matches_eager():
    """--compile (torch.compile, inductor on the CPU) trains the same model: same losses and weights as eager mode
    to float tolerance, and the checkpoint has plain parameter names (no `_orig_mod.` prefix), so load_encoder works."""
    d1, d2 = tmpdir(), tmpdir()
    base = ["--data", "shapes", "--shapes-n", "64", "32", "--width", "2", "--batch-size", "32", "--epochs", "1",
            "--device", "cpu", "--knn-every", "1", "--log-every", "1000", "--optimizer", "sgd"]
    simclr.main(base + ["--out", d1])
    simclr.main(base + ["--out", d2, "--compile"])
    m1, m2 = (json.loads(open(os.path.join(d, "metrics.jsonl")).readline()) for d in (d1, d2))
    assert abs(m1["loss"] - m2["loss"]) < 1e-3, (m1, m2)
    w1, w2 = (torch.load(os.path.join(d, "last.pt"), weights_only=False)["encoder"] for d in (d1, d2))
    assert w1.keys() == w2.keys()
    assert all(torch.allclose(w1[k].float(), w2[k].float(), atol=1e-3) for k in w1)
    enc, _ = common.load_encoder(os.path.join(d2, "last.pt"))
    assert isinstance(enc, common.ResNet)


def test_simclr_resume_continues_exactly():
    """2 epochs in one go == 1 epoch, then --resume for the second (same losses, lr and weights)."""
    d1, d2 = tmpdir(), tmpdir()
    base = ["--data", "shapes", "--shapes-n", "96", "32", "--width", "4", "--batch-size", "32", "--device", "cpu",
            "--knn-every", "1", "--warmup-epochs", "1", "--log-every", "1000"]
    simclr.main(base + ["--epochs", "2", "--out", d1])
    simclr.main(base + ["--epochs", "1", "--out", d2])
    s = simclr.main(["--resume", os.path.join(d2, "last.pt"), "--epochs", "2"])
    m1 = [json.loads(x) for x in open(os.path.join(d1, "metrics.jsonl"))]
    m2 = [json.loads(x) for x in open(os.path.join(d2, "metrics.jsonl"))]
    assert [r["epoch"] for r in m2] == [1, 2]
    for a, b in zip(m1, m2):
        assert abs(a["loss"] - b["loss"]) < 1e-4 and abs(a["lr"] - b["lr"]) < 1e-9, (a, b)
    w1 = torch.load(os.path.join(d1, "last.pt"), weights_only=False)["encoder"]
    w2 = torch.load(os.path.join(d2, "last.pt"), weights_only=False)["encoder"]
    assert all(torch.allclose(w1[k].float(), w2[k].float(), atol=1e-4) for k in w1)
    assert s["epochs"] == 2 and os.path.exists(os.path.join(d2, "curves.png"))


def test_simclr_bad_input_errors():
    d = tmpdir()
    base = ["--data", "shapes", "--shapes-n", "64", "16", "--width", "4", "--device", "cpu", "--out", d]
    expect_exit(lambda: simclr.main(base + ["--epochs", "0"]), "--epochs")
    expect_exit(lambda: simclr.main(base + ["--batch-size", "128", "--epochs", "1"]), "larger than the dataset")
    expect_exit(lambda: simclr.main(base + ["--data", "no-such-set"]), "unknown dataset")
    expect_exit(lambda: simclr.main(base + ["--resume", os.path.join(d, "missing.pt")]), "checkpoint not found")
    torch.save({"format": common.CKPT_FORMAT, "method": "deepcluster", "args": {}}, os.path.join(d, "dc.pt"))
    expect_exit(lambda: simclr.main(base + ["--resume", os.path.join(d, "dc.pt")]), "deepcluster checkpoint")
    if not torch.cuda.is_available():
        expect_exit(lambda: simclr.main(base + ["--amp", "bf16"]), "--amp bf16 needs a CUDA device")
    # the command line shows one error line and a non-zero exit status
    r = run_script("simclr.py", "--data", "/no/such/folder", "--device", "cpu", "--out", d)
    assert r.returncode != 0 and r.stderr.strip() == "error: dataset folder not found: /no/such/folder", r.stderr


def test_simclr_benchmark_reports_both_pipelines():
    r = simclr.main(["--benchmark", "--data", "shapes", "--shapes-n", "256", "16", "--width", "4", "--batch-size",
                     "64", "--device", "cpu", "--workers", "0", "--benchmark-steps", "2", "--out", tmpdir()])
    assert r["batched_img_s"] > 0 and r["pil_img_s"] > 0 and 0 < r["aug_fraction"] < 1


def test_simclr_trains_on_shapes():
    """End to end on the synthetic shapes, on the CPU (the README's quick-start command): SimCLR optimises its
    objective (the NT-Xent loss falls, the contrastive accuracy rises) and its representation classifies shapes
    clearly better than a random-init encoder of the same architecture: weighted-kNN top-1 at least 8 points above
    (measured: 61.8% vs 46.8% with one thread)."""
    d = tmpdir()
    s = simclr.main(["--data", "shapes", "--shapes-n", "2000", "500", "--width", "8", "--epochs", "8",
                     "--batch-size", "64", "--optimizer", "adamw", "--lr", "4e-3", "--weight-decay", "1e-4",
                     "--warmup-epochs", "1", "--crop-min-scale", "0.2", "--knn-every", "8", "--device", "cpu",
                     "--out", d, "--log-every", "1000"])
    base = random_init_knn(common.load_dataset("shapes", shapes_n=(2000, 500)), width=8, small_stem=True)
    rows = [json.loads(x) for x in open(os.path.join(d, "metrics.jsonl"))]
    print(f"    loss {rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f}, contrastive acc {rows[0]['contrastive_acc']:.4f} -> "
          f"{rows[-1]['contrastive_acc']:.4f}; kNN {s['knn_top1']:.1f}% vs random init {base:.1f}%")
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.2, rows
    assert rows[-1]["contrastive_acc"] > 2 * rows[0]["contrastive_acc"], rows
    assert s["knn_top1"] > base + 8, (s["knn_top1"], base)
    assert json.load(open(os.path.join(d, "summary.json")))["knn_top1"] == s["knn_top1"]


# ================================================================================================================
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


# ================================================================================================================
# deepcluster.py
# ================================================================================================================
# ================================================================================================================
# DeepCluster: k-means, PCA-whitening, NMI, the uniform-over-clusters sampler
# ================================================================================================================
def lloyd_reference(x, init, n_iter):
    """Slow and obvious Lloyd's algorithm: one point and one centroid at a time."""
    x = x.double().tolist()
    c = init.double().tolist()

    def assign_all():
        return [min(range(len(c)), key=lambda j: sum((a - b) ** 2 for a, b in zip(p, c[j]))) for p in x]
    for _ in range(n_iter):
        a = assign_all()
        for j in range(len(c)):
            members = [p for p, aj in zip(x, a) if aj == j]
            if members:
                c[j] = [sum(col) / len(members) for col in zip(*members)]
    return torch.tensor(c, dtype=torch.double), torch.tensor(assign_all())


def test_deepcluster_kmeans_matches_lloyd_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100, 5, generator=g, dtype=torch.double)
    init = x[torch.randperm(100, generator=g)[:6]]
    ref_c, ref_a = lloyd_reference(x, init, 8)
    for chunk in (7, 1000):  # chunking the distance matrix changes nothing
        c, a = deepcluster.kmeans(x, 6, n_iter=8, init=init, chunk=chunk)
        assert torch.equal(a, ref_a) and torch.allclose(c, ref_c, atol=1e-10)
    # without init: k distinct data points, the same result for the same seed, another for another seed
    c0, a0 = deepcluster.kmeans(x, 6, n_iter=0, seed=3)
    assert len({tuple(r) for r in c0.tolist()}) == 6 and all(r in x.tolist() for r in c0.tolist())
    assert torch.equal(deepcluster.kmeans(x, 6, seed=3)[1], deepcluster.kmeans(x, 6, seed=3)[1])
    assert not torch.equal(deepcluster.kmeans(x, 6, n_iter=0, seed=3)[0], deepcluster.kmeans(x, 6, n_iter=0, seed=4)[0])
    # the objective is the mean squared distance to the assigned centroid
    obj = deepcluster.kmeans_objective(x, c0, a0)
    assert abs(obj - sum(((x[i] - c0[a0[i]]) ** 2).sum().item() for i in range(100)) / 100) < 1e-9


def test_deepcluster_kmeans_recovers_blobs():
    g = torch.Generator().manual_seed(1)
    centers = torch.randn(4, 32, generator=g) * 10
    labels = torch.randint(4, (4000,), generator=g)
    x = centers[labels] + torch.randn(4000, 32, generator=g)
    # Lloyd's algorithm from k random points (faiss's start) keeps two blobs merged when two starting points fall in
    # one blob (a local minimum): keep the lowest objective of a few seeds, as faiss's `nredo` does
    runs = [deepcluster.kmeans(x, 4, n_iter=5, seed=s) for s in range(10)]
    c, a = min(runs, key=lambda r: deepcluster.kmeans_objective(x, *r))
    score = deepcluster.nmi(labels, a)
    assert score > 0.95, score
    assert c.shape == (4, 32) and a.shape == (4000,) and a.dtype == torch.int64


def test_deepcluster_kmeans_never_returns_an_empty_cluster():
    # 3 distinct points, 100 copies each, 10 clusters: Lloyd's algorithm alone leaves 7 clusters empty
    x = torch.tensor([[0.0, 0], [5, 0], [0, 5]]).repeat_interleave(100, 0)
    for seed in range(3):
        _, a = deepcluster.kmeans(x, 10, n_iter=5, seed=seed)
        assert torch.bincount(a, minlength=10).min() >= 1, torch.bincount(a, minlength=10)
    # centroids started far from the data: all points go to one cluster, the others are refilled by splitting
    g = torch.Generator().manual_seed(0)
    y = torch.randn(500, 4, generator=g)
    init = torch.cat([torch.zeros(1, 4), torch.full((5, 4), 1e3)])
    c, a = deepcluster.kmeans(y, 6, n_iter=10, init=init)
    sizes = torch.bincount(a, minlength=6)
    assert sizes.min() >= 1 and sizes.max() < 400, sizes
    assert (c.abs() < 10).all()  # every centroid moved to the data
    # k == N: every point its own cluster
    _, a = deepcluster.kmeans(y[:20], 20, n_iter=3)
    assert sorted(a.tolist()) == list(range(20))
    expect_exit(lambda: deepcluster.kmeans(y[:5], 6), "k=6", "5 points")


def nmi_reference(a, b):
    """NMI from the definition, with plain Python counting."""
    n = len(a)
    pa = {u: a.count(u) / n for u in set(a)}
    pb = {v: b.count(v) / n for v in set(b)}
    pab = {}
    for u, v in zip(a, b):
        pab[u, v] = pab.get((u, v), 0) + 1 / n
    mi = sum(p * math.log(p / (pa[u] * pb[v])) for (u, v), p in pab.items())
    ha = -sum(p * math.log(p) for p in pa.values())
    hb = -sum(p * math.log(p) for p in pb.values())
    return mi / ((ha + hb) / 2)


def test_deepcluster_nmi_values():
    nmi = deepcluster.nmi
    # by hand: H(a) = ln 2, H(b) = -(3/4 ln 3/4 + 1/4 ln 1/4), I = 1/2 ln 4/3 + 1/4 ln 2/3 + 1/4 ln 2
    a, b = [0, 0, 1, 1], [0, 0, 0, 1]
    hand = (0.5 * math.log(4 / 3) + 0.25 * math.log(2 / 3) + 0.25 * math.log(2)) / (
        (math.log(2) - 0.75 * math.log(0.75) - 0.25 * math.log(0.25)) / 2)
    assert abs(nmi(a, b) - hand) < 1e-9 and abs(hand - 0.34371) < 1e-4
    g = torch.Generator().manual_seed(0)
    x = torch.randint(7, (3000,), generator=g)
    assert abs(nmi(x, x) - 1) < 1e-9
    assert abs(nmi(x, torch.randperm(7, generator=g)[x] + 100) - 1) < 1e-9  # renaming the ids changes nothing
    assert nmi(x, torch.randint(5, (3000,), generator=g)) < 0.01  # independent labelings
    assert nmi([3, 3, 3], [1, 1, 1]) == 1.0 and nmi([3, 3, 3], [1, 2, 1]) == 0.0
    for n, ka, kb in [(10, 3, 4), (200, 5, 9), (57, 1, 6)]:
        u, v = torch.randint(ka, (n,), generator=g).tolist(), torch.randint(kb, (n,), generator=g).tolist()
        u[0], v[0] = 99, 99  # ids need not be 0..k-1
        if len(set(u)) > 1 or len(set(v)) > 1:
            assert abs(nmi(u, v) - nmi_reference(u, v)) < 1e-9, (n, ka, kb)
        assert abs(nmi(u, v) - nmi(v, u)) < 1e-12
    expect_exit(lambda: nmi([0, 1], [0, 1, 2]), "same length")


def test_deepcluster_pca_whiten_identity_covariance():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3000, 20, generator=g) @ torch.randn(20, 20, generator=g) + 5  # correlated, offset
    y = deepcluster.pca_whiten(x, 8)
    assert y.shape == (3000, 8)
    cov = torch.cov(y.double().T)
    assert torch.allclose(cov, torch.eye(8, dtype=torch.double), atol=1e-3), cov
    assert y.mean(0).abs().max() < 1e-4
    # the kept axes are the top-8 principal axes: up to sign, y_i = (x - mean) v_i / sqrt(lambda_i) (numpy SVD)
    xc = (x - x.mean(0)).double().numpy()
    _, s, vt = np.linalg.svd(xc, full_matrices=False)
    ref = xc @ vt[:8].T / (s[:8] / math.sqrt(len(xc) - 1))
    signs = np.sign((ref * y.double().numpy()).sum(0))
    assert np.allclose(ref * signs, y.double().numpy(), atol=1e-3)
    assert deepcluster.pca_whiten(x, 64).shape == (3000, 20)  # never more than the input's dimensions
    z = deepcluster.preprocess_features(x, 8)
    assert torch.allclose(z.norm(dim=1), torch.ones(3000), atol=1e-5)


def test_deepcluster_sampler_uniform_over_clusters():
    sizes = [3000, 800, 150, 40, 9, 1]
    assign = torch.cat([torch.full((s,), c) for c, s in enumerate(sizes)])[torch.randperm(sum(sizes))]
    n = len(assign)
    idx = deepcluster.uniform_cluster_sampler(assign, n, torch.Generator().manual_seed(0))
    assert idx.shape == (n,) and idx.dtype == torch.int64 and 0 <= idx.min() and idx.max() < n
    counts = torch.bincount(assign[idx], minlength=len(sizes))
    per = n // len(sizes) + 1
    assert counts.max() <= per and counts.min() >= per - len(sizes) * per + n, counts  # about N/k each
    for c in range(2):  # clusters of at least N/k images: drawn without replacement
        drawn = idx[assign[idx] == c]
        assert len(drawn.unique()) == len(drawn)
    assert len(idx[assign[idx] == 5].unique()) == 1  # a cluster of one image: that image, many times
    # empty cluster ids are skipped; the same generator seed gives the same order
    a2 = torch.tensor([0, 0, 0, 0, 3, 3])
    i2 = deepcluster.uniform_cluster_sampler(a2, 6, torch.Generator().manual_seed(1))
    c2 = torch.bincount(a2[i2], minlength=4).tolist()
    assert c2[1] == c2[2] == 0 and 2 <= c2[0] <= 4 and 2 <= c2[3] <= 4, c2
    assert torch.equal(i2, deepcluster.uniform_cluster_sampler(a2, 6, torch.Generator().manual_seed(1)))


# ================================================================================================================
# DeepCluster: the script
# ================================================================================================================
def test_deepcluster_bad_input_errors():
    d = tmpdir()
    base = ["--data", "shapes", "--shapes-n", "64", "16", "--width", "4", "--device", "cpu", "--out", d,
            "--batch-size", "32", "--k", "8"]
    expect_exit(lambda: deepcluster.main(base + ["--epochs", "0"]), "--epochs")
    expect_exit(lambda: deepcluster.main(base[:-2]), "--k", "got 100")  # default k = 10 x 10 classes > 64 images
    expect_exit(lambda: deepcluster.main(base + ["--k", "1"]), "--k", "64")
    expect_exit(lambda: deepcluster.main(base + ["--k", "65"]), "--k", "65")
    expect_exit(lambda: deepcluster.main(base + ["--batch-size", "128"]), "larger than the dataset")
    expect_exit(lambda: deepcluster.main(base + ["--pca-dim", "0"]), "--pca-dim")
    expect_exit(lambda: deepcluster.main(base + ["--samples-per-epoch", "10", "--batch-size", "32"]),
                "--samples-per-epoch 10")
    expect_exit(lambda: deepcluster.main(base + ["--crop-min-scale", "0"]), "--crop-min-scale")
    expect_exit(lambda: deepcluster.main(base + ["--data", "no-such-set"]), "unknown dataset")
    expect_exit(lambda: deepcluster.main(base + ["--width", "0"]), "--width")
    expect_exit(lambda: deepcluster.main(base + ["--resume", os.path.join(d, "missing.pt")]), "checkpoint not found")
    torch.save({"format": common.CKPT_FORMAT, "method": "simclr", "args": {}}, os.path.join(d, "s.pt"))
    expect_exit(lambda: deepcluster.main(base + ["--resume", os.path.join(d, "s.pt")]), "simclr checkpoint")
    if not torch.cuda.is_available():
        expect_exit(lambda: deepcluster.main(base + ["--amp", "fp16"]), "--amp fp16 needs a CUDA device")
    r = run_script("deepcluster.py", "--data", "/no/such/folder", "--device", "cpu", "--out", d)
    assert r.returncode == 1 and r.stderr.strip() == "error: dataset folder not found: /no/such/folder", r.stderr


def test_deepcluster_resume_continues_exactly():
    """2 epochs in one go == 1 epoch, then --resume for the second (same clusters, losses, NMI and weights)."""
    d1, d2 = tmpdir(), tmpdir()
    base = ["--data", "shapes", "--shapes-n", "96", "32", "--width", "4", "--batch-size", "32", "--k", "6",
            "--device", "cpu", "--knn-every", "1", "--log-every", "1000"]
    deepcluster.main(base + ["--epochs", "2", "--out", d1])
    deepcluster.main(base + ["--epochs", "1", "--out", d2])
    s = deepcluster.main(["--resume", os.path.join(d2, "last.pt"), "--epochs", "2"])
    m1 = [json.loads(x) for x in open(os.path.join(d1, "metrics.jsonl"))]
    m2 = [json.loads(x) for x in open(os.path.join(d2, "metrics.jsonl"))]
    assert [r["epoch"] for r in m2] == [1, 2] and m2[0]["nmi_prev"] is None and m2[1]["nmi_prev"] is not None
    for a, b in zip(m1, m2):
        for key in ("loss", "clustering_loss", "nmi_labels", "nmi_prev", "min_cluster", "max_cluster"):
            assert (a[key] is None and b[key] is None) or abs(a[key] - b[key]) < 1e-4, (key, a, b)
    c1, c2 = (torch.load(os.path.join(d, "last.pt"), weights_only=False) for d in (d1, d2))
    assert torch.equal(c1["assignments"], c2["assignments"])
    assert all(torch.allclose(c1["model"][k].float(), c2["model"][k].float(), atol=1e-4) for k in c1["model"])
    assert s["epochs"] == 2 and os.path.exists(os.path.join(d2, "nmi.png"))
    # the checkpoint is a checkpoint of this project: load_encoder rebuilds the Sobel AlexNet
    enc, ckpt = common.load_encoder(os.path.join(d2, "last.pt"))
    assert isinstance(enc, common.AlexNet) and enc.sobel is not None and ckpt["k"] == 6


def test_deepcluster_torchrun_two_processes_on_cpu():
    """torchrun with 2 gloo processes: each rank extracts features for its shard, the all-gathered features are
    clustered once, and the first epoch's clustering equals the one-process run's (same initial weights, same
    features, same k-means seed); then both ranks train on their halves of the pseudo-labelled batches."""
    d1, d2 = tmpdir(), tmpdir()
    base = ["--data", "shapes", "--shapes-n", "130", "40", "--epochs", "1", "--width", "4", "--batch-size", "32",
            "--k", "6", "--pca-dim", "16", "--feature-batch-size", "16", "--device", "cpu", "--log-every", "1000"]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port",
                        str(free_port()), "deepcluster.py"] + base + ["--out", d2],
                       cwd=HERE, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 process(es)" in r.stdout
    s2 = json.load(open(os.path.join(d2, "summary.json")))
    s1 = deepcluster.main(base + ["--out", d1])
    assert s2["world_size"] == 2 and s1["world_size"] == 1 and s2["knn_top1"] is not None
    c1, c2 = (torch.load(os.path.join(d, "last.pt"), weights_only=False) for d in (d1, d2))
    assert len(c2["assignments"]) == 130  # every image once, although 130 is not a multiple of 2 x 16
    assert torch.equal(c1["assignments"], c2["assignments"])
    assert abs(s1["nmi_labels"] - s2["nmi_labels"]) < 1e-9
    assert len(c2["rng"]) == 2 and c2["step"] == 4  # 130 images // 32 per step


def test_deepcluster_resnet_backbone_and_no_sobel():
    """The other backbones: a ResNet-18 (its pooled features are clustered and trained on) and the AlexNet without
    its Sobel layer (RGB input); each run finishes and its checkpoint rebuilds the right encoder."""
    base = ["--data", "shapes", "--shapes-n", "64", "32", "--epochs", "1", "--batch-size", "32", "--k", "4",
            "--pca-dim", "8", "--device", "cpu", "--log-every", "1000", "--width", "4"]
    for extra, check in [(["--backbone", "resnet18"], lambda e: isinstance(e, common.ResNet) and e.feature_dim == 32),
                         (["--no-sobel"], lambda e: isinstance(e, common.AlexNet) and e.sobel is None)]:
        d = tmpdir()
        s = deepcluster.main(base + extra + ["--out", d])
        enc, ckpt = common.load_encoder(os.path.join(d, "last.pt"))
        assert check(enc), extra
        assert s["knn_top1"] is not None and len(ckpt["assignments"]) == 64
        x = common.normalize(common.to_float(common.make_shapes(2, 32).images))
        assert enc.eval()(x).shape == (2, enc.feature_dim)


def test_deepcluster_learns_its_task_on_shapes():
    """End to end on the synthetic shapes, on the CPU: the network learns to predict its own clusters (pseudo-label
    accuracy well above chance 1/k), the clusters stabilise across epochs (NMI(t-1, t) rises), none is empty, and the
    representation classifies shapes clearly better than the random-init Sobel AlexNet of the same width: weighted-kNN
    top-1 at least 7 points above (measured: 67.7% vs 53.3% with one thread).
    Small-budget settings: a small PCA (fc7 has only 512 dimensions at width 8) and 3 x N images per clustering."""
    d = tmpdir()
    s = deepcluster.main(["--data", "shapes", "--shapes-n", "1000", "300", "--width", "8", "--epochs", "6",
                          "--batch-size", "32", "--k", "20", "--pca-dim", "32", "--samples-per-epoch", "3000",
                          "--crop-min-scale", "0.3", "--knn-every", "6", "--device", "cpu", "--out", d,
                          "--log-every", "1000"])
    data = common.load_dataset("shapes", shapes_n=(1000, 300))
    base = random_init_knn(data, backbone="alexnet", width=8, sobel=True, small=True)
    rows = [json.loads(x) for x in open(os.path.join(d, "metrics.jsonl"))]
    print(f"    pseudo-label acc {[round(r['pseudo_label_acc'], 3) for r in rows]}, NMI(t-1,t) "
          f"{[round(r['nmi_prev'], 3) for r in rows[1:]]}; kNN {s['knn_top1']:.1f}% vs random init {base:.1f}%")
    assert all(r["min_cluster"] >= 1 for r in rows)
    assert rows[-1]["pseudo_label_acc"] > 4 / 20, rows[-1]
    assert rows[-1]["nmi_prev"] > rows[1]["nmi_prev"], rows
    assert s["knn_top1"] > base + 7, (s["knn_top1"], base)


# ================================================================================================================
# visualize.py
# ================================================================================================================
# ================================================================================================================
# visualize.py
# ================================================================================================================
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
    for name, kw, layer in [("resnet18", {"width": 8, "small_stem": True}, 3), ("alexnet", {"width": 4, "small": True}, 2)]:
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
    g = torch.Generator().manual_seed(0)
    f = torch.randn(300, 20, generator=g) * torch.linspace(5, 0.1, 20) + 3
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
    # recipes: simclr's own function with the checkpoint's flags; the fall-back crop + flip for unknown methods
    aug, name = visualize.augmentation("simclr", {"jitter_strength": 0.5, "crop_min_scale": 0.2})
    assert "simclr_augment" in name and "0.5" in name
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    aug, name = visualize.augmentation("no-such-method")
    assert name == "random resized crop + horizontal flip" and aug(x, 16).shape == (4, 3, 16, 16)


def test_visualize_every_subcommand_writes_a_png():
    d = tmpdir()
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
    _check_png(visualize.main(["curves", "--run", run, os.path.join(run, "metrics.jsonl")] + cpu), (800, 300))
    paths = []
    for i, name in enumerate(["simclr", "deepcluster"]):  # knn_eval.py's JSON
        rows = [{"protocol": "few-shot linear probe", "labels_per_class": n, "top1": 20.0 + 5 * i + n / 10}
                for n in (10, 50, 100, 500)] + [{"protocol": "linear probe", "top1": 70.0}]
        paths.append(os.path.join(d, f"{name}.json"))
        json.dump({"encoder": name, "data": "cifar10", "rows": rows}, open(paths[-1], "w"))
    points, label = visualize.read_fewshot(paths[0])
    assert list(points) == [10, 50, 100, 500] and points[50] == [25.0] and label == "simclr (cifar10)"
    _check_png(visualize.main(["fewshot", "--json"] + paths + cpu), (600, 400))
    assert sorted(f for f in os.listdir(d) if f.endswith(".png")) == [
        "augment-simclr.png", "curves.png", "embedding.png", "fewshot.png", "filters.png", "maximize-layer2.png",
        "top-images-layer5.png", "views.png"]


def test_visualize_bad_input_errors():
    d = tmpdir()
    res = _tiny_ckpt(d)
    cpu = ["--device", "cpu", "--out", d]
    main = visualize.main
    expect_exit(lambda: main(["top-images", "--ckpt", res, "--layer", "6"] + cpu), "--layer 6 is out of range", "1..5")
    expect_exit(lambda: main(["maximize", "--ckpt", res, "--layer", "0"] + cpu), "--layer 0 is out of range")
    expect_exit(lambda: main(["top-images", "--ckpt", res, "--layer", "1", "--filters", "0", "8"] + cpu),
                "filter id(s) [8] out of range", "0..7")
    expect_exit(lambda: main(["maximize", "--ckpt", res, "--layer", "5", "--filter", "-1"] + cpu), "[-1] out of range")
    expect_exit(lambda: main(["top-images", "--ckpt", res, "--k", "0"] + cpu), "--k must be at least 1")
    expect_exit(lambda: main(["top-images", "--ckpt", res, "--max-images", "0"] + cpu), "--max-images")
    expect_exit(lambda: main(["views", "--ckpt", res, "--n", "1"] + cpu), "--n must be at least 2")
    expect_exit(lambda: main(["filters", "--ckpt", os.path.join(d, "missing.pt")] + cpu), "checkpoint not found")
    no_conv = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))
    expect_exit(lambda: visualize.first_conv(no_conv), "has no conv layers")
    expect_exit(lambda: visualize.compute_activations(no_conv, torch.zeros(2, 3, 8, 8, dtype=torch.uint8), 1),
                "has no conv layers")
    enc = common.build_backbone("resnet18", width=8, small_stem=True)
    expect_exit(lambda: visualize.compute_activations(enc, torch.zeros(0, 3, 8, 8, dtype=torch.uint8), 1),
                "empty dataset")
    expect_exit(lambda: main(["curves", "--run", d] + cpu), "no metrics.jsonl")
    open(os.path.join(d, "metrics.jsonl"), "w").close()
    expect_exit(lambda: main(["curves", "--run", d] + cpu), "has no epochs")
    json.dump({"rows": [{"protocol": "weighted kNN", "top1": 50.0}]}, open(os.path.join(d, "knn.json"), "w"))
    expect_exit(lambda: main(["fewshot", "--json", os.path.join(d, "knn.json")] + cpu), "no few-shot rows")
    open(os.path.join(d, "bad.json"), "w").write("{not json")
    expect_exit(lambda: main(["fewshot", "--json", os.path.join(d, "bad.json")] + cpu), "cannot read")
    # the command line: one error line, exit status 1
    r = run_script("visualize.py", "maximize", "--ckpt", res, "--layer", "9", "--device", "cpu", "--out", d,
                   env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 1 and r.stderr.strip() == "error: --layer 9 is out of range: this ResNet has layers 1..5", r.stderr


# ================================================================================================================
# imagenet_mnist.py
# ================================================================================================================
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


def test_imagenet_mnist_load_digits_sorted_and_resized():
    d = write_fake_mnist(tmpdir())
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


def test_imagenet_mnist_pairs_share_what_they_should():
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0] * 5 + [1] * 3 + [2] * 7)  # sorted, 3 classes
    n_bg = 11
    idx = torch.randint(0, n_bg, (400,), generator=g)
    bg1, bg2, dg1, dg2 = im.sample_pairs("background", idx, n_bg, labels, g)
    assert torch.equal(bg1, idx) and torch.equal(bg2, bg1)  # the same background image
    assert (labels[dg1] != labels[dg2]).all()  # digits of different classes
    assert len(set(labels[dg2].tolist())) == 3 and len(set(dg2.tolist())) == 15  # any digit of the other classes
    bg1, bg2, dg1, dg2 = im.sample_pairs("digit", idx, n_bg, labels, g)
    assert torch.equal(dg1, dg2) and (bg1 != bg2).all() and bg2.max() < n_bg and bg2.min() >= 0
    assert len(set(bg2.tolist())) == n_bg  # any other background
    bg1, bg2, dg1, dg2 = im.sample_pairs("both", idx, n_bg, labels, g)
    assert torch.equal(bg1, bg2) and torch.equal(dg1, dg2) and len(set(dg1.tolist())) == 15
    # the composed training views: same background -> identical views when augmentation is off
    bgs = torch.randint(0, 256, (n_bg, 3, 16, 16), dtype=torch.uint8)
    digs = torch.randint(0, 256, (15, 1, 8, 8), dtype=torch.uint8)
    b1, b2, d1, d2 = im.sample_pairs("digit", idx[:8], n_bg, labels, g)
    assert not torch.equal(bgs[b1], bgs[b2]) and torch.equal(digs[d1], digs[d2])


def test_imagenet_mnist_eval_set_is_seeded_and_labelled():
    bg = common.make_shapes(40, 16, seed=0)
    d = write_fake_mnist(tmpdir())
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


def test_imagenet_mnist_bad_input_errors():
    d = tmpdir()
    write_fake_mnist(d)
    base = ["--backgrounds", "shapes", "--shapes-n", "64", "16", "--img-size", "16", "--width", "4",
            "--device", "cpu", "--out", d, "--mnist-dir", d, "--epochs", "1", "--batch-size", "32"]
    expect_exit(lambda: im.main(base + ["--digits", "3"]), "--digits", "at least two")
    expect_exit(lambda: im.main(base + ["--digits", "3", "3"]), "--digits")
    expect_exit(lambda: im.main(base + ["--digits", "1", "12"]), "--digits", "0-9")
    expect_exit(lambda: im.main(base + ["--digit-scale", "1.5"]), "--digit-scale")
    expect_exit(lambda: im.main(base + ["--epochs", "0"]), "--epochs")
    expect_exit(lambda: im.main(base + ["--max-images", "-1"]), "--max-images")
    expect_exit(lambda: im.main(base + ["--batch-size", "128"]), "larger than the dataset")
    expect_exit(lambda: im.main(base + ["--backgrounds", "no-such-set"]), "unknown dataset")
    expect_exit(lambda: im.main(base + ["--resume", os.path.join(d, "missing.pt")]), "checkpoint not found")
    torch.save({"format": common.CKPT_FORMAT, "method": "simclr", "args": {}}, os.path.join(d, "s.pt"))
    expect_exit(lambda: im.main(base + ["--resume", os.path.join(d, "s.pt")]), "simclr checkpoint")
    # a digit class the MNIST files lack, and broken MNIST files
    few = tmpdir()
    write_fake_mnist(few, n_train=5, n_test=5)  # labels 0..4 only
    expect_exit(lambda: im.main(base + ["--mnist-dir", few, "--digits", "1", "8"]), "no images of digit 8")
    broken = tmpdir()
    write_fake_mnist(broken)
    open(os.path.join(broken, "MNIST", "raw", "train-images-idx3-ubyte"), "wb").write(b"\x00\x00")
    expect_exit(lambda: im.main(base + ["--mnist-dir", broken]), "could not download or read MNIST")
    r = run_script("imagenet_mnist.py", *base, "--digits", "5")
    assert r.returncode == 1 and r.stderr.strip().startswith("error: --digits"), r.stderr[-500:]


def test_imagenet_mnist_end_to_end_all_settings_and_resume():
    """The whole experiment on tiny data: three settings, random init, table files; then a resumed setting."""
    d, out, two = tmpdir(), tmpdir(), tmpdir()
    write_fake_mnist(d, 60, 30)
    base = ["--backgrounds", "shapes", "--shapes-n", "64", "32", "--img-size", "16", "--width", "4",
            "--device", "cpu", "--mnist-dir", d, "--batch-size", "32", "--knn-k", "20", "--log-every", "1000"]
    s = im.main(base + ["--epochs", "1", "--out", out])
    assert set(s["rows"]) == {"digit", "background", "both", "random"}
    for row in s["rows"].values():
        assert 0 <= row["digit_error"] <= 100 and 0 <= row["background_error"] <= 100
    assert set(s["paper_pattern"]) == {"digit_views_best_for_digits", "background_views_better_for_backgrounds",
                                       "both_background_dominates"}
    md = open(os.path.join(out, "table.md")).read()
    assert md.count("\n") == 6 and "| digit, background |" in md and "| random init |" in md
    assert json.load(open(os.path.join(out, "table.json")))["digit"]["epochs"] == 1
    assert os.path.getsize(os.path.join(out, "bars.png")) > 1000
    enc, ck = common.load_encoder(os.path.join(out, "digit", "last.pt"))  # checkpoints load as encoders
    assert ck["setting"] == "digit" and ck["epoch"] == 1 and ck["step"] == 2
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


# ================================================================================================================
def main():
    words = sys.argv[1:]
    tests = [(n, f) for n, f in globals().items() if n.startswith("test_") and callable(f)
             and (not words or any(w in n for w in words))]
    passed = failed = 0
    t_all = time.time()
    for name, fn in tests:
        t0 = time.time()
        try:
            fn()
            passed += 1
            print(f"PASS {name} ({time.time() - t0:.1f}s)", flush=True)
        except BaseException as e:  # noqa: B036 (SystemExit from a script is a failure too)
            if isinstance(e, KeyboardInterrupt):
                raise
            failed += 1
            print(f"FAIL {name} ({time.time() - t0:.1f}s)\n{traceback.format_exc()}", flush=True)
    print(f"total {time.time() - t_all:.0f}s")
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
