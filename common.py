"""What every script of this project shares, and nothing a single method owns.

Sections, in order:
  1. errors            -- `fail()`: one clear line and a non-zero exit for bad input
  2. device, precision -- `--device`, `--amp`, seeding, torchrun / DistributedDataParallel set-up
  3. datasets          -- cifar10/100, stl10, mnist, imagenette (downloaded), any folder, synthetic `shapes`,
                          all turned into uint8 tensors (N, 3, S, S) that are decoded and resized once
  4. augmentations     -- batched, on the training device, independent random parameters per image;
                          each method composes its own recipe from these blocks in its own file
  5. backbones         -- torchvision ResNet-18/34/50 (with a small-image stem and a width option) and the
                          DeepCluster AlexNet (BatchNorm, optional Sobel input), RotNet's Network-In-Network, a
                          ViT-Tiny (torchvision's VisionTransformer, any input size), the context encoder's stack of
                          stride-2 convs; each returns h and has .feature_dim
  6. checkpoints, logs -- one checkpoint format, atomic writes, `load_encoder`, progress/ETA, metrics.jsonl, curves.png
  7. optimisation      -- LARS, parameter groups without decay on biases and BatchNorm, the optimiser choice,
                          learning-rate scaling with the batch, warm-up then cosine decay
  8. kNN monitor       -- the weighted kNN that every training script prints, and its flags
"""
import argparse
import glob
import hashlib
import itertools
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageDraw
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler
from torchvision.models.resnet import BasicBlock, Bottleneck

CKPT_FORMAT = "minimal-ssl/1"  # every checkpoint of this project carries this tag
MEAN = torch.tensor([0.485, 0.456, 0.406])  # ImageNet statistics, used for every dataset
STD = torch.tensor([0.229, 0.224, 0.225])


# ----------------------------------------------------------------------------------------------------------------
# 1. Errors: bad input stops the run with one line that names the problem (SystemExit prints it, exit status 1).
# ----------------------------------------------------------------------------------------------------------------
def fail(message):
    raise SystemExit(f"error: {message}")


# ----------------------------------------------------------------------------------------------------------------
# 2. Device, precision, seeding, distributed
# ----------------------------------------------------------------------------------------------------------------
def add_common_args(parser, backbone="resnet18", training=True, sobel=True):
    """The flags every script has (data, model, device, run folder). Method flags stay in each file.
    training=False (evaluation scripts) leaves out --compile and --resume. sobel: the --sobel default, whether an
    AlexNet gets DeepCluster's fixed Sobel input layer (True) or sees RGB (False) unless told otherwise."""
    group = parser.add_argument_group("data, model, device and run (shared by every script)")
    group.add_argument("--data", default="shapes", help=f"dataset: one of {', '.join(DATASETS)}, or a folder path "
                   "(class sub-folders, either directly or under train/ and val/ or test/)")
    group.add_argument("--data-dir", default="./data", help="where datasets are downloaded and decoded caches kept")
    group.add_argument("--img-size", type=int, default=None, help=f"{'training' if training else 'evaluation'} "
                   "resolution in px (default: the dataset's)")
    group.add_argument("--imagenette-size", default="160px", choices=list(IMAGENETTE), help="which Imagenette archive")
    group.add_argument("--shapes-n", type=int, nargs=2, default=[5000, 1000], metavar=("TRAIN", "TEST"),
                   help="number of training and test images of the synthetic `shapes` dataset")
    group.add_argument("--backbone", default=backbone, choices=list(BACKBONES), help="encoder architecture")
    group.add_argument("--width", type=int, default=64, help="base width of ResNet/AlexNet/NIN (64 = the standard network; 16 or 32 for CPU; ignored by vit_tiny)")
    group.add_argument("--sobel", action=argparse.BooleanOptionalAction, default=sobel,
                       help="AlexNet only: a fixed Sobel input layer (DeepCluster's); --no-sobel: RGB input")
    group.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="DataLoader worker processes for large images and decoding (default: min(4, CPU count))")
    group.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="auto: cuda, mps, cpu")
    group.add_argument("--amp", default="auto", choices=["auto", "off", "bf16", "fp16"],
                   help="mixed precision of the forward pass (losses stay fp32). auto: on CUDA bf16 if supported, else "
                        "fp16 with a GradScaler; on a CPU bf16 if it computes bf16 natively (AVX-512 BF16, AMX or "
                        "Arm BF16), else off; off on MPS")
    group.add_argument("--channels-last", default="auto", choices=["auto", "on", "off"],
                   help="NHWC memory format for convolutions. auto: on for CUDA and for CPUs with AVX-512; off on "
                        "AVX2-only CPUs, where oneDNN crashed with it (see docs/simclr.md)")
    if training:
        group.add_argument("--compile", action="store_true", help="torch.compile the model")
    group.add_argument("--seed", type=int, default=0, help="seed of python, numpy and torch")
    group.add_argument("--out", default=None, help="run folder (default runs/<method>-<data>-<time>)")
    if training:
        group.add_argument("--resume", default=None, help="checkpoint (last.pt) to continue from, same epoch, step and lr")
    group.add_argument("--log-every", type=int, default=20, help="print a progress line every N steps")
    return parser


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def get_device(name="auto"):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        fail("--device cuda but no CUDA device is available (use --device auto or cpu)")
    if name == "mps" and not torch.backends.mps.is_available():
        fail("--device mps but MPS is not available (use --device auto or cpu)")
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device(name)


def cpu_has_native_bf16():
    """True where the CPU computes bf16 in hardware (x86 AVX-512 BF16 or AMX, Arm BF16): there bf16 autocast is
    ~2x faster than fp32; elsewhere bf16 is emulated and slower than fp32."""
    caps = torch.cpu.get_capabilities()
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16") or caps.get("bf16"))


def setup_amp(amp, device):
    """Returns (autocast, scaler): `with autocast(): ...` around the forward pass, `scaler` for fp16 loss scaling.
    `autocast.dtype` is the chosen dtype (None = fp32)."""
    if amp == "auto":
        if device.type == "cuda":
            amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            amp = "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "off"
    if amp == "fp16" and device.type != "cuda":
        fail(f"--amp fp16 needs a CUDA device (this run is on {device.type}); use --amp bf16, off or auto")
    if amp == "bf16" and device.type not in ("cuda", "cpu"):
        fail(f"--amp bf16 needs a CUDA device or a CPU (this run is on {device.type}); use --amp off or auto")
    dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    scaler = torch.amp.GradScaler(device.type if device.type == "cuda" else "cpu", enabled=(amp == "fp16"))

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
    autocast.dtype = dtype
    return autocast, scaler


def cpu_has_avx512():
    """True where the CPU has AVX-512 (torch reports avx512_f): there oneDNN's channels_last kernels are fast and safe."""
    return bool(torch.cpu.get_capabilities().get("avx512_f"))


def memory_format(device, channels_last="auto"):
    """The memory format of the model and its inputs (--channels-last). auto: channels_last (NHWC) on CUDA and on
    CPUs with AVX-512, where it is faster (1.4x fp32, 1.1x bf16 at width 16 on a Zen 5); plain NCHW elsewhere:
    on an AVX2-only Zen 3, torch 2.14.1's oneDNN crashed (double free / segfault) training a width-4 ResNet-18 in
    channels_last at fp32, and hung with 2 threads. `on` forces it (at your own risk on such CPUs)."""
    if channels_last == "auto":
        use = device.type == "cuda" or (device.type == "cpu" and cpu_has_avx512())
    else:
        use = channels_last == "on"
    return torch.channels_last if use else torch.contiguous_format


def compile_model(model, memory_format):
    """torch.compile (--compile). In a run that is not channels_last (`memory_format`, the run's resolved format),
    inductor's layout optimisation is turned off: it converts convolutions to channels_last, which hits the oneDNN
    crash of memory_format() on AVX2-only CPUs (a `double free`, measured), and the run asked for NCHW."""
    if memory_format != torch.channels_last:
        import torch._inductor.config as inductor_config
        inductor_config.layout_optimization = False
    return torch.compile(model)


def setup_distributed(device):
    """Under `torchrun`, join the process group (nccl on CUDA, gloo on CPU). Returns (rank, world_size)."""
    if "RANK" not in os.environ:
        return 0, 1
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


class AllReduceBatchNorm(nn.BatchNorm2d):
    """BatchNorm over the global batch of every rank, for CPU/gloo where nn.SyncBatchNorm (CUDA only) cannot run.

    Per-channel sum, sum of squares and count are all-reduced with a differentiable all_reduce, so the output and
    the gradients are those of one BatchNorm over the concatenated batch. Works for (N, C) and (N, C, H, W) inputs.
    """
    def _check_input_dim(self, x):
        if x.dim() not in (2, 4):
            raise ValueError(f"expected 2D or 4D input, got {x.dim()}D")

    def forward(self, x):
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        dims = [0] + list(range(2, x.dim()))
        C, count = x.shape[1], x.numel() // x.shape[1]
        stats = torch.cat([x.sum(dims), (x * x).sum(dims), x.new_tensor([float(count)])])
        stats = all_reduce_with_grad(stats)  # sums over ranks, gradient flows back to every rank
        n = stats[-1]
        mean = stats[:C] / n
        var = stats[C:2 * C] / n - mean * mean  # biased variance over the global batch
        with torch.no_grad():
            self.num_batches_tracked += 1
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(m * mean.detach())
            self.running_var.mul_(1 - m).add_(m * var.detach() * n / (n - 1))
        shape = [1, C] + [1] * (x.dim() - 2)
        x = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        return x * self.weight.view(shape) + self.bias.view(shape)


def all_gather_with_grad(x):
    """Concatenate x (N, ...) from every rank into (world*N, ...); the backward pass sums the gradients of every
    rank's copy into its owner (torch.distributed.nn: differentiable collectives)."""
    import warnings
    import torch.distributed.nn.functional as dist_nn
    with warnings.catch_warnings():  # "deprecated" in favour of a private module; still the public API
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(dist_nn.all_gather(x))


def all_reduce_with_grad(x):
    """Sum of x over every rank; differentiable (the backward pass all-reduces the gradient)."""
    import warnings
    import torch.distributed.nn.functional as dist_nn
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return dist_nn.all_reduce(x)


def convert_sync_batchnorm(model, device):
    """Every BatchNorm normalises over the global batch: nn.SyncBatchNorm on CUDA, AllReduceBatchNorm elsewhere."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, AllReduceBatchNorm):
            new = AllReduceBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                     child.track_running_stats, device=child.running_mean.device,
                                     dtype=child.running_mean.dtype)
            new.load_state_dict(child.state_dict())
            setattr(model, name, new)
        else:
            convert_sync_batchnorm(child, device)
    return model


# ----------------------------------------------------------------------------------------------------------------
# 3. Datasets. Every split becomes images: uint8 (N, 3, S, S), labels: int64 (N,) (-1 = no label), classes: [str].
#    Images are decoded and resized once; the result is cached as .npy under <data-dir>/cache. Small images
#    (<= 96 px) are then held in memory; larger ones are memory-mapped and read by DataLoader workers.
# ----------------------------------------------------------------------------------------------------------------
DATASETS = ["cifar10", "cifar100", "stl10", "stl10-unlabeled", "mnist", "imagenette", "shapes"]
IMAGENETTE = torchvision.datasets.Imagenette._ARCHIVES  # {"160px": (url, md5), "320px": ..., "full": ...}
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SMALL = 96  # at most this many pixels a side: held in memory


class Split:
    def __init__(self, images, labels, classes):
        self.images, self.labels, self.classes = images, labels, classes

    def __len__(self):
        return len(self.images)

    def __getitem__(self, idx):  # idx: a list of indices (a whole batch is read at once)
        idx = torch.as_tensor(idx)
        return self.images[idx], self.labels[idx]


class Data:
    """train: what pre-training sees (labels unused); memory: labelled training split (kNN memory bank, probes);
    test: labelled evaluation queries."""
    def __init__(self, name, img_size, train, memory, test):
        self.name, self.img_size, self.train, self.memory, self.test = name, img_size, train, memory, test
        self.num_classes = len(test.classes)


def dataset_from_args(args, log=print):
    return load_dataset(args.data, args.data_dir, args.img_size, args.imagenette_size, args.workers,
                        shapes_n=tuple(args.shapes_n), seed=args.seed, log=log)


def load_dataset(name, data_dir="./data", img_size=None, imagenette_size="160px", workers=4, url=None, md5=None,
                 shapes_n=(5000, 1000), seed=0, log=print):
    """Load a dataset by name or folder path. `url`/`md5` override the Imagenette archive (tests use file://)."""
    if name in DATASETS:
        pass
    elif os.path.isdir(name):
        return load_folder(name, data_dir, img_size, workers, log)
    elif os.sep in name or name.startswith("."):
        fail(f"dataset folder not found: {name}")
    else:
        fail(f"unknown dataset '{name}': expected one of {', '.join(DATASETS)}, or a folder path")
    if img_size is not None and img_size < 8:
        fail(f"--img-size {img_size} is too small (at least 8)")
    if name == "shapes":
        if min(shapes_n) < 1:
            fail(f"--shapes-n needs positive sizes, got {list(shapes_n)}")
        size = img_size or 32
        tr = make_shapes(shapes_n[0], size, seed=seed)
        te = make_shapes(shapes_n[1], size, seed=seed + 1_000_003)
        return Data("shapes", size, tr, tr, te)
    if name == "imagenette":
        root = download_imagenette(data_dir, imagenette_size, url, md5, log)
        return load_folder(root, data_dir, img_size or 128, workers, log, name="imagenette")
    tv = torchvision.datasets
    root = os.path.join(data_dir, name.split("-")[0])
    try:
        if name in ("cifar10", "cifar100"):
            cls = tv.CIFAR10 if name == "cifar10" else tv.CIFAR100
            parts = [cls(root, train=t, download=True) for t in (True, False)]
            parts = [(torch.from_numpy(p.data).permute(0, 3, 1, 2), torch.tensor(p.targets), p.classes) for p in parts]
        elif name == "mnist":
            parts = [tv.MNIST(root, train=t, download=True) for t in (True, False)]
            parts = [(p.data[:, None].expand(-1, 3, -1, -1), p.targets, p.classes) for p in parts]
        else:  # stl10: pre-train on the 100k unlabelled images (plus the 5k labelled ones for "stl10")
            splits = ["train+unlabeled" if name == "stl10" else "unlabeled", "train", "test"]
            stl = [tv.STL10(root, split=s, download=True) for s in splits]
            parts = [(torch.from_numpy(p.data), torch.from_numpy(p.labels).long(), p.classes) for p in stl]
    except (OSError, RuntimeError) as e:  # no network, broken archive, ...
        fail(f"could not download or read {name} into {root}: {e}")
    size = img_size or parts[0][0].shape[-1]
    splits = [Split(resize_uint8(x, size), y.long(), list(c)) for x, y, c in parts]
    if len(splits) == 2:
        splits = [splits[0], splits[0], splits[1]]
    return Data(name, size, *splits)


def download_imagenette(data_dir, size="160px", url=None, md5=None, log=print):
    """fast.ai's Imagenette: download the archive, verify its md5, extract; returns the folder holding train/, val/.
    `url` may also be a file:// URL or a local path (offline copies, tests)."""
    from torchvision.datasets.utils import check_integrity, extract_archive
    if size not in IMAGENETTE:
        fail(f"unknown Imagenette size '{size}': expected one of {', '.join(IMAGENETTE)}")
    default_url, default_md5 = IMAGENETTE[size]
    url, md5 = url or default_url, md5 or (default_md5 if url is None else None)
    filename = os.path.basename(url)
    folder = os.path.join(data_dir, filename.split(".")[0])
    if os.path.isdir(os.path.join(folder, "train")):
        return folder
    archive = os.path.join(data_dir, filename)
    if not (os.path.exists(archive) and (md5 is None or check_integrity(archive, md5))):
        download(url, archive, log)
    if md5 is not None and not check_integrity(archive, md5):
        os.remove(archive)
        fail(f"could not download {url}: md5 of the archive is not {md5} (corrupt or incomplete; removed)")
    log(f"extracting {archive} ...")
    extract_archive(archive, data_dir)
    if not os.path.isdir(os.path.join(folder, "train")):
        fail(f"{archive} did not contain {os.path.basename(folder)}/train")
    return folder


def download(url, path, log=print, chunk=1 << 20):
    """Fetch `url` (http(s), file:// or a local path) to `path` atomically, printing progress."""
    import urllib.request
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if "://" not in url:
        url = "file://" + os.path.abspath(url)
    tmp, t0, done = f"{path}.tmp{os.getpid()}", time.time(), 0
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0)
            while block := r.read(chunk):
                f.write(block)
                done += len(block)
                if done % (50 * chunk) < chunk:
                    speed = done / max(time.time() - t0, 1e-9)
                    eta = f", ETA {fmt_time((total - done) / speed)}" if total else ""
                    log(f"downloaded {done / 2**20:.0f}/{total / 2**20:.0f} MB ({speed / 2**20:.1f} MB/s{eta})")
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        fail(f"could not download {url}: {e}")


def load_folder(root, data_dir, img_size, workers, log=print, name=None):
    """A folder of class sub-folders: root/{train,val|test}/<class>/*.jpg, or one tree root/<class>/*.jpg (then a
    deterministic 10% per class is held out as the test split; its labels are only used for evaluation)."""
    root = os.path.abspath(root)
    test_dir = next((os.path.join(root, d) for d in ("val", "test") if os.path.isdir(os.path.join(root, d))), None)
    if os.path.isdir(os.path.join(root, "train")):
        if test_dir is None:
            fail(f"{root} has train/ but neither val/ nor test/")
        train_files, train_labels, classes = list_images(os.path.join(root, "train"))
        test_files, test_labels, test_classes = list_images(test_dir, classes)
    else:
        files, labels, classes = list_images(root)
        order = torch.randperm(len(files), generator=torch.Generator().manual_seed(0)).tolist()
        held = set()
        for c in range(len(classes)):  # every 10th image of each class, in a seeded order
            of_c = [i for i in order if labels[i] == c]
            held.update(of_c[:max(1, len(of_c) // 10)])
        train_idx = [i for i in range(len(files)) if i not in held]
        test_idx = sorted(held)
        train_files, train_labels = [files[i] for i in train_idx], [labels[i] for i in train_idx]
        test_files, test_labels = [files[i] for i in test_idx], [labels[i] for i in test_idx]
    if img_size is None:
        with Image.open(train_files[0]) as im:
            img_size = min(min(im.size), 224)
    tr = Split(*decode_images(train_files, img_size, data_dir, workers, log), classes)
    te = Split(*decode_images(test_files, img_size, data_dir, workers, log), classes)
    tr.labels, te.labels = torch.tensor(train_labels), torch.tensor(test_labels)
    return Data(name or os.path.basename(root), img_size, tr, tr, te)


def list_images(folder, classes=None):
    """(files, labels, classes) of a class-sub-folder tree; `classes` fixes the class order (for val/)."""
    found = sorted(d.name for d in os.scandir(folder) if d.is_dir())
    if not found:
        fail(f"no class sub-folders in {folder} (expected {folder}/<class>/<image files>)")
    if classes is not None and set(found) - set(classes):
        fail(f"{folder} has classes that the training split lacks: {sorted(set(found) - set(classes))}")
    classes = classes or found
    files, labels = [], []
    for c in found:
        fs = sorted(f for f in glob.glob(os.path.join(folder, c, "**", "*"), recursive=True)
                    if f.lower().endswith(IMG_EXTENSIONS))
        if not fs:
            fail(f"class folder {os.path.join(folder, c)} has no images ({', '.join(IMG_EXTENSIONS)})")
        files += fs
        labels += [classes.index(c)] * len(fs)
    return files, labels, classes


def _decode_one(path, size):
    """Open, convert to RGB, resize the shorter side to `size` and center-crop; None if the file is unreadable."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = size / min(w, h)
            im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
            w, h = im.size
            left, top = (w - size) // 2, (h - size) // 2
            return np.asarray(im.crop((left, top, left + size, top + size))).transpose(2, 0, 1).copy()
    except Exception:
        return None


class _Files(torch.utils.data.Dataset):
    def __init__(self, files, size):
        self.files, self.size = files, size

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return i, _decode_one(self.files[i], self.size)


def decode_images(files, size, data_dir, workers=4, log=print):
    """Decode every file once into uint8 (N, 3, size, size), in parallel, cached as .npy under <data-dir>/cache.
    Returns (images, None): labels are filled in by the caller."""
    key = hashlib.sha1(json.dumps([size] + [(f, os.path.getsize(f)) for f in files]).encode()).hexdigest()[:16]
    cache = os.path.join(data_dir, "cache", f"images-{size}px-{len(files)}-{key}.npy")
    if not os.path.exists(cache):
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        tmp = cache + f".tmp{os.getpid()}"
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(files), 3, size, size))
        loader = DataLoader(_Files(files, size), batch_size=None, num_workers=workers)
        t0 = time.time()
        for n, (i, arr) in enumerate(loader, 1):
            if arr is None:
                fail(f"cannot read image file {files[i]}")
            out[i] = arr
            if n % 2000 == 0 or n == len(files):
                log(f"decoded {n}/{len(files)} images at {size}px ({n / (time.time() - t0):.0f}/s)")
        out.flush()
        del out
        os.replace(tmp, cache)
    images = np.load(cache, mmap_mode="c" if size > SMALL else None)
    return torch.from_numpy(images), None


def resize_uint8(x, size):
    """uint8 (N, 3, H, W) -> uint8 (N, 3, size, size), antialiased, in chunks (done once, at load time)."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x.contiguous()
    out = [F.interpolate(c.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
           for c in x.split(2048)]
    return torch.cat(out).round().clamp(0, 255).to(torch.uint8)


SHAPES = ["circle", "ring", "triangle", "square", "pentagon", "star", "cross", "crescent", "arrow", "bar"]


def make_shapes(n, size=32, seed=0):
    """The synthetic `shapes` dataset: one of 10 shapes, light (215) on a dark (40) background with pixel noise, with
    a random size, position and a small rotation (+-20 degrees). Deterministic given (n, size, seed); no download.
    All that varies within a class is geometry, and crops remove most of it (position, size); colour varies only
    through the training augmentations. Random per-image colours made the set useless for instance discrimination:
    the relative colours of shape and background survive colour jitter (a hue shift moves both), so SimCLR learned
    to tell images apart by colour, not shape, and ended below a random-init encoder (see README). With free
    rotation, the angle would be the same kind of shortcut."""
    rng = np.random.default_rng(seed)
    labels = torch.from_numpy(rng.integers(0, len(SHAPES), n)).long()
    images = np.empty((n, 3, size, size), np.uint8)
    S = 4 * size  # draw at 4x, then downsample: antialiased edges
    for i in range(n):
        mask = Image.new("L", (S, S), 0)
        r = rng.uniform(0.25, 0.45) * S
        cx, cy = rng.uniform(r, S - r, 2)
        rot = rng.uniform(-0.35, 0.35) - np.pi / 2  # upright +- 20 degrees: no augmentation removes rotation
        _draw_shape(ImageDraw.Draw(mask), SHAPES[labels[i]], cx, cy, r, rot)
        m = np.asarray(mask.resize((size, size), Image.LANCZOS), np.float32)[None] / 255
        img = 40 + 175 * m + rng.normal(0, 12, (3, size, size))
        images[i] = np.clip(img, 0, 255).astype(np.uint8)
    return Split(torch.from_numpy(images), labels, list(SHAPES))


def _draw_shape(d, shape, cx, cy, r, rot):
    def poly(k, radii=(1.0,), phase=0.0):
        pts = []
        for j in range(k * len(radii)):
            ang = rot + phase + 2 * np.pi * j / (k * len(radii))
            rr = r * radii[j % len(radii)]
            pts.append((cx + rr * np.cos(ang), cy + rr * np.sin(ang)))
        return pts

    def rotated(points):  # points in units of r around the centre
        c, s = np.cos(rot), np.sin(rot)
        return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in points]
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        d.ellipse(box, fill=255)
    elif shape == "ring":
        d.ellipse(box, fill=255)
        d.ellipse((cx - 0.55 * r, cy - 0.55 * r, cx + 0.55 * r, cy + 0.55 * r), fill=0)
    elif shape == "triangle":
        d.polygon(poly(3), fill=255)
    elif shape == "square":
        d.polygon(poly(4), fill=255)
    elif shape == "pentagon":
        d.polygon(poly(5), fill=255)
    elif shape == "star":
        d.polygon(poly(5, (1.0, 0.4)), fill=255)
    elif shape == "cross":
        d.polygon(rotated([(-1, -.3), (-.3, -.3), (-.3, -1), (.3, -1), (.3, -.3), (1, -.3), (1, .3), (.3, .3),
                           (.3, 1), (-.3, 1), (-.3, .3), (-1, .3)]), fill=255)
    elif shape == "crescent":
        d.ellipse(box, fill=255)
        ox, oy = cx + 0.5 * r * np.cos(rot), cy + 0.5 * r * np.sin(rot)
        d.ellipse((ox - 0.85 * r, oy - 0.85 * r, ox + 0.85 * r, oy + 0.85 * r), fill=0)
    elif shape == "arrow":
        d.polygon(rotated([(-1, -.25), (.1, -.25), (.1, -.7), (1, 0), (.1, .7), (.1, .25), (-1, .25)]), fill=255)
    elif shape == "bar":
        d.polygon(rotated([(-1, -.22), (1, -.22), (1, .22), (-1, .22)]), fill=255)


def make_loader(split, batch_size, shuffle, drop_last=False, workers=0, seed=0, rank=0, world=1):
    """Batches of (uint8 images, labels) from a Split. Each rank gets its own shard (DistributedSampler, also used
    for one process); call `loader.set_epoch(epoch)` for a new, reproducible order.
    In-memory small images need no workers; memory-mapped large images are read by `workers` processes."""
    workers = 0 if split.images.shape[-1] <= SMALL else workers
    sampler = DistributedSampler(split, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
    batches = BatchSampler(sampler, batch_size, drop_last)
    if drop_last and len(batches) == 0:
        fail(f"batch size {batch_size * world} is larger than the dataset ({len(split)} images)")
    loader = DataLoader(split, batch_size=None, sampler=batches, num_workers=workers,
                        pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0,
                        generator=torch.Generator().manual_seed(seed))  # leaves the global RNG (augmentations) alone
    loader.set_epoch = sampler.set_epoch  # `loader.set_epoch(epoch)`: this epoch's shuffled order
    return loader


# ----------------------------------------------------------------------------------------------------------------
# 4. Augmentations: batched on the device, each image with its own random parameters. Input/output: float images
#    (N, 3, H, W) in [0, 1] (normalize() last). A per-image coin flip `p` picks which images get a transform.
# ----------------------------------------------------------------------------------------------------------------
def to_float(x):
    """uint8 (N, 3, H, W) on any device -> float in [0, 1]."""
    return x.float().div_(255)


def normalize(x):
    return (x - MEAN.to(x.device).view(1, 3, 1, 1)) / STD.to(x.device).view(1, 3, 1, 1)


def denormalize(x):
    return x * STD.to(x.device).view(1, 3, 1, 1) + MEAN.to(x.device).view(1, 3, 1, 1)


def _coin(x, p):
    return (torch.rand(x.shape[0], device=x.device) < p).view(-1, 1, 1, 1)


def random_resized_crop(x, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """Crop a random area fraction `scale` and aspect `ratio` of each image and resize it to size x size
    (bilinear), as torchvision's RandomResizedCrop: 10 tries per image, else the whole image."""
    N, _, H, W = x.shape
    dev = x.device
    area = torch.empty(N, 10, device=dev).uniform_(*scale) * H * W
    logr = torch.empty(N, 10, device=dev).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    w, h = (area * logr.exp()).sqrt().round(), (area / logr.exp()).sqrt().round()
    ok = (w <= W) & (h <= H) & (w > 0) & (h > 0)
    first = ok.float().argmax(1)  # first valid try per image
    w, h = w.gather(1, first[:, None])[:, 0], h.gather(1, first[:, None])[:, 0]
    none = ~ok.any(1)
    w, h = torch.where(none, torch.full_like(w, W), w), torch.where(none, torch.full_like(h, H), h)
    x0 = (torch.rand(N, device=dev) * (W - w + 1)).floor()
    y0 = (torch.rand(N, device=dev) * (H - h + 1)).floor()
    return resized_crop(x, torch.stack([x0, y0, w, h], 1), size)


def resized_crop(x, boxes, size):
    """Crop boxes (N, 4) = (left, top, width, height) in pixels, one per image, and resize each to size x size with
    bilinear interpolation, in one grid_sample. Samples are clamped to the crop's own border pixels, as
    torchvision's resized_crop (crop, then resize) does; without antialiasing (see docs/simclr.md)."""
    N, C, H, W = x.shape
    x0, y0, w, h = boxes.to(x.dtype).unbind(1)
    # output pixel centre j (0..size-1) samples input pixel x0 + (j + 0.5) * w / size - 0.5, clamped to the crop
    j = (torch.arange(size, device=x.device, dtype=x.dtype) + 0.5) / size  # (size,)
    px = (x0[:, None] + j * w[:, None] - 0.5).clamp(min=x0[:, None]).minimum(x0[:, None] + w[:, None] - 1)
    py = (y0[:, None] + j * h[:, None] - 0.5).clamp(min=y0[:, None]).minimum(y0[:, None] + h[:, None] - 1)
    gx, gy = (2 * px + 1) / W - 1, (2 * py + 1) / H - 1  # pixel -> normalised coordinates (align_corners=False)
    grid = torch.stack([gx[:, None, :].expand(N, size, size), gy[:, :, None].expand(N, size, size)], -1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def center_resize(x, size):
    """Deterministic resize of the whole image (evaluation)."""
    if x.shape[-1] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def random_flip(x, p=0.5):
    return torch.where(_coin(x, p), x.flip(-1), x)


def _gray(x):
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _rgb_to_hsv(x):
    r, g, b = x.unbind(1)
    mx, mn = x.max(1).values, x.min(1).values
    d = mx - mn
    ds = torch.where(d == 0, torch.ones_like(d), d)
    h = torch.where(mx == r, ((g - b) / ds) % 6, torch.where(mx == g, (b - r) / ds + 2, (r - g) / ds + 4))
    h = torch.where(d == 0, torch.zeros_like(h), h) / 6
    s = torch.where(mx == 0, torch.zeros_like(d), d / torch.where(mx == 0, torch.ones_like(mx), mx))
    return h, s, mx


def _hsv_to_rgb(h, s, v):
    k = torch.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6], 1)  # (N, 3, H, W)
    return v[:, None] - (v * s)[:, None] * k.clamp(max=1).minimum(4 - k).clamp(min=0)


JITTER_ORDERS = list(itertools.permutations(range(4)))  # brightness 0, contrast 1, saturation 2, hue 3


def color_jitter(x, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, p=0.8):
    """Per image, with probability p: brightness, contrast, saturation and hue factors drawn independently
    (uniform in [1-b, 1+b], ..., hue shift in [-hue, hue]) and applied in a random order drawn per image, as
    torchvision's ColorJitter. Vectorised: the images are grouped by their order (24 orders)."""
    N, dev = x.shape[0], x.device

    def factor(s):
        return torch.empty(N, 1, 1, 1, device=dev).uniform_(max(0.0, 1 - s), 1 + s)
    factors = [factor(brightness), factor(contrast), factor(saturation),
               torch.empty(N, 1, 1, device=dev).uniform_(-hue, hue)]
    order = torch.randint(len(JITTER_ORDERS), (N,), device=dev)
    y = x.clone()
    for o in order.unique().tolist():
        idx = (order == o).nonzero()[:, 0]
        y[idx] = _jitter_in_order(x[idx], [f[idx] for f in factors], JITTER_ORDERS[o],
                                  (brightness > 0, contrast > 0, saturation > 0, hue > 0))
    return torch.where(_coin(x, p), y, x)


def _jitter_in_order(y, factors, order, enabled):
    for op in order:
        if not enabled[op]:
            continue
        if op == 0:
            y = (y * factors[0]).clamp(0, 1)
        elif op == 1:
            mean = _gray(y).mean((1, 2, 3), keepdim=True)
            y = (mean + factors[1] * (y - mean)).clamp(0, 1)
        elif op == 2:
            gray = _gray(y)
            y = (gray + factors[2] * (y - gray)).clamp(0, 1)
        else:
            h, s, v = _rgb_to_hsv(y)
            y = _hsv_to_rgb((h + factors[3]) % 1.0, s, v).clamp(0, 1)
    return y


def solarize(x, threshold=0.5, p=0.2):
    """Per image, with probability p, every value >= threshold becomes 1 - v (PIL's ImageOps.solarize on [0, 1])."""
    return torch.where(_coin(x, p) & (x >= threshold), 1 - x, x)


def random_grayscale(x, p=0.2):
    return torch.where(_coin(x, p), _gray(x).expand_as(x), x)


def gaussian_blur(x, kernel_size, sigma=(0.1, 2.0), p=0.5):
    """Per image, with probability p, a Gaussian blur with sigma ~ U(sigma) (separable, reflect padding)."""
    N, C, H, W = x.shape
    k = kernel_size + (kernel_size % 2 == 0)  # odd
    s = torch.empty(N, 1, device=x.device).uniform_(*sigma)
    t = torch.arange(k, device=x.device, dtype=x.dtype) - k // 2
    w = torch.exp(-t[None] ** 2 / (2 * s ** 2))
    w = (w / w.sum(1, keepdim=True)).repeat_interleave(C, 0)  # (N*C, k): one kernel per image and channel
    y = F.pad(x.reshape(1, N * C, H, W), (k // 2,) * 4, mode="reflect")
    y = F.conv2d(y, w.view(N * C, 1, 1, k), groups=N * C)
    y = F.conv2d(y, w.view(N * C, 1, k, 1), groups=N * C).view(N, C, H, W)
    return torch.where(_coin(x, p), y, x)


def light_augment(x, size):
    """float (N, 3, S, S) in [0, 1] -> (N, 3, size, size): random crop of the reflect-padded image (padding size/8,
    the CIFAR recipe) and horizontal flip, each image with its own offsets (RotNet's augmentation, the supervised
    baseline's of knn_eval.py)."""
    x = center_resize(x, size)
    N, p = x.shape[0], max(1, size // 8)
    x = F.pad(x, (p, p, p, p), mode="reflect")
    i, j = torch.randint(0, 2 * p + 1, (2, N, 1), device=x.device)
    r = torch.arange(size, device=x.device)
    rows, cols = (i + r)[:, None, :, None], (j + r)[:, None, None, :]  # (N, 1, size, 1), (N, 1, 1, size)
    x = x[torch.arange(N, device=x.device)[:, None, None, None], torch.arange(3, device=x.device)[None, :, None, None],
          rows, cols]
    return random_flip(x)


# ----------------------------------------------------------------------------------------------------------------
# 5. Backbones: forward(x) returns the representation h (N, feature_dim); no classifier.
# ----------------------------------------------------------------------------------------------------------------
class ResNet(torchvision.models.ResNet):
    """torchvision's ResNet (its blocks, _make_layer and forward) with base width `width` (64 = the standard
    network) and, for images <= 64 px, the small-image stem of SimCLR's CIFAR ResNet (3x3 conv, stride 1, no max-pool)."""
    def __init__(self, depth=18, width=64, small_stem=False):
        block, layers = {18: (BasicBlock, [2, 2, 2, 2]), 34: (BasicBlock, [3, 4, 6, 3]),
                         50: (Bottleneck, [3, 4, 6, 3])}[depth]
        nn.Module.__init__(self)
        self._norm_layer, self.dilation, self.groups, self.base_width, self.inplanes = nn.BatchNorm2d, 1, 1, 64, width
        if small_stem:
            self.conv1, self.maxpool = nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.Identity()
        else:
            self.conv1, self.maxpool = nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.MaxPool2d(3, 2, 1)
        self.bn1, self.relu = nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], stride=2)
        self.avgpool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Identity()
        self.feature_dim = width * 8 * block.expansion
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


class Sobel(nn.Module):
    """DeepCluster's fixed input layer: grayscale (1x1 conv, weights 1/3), then horizontal and vertical 3x3 Sobel."""
    def __init__(self):
        super().__init__()
        self.gray = nn.Conv2d(3, 1, 1, bias=False)
        self.gray.weight.data.fill_(1 / 3)
        self.sobel = nn.Conv2d(1, 2, 3, padding=1, bias=False)
        gx = torch.tensor([[1.0, 0, -1], [2, 0, -2], [1, 0, -1]])
        self.sobel.weight.data.copy_(torch.stack([gx, gx.t()])[:, None])
        for p in self.parameters():
            p.requires_grad = False

    def forward(self, x):
        return self.sobel(self.gray(x))


class AlexNet(nn.Module):
    """DeepCluster's AlexNet: conv 96-256-384-384-256 (x width/64), BatchNorm after each conv, fc 4096-4096
    (x width/64). forward returns fc7 before its ReLU (what DeepCluster clusters). For images <= 64 px the
    first conv is 5x5/stride 1 and the three max-pools are 2x2; `conv_features` returns each conv's ReLU output.
    head=False: no fc layers, forward returns pool5 (after the adaptive average pool) flattened (context_encoder.py,
    whose decoder reads pool5 as the paper's)."""
    def __init__(self, width=64, sobel=True, small=False, head=True):
        super().__init__()
        c = [max(1, round(k * width / 64)) for k in (96, 256, 384, 384, 256)]
        fc = max(1, round(4096 * width / 64))
        self.sobel = Sobel() if sobel else None
        first = nn.Conv2d(2 if sobel else 3, c[0], 5, 1, 2) if small else nn.Conv2d(2 if sobel else 3, c[0], 11, 4, 2)
        convs = [first] + [nn.Conv2d(c[i - 1], c[i], 5 if i == 1 else 3, padding=2 if i == 1 else 1)
                           for i in range(1, 5)]
        self.convs = nn.ModuleList(nn.Sequential(conv, nn.BatchNorm2d(conv.out_channels), nn.ReLU(inplace=True))
                                   for conv in convs)
        pool = (lambda: nn.MaxPool2d(2, 2)) if small else (lambda: nn.MaxPool2d(3, 2))
        self.pools = nn.ModuleList([pool(), pool(), nn.Identity(), nn.Identity(), pool()])
        self.avgpool = nn.AdaptiveAvgPool2d(4 if small else 6)
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Linear(c[4] * (16 if small else 36), fc),
                                        nn.ReLU(inplace=True), nn.Dropout(0.5), nn.Linear(fc, fc)) if head else \
            nn.Identity()
        self.feature_dim = fc if head else c[4] * (16 if small else 36)
        for m in self.modules():  # DeepCluster's initialisation
            if isinstance(m, nn.Conv2d) and m.weight.requires_grad:
                nn.init.normal_(m.weight, 0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def conv_features(self, x):
        """The ReLU output of conv1 ... conv5 (before each max-pool): a list of five (N, C_l, H_l, W_l) maps."""
        x = self.sobel(x) if self.sobel is not None else x
        outs = []
        for conv, pool in zip(self.convs, self.pools):
            x = conv(x)
            outs.append(x)
            x = pool(x)
        return outs

    def forward(self, x):
        x = self.sobel(x) if self.sobel is not None else x
        for conv, pool in zip(self.convs, self.pools):
            x = pool(conv(x))
        return self.classifier(torch.flatten(self.avgpool(x), 1))


class NIN(nn.Module):
    """The RotNet paper's Network-In-Network with 4 conv blocks (its CIFAR-10 network). A block is three conv layers,
    each followed by BatchNorm and ReLU: a 5x5 (blocks 1-2) or 3x3 (blocks 3-4) conv, then two 1x1 convs. Every conv
    has 192 channels (x width/64), except block 1 (192, 160, 96). A 3x3/2 max-pool follows block 1 and a 3x3/2
    average pool block 2. Images > 64 px (small=False) get a third pool after block 3, the reference's default.
    forward returns the global average of block 4 (N, feature_dim). `block_features` returns each block's output
    after its pool: the maps the paper probes (block 2: 192 x 8 x 8 on 32 px)."""
    def __init__(self, width=64, small=True):
        super().__init__()
        c, c2, c3 = (max(1, round(k * width / 64)) for k in (192, 160, 96))
        layers = [[(3, c, 5), (c, c2, 1), (c2, c3, 1)], [(c3, c, 5), (c, c, 1), (c, c, 1)],
                  [(c, c, 3), (c, c, 1), (c, c, 1)], [(c, c, 3), (c, c, 1), (c, c, 1)]]
        pools = [nn.MaxPool2d(3, 2, 1), nn.AvgPool2d(3, 2, 1), nn.Identity() if small else nn.AvgPool2d(3, 2, 1),
                 nn.Identity()]
        self.blocks = nn.ModuleList(
            nn.Sequential(*[m for i, o, k in block for m in (nn.Conv2d(i, o, k, padding=k // 2, bias=False),
                                                             nn.BatchNorm2d(o), nn.ReLU(inplace=True))], pool)
            for block, pool in zip(layers, pools))
        self.feature_dim = c
        for m in self.modules():  # the reference's initialisation (BatchNorm: weight 1, bias 0)
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))

    def block_features(self, x):
        """The output of block 1 ... block 4 (after its pool): a list of four (N, C_b, H_b, W_b) maps."""
        outs = []
        for block in self.blocks:
            x = block(x)
            outs.append(x)
        return outs

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x.mean((2, 3))


class ViT(torchvision.models.VisionTransformer):
    """torchvision's VisionTransformer without its classifier; forward returns the final LayerNorm's [CLS] token
    (N, dim). The defaults are ViT-Tiny (DeiT-Ti, as `--backbone vit_tiny`): 192-d, 12 blocks, 3 heads, MLP 4x.
    Any input size works (DINO's small crops): the patch grid is floor(H/p) x floor(W/p) and the position
    embedding, learned for img_size, is interpolated bicubically to it, as DINO's ViT does. --width is ignored."""
    def __init__(self, img_size=224, patch_size=16, dim=192, depth=12, heads=3):
        super().__init__(img_size, patch_size, depth, heads, dim, 4 * dim, num_classes=1)
        self.heads = nn.Identity()
        self.feature_dim = dim

    def tokens(self, x):
        """(N, 3, H, W) -> (N, 1 + h*w, dim): [CLS] and patch embeddings plus position embedding."""
        x = self.conv_proj(x)  # (N, dim, h, w), h = H // patch
        n, d, h, w = x.shape
        pos = self.encoder.pos_embedding  # (1, 1 + g*g, dim), g = img_size // patch
        g = self.image_size // self.patch_size
        patch_pos = pos[:, 1:]
        if (h, w) != (g, g):
            patch_pos = F.interpolate(patch_pos.reshape(1, g, g, d).permute(0, 3, 1, 2), size=(h, w), mode="bicubic",
                                      align_corners=False).permute(0, 2, 3, 1).reshape(1, h * w, d)
        x = torch.cat([self.class_token.expand(n, -1, -1), x.flatten(2).transpose(1, 2)], 1)
        return self.encoder.dropout(x + torch.cat([pos[:, :1], patch_pos], 1))

    def forward(self, x):
        return self.encoder.ln(self.encoder.layers(self.tokens(x)))[:, 0]

    def last_attention(self, x):
        """The last block's attention weights per head, (N, heads, 1 + h*w, 1 + h*w); row 0 is the [CLS] query."""
        x = self.encoder.layers[:-1](self.tokens(x))
        last = self.encoder.layers[-1]
        y = last.ln_1(x)
        return last.self_attention(y, y, y, need_weights=True, average_attn_weights=False)[1]


def vit_patch_size(img_size):
    """ViT patch size for an image size: 4 up to 64 px (8x8 patches at 32 px), 8 up to 128 px, else 16 (14x14
    patches at 224 px)."""
    return 4 if img_size <= 64 else 8 if img_size <= 128 else 16


def patch_grid(x, patch, stride):
    """The grid of overlapping square patches of CPC (cpc.py): (N, C, H, W) -> (N, Gh, Gw, C, patch, patch), a view
    (no copy) where [:, i, j] = x[:, :, i*stride : i*stride + patch, j*stride : j*stride + patch],
    Gh = (H - patch) // stride + 1 (e.g. 8-px patches with stride 4 on 32 px: a 7x7 grid, each patch sharing half its
    pixels with its neighbours)."""
    return x.unfold(2, patch, stride).unfold(3, patch, stride).permute(0, 2, 3, 1, 4, 5)


class PatchGridEncoder(nn.Module):
    """CPC's encoder as an image encoder (`--backbone` of cpc.py on every patch): the image cut into patch_grid's
    patches, the backbone applied to all N*Gh*Gw patches as one batch, its vectors mean-pooled over the grid ->
    (N, feature_dim). Built by build_backbone("patch_grid", backbone=..., backbone_kwargs=..., patch=..., stride=...)
    so that load_encoder rebuilds it from a cpc.py checkpoint."""
    def __init__(self, backbone="resnet18", backbone_kwargs=None, patch=8, stride=4):
        super().__init__()
        self.backbone = build_backbone(backbone, **(backbone_kwargs or {}))
        self.patch, self.stride, self.feature_dim = patch, stride, self.backbone.feature_dim

    def forward(self, x):
        p = patch_grid(x, self.patch, self.stride)  # (N, Gh, Gw, C, P, P)
        z = self.backbone(p.reshape(-1, *p.shape[3:]))  # (N*Gh*Gw, D)
        return z.view(*p.shape[:3], -1).mean((1, 2))


class ConvStack(nn.Module):
    """The context encoder's encoder (Pathak et al. 2016's reference code, the CS294-158 demo): 4x4 convs of stride 2,
    each followed by BatchNorm and LeakyReLU(0.2), halve the image down to 4x4 (five at 128 px: 64, 64, 128, 256, 512
    channels x width/64; on smaller images the last ones of that list: 128, 256, 512 at 32 px), then one conv over the
    whole remaining map gives a code_dim-channel 1x1 map, the code (default: the demo's 4,000, x width/64). forward
    returns the code (N, code_dim). Initialised as the reference (DCGAN's): conv weights N(0, 0.02), BatchNorm
    weights N(1, 0.02)."""
    def __init__(self, width=64, img_size=128, code_dim=None):
        super().__init__()
        sizes = [img_size]
        while sizes[-1] > 4:
            sizes.append(sizes[-1] // 2)  # a 4x4 conv with stride 2 and padding 1 halves (floor) the side
        n = len(sizes) - 1
        mult = [1] * max(0, n - 4) + [1, 2, 4, 8]
        chans = [3] + [max(1, round(m * width)) for m in mult[len(mult) - n:]]
        self.convs = nn.Sequential(*[m for i in range(n) for m in (
            nn.Conv2d(chans[i], chans[i + 1], 4, 2, 1, bias=False), nn.BatchNorm2d(chans[i + 1]),
            nn.LeakyReLU(0.2, inplace=True))])
        self.feature_dim = code_dim or max(1, round(4000 * width / 64))
        self.code = nn.Conv2d(chans[-1], self.feature_dim, sizes[-1])  # (N, C, s, s) -> (N, code_dim, 1, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.code(self.convs(x)).flatten(1)


BACKBONES = {"resnet18": 18, "resnet34": 34, "resnet50": 50, "alexnet": None, "nin": None, "vit_tiny": None,
             "conv_stack": None}


def backbone_kwargs(args, img_size):
    """The keyword arguments that rebuild this run's encoder (stored in every checkpoint)."""
    if args.backbone == "alexnet":
        return {"width": args.width, "sobel": args.sobel, "small": img_size <= 64}
    if args.backbone == "nin":
        return {"width": args.width, "small": img_size <= 64}
    if args.backbone == "vit_tiny":
        return {"img_size": img_size, "patch_size": vit_patch_size(img_size)}
    if args.backbone == "conv_stack":
        return {"width": args.width, "img_size": img_size, "code_dim": getattr(args, "code_dim", None)
                or max(1, round(4000 * args.width / 64))}
    return {"width": args.width, "small_stem": img_size <= 64}


def build_backbone(name, **kwargs):
    if name == "patch_grid":  # cpc.py's checkpoints (not a --backbone choice: cpc.py builds it around one)
        return PatchGridEncoder(**kwargs)
    if name not in BACKBONES:
        fail(f"unknown backbone '{name}': expected one of {', '.join(BACKBONES)}")
    if kwargs.get("width", 64) < 1:
        fail(f"--width must be positive, got {kwargs['width']}")
    if name == "vit_tiny":
        return ViT(**kwargs)
    if name == "conv_stack":
        return ConvStack(**kwargs)
    if name == "nin":
        return NIN(**kwargs)
    return AlexNet(**kwargs) if name == "alexnet" else ResNet(BACKBONES[name], **kwargs)


@torch.no_grad()
def extract_features(encoder, split, device, batch_size=512, img_size=None, autocast=None, workers=0, rank=0,
                     world=1, log=None, log_every=20):
    """h = encoder(normalize(image)) for every image of a split, without augmentation, in eval mode.
    Returns float32 (N, D) on `device`, in the split's order. Images are resized to `img_size` if it differs.
    Under torchrun (world > 1) each rank computes every world-th image and the shards are all-gathered back in
    order (a collective: every rank must call it). `log`: a progress line every `log_every` batches."""
    was_training = encoder.training
    encoder.eval()
    loader = make_loader(split, batch_size, shuffle=False, workers=workers, rank=rank, world=world)
    feats, t0 = [], time.time()
    for i, (x, _) in enumerate(loader):
        x = normalize(to_float(x.to(device, non_blocking=True)))
        if img_size is not None:
            x = center_resize(x, img_size)
        with (autocast() if autocast else torch.autocast(device.type, enabled=False)):
            feats.append(encoder(x).float())
        if log is not None and ((i + 1) % log_every == 0 or i + 1 == len(loader)):
            el = time.time() - t0
            log(f"features {i + 1}/{len(loader)} batches | {(i + 1) * batch_size * world / el:.0f} img/s | "
                f"ETA {fmt_time(el / (i + 1) * (len(loader) - i - 1))}")
    encoder.train(was_training)
    feats = torch.cat(feats)  # this rank's images rank, rank + world, ... (DistributedSampler pads to equal sizes)
    if world > 1:
        parts = [torch.empty_like(feats) for _ in range(world)]
        dist.all_gather(parts, feats)
        feats = torch.stack(parts, 1).flatten(0, 1)  # interleave back: row r*world + rank = image r*world + rank
    return feats[:len(split)]


# ----------------------------------------------------------------------------------------------------------------
# 6. Checkpoints and logs
# ----------------------------------------------------------------------------------------------------------------
def rng_state():
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def all_rng_states(world=1):
    """Every rank's RNG state as a list (collective under torchrun: every rank must call it); rank 0 saves the
    list so that a resumed run draws the same augmentations on every rank."""
    if world == 1:
        return [rng_state()]
    states = [None] * world
    dist.all_gather_object(states, rng_state())
    return states


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path, **state):
    """Write {format, **state} to `path` atomically: a temporary file in the same folder, then a rename."""
    state = {"format": CKPT_FORMAT, **state}
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path):
    if not os.path.isfile(path):
        fail(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        fail(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__})")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        fail(f"{path} is not a checkpoint of this project (no '{CKPT_FORMAT}' format tag)")
    return ckpt


def load_encoder(path, device="cpu"):
    """The trained encoder of any script's checkpoint, in eval mode, and the checkpoint dict."""
    ckpt = load_checkpoint(path)
    encoder = build_backbone(ckpt["backbone"]["name"], **ckpt["backbone"]["kwargs"])
    encoder.load_state_dict(ckpt["encoder"])
    return encoder.to(device).eval(), ckpt


def given_flags(parser, argv=None):
    """The dests of the flags written on the command line (argv, default sys.argv[1:]), including abbreviations
    that argparse accepts (`--temp` for `--temperature`)."""
    argv = sys.argv[1:] if argv is None else argv
    options = {o: a.dest for a in parser._actions for o in a.option_strings if o.startswith("--")}
    given = set()
    for w in (tok.split("=")[0] for tok in argv if tok.startswith("--")):
        matches = [w] if w in options else [o for o in options if o.startswith(w)]
        if len(matches) == 1:  # argparse accepts a unique prefix
            given.add(options[matches[0]])
    return given


def merge_resume_args(parser, argv, args, saved):
    """On --resume: the checkpoint's flags, except those given again on this command line (e.g. more --epochs)."""
    given = given_flags(parser, argv) - {"resume"}
    if "no_sobel" in saved:  # older checkpoints kept args.no_sobel; --sobel / --no-sobel now set args.sobel
        saved = {**{k: v for k, v in saved.items() if k != "no_sobel"}, "sobel": not saved["no_sobel"]}
    merged = dict(saved, **{k: getattr(args, k) for k in given}, resume=args.resume)
    for k, v in vars(args).items():  # flags added since the checkpoint was written keep their defaults
        merged.setdefault(k, v)
    return argparse.Namespace(**merged)


def resume_checkpoint(parser, argv, args, method):
    """--resume: returns (args, ckpt) with the checkpoint's flags, except those given again on this command line;
    without --resume, (args, None)."""
    if not getattr(args, "resume", None):
        return args, None
    ckpt = load_checkpoint(args.resume)
    if ckpt.get("method") != method:
        fail(f"{args.resume} is a {ckpt.get('method')} checkpoint, not {method}")
    return merge_resume_args(parser, argv, args, ckpt["args"]), ckpt


def setup_run(args):
    """Device, torchrun process group, seeding (each rank draws its own augmentations). Returns (device, rank, world)."""
    device = get_device(args.device)
    rank, world = setup_distributed(device)
    seed_everything(args.seed + rank)
    if args.batch_size % world:
        fail(f"--batch-size {args.batch_size} is not divisible by the {world} torchrun processes")
    return device, rank, world


def restore(ckpt, rank, **objects):
    """--resume: load each object's state (model=..., optimizer=..., a None object is skipped) and this rank's RNG
    from the checkpoint. Returns the epoch to start from (0 without a checkpoint).

    The optimizer's hyperparameters (lr, weight decay, momentum, ...) and a LambdaLR's base learning rates come from
    this run's flags, not from the checkpoint, so `--resume ... --lr 0.1` acts; the learning rate of the resumed
    step is recomputed from the schedule of this run (with more --epochs the stretched cosine acts from the first
    step). With unchanged flags every value equals the saved one."""
    if ckpt is None:
        return 0
    optimizer, scheduler = objects.get("optimizer"), objects.get("scheduler")
    fresh = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups] if optimizer else None
    for name, obj in objects.items():
        if obj is not None:
            obj.load_state_dict(ckpt[name])
    if optimizer is not None:
        for group, hyper in zip(optimizer.param_groups, fresh):
            group.update(hyper)
        if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
            scheduler.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
            for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
                group["lr"] = base * factor(scheduler.last_epoch)
            scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
    set_rng_state(ckpt["rng"][rank] if rank < len(ckpt["rng"]) else ckpt["rng"][0])
    return ckpt["epoch"]


def save_training_checkpoint(path, rank, world, **state):
    """The end-of-epoch checkpoint: every rank's RNG state (a collective under torchrun: call it on every rank),
    written by rank 0. Values with a state_dict() (model, optimizer, scheduler, scaler) are saved as their state."""
    rng = all_rng_states(world)
    if rank == 0:
        save_checkpoint(path, rng=rng, **{k: v.state_dict() if hasattr(v, "state_dict") else v
                                          for k, v in state.items()})
    if world > 1:
        dist.barrier()


def finish(out, rank, world, log, summary):
    """Write summary.json and print it (rank 0); leave the torchrun process group. Returns the summary."""
    if rank == 0:
        log.begin()
        with open(os.path.join(out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        log.print("summary " + json.dumps(summary))
    if world > 1:
        dist.destroy_process_group()
    return summary


def run_folder(args, method):
    if args.out:
        return args.out
    if getattr(args, "resume", None):
        return os.path.dirname(os.path.abspath(args.resume))
    data = os.path.basename(os.path.normpath(args.data))
    return os.path.join("runs", f"{method}-{data}-{time.strftime('%Y%m%d-%H%M%S')}")


class RunLog:
    """Progress lines with speed and ETA, per-epoch metrics.jsonl, curves.png redrawn each epoch (rank 0 only)."""
    def __init__(self, out, args, enabled=True, start_epoch=0):
        self.out, self.enabled, self.args, self.start_epoch = out, enabled, args, start_epoch
        self.t0, self.images, self.t_plot = time.time(), 0, 0.0
        self.begun = not enabled

    def begin(self):
        """Create the run folder, write args.json (with the defaults the script has resolved by now) and keep only
        the epochs of metrics.jsonl before the checkpoint's (all of them on a resume; none on a fresh run). Called
        by the first step, epoch or summary: a run that stops on bad input before that leaves the folder as it was."""
        if self.begun:
            return
        self.begun = True
        os.makedirs(self.out, exist_ok=True)
        with open(os.path.join(self.out, "args.json"), "w") as f:
            json.dump(vars(self.args), f, indent=2)
        path = os.path.join(self.out, "metrics.jsonl")
        if os.path.exists(path):
            rows = [json.loads(line) for line in open(path) if line.strip()]
            with open(path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows if r.get("epoch", 0) <= self.start_epoch)

    def print(self, *a):
        if self.enabled:
            print(*a, flush=True)

    def step(self, epoch, step, steps, images, **metrics):
        """Call after every training step: `epoch` and `step` count from 0, `steps` per epoch, `images` processed
        in this step by all ranks. Prints a progress line (speed, ETA) every --log-every steps and at epoch end."""
        self.images += images
        self.begin()
        if not self.enabled or ((step + 1) % self.args.log_every and step + 1 != steps):
            return
        done = (epoch - self.start_epoch) * steps + step + 1  # steps of this run (not of the resumed part)
        total = (self.args.epochs - self.start_epoch) * steps
        elapsed = time.time() - self.t0
        eta = elapsed / done * (total - done)
        m = " ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        print(f"epoch {epoch + 1}/{self.args.epochs} step {step + 1}/{steps} {m} | {self.images / elapsed:.0f} img/s"
              f" | ETA {fmt_time(eta)}", flush=True)

    def epoch(self, **metrics):
        """End of an epoch: print the metrics, append them to metrics.jsonl, redraw curves.png."""
        if not self.enabled:
            return
        self.begin()
        print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()), flush=True)
        with open(os.path.join(self.out, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(metrics) + "\n")
        # redrawn at the last epoch and at most every 30 s before (drawing costs 1-5 s on a small CPU)
        if metrics.get("epoch") == getattr(self.args, "epochs", None) or time.time() - self.t_plot > 30:
            plot_curves(os.path.join(self.out, "metrics.jsonl"), os.path.join(self.out, "curves.png"))
            self.t_plot = time.time()


def fmt_time(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def plot_curves(metrics_path, png_path):
    """One panel per numeric metric of metrics.jsonl against epoch."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(line) for line in open(metrics_path) if line.strip()]
    keys = [k for k in rows[0] if k != "epoch" and isinstance(rows[0][k], (int, float))] if rows else []
    if not keys:
        return
    cols = min(3, len(keys))
    fig, axes = plt.subplots(math.ceil(len(keys) / cols), cols, figsize=(4 * cols, 3 * math.ceil(len(keys) / cols)),
                             squeeze=False)
    for ax, k in zip(axes.flat, keys):
        pts = [(r["epoch"], r[k]) for r in rows if isinstance(r.get(k), (int, float))]
        ax.plot(*zip(*pts), marker="o", ms=3)
        ax.set_title(k)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(png_path, dpi=80)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------
# 7. Optimisation: LARS (You et al. 2017, as SimCLR's reference code), biases and BatchNorm excluded from weight decay
#    and trust-ratio adaptation, the optimiser choice, the learning-rate scaling, linear warm-up then cosine decay
#    stepped every iteration.
# ----------------------------------------------------------------------------------------------------------------
class LARS(torch.optim.Optimizer):
    """SGD with momentum where each weight tensor's step is scaled by the trust ratio eta |w| / |g + wd w|.

    As the reference code (its LARSOptimizer), the learning rate is folded into the momentum buffer:
        v <- m v + lr * trust * (g + wd w),   w <- w - v
    (PyTorch's SGD keeps v <- m v + g and steps lr * v, which differs while the lr changes, e.g. in warm-up).
    Parameter groups with `lars_exclude=True` (biases, BatchNorm) get no decay and no trust ratio."""
    def __init__(self, params, lr, momentum=0.9, weight_decay=0.0, eta=0.001):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta,
                                      lars_exclude=False))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if not group["lars_exclude"]:
                    d = d.add(p, alpha=group["weight_decay"])
                    w_norm, d_norm = p.norm(), d.norm()
                    trust = torch.where((w_norm > 0) & (d_norm > 0), group["eta"] * w_norm / d_norm, 1.0)
                    d = d.mul(trust)
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.mul_(group["momentum"]).add_(d, alpha=group["lr"])
                p.sub_(buf)


def param_groups(model, weight_decay):
    """Weights get weight decay (and LARS adaptation); biases and BatchNorm parameters (1-D tensors) do not."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0, "lars_exclude": True}]


def make_optimizer(name, groups, lr):
    """--optimizer: lars (LARS), sgd (momentum 0.9) or adamw, over parameter groups as param_groups makes them."""
    if name == "lars":
        return LARS(groups, lr=lr, momentum=0.9)
    groups = [{k: v for k, v in group.items() if k != "lars_exclude"} for group in groups]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9)
    return torch.optim.AdamW(groups, lr=lr)


def scaled_lr(lr, batch_size, defaults=None, optimizer=None):
    """The learning rate of a run: the base rate per 256 images times batch_size / 256 (the linear scaling rule).
    The base rate is `lr` (--lr), or where that is not given (None) defaults[optimizer], the method's default for
    its --optimizer."""
    return (lr if lr is not None else defaults[optimizer]) * batch_size / 256


def default_warmup_epochs(epochs):
    """The warm-up when --warmup-epochs is not given: the papers' 10 epochs, at most 10% of the run (so that a short
    run leaves the warm-up)."""
    return min(10.0, 0.1 * epochs)


def warmup_cosine(step, total_steps, warmup_steps):
    """Learning-rate factor per step: linear from ~0 to 1 over the warm-up, then cosine from 1 to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, total_steps - warmup_steps)))


# ----------------------------------------------------------------------------------------------------------------
# 8. kNN monitor: the weighted kNN (InstDisc, Wu et al. 2018) of every training script, on the frozen representation;
#    knn_eval.py adds the other protocols.
# ----------------------------------------------------------------------------------------------------------------
def add_knn_args(parser, every=5):
    """The kNN monitor's flags, which every training script has."""
    parser.add_argument("--knn-every", type=int, default=every,
                        help="weighted-kNN monitor every N epochs (and the last)")
    parser.add_argument("--knn-k", type=int, default=200, help="kNN monitor: neighbours")
    parser.add_argument("--knn-temperature", type=float, default=0.1, help="kNN monitor: vote temperature")


def knn_epoch(epoch, args):
    """Does the kNN monitor run after epoch `epoch` (from 0)? Every --knn-every epochs and after the last."""
    return (epoch + 1) % args.knn_every == 0 or epoch + 1 == args.epochs


@torch.no_grad()
def knn_neighbours(train_feats, test_feats, k, chunk=1024):
    """Cosine similarities (Nq, k) and indices (Nq, k) of the k most similar training features of each query,
    in chunks of `chunk` queries on the features' device (so 50,000 x 10,000 fits in memory)."""
    train = F.normalize(train_feats.float(), dim=1)  # (Nt, D)
    k = min(k, train.shape[0])
    sims, idxs = [], []
    for q in F.normalize(test_feats.float(), dim=1).split(chunk):  # q: (B, D)
        s, i = (q @ train.T).topk(k, dim=1)  # (B, k), most similar first
        sims.append(s)
        idxs.append(i)
    return torch.cat(sims), torch.cat(idxs)


def knn_votes(sim, idx, train_labels, num_classes, k, temperature):
    """Class scores (Nq, C) from neighbours sorted by similarity: the first k vote with weight exp(s / temperature)."""
    sim, idx = sim[:, :k], idx[:, :k]
    votes = torch.zeros(sim.shape[0], num_classes, device=sim.device)
    return votes.scatter_add_(1, train_labels[idx], (sim / temperature).exp())


def knn_scores(train_feats, train_labels, test_feats, num_classes, k=200, temperature=0.1, chunk=1024):
    """Class scores (Nq, C) of the weighted kNN: cosine similarity s on L2-normalised features, the k most similar
    training images vote for their class with weight exp(s / temperature) (Wu et al. 2018)."""
    sim, idx = knn_neighbours(train_feats, test_feats, k, chunk)  # (Nq, k) each
    return knn_votes(sim, idx, train_labels, num_classes, k, temperature)


def knn_predict(train_feats, train_labels, test_feats, num_classes, k=200, temperature=0.1):
    """Predicted labels (Nq,) of the weighted kNN classifier (see knn_scores)."""
    return knn_scores(train_feats, train_labels, test_feats, num_classes, k, temperature).argmax(1)


def knn_monitor(encoder, data, device, k=200, temperature=0.1, autocast=None, workers=0):
    """Top-1 (%) of the weighted kNN: memory bank = labelled training split, queries = test split."""
    train = extract_features(encoder, data.memory, device, autocast=autocast, workers=workers)
    test = extract_features(encoder, data.test, device, autocast=autocast, workers=workers)
    pred = knn_predict(train, data.memory.labels.to(device), test, data.num_classes, k, temperature)
    return (pred.cpu() == data.test.labels).float().mean().item() * 100
