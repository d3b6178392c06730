"""Shared code of common.py: augmentations, datasets, backbones, device, checkpoints, logs."""
import hashlib
import json
import math
import os
import pickle
import struct
import tarfile

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from util import expect_exit, runs_at, tmpdir
import common
import knn_eval
import simclr


# Augmentations
# ================================================================================================================
def test_augmentations_shapes_ranges_and_identity():
    torch.manual_seed(0)
    x = torch.rand(6, 3, 20, 24)
    for f in [lambda t: common.random_resized_crop(t, 16), common.random_flip, common.color_jitter,
              common.random_grayscale, lambda t: common.gaussian_blur(t, 5, p=1.0)]:
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
    # grayscale p=1 gives equal channels; flip p=1 mirrors
    g = common.random_grayscale(x, p=1.0)
    assert torch.allclose(g[:, 0], g[:, 1]) and torch.allclose(g[:, 1], g[:, 2])
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


def test_resized_crop_matches_torchvision_including_the_crop_border():
    """Each image's crop, resized up, equals torchvision's resized_crop (crop, then resize) -- also on the outer
    row/column, where sampling the full image with padding at the image border blends in pixels outside the crop
    (0.24 off before the fix)."""
    from torchvision.transforms.v2 import functional as TF
    torch.manual_seed(0)
    x = torch.rand(5, 3, 32, 24)
    boxes = torch.tensor([[3, 4, 10, 7], [0, 0, 24, 32], [5, 9, 13, 20], [20, 30, 4, 2], [1, 2, 3, 3]])
    y = common.resized_crop(x, boxes, 40)
    ref = torch.stack([TF.resized_crop(x[i], int(t), int(l), int(h), int(w), [40, 40], antialias=False)
                       for i, (l, t, w, h) in enumerate(boxes.tolist())])
    assert (y - ref).abs().max() < 1e-4, (y - ref).abs().max()


def test_color_jitter_draws_its_order_per_image_and_matches_torchvision():
    """The four colour operations are applied in an order drawn per image (as torchvision's ColorJitter), with
    the factors drawn per image; a per-image reference built from torchvision's functional ops agrees."""
    from torchvision.transforms.v2 import functional as TF
    x = torch.rand(64, 3, 8, 8)
    torch.manual_seed(3)
    y = common.color_jitter(x, 0.4, 0.4, 0.4, 0.1, p=1.0)
    torch.manual_seed(3)  # replay the draws of color_jitter: factors, then one order per image
    f = [torch.empty(64, 1, 1, 1).uniform_(0.6, 1.4) for _ in range(3)] + [torch.empty(64, 1, 1).uniform_(-0.1, 0.1)]
    order = torch.randint(24, (64,))
    assert len(order.unique()) > 10  # many different orders in one batch
    ops = [lambda im, i: TF.adjust_brightness(im, f[0][i].item()), lambda im, i: TF.adjust_contrast(im, f[1][i].item()),
           lambda im, i: TF.adjust_saturation(im, f[2][i].item()), lambda im, i: TF.adjust_hue(im, f[3][i].item())]
    for i in range(64):
        ref = x[i]
        for op in common.JITTER_ORDERS[order[i]]:
            ref = ops[op](ref, i)
        assert (y[i] - ref).abs().max() < 1e-4, (i, (y[i] - ref).abs().max())


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
        loader.set_epoch(3)
        seen.append(torch.cat([y for _, y in loader]).shape[0])
        idx = [i for b in loader.sampler for i in b]
        assert len(idx) == 20
        if rank == 0:
            first = set(idx)
        else:
            assert not first & set(idx) and len(first | set(idx)) == 40
    # a new epoch, a new order; the same epoch, the same order
    loader = common.make_loader(split, 40, shuffle=True, seed=1)
    loader.set_epoch(0)
    o0 = list(loader.sampler)[0]
    loader.set_epoch(1)
    o1 = list(loader.sampler)[0]
    loader.set_epoch(0)
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


def test_nin_backbone_is_the_rotnet_papers_network_in_four_blocks():
    """--backbone nin: the reference's NetworkInNetwork with 4 blocks (FeatureLearningRotNet, CIFAR-10 config): each
    block a 5x5 (blocks 1-2) or 3x3 (3-4) conv and two 1x1 convs, each conv without bias and followed by BatchNorm
    and ReLU; 192 channels, 160 and 96 in block 1; max-pool after block 1, average pool after block 2; h is the
    global average of block 4. --width scales the channels; images > 64 px get a third pool (the reference's
    default); block_features gives the four block outputs, block 2's the 192 x 8 x 8 map the paper probes."""
    net = common.build_backbone("nin").eval()
    assert isinstance(net, common.NIN) and len(net.blocks) == 4 and net.feature_dim == 192
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size[0]) for c in convs] == [
        (3, 192, 5), (192, 160, 1), (160, 96, 1), (96, 192, 5), (192, 192, 1), (192, 192, 1)] + \
        [(192, 192, 3), (192, 192, 1), (192, 192, 1)] * 2
    assert all(c.bias is None for c in convs)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) == 12
    assert [type(b[-1]).__name__ for b in net.blocks] == ["MaxPool2d", "AvgPool2d", "Identity", "Identity"]
    x = torch.randn(2, 3, 32, 32)
    maps = net.block_features(x)
    assert [tuple(m.shape[1:]) for m in maps] == [(96, 16, 16), (192, 8, 8), (192, 8, 8), (192, 8, 8)]
    assert torch.allclose(net(x), maps[3].mean((2, 3))) and all((m >= 0).all() for m in maps)
    small = common.build_backbone("nin", width=16, small=False).eval()
    assert small.feature_dim == 48 and type(small.blocks[2][-1]).__name__ == "AvgPool2d"
    assert [tuple(m.shape[1:]) for m in small.block_features(torch.randn(1, 3, 96, 96))] == [
        (24, 48, 48), (48, 24, 24), (48, 12, 12), (48, 12, 12)]
    args = knn_eval.get_args(["--random-init", "--backbone", "nin", "--width", "16"])[1]
    assert common.backbone_kwargs(args, 32) == {"width": 16, "small": True}


@runs_at(None)  # tests the auto rule itself
def test_device_and_amp_selection():
    assert common.get_device("cpu").type == "cpu"
    assert common.get_device("auto").type in ("cpu", "cuda", "mps")
    autocast, scaler = common.setup_amp("auto", torch.device("cpu"))
    assert not scaler.is_enabled()
    with autocast():
        assert torch.is_autocast_enabled("cpu") == common.cpu_has_native_bf16()
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
    log = common.RunLog(d, argparse.Namespace(a=1), start_epoch=2)  # resuming from epoch 2 drops epoch 3 ...
    assert len(open(os.path.join(d, "metrics.jsonl")).readlines()) == 3  # ... once the run begins, not before
    log.begin()
    assert [json.loads(x)["epoch"] for x in open(os.path.join(d, "metrics.jsonl"))] == [1, 2]
    assert json.load(open(os.path.join(d, "args.json"))) == {"a": 1}
    assert common.fmt_time(3725) == "1:02:05"


def test_a_run_stopped_by_bad_input_leaves_its_folder_as_it_was(tmp_path):
    """A typo in --data with --out pointing at an earlier run must not erase that run's metrics.jsonl or args.json
    (the run folder is written at the first step); a run that trains writes args.json with its resolved defaults."""
    d = str(tmp_path)
    tiny = ["--data", "shapes", "--shapes-n", "32", "16", "--width", "2", "--batch-size", "16", "--epochs", "1",
            "--device", "cpu", "--out", d, "--log-every", "1000"]
    simclr.main(tiny)
    before = {f: open(os.path.join(d, f)).read() for f in ("args.json", "metrics.jsonl")}
    assert json.loads(before["args.json"])["jitter_strength"] is not None  # resolved from the image size
    expect_exit(lambda: simclr.main(tiny + ["--data", "/no/such/folder"]), "dataset folder not found")
    expect_exit(lambda: simclr.main(tiny + ["--batch-size", "64"]), "larger than the dataset")
    assert before == {f: open(os.path.join(d, f)).read() for f in ("args.json", "metrics.jsonl")}


# ================================================================================================================


def test_given_flags_sees_exact_equals_and_abbreviated_flags():
    """--resume keeps the checkpoint's flags except those given again: those are found written in full, with =,
    or abbreviated as argparse allows; flags left at their defaults are not."""
    import simclr
    parser, _ = simclr.get_args([])
    argv = ["--temp", "0.2", "--epochs=3", "--out", "x", "--data", "shapes"]
    assert common.given_flags(parser, argv) == {"temperature", "epochs", "out", "data"}
    assert common.given_flags(parser, []) == set()


def test_restore_takes_hyperparameters_and_schedule_from_this_runs_flags():
    """--resume with a new --lr / --weight-decay / --epochs acts from the first resumed step (the optimizer's and
    LambdaLR's saved state used to override them); with unchanged flags the restored values equal the saved ones."""
    def build(lr, wd, total):
        model = nn.Linear(3, 2)
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=wd)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: common.warmup_cosine(s, total, 2))
        return model, opt, sched

    model, opt, sched = build(0.5, 1e-4, 10)
    for _ in range(6):
        model(torch.randn(4, 3)).sum().backward()
        opt.step()
        sched.step()
    ckpt = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "rng": [common.rng_state()], "epoch": 3}
    saved_lr = opt.param_groups[0]["lr"]

    model2, opt2, sched2 = build(0.5, 1e-4, 10)          # same flags: the saved values, exactly
    assert common.restore(ckpt, 0, model=model2, optimizer=opt2, scheduler=sched2) == 3
    assert opt2.param_groups[0]["lr"] == saved_lr and sched2.get_last_lr() == [saved_lr]
    assert opt2.state_dict()["state"][0]["momentum_buffer"].equal(opt.state_dict()["state"][0]["momentum_buffer"])

    model3, opt3, sched3 = build(0.1, 5e-4, 20)          # --lr 0.1 --weight-decay 5e-4, twice the steps
    common.restore(ckpt, 0, model=model3, optimizer=opt3, scheduler=sched3)
    assert sched3.last_epoch == 6
    assert math.isclose(opt3.param_groups[0]["lr"], 0.1 * common.warmup_cosine(6, 20, 2), rel_tol=1e-12)
    assert opt3.param_groups[0]["weight_decay"] == 5e-4 and sched3.base_lrs == [0.1]
    sched3.step()
    assert math.isclose(opt3.param_groups[0]["lr"], 0.1 * common.warmup_cosine(7, 20, 2), rel_tol=1e-12)
