"""Figures of a learned representation, from the checkpoint of any script of this project (or a random-init copy
of its network, for comparison), and of what a method's run saved. Each sub-command writes one PNG into --out (a
folder, or the .png file itself).

    filters     the first conv layer's filters (DeepCluster, Fig. 3): colour for RGB input, gray per channel
                for the Sobel input layer
    top-images  for some filters of a layer, the k images with the largest activation (DeepCluster, Fig. 5)
    maximize    the image that maximises a filter's activation, by regularised gradient ascent in image space
                (Yosinski et al. 2015, https://arxiv.org/abs/1506.06579)
    views       two augmented views of a batch of images (the checkpoint method's recipe), the cosine similarity
                matrix of their embeddings and how often the most similar view-2 is the right one; with --ckpt2,
                the difference of the two matrices
    augment     originals and several augmented views of each
    curves      training curves of one or more runs' metrics.jsonl, or per step from their saved output (.log)
    fewshot     test top-1 against labels per class from knn_eval.py's few-shot JSON, several encoders
    embedding   a 2-D PCA projection of the test-set features, coloured by class
    attention   ViT only: the last block's [CLS]-to-patch attention of each head over a few images (DINO, Fig. 3)
    cpc-grid             CPC's grid of patches on one image, a context's rows and its prediction targets (no run)
    deepcluster-nmi      NMI of consecutive clusterings and of clusters and labels per epoch (DeepCluster, Fig. 2),
                         from a deepcluster.py run's metrics.jsonl
    rotnet-per-class     held-out rotation accuracy per class, from a rotnet.py run's summary.json
    inpaint              a context_encoder.py checkpoint: corrupted images, what it paints, the originals
    imagenet-mnist-bars  the kNN errors of each setting, from an imagenet_mnist.py run's table.json

A layer of `--layer` is a numbered stage of the encoder, each seen after its ReLU: AlexNet conv1 ... conv5;
ResNet 1 = the stem (conv1 + BN + ReLU), 2 ... 5 = layer1 ... layer4. A filter's activation on an image is its
ReLU output averaged over space.

    python visualize.py filters --ckpt runs/deepcluster-cifar10/last.pt --out figs
    python visualize.py top-images --ckpt runs/deepcluster-cifar10/last.pt --layer 5 --filters 0 33 --k 10
    python visualize.py maximize --ckpt runs/simclr-cifar10/last.pt --layer 5 --filter 0 1 2 3 --steps 200
    python visualize.py views --ckpt runs/simclr-cifar10/last.pt --ckpt2 runs/deepcluster-cifar10/last.pt
    python visualize.py augment --data shapes --method simclr --device cpu --out figs  # no checkpoint: seconds on a CPU
    python visualize.py filters --ckpt runs/simclr-cifar10/last.pt --random-init       # same network, untrained
    python visualize.py attention --ckpt runs/dino-cifar10/last.pt --n 4               # a vit_tiny checkpoint
    python visualize.py cpc-grid --data data/cifar10 --out docs/cpc/grid.png           # the first test image
    python visualize.py deepcluster-nmi --run runs/deepcluster-cifar10 --out runs/deepcluster-cifar10/nmi.png
    python visualize.py inpaint --ckpt runs/context_encoder-cifar10/last.pt --n 8      # a context encoder's painting

docs/visualize.md shows each figure with the command that made it.
"""
import argparse
import json
import math
import os
import re
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.transforms.functional import gaussian_blur

import byol
import common
import context_encoder
import cpc
import deepcluster
import dino
import imagenet_mnist
import moco
import rotnet
import simclr
from common import center_resize, denormalize, fail, normalize, to_float

DPI = 100  # every figure is saved at this resolution: its size in pixels is DPI x its size in inches
CELL = 0.9  # inches per image of a montage


def get_args(argv=None):
    p = argparse.ArgumentParser(description="figures of a learned representation from a checkpoint",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    out = argparse.ArgumentParser(add_help=False)  # flags every sub-command has
    out.add_argument("--out", default="figures", help="folder the PNG is written to, or the .png file itself")

    run = argparse.ArgumentParser(add_help=False)  # sub-commands that compute something
    run.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="auto: cuda, mps, cpu")
    run.add_argument("--seed", type=int, default=0, help="seed of the image subset, augmentations and --random-init")

    model = argparse.ArgumentParser(add_help=False)
    model.add_argument("--ckpt", required=True, help="checkpoint (last.pt) of any script of this project")
    model.add_argument("--random-init", action="store_true",
                       help="use the checkpoint's network with fresh random weights instead (a baseline)")

    data = argparse.ArgumentParser(add_help=False)
    data.add_argument("--data", default=None, help="dataset name or folder (default: the checkpoint's)")
    data.add_argument("--data-dir", default=None, help="datasets and decoded caches (default: the checkpoint's)")
    data.add_argument("--shapes-n", type=int, nargs=2, default=None, metavar=("TRAIN", "TEST"),
                      help="sizes of the synthetic shapes dataset (default: the checkpoint's)")
    data.add_argument("--split", default="test", choices=["train", "test"],
                      help="which split's images: test, or the labelled training split")
    data.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                      help="processes that decode folder datasets and read memory-mapped images")

    many = argparse.ArgumentParser(add_help=False)  # sub-commands that run the encoder over a whole split
    many.add_argument("--max-images", type=int, default=None,
                      help="a seeded random subset of at most this many images (default: all)")
    many.add_argument("--batch-size", type=int, default=256, help="images per forward pass")

    s = sub.add_parser("filters", parents=[out, run, model], help="first conv layer's filters as a grid")

    s = sub.add_parser("top-images", parents=[out, run, model, data, many],
                       help="images that most activate some filters")
    s.add_argument("--layer", type=int, default=5, help="layer number (1 = first conv stage)")
    s.add_argument("--filters", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5], help="filter (channel) ids")
    s.add_argument("--k", type=int, default=10, help="images per filter")

    s = sub.add_parser("maximize", parents=[out, run, model], help="gradient ascent on a filter's activation")
    s.add_argument("--layer", type=int, default=5, help="layer number (1 = first conv stage)")
    s.add_argument("--filter", type=int, nargs="+", default=[0, 1, 2, 3], help="filter (channel) id(s)")
    s.add_argument("--steps", type=int, default=200, help="gradient-ascent steps")
    s.add_argument("--lr", type=float, default=0.05, help="step size (per pixel, the gradient normalised)")
    s.add_argument("--l2-decay", type=float, default=0.01, help="x <- (1 - decay) x after each step")
    s.add_argument("--blur-every", type=int, default=4, help="Gaussian blur every N steps (0: never)")
    s.add_argument("--blur-sigma", type=float, default=0.5, help="sigma of that blur in pixels")

    s = sub.add_parser("views", parents=[out, run, model, data], help="two views, embedding cosine similarities")
    s.add_argument("--ckpt2", default=None, help="a second checkpoint: its matrix on the same views, and A - B")
    s.add_argument("--n", type=int, default=8, help="number of images (a seeded random subset of the split)")

    s = sub.add_parser("augment", parents=[out, run, data], help="originals with augmented views")
    s.add_argument("--ckpt", default=None, help="take the method, its flags and the data from this checkpoint")
    s.add_argument("--method", default="simclr", choices=sorted(RECIPES),
                   help="whose augmentation recipe (without --ckpt)")
    s.add_argument("--img-size", type=int, default=None, help="view size (default: the dataset's)")
    s.add_argument("--n", type=int, default=6, help="number of images (a seeded random subset of the split)")
    s.add_argument("--views", type=int, default=5, help="augmented views per image")

    s = sub.add_parser("curves", parents=[out], help="training curves of runs (metrics.jsonl or a saved output)")
    s.add_argument("--run", nargs="+", required=True,
                   help="run folder(s) or metrics.jsonl file(s) (a point per epoch), or a training script's saved "
                        "output, a .log file (a point per progress line)")

    s = sub.add_parser("fewshot", parents=[out], help="test top-1 against labels per class")
    s.add_argument("--json", nargs="+", required=True, help="few-shot JSON file(s) of knn_eval.py")

    s = sub.add_parser("embedding", parents=[out, run, model, data, many], help="2-D PCA of the features by class")
    s.set_defaults(max_images=2000)

    s = sub.add_parser("attention", parents=[out, run, model, data],
                       help="ViT only: the last block's [CLS]-to-patch attention of each head over the image")
    s.add_argument("--n", type=int, default=4, help="number of images (a seeded random subset of the split)")

    s = sub.add_parser("cpc-grid", parents=[out, data],
                       help="CPC's grid of patches on the first image of the split and a context's targets")
    s.add_argument("--img-size", type=int, default=None, help="image size (default: the dataset's)")
    s.add_argument("--patch-size", type=int, default=None, help="side of a patch in px (default: cpc.py's)")
    s.add_argument("--patch-stride", type=int, default=None, help="step between patches in px (default: cpc.py's)")
    s.add_argument("--pred-steps", type=int, default=5, help="K: the targets k = 1..K rows below the context")

    run_files = argparse.ArgumentParser(add_help=False)  # sub-commands that draw what a run saved
    run_files.add_argument("--run", required=True, help="the run folder (or the file it wrote)")
    sub.add_parser("deepcluster-nmi", parents=[out, run_files], help="NMI per epoch of a deepcluster.py run "
                   "(metrics.jsonl)")
    sub.add_parser("rotnet-per-class", parents=[out, run_files], help="held-out rotation accuracy per class of a "
                   "rotnet.py run (summary.json)")
    s = sub.add_parser("inpaint", parents=[out, run, model, data],
                       help="context_encoder.py checkpoint: corrupted images, the painting, the originals")
    s.add_argument("--n", type=int, default=8, help="number of images (a seeded random subset of the split)")
    s.add_argument("--mask", default=None, choices=context_encoder.MASKS,
                   help="the corruption (default: the checkpoint's; block, region and noise can stand in for each "
                        "other, center only for center: its decoder paints the centre)")
    sub.add_parser("imagenet-mnist-bars", parents=[out, run_files], help="kNN errors per setting of an "
                   "imagenet_mnist.py run (table.json)")
    return p, p.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------------
# Layers and activations
# ----------------------------------------------------------------------------------------------------------------
def layer_modules(encoder):
    """The modules whose outputs are layers 1..L: AlexNet conv1..conv5 (after conv + BN), ResNet the stem's ReLU
    and layer1..layer4, any other network each trainable nn.Conv2d in order (its output then goes through a ReLU)."""
    if isinstance(encoder, common.AlexNet):
        mods = [conv[1] for conv in encoder.convs]  # BatchNorm: the output before the ReLU (see maximize)
    elif isinstance(encoder, common.ResNet):
        mods = [encoder.relu, encoder.layer1, encoder.layer2, encoder.layer3, encoder.layer4]
    else:
        mods = [m for m in encoder.modules() if isinstance(m, nn.Conv2d) and m.weight.requires_grad]
    if not mods:
        fail(f"the {type(encoder).__name__} encoder has no conv layers to visualise")
    return mods


class _Stop(Exception):
    """Raised by the hook once the wanted layer has run: the rest of the network is not computed."""


def layer_output(encoder, x, layer, relu=True):
    """ReLU output (N, C, H, W) of layer `layer` (1-based) for normalised images x (N, 3, S, S); differentiable.
    relu=False: the output before the ReLU where the network has one (AlexNet, generic conv nets)."""
    mods = layer_modules(encoder)
    if not 1 <= layer <= len(mods):
        fail(f"--layer {layer} is out of range: this {type(encoder).__name__} has layers 1..{len(mods)}")
    got = []

    def hook(module, inputs, output):
        got.append(output)
        raise _Stop
    handle = mods[layer - 1].register_forward_hook(hook)
    try:
        encoder(x)
    except _Stop:
        pass
    finally:
        handle.remove()
    return F.relu(got[0]) if relu else got[0]


def check_filters(encoder, layer, filters, img_size):
    """Number of filters of `layer`; fails if a filter id is out of range (one forward pass of one image)."""
    with torch.no_grad():
        dev = next(encoder.parameters()).device
        C = layer_output(encoder, torch.zeros(1, 3, img_size, img_size, device=dev), layer).shape[1]
    bad = [f for f in filters if not 0 <= f < C]
    if bad:
        fail(f"filter id(s) {bad} out of range: layer {layer} has filters 0..{C - 1}")
    return C


def prepare(x, img_size=None):
    """uint8 images (N, 3, H, W) -> normalised float, resized to the encoder's resolution (as extract_features)."""
    x = normalize(to_float(x))
    return center_resize(x, img_size) if img_size else x


@torch.no_grad()
def compute_activations(encoder, images, layer, batch_size=256, img_size=None, log=print):
    """Activation of every filter of `layer` on every image: its ReLU output averaged over space.
    images: uint8 (N, 3, H, W) -> float32 (N, C) on the CPU. One pass over the images, with progress."""
    N = len(images)
    if N == 0:
        fail("empty dataset: no images to compute activations on")
    was_training = encoder.training
    encoder.eval()
    dev = next(encoder.parameters()).device
    acts, t0 = [], time.time()
    for i in range(0, N, batch_size):
        x = prepare(images[i:i + batch_size].to(dev), img_size)
        acts.append(layer_output(encoder, x, layer).mean((2, 3)).float().cpu())  # (B, C)
        done = min(i + batch_size, N)
        if done == N or (i // batch_size) % 20 == 19:
            el = time.time() - t0
            log(f"activations of layer {layer}: {done}/{N} images ({done / max(el, 1e-9):.0f} img/s, "
                f"ETA {common.fmt_time(el / done * (N - done))})")
    encoder.train(was_training)
    return torch.cat(acts)


def top_k_images(acts, filters, k):
    """For each filter f, the k images with the largest activation acts[:, f], largest first.
    acts: (N, C) -> (values, indices), each (len(filters), min(k, N))."""
    bad = [f for f in filters if not 0 <= f < acts.shape[1]]
    if bad:
        fail(f"filter id(s) {bad} out of range: the layer has filters 0..{acts.shape[1] - 1}")
    if k < 1:
        fail(f"--k must be at least 1, got {k}")
    return acts[:, list(filters)].T.topk(min(k, acts.shape[0]), dim=1)


def maximize_activation(encoder, layer, filt, img_size, steps=200, lr=0.05, l2_decay=0.01, blur_every=4,
                        blur_sigma=0.5, seed=0):
    """Regularised gradient ascent in image space (Yosinski et al. 2015) on a(x) = mean over space of the ReLU
    output of filter `filt` of `layer`. From small noise around the mean image (x = 0 in normalised space):

        x <- (1 - l2_decay) * (x + lr * g / mean|g|),   g = da/dx      (normalised gradient, then L2 decay)
        every `blur_every` steps: x <- GaussianBlur(x, blur_sigma)     (suppresses high frequencies)
        x is clamped to the valid pixel range [0, 1] after de-normalisation
    While the filter is silent everywhere (a = 0, no gradient), its pre-ReLU output is raised instead.

    Returns the image de-normalised to [0, 1], (3, S, S), and the activation before each step and at the end."""
    encoder.eval()
    dev = next(encoder.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    x = (0.1 * torch.randn(1, 3, img_size, img_size, generator=gen)).to(dev).requires_grad_(True)
    lo, hi = normalize(torch.zeros(1, 3, 1, 1, device=dev)), normalize(torch.ones(1, 3, 1, 1, device=dev))
    ksize = 2 * math.ceil(2 * blur_sigma) + 1
    history = []
    for step in range(steps + 1):
        raw = layer_output(encoder, x, layer, relu=False)[0, filt]  # (H, W)
        a = F.relu(raw).mean()
        history.append(a.item())
        if step == steps:
            break
        grad, = torch.autograd.grad(a if a > 0 else raw.mean(), x)  # a silent filter: raise its pre-ReLU output
        with torch.no_grad():
            x += lr * grad / (grad.abs().mean() + 1e-12)
            x *= 1 - l2_decay
            if blur_every and (step + 1) % blur_every == 0:
                x.copy_(gaussian_blur(x, [ksize, ksize], [blur_sigma, blur_sigma]))
            x.copy_(torch.maximum(torch.minimum(x, hi), lo))
    return denormalize(x.detach())[0].clamp(0, 1).cpu(), history


@torch.no_grad()
def view_similarity(encoder, v1, v2):
    """Cosine similarity sim[i, j] = cos(h(v1_i), h(v2_j)) of the encoder's representations h of two views of N
    images (normalised (N, 3, S, S) each), and the fraction of images i whose most similar view-2 is their own."""
    encoder.eval()
    h1, h2 = F.normalize(encoder(v1).float(), dim=1), F.normalize(encoder(v2).float(), dim=1)  # (N, D)
    sim = h1 @ h2.T  # (N, N)
    acc = (sim.argmax(1) == torch.arange(len(sim), device=sim.device)).float().mean().item()
    return sim.cpu(), acc


def pca_2d(feats):
    """Projection of the centred features (N, D) on their two principal directions -> (N, 2), and the fraction of
    the variance each explains (torch.pca_lowrank, a randomised SVD, with a few spare directions for accuracy)."""
    x = feats.float() - feats.float().mean(0)
    _, S, V = torch.pca_lowrank(x, q=min(10, *x.shape), center=False, niter=10)
    total = x.pow(2).sum().clamp_min(1e-12)
    return x @ V[:, :2], (S[:2] ** 2 / total)


# ----------------------------------------------------------------------------------------------------------------
# Augmentation recipes
# ----------------------------------------------------------------------------------------------------------------
def _simclr_recipe(x, size, saved):
    js = saved.get("jitter_strength")
    js = js if js is not None else (0.5 if size < 96 else 1.0)  # simclr.py's default for this image size
    return simclr.simclr_augment(x, size, js, saved.get("crop_min_scale", 0.08))


def _deepcluster_recipe(x, size, saved):
    return deepcluster.deepcluster_augment(x, size, saved.get("crop_min_scale", 0.08))


def _rotnet_recipe(x, size, saved):
    return rotnet.rotnet_augment(x, size)  # the light crop + flip; rotnet.rotate_batch then makes the four rotations


def _byol_recipe(x, size, saved):
    return byol.byol_augment(x, size, **byol.VIEW1, min_scale=saved.get("crop_min_scale", 0.08))  # the first view


def _moco_recipe(x, size, saved):
    return moco.moco_augment(x, size, saved.get("crop_min_scale", 0.2), saved.get("blur_prob", 0.5))


def _dino_recipe(x, size, saved):
    return dino.dino_augment(x, size, tuple(saved.get("global_scale", (0.4, 1.0))))  # the first global crop


# method -> f(uint8 images (N, 3, H, W), size, the checkpoint's flags) -> one normalised view (N, 3, size, size)
RECIPES = {"simclr": _simclr_recipe, "deepcluster": _deepcluster_recipe, "rotnet": _rotnet_recipe,
           "byol": _byol_recipe, "moco": _moco_recipe, "dino": _dino_recipe}
DEFAULT_RECIPE = "deepcluster"  # other methods: random resized crop + horizontal flip (DeepCluster's recipe)


def augmentation(method, saved=None):
    """The method's recipe from RECIPES with the checkpoint's flags (`saved`, its args), as
    f(uint8 (N, 3, H, W), size) -> one normalised view (N, 3, size, size), and a name for titles.
    A method without a recipe here gets DeepCluster's random resized crop + horizontal flip."""
    saved = saved or {}
    name = method if method in RECIPES else DEFAULT_RECIPE
    fn = RECIPES[name]
    flags = ", ".join(f"{k} {saved[k]}" for k in ("jitter_strength", "crop_min_scale") if saved.get(k) is not None)
    label = f"{name}.{name}_augment" + (f" ({flags})" if flags else "")
    if name != method:
        label = f"random resized crop + horizontal flip ({label})"
    return (lambda x, size: fn(x, size, saved)), label


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints, data, figures
# ----------------------------------------------------------------------------------------------------------------
def load_model(path, device, random_init=False, seed=0):
    """(encoder in eval mode, checkpoint dict, its image size, a label for titles)."""
    encoder, ckpt = common.load_encoder(path, device)
    if random_init:
        torch.manual_seed(seed)
        encoder = common.build_backbone(ckpt["backbone"]["name"], **ckpt["backbone"]["kwargs"]).to(device).eval()
    img_size = ckpt.get("img_size") or ckpt.get("args", {}).get("img_size") or 32
    label = f"{ckpt.get('method', '?')} {ckpt['backbone']['name']}" + (
        " random init" if random_init else f" epoch {ckpt.get('epoch', '?')}")
    return encoder, ckpt, img_size, label


def load_images(args, ckpt=None, img_size=None, max_images=None):
    """(uint8 images, labels, class names) of --split of --data (default: the checkpoint's dataset at its size),
    a seeded (--seed) random subset of at most `max_images` (None: all)."""
    saved = (ckpt or {}).get("args", {})
    name = args.data or (ckpt or {}).get("data") or saved.get("data") or "shapes"
    data = common.load_dataset(name, args.data_dir or saved.get("data_dir", "./data"), img_size,
                               saved.get("imagenette_size", "160px"), args.workers,
                               shapes_n=tuple(args.shapes_n or saved.get("shapes_n", (5000, 1000))),
                               seed=saved.get("seed", 0))
    split = data.test if args.split == "test" else data.memory
    if max_images is not None and max_images < 1:
        fail(f"--max-images must be at least 1, got {max_images}")
    if len(split) == 0:
        fail(f"empty dataset: the {args.split} split of {name} has no images")
    idx = torch.arange(len(split))
    if max_images is not None and max_images < len(split):  # random: folder splits are sorted by class
        gen = torch.Generator().manual_seed(args.seed)
        idx = torch.randperm(len(split), generator=gen)[:max_images].sort().values
    return split.images[idx], split.labels[idx], split.classes


def montage(images, nrow, pad=2):
    """float images (N, 3, H, W) in [0, 1] -> one (H', W', 3) array, nrow images per row, white gaps."""
    grid = torchvision.utils.make_grid(images.float().cpu(), nrow=nrow, padding=pad, pad_value=1.0)
    return grid.permute(1, 2, 0).numpy()


def show_montage(ax, images, nrow, row_labels=(), title=None, pad=2):
    ax.imshow(montage(images, nrow, pad), interpolation="nearest")
    H = images.shape[-2]
    ax.set_xticks([])
    ax.set_yticks([pad + H / 2 + r * (H + pad) for r in range(len(row_labels))], list(row_labels), fontsize=8)
    for s in ax.spines.values():
        s.set_visible(False)
    if title:
        ax.set_title(title, fontsize=9)


def figure(w, h):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt, plt.figure(figsize=(w, h))


def save(plt, fig, out, name):
    """Write the figure to out/name, or to `out` itself where it names a .png file."""
    path = out if out.endswith(".png") else os.path.join(out, name)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    print(f"wrote {path}")
    return path


def first_conv(encoder):
    """The first trainable nn.Conv2d (after the fixed Sobel layer, if any)."""
    conv = next((m for m in encoder.modules() if isinstance(m, nn.Conv2d) and m.weight.requires_grad), None)
    if conv is None:
        fail(f"the {type(encoder).__name__} encoder has no conv layers to visualise")
    return conv


def filter_tiles(weight):
    """Conv weights (C_out, C_in, k, k) -> one image per filter, each scaled to [0, 1] on its own: colour for 3
    input channels, otherwise each input channel in gray side by side (the Sobel layer's gx | gy)."""
    C, C_in, k, _ = weight.shape
    w = weight.detach().float().cpu()
    lo, hi = w.amin((1, 2, 3), keepdim=True), w.amax((1, 2, 3), keepdim=True)
    w = (w - lo) / (hi - lo).clamp_min(1e-12)
    if C_in == 3:
        return w
    gap = torch.ones(C, 1, k, 1)
    parts = [w[:, i:i + 1] if i == 0 else torch.cat([gap, w[:, i:i + 1]], -1) for i in range(C_in)]
    return torch.cat(parts, -1).expand(-1, 3, -1, -1)  # (C, 3, k, C_in * (k + 1) - 1)


# ----------------------------------------------------------------------------------------------------------------
# Sub-commands
# ----------------------------------------------------------------------------------------------------------------
def cmd_filters(args, device):
    encoder, ckpt, _, label = load_model(args.ckpt, device, args.random_init, args.seed)
    conv = first_conv(encoder)
    tiles = filter_tiles(conv.weight)  # (C, 3, k, k') in [0, 1]
    C, C_in, k = conv.out_channels, conv.in_channels, conv.kernel_size[0]
    nrow = math.ceil(math.sqrt(C * k / tiles.shape[-1]))  # about as wide as high
    rows, pad = math.ceil(C / nrow), max(1, k // 2)  # wider gaps between filters than between channels
    grid_w, grid_h = nrow * (tiles.shape[-1] + pad) + pad, rows * (k + pad) + pad
    plt, fig = figure(6, round(6 * grid_h / grid_w + 0.5, 1))
    ax = fig.add_axes([0.02, 0.02, 0.96, 0.96 - 0.45 / fig.get_figheight()])
    kind = "RGB" if C_in == 3 else ("Sobel input: gx | gy, gray" if isinstance(encoder, common.AlexNet)
                                   and encoder.sobel is not None else f"{C_in} channels, gray")
    show_montage(ax, tiles, nrow, pad=pad, title=f"{label}: first conv, {C} filters {k}x{k} ({kind})")
    ax.set_yticks([])
    return save(plt, fig, args.out, "filters.png")


def cmd_top_images(args, device):
    encoder, ckpt, img_size, label = load_model(args.ckpt, device, args.random_init, args.seed)
    check_filters(encoder, args.layer, args.filters, img_size)
    if args.k < 1:
        fail(f"--k must be at least 1, got {args.k}")
    images, _, _ = load_images(args, ckpt, img_size, args.max_images)
    acts = compute_activations(encoder, images, args.layer, args.batch_size, img_size)
    vals, idx = top_k_images(acts, args.filters, args.k)  # (F, k)
    k = idx.shape[1]
    plt, fig = figure(1.6 + CELL * k, 0.6 + CELL * len(args.filters))
    ax = fig.add_axes([1.4 / fig.get_figwidth(), 0.02, 1 - 1.5 / fig.get_figwidth(), 1 - 0.6 / fig.get_figheight()])
    show_montage(ax, to_float(images[idx.flatten()]), k,
                 [f"filter {f}\nmax {v[0]:.3g}" for f, v in zip(args.filters, vals.tolist())],
                 f"{label}: top-{k} of {len(images)} {args.split} images, layer {args.layer}")
    return save(plt, fig, args.out, f"top-images-layer{args.layer}.png")


def cmd_maximize(args, device):
    encoder, ckpt, img_size, label = load_model(args.ckpt, device, args.random_init, args.seed)
    check_filters(encoder, args.layer, args.filter, img_size)
    if args.steps < 1:
        fail(f"--steps must be at least 1, got {args.steps}")
    for p in encoder.parameters():
        p.requires_grad_(False)
    plt, fig = figure(0.2 + 1.6 * len(args.filter), 2.2)
    for i, f in enumerate(args.filter):
        img, hist = maximize_activation(encoder, args.layer, f, img_size, args.steps, args.lr, args.l2_decay,
                                        args.blur_every, args.blur_sigma, args.seed)
        print(f"layer {args.layer} filter {f}: activation {hist[0]:.4g} -> {hist[-1]:.4g} in {args.steps} steps")
        ax = fig.add_axes([(0.1 + 1.6 * i + 0.1) / fig.get_figwidth(), 0.05, 1.4 / fig.get_figwidth(), 0.7])
        ax.imshow(img.permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_axis_off()
        ax.set_title(f"filter {f}\n{hist[0]:.3g} -> {hist[-1]:.3g}", fontsize=8)
    fig.suptitle(f"{label}: layer {args.layer}, {args.steps} steps", fontsize=9)
    return save(plt, fig, args.out, f"maximize-layer{args.layer}.png")


def cmd_views(args, device):
    encoder, ckpt, img_size, label = load_model(args.ckpt, device, args.random_init, args.seed)
    if args.n < 2:
        fail(f"--n must be at least 2 (a similarity matrix of one image says nothing), got {args.n}")
    images, _, _ = load_images(args, ckpt, img_size, args.n)
    n = len(images)
    augment, recipe = augmentation(ckpt.get("method"), ckpt.get("args"))
    torch.manual_seed(args.seed)
    x = images.to(device)
    v1, v2 = augment(x, img_size), augment(x, img_size)  # normalised (n, 3, S, S)
    sims = [(label, *view_similarity(encoder, v1, v2))]
    if args.ckpt2:
        enc2, _, size2, label2 = load_model(args.ckpt2, device)
        sims.append((label2, *view_similarity(enc2, center_resize(v1, size2), center_resize(v2, size2))))
    for lab, _, acc in sims:
        print(f"{lab}: the most similar view-2 is the right one for {acc * 100:.0f}% of {n} images")
    panels = len(sims) + (len(sims) == 2)
    left = 0.9 + 0.6 * n  # inches: the image montage (0.6 in per image), then 3.2 in per matrix
    plt, fig = figure(left + 3.2 * panels, 3.4)
    W, H = fig.get_figwidth(), fig.get_figheight()
    ax = fig.add_axes([0.7 / W, 0.5 / H, 0.6 * n / W, 2.4 / H])
    shown = torch.cat([to_float(images.cpu()), denormalize(v1).clamp(0, 1).cpu(), denormalize(v2).clamp(0, 1).cpu()])
    show_montage(ax, shown, n, ["image", "view 1", "view 2"], f"views: {recipe}")
    mats = [(f"{lab}\ntop-1 {acc * 100:.0f}%", s, "viridis", -1, 1) for lab, s, acc in sims]
    if len(sims) == 2:
        d = sims[0][1] - sims[1][1]
        m = d.abs().max().item() or 1.0
        mats.append(("first minus second", d, "RdBu_r", -m, m))
    for i, (title, s, cmap, vmin, vmax) in enumerate(mats):
        ax = fig.add_axes([(left + 3.2 * i + 0.3) / W, 0.5 / H, 2.4 / W, 2.4 / H])
        im = ax.imshow(s.numpy(), cmap=cmap, vmin=vmin, vmax=vmax)
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("view 2 of image", fontsize=8)
        ax.set_ylabel("view 1 of image", fontsize=8)
        ax.tick_params(labelsize=6)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04).ax.tick_params(labelsize=6)
    return save(plt, fig, args.out, "views.png")


def cmd_augment(args, device):
    ckpt = common.load_checkpoint(args.ckpt) if args.ckpt else None
    method = ckpt.get("method") if ckpt else args.method
    if args.n < 1 or args.views < 1:
        fail(f"--n and --views must be at least 1, got {args.n} and {args.views}")
    img_size = args.img_size or (ckpt or {}).get("img_size")
    images, _, _ = load_images(args, ckpt, img_size, args.n)
    size = images.shape[-1]
    augment, recipe = augmentation(method, (ckpt or {}).get("args"))
    torch.manual_seed(args.seed)
    x = images.to(device)
    views = torch.stack([denormalize(augment(x, size)).clamp(0, 1).cpu() for _ in range(args.views)], 1)
    shown = torch.cat([to_float(images.cpu())[:, None], views], 1).flatten(0, 1)  # per image: original, views
    n = len(images)
    plt, fig = figure(0.3 + CELL * (1 + args.views), 0.5 + CELL * n)
    ax = fig.add_axes([0.02, 0.02, 0.96, 1 - 0.5 / fig.get_figheight()])
    show_montage(ax, shown, 1 + args.views, title=f"{method}: original, then {args.views} views\n{recipe}")
    ax.set_yticks([])
    return save(plt, fig, args.out, f"augment-{method}.png")


PROGRESS_LINE = re.compile(r"^epoch (\d+)/\d+ step (\d+)/(\d+) (.*?) \|")  # RunLog.step's progress line
EPOCH_LINE = re.compile(r"^epoch (\d+) (\S.*)$")  # RunLog.epoch's line: epoch E name value name value ...


def read_log(path):
    """Rows of a training script's saved output (`python byol.py ... > run.log`): one per progress line (every
    --log-every steps) at the fractional epoch (epoch - 1 + step / steps) with its metrics, and, at the whole epoch,
    the metrics of the end-of-epoch lines that the progress lines lack (e.g. knn_top1). Per-step points show what
    happens inside the first epochs, which metrics.jsonl (one row per epoch) cannot."""
    def pairs(text):  # "loss 1.2 lr 0.1" -> {"loss": 1.2, "lr": 0.1}; non-numbers are left out
        tokens, out = text.split(), {}
        for key, value in zip(tokens[::2], tokens[1::2]):
            try:
                out[key] = float(value)
            except ValueError:
                pass
        return out

    steps, ends = [], []
    for line in open(path, errors="replace"):
        if m := PROGRESS_LINE.match(line):
            steps.append({"epoch": int(m[1]) - 1 + int(m[2]) / int(m[3]), **pairs(m[4])})
        elif m := EPOCH_LINE.match(line):
            ends.append({"epoch": int(m[1]), **pairs(m[2])})
    per_step = {k for r in steps for k in r}
    rows = steps + [{k: v for k, v in r.items() if k == "epoch" or k not in per_step} for r in ends]
    return sorted(rows, key=lambda r: r["epoch"])


def read_metrics(run):
    if run.endswith(".log"):
        if not os.path.isfile(run):
            fail(f"no such log file: {run}")
        rows = read_log(run)
        if not rows:
            fail(f"{run} has no progress or epoch lines (expected a training script's saved output)")
        return rows
    path = run if run.endswith(".jsonl") else os.path.join(run, "metrics.jsonl")
    if not os.path.isfile(path):
        fail(f"no metrics.jsonl in {run}")
    rows = [json.loads(line) for line in open(path) if line.strip()]
    if not rows:
        fail(f"{path} has no epochs yet")
    return rows


def cmd_curves(args, device):
    runs = [(os.path.basename(os.path.normpath(r)).removesuffix(".log"), read_metrics(r)) for r in args.run]
    keys = []
    for _, rows in runs:  # numeric metrics, in order of appearance
        keys += [k for r in rows for k, v in r.items()
                 if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool) and k not in keys]
        keys = list(dict.fromkeys(keys))
    cols = min(3, len(keys))
    rows_n = math.ceil(len(keys) / cols)
    plt, fig = figure(4 * cols, 3 * rows_n)
    for i, k in enumerate(keys):
        ax = fig.add_subplot(rows_n, cols, i + 1)
        for name, rows in runs:
            pts = [(r["epoch"], r[k]) for r in rows if isinstance(r.get(k), (int, float))]
            if pts:  # markers only where there are few points (per-epoch rows), not on per-step curves
                ax.plot(*zip(*pts), marker="o" if len(pts) <= 30 else None, ms=3, label=name)
        ax.set_title(k, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.grid(alpha=0.3)
        if i == 0 and len(runs) > 1:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return save(plt, fig, args.out, "curves.png")


def read_json(path, what):
    try:
        return json.load(open(path))
    except (OSError, ValueError) as e:
        fail(f"cannot read {what} {path}: {type(e).__name__}")


def read_fewshot(path):
    """({labels per class: [top-1, ...]}, name) from knn_eval.py's JSON: its "rows" with a "labels_per_class"
    (the few-shot probes; several rows of one size, e.g. several seeds, are averaged), the encoder's name."""
    obj = read_json(path, "few-shot JSON")
    rows = obj.get("rows") if isinstance(obj, dict) else None
    points = {}
    for r in rows if isinstance(rows, list) else []:
        n, top1 = (r.get("labels_per_class"), r.get("top1")) if isinstance(r, dict) else (None, None)
        if isinstance(n, (int, float)) and isinstance(top1, (int, float)):
            points.setdefault(n, []).append(top1)
    if not points:
        fail(f"{path} has no few-shot rows (run knn_eval.py with the fewshot protocol)")
    name = obj.get("encoder") or obj.get("method") or os.path.splitext(os.path.basename(path))[0]
    return dict(sorted(points.items())), f"{name} ({obj.get('data', '?')})"


def cmd_fewshot(args, device):
    plt, fig = figure(6, 4)
    ax = fig.add_subplot(1, 1, 1)
    for path in args.json:
        points, name = read_fewshot(path)
        xs = list(points)
        ys = np.array([np.mean(v) for v in points.values()])
        sd = np.array([np.std(v) for v in points.values()])
        ax.errorbar(xs, ys, yerr=sd if (sd > 0).any() else None, marker="o", ms=4, capsize=3, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("labels per class")
    ax.set_ylabel("test top-1 (%)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save(plt, fig, args.out, "fewshot.png")


def cmd_embedding(args, device):
    encoder, ckpt, img_size, label = load_model(args.ckpt, device, args.random_init, args.seed)
    images, labels, classes = load_images(args, ckpt, img_size, args.max_images)
    feats = common.extract_features(encoder, common.Split(images, labels, classes), device, args.batch_size, img_size,
                                    workers=args.workers)
    xy, ratio = pca_2d(feats)
    xy = xy.cpu().numpy()
    plt, fig = figure(6, 5)
    ax = fig.add_axes([0.1, 0.1, 0.6, 0.8])
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    for c in range(len(classes)):
        m = (labels == c).numpy()
        if m.any():
            ax.scatter(xy[m, 0], xy[m, 1], s=4, color=cmap(c % cmap.N), label=classes[c], alpha=0.7)
    ax.set_xlabel(f"PC 1 ({ratio[0] * 100:.1f}% of variance)", fontsize=8)
    ax.set_ylabel(f"PC 2 ({ratio[1] * 100:.1f}%)", fontsize=8)
    ax.set_title(f"{label}: {len(images)} {args.split} images", fontsize=9)
    if len(classes) <= 20:
        ax.legend(fontsize=7, markerscale=3, loc="center left", bbox_to_anchor=(1.02, 0.5))
    return save(plt, fig, args.out, "embedding.png")


def cls_attention_maps(encoder, x):
    """The last block's attention from the [CLS] query to every patch, per head, each map scaled to max 1:
    normalised images (n, 3, S, S) -> (n, heads, S // patch, S // patch) (DINO, Fig. 1 and 3)."""
    with torch.no_grad():
        attn = encoder.last_attention(x)[:, :, 0, 1:]  # (n, heads, h*w): row 0 = the [CLS] query, minus itself
    grid = x.shape[-1] // encoder.patch_size
    maps = attn.reshape(*attn.shape[:2], grid, grid)
    return maps / maps.amax((2, 3), keepdim=True).clamp_min(1e-12)


def cmd_attention(args, device):
    encoder, ckpt, img_size, label = load_model(args.ckpt, device, args.random_init, args.seed)
    if not isinstance(encoder, common.ViT):
        fail(f"attention maps need a ViT checkpoint (--backbone vit_tiny); {args.ckpt} has a "
             f"{ckpt['backbone']['name']} encoder")
    if args.n < 1:
        fail(f"--n must be at least 1, got {args.n}")
    images, _, _ = load_images(args, ckpt, img_size, args.n)
    maps = cls_attention_maps(encoder, normalize(to_float(images.to(device)))).cpu()  # (n, heads, g, g)
    n, heads = maps.shape[:2]
    plt, fig = figure(1.2 * (heads + 1) + 0.4, 1.2 * n + 0.5)
    for i in range(n):
        img = to_float(images[i]).permute(1, 2, 0).numpy()
        for j in range(heads + 1):
            ax = fig.add_subplot(n, heads + 1, i * (heads + 1) + j + 1)
            ax.imshow(img, interpolation="nearest", extent=(0, 1, 1, 0))
            if j:  # the head's map over the image (nearest: one square per patch)
                ax.imshow(maps[i, j - 1].numpy(), cmap="inferno", alpha=0.75, vmin=0, vmax=1,
                          interpolation="nearest", extent=(0, 1, 1, 0))
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title("image" if j == 0 else f"head {j}", fontsize=8)
    fig.suptitle(f"{label}: last block, [CLS] attention to the {maps.shape[-1]}x{maps.shape[-1]} patches",
                 fontsize=9)
    fig.tight_layout()
    return save(plt, fig, args.out, "attention.png")


# ----------------------------------------------------------------------------------------------------------------
# Figures of a method: what its run saved, or (cpc-grid) its input
# ----------------------------------------------------------------------------------------------------------------
def cmd_cpc_grid(args, device, row=1, col=3):
    """docs/cpc.md's figure: the first image of the split with its grid of patches, and the grid drawn apart with
    the context c_{row,col}'s receptive field (rows <= row) and its targets z_{row+k,col}, k = 1..K."""
    from matplotlib.patches import Rectangle
    image = load_images(args, None, args.img_size)[0][0]  # uint8 (3, S, S)
    size = image.shape[-1]
    patch, stride = cpc.patch_defaults(size, args.patch_size, args.patch_stride)
    G = cpc.check_grid(size, patch, stride, args.pred_steps)
    patches = common.patch_grid(image[None], patch, stride)[0]  # (G, G, 3, P, P)
    plt, fig = figure(10, 5)
    a1, a2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.15]})
    a1.imshow(image.permute(1, 2, 0).numpy(), interpolation="nearest")
    for j, color in [(col, "tab:red"), (col + 1, "tab:orange")]:  # two overlapping columns of patches
        if j < G:
            for i in range(G):
                a1.add_patch(Rectangle((j * stride - 0.5, i * stride - 0.5), patch, patch, fill=False, lw=1.2,
                                       ec=color, alpha=0.9))
    a1.set_title(f"{size}px image, {patch}px patches, stride {stride}: a {G}x{G} grid\n"
                 f"(columns {col}, {col + 1} outlined: neighbours share half their pixels)", fontsize=9)
    a1.axis("off")
    gap = patch // 4 + 1
    step = patch + gap
    canvas = torch.full((G * step, G * step, 3), 255, dtype=torch.uint8)
    for i in range(G):
        for j in range(G):
            canvas[i * step:i * step + patch, j * step:j * step + patch] = patches[i, j].permute(1, 2, 0)
    a2.imshow(canvas.numpy(), interpolation="nearest")
    for i in range(row + 1):  # the rows c_{row,col} may see (the masked convolutions' causal rows)
        for j in range(G):
            a2.add_patch(Rectangle((j * step - 1, i * step - 1), patch + 1, patch + 1, fill=True, fc="tab:blue",
                                   alpha=0.25, ec="none"))
    a2.add_patch(Rectangle((col * step - 1, row * step - 1), patch + 1, patch + 1, fill=False, ec="tab:blue", lw=2.5))
    a2.text(col * step + patch / 2, row * step - 2, "c", color="tab:blue", ha="center", va="bottom", fontsize=10,
            weight="bold")
    for k in range(1, min(args.pred_steps, G - 1 - row) + 1):
        a2.add_patch(Rectangle((col * step - 1, (row + k) * step - 1), patch + 1, patch + 1, fill=False,
                               ec="tab:red", lw=2))
        a2.text(col * step + patch + 1, (row + k) * step + patch / 2, f"k={k}", color="tab:red", va="center",
                fontsize=8, bbox={"fc": "white", "ec": "none", "pad": 0.5})
    a2.set_title(f"the grid apart: context c at ({row}, {col}) sees the shaded rows <= {row};\nW_k c must pick the "
                 f"red patch k rows below among all patches of the batch", fontsize=9)
    a2.axis("off")
    fig.tight_layout()
    return save(plt, fig, args.out, "cpc-grid.png")


def cmd_deepcluster_nmi(args, device):
    """The paper's Fig. 2: NMI between consecutive clusterings, and NMI of the clusters with the true labels."""
    rows = read_metrics(args.run)
    plt, fig = figure(4.5, 3)
    ax = fig.add_subplot(1, 1, 1)
    curves = [(key, label, [(r["epoch"], r[key]) for r in rows if isinstance(r.get(key), (int, float))])
              for key, label in [("nmi_prev", "NMI(t-1, t)"), ("nmi_labels", "NMI(clusters, labels)")]]
    if not any(pts for _, _, pts in curves):
        fail(f"{args.run} has no NMI values (nmi_prev, nmi_labels: a deepcluster.py run's metrics)")
    for _, label, pts in curves:
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=3, label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("NMI")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save(plt, fig, args.out, "deepcluster-nmi.png")


def read_run_json(run, name):
    """A run's JSON file: `run` is the file itself or the run folder that holds `name`."""
    return read_json(run if run.endswith(".json") else os.path.join(run, name), "run file")


def cmd_rotnet_per_class(args, device):
    """Bar chart of the held-out rotation accuracy per class (the last kNN-monitor epoch's), with chance (25%)."""
    per_class = read_run_json(args.run, "summary.json").get("test_rotation_acc_per_class")
    if not isinstance(per_class, dict) or not per_class:
        fail(f"{args.run} has no test_rotation_acc_per_class (a rotnet.py run's summary.json has it)")
    names = list(per_class)
    plt, fig = figure(min(20.0, max(4.0, 0.45 * len(names))), 3)
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(range(len(names)), [100 * per_class[c] for c in names])
    ax.axhline(25, color="gray", ls="--", label="chance (25%)")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_ylabel("test rotation accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(loc="upper left")
    fig.tight_layout()
    return save(plt, fig, args.out, "rotnet-per-class.png")


def cmd_inpaint(args, device):
    """docs/context_encoder.md's figure: --n images of the split corrupted as in training (or by --mask), the
    context encoder's painting pasted into the hidden pixels, and the originals, one row each."""
    ckpt = common.load_checkpoint(args.ckpt)
    if ckpt.get("method") != context_encoder.METHOD or "model" not in ckpt:
        fail(f"{args.ckpt} is a {ckpt.get('method')} checkpoint; inpaint needs a context_encoder.py checkpoint "
             f"(its decoder paints)")
    if args.n < 1:
        fail(f"--n must be at least 1, got {args.n}")
    saved = argparse.Namespace(**ckpt["args"])
    if args.mask and (args.mask == "center") != (saved.mask == "center"):
        fail(f"--mask {args.mask}: this checkpoint was trained with --mask {saved.mask}, whose decoder paints "
             f"{'the centre' if saved.mask == 'center' else 'the whole image'}")
    saved.mask = args.mask or saved.mask
    img_size = ckpt["img_size"]
    torch.manual_seed(args.seed)
    model, _ = context_encoder.build_model(saved, img_size)
    if not args.random_init:
        model.load_state_dict(ckpt["model"])
    model = model.to(device).eval()
    images, _, _ = load_images(args, ckpt, img_size, args.n)
    x = normalize(to_float(images.to(device)))
    gen = torch.Generator(device=device).manual_seed(args.seed)
    xt, filled, pred, target, weight = context_encoder.inpaint(model, x, saved, gen)
    loss = context_encoder.reconstruction_loss(pred, target, weight).item()
    label = f"{ckpt.get('method')} {ckpt['backbone']['name']}" + (
        " random init" if args.random_init else f" epoch {ckpt.get('epoch', '?')}")
    n = len(images)
    plt, fig = figure(1.2 + CELL * n, 0.7 + CELL * 3)
    ax = fig.add_axes([0.9 / fig.get_figwidth(), 0.02, 1 - 1.0 / fig.get_figwidth(), 1 - 0.7 / fig.get_figheight()])
    shown = torch.cat([denormalize(t).clamp(0, 1).cpu() for t in (xt, filled, x)])
    show_montage(ax, shown, n, ["corrupted", "painted", "original"],
                 f"{label}: --mask {saved.mask}, L_rec {loss:.3f} on these {n}")
    return save(plt, fig, args.out, "inpaint.png")


def cmd_imagenet_mnist_bars(args, device):
    """The digit and background kNN errors of each setting (and random init) of imagenet_mnist.py's table.json."""
    table = read_run_json(args.run, "table.json")
    order = [s for s in imagenet_mnist.SETTINGS + ["random"] if isinstance(table, dict) and s in table]
    if not order:
        fail(f"{args.run} has no settings (an imagenet_mnist.py run's table.json has them)")
    plt, fig = figure(6, 3.2)
    ax = fig.add_subplot(1, 1, 1)
    w = 0.8 / len(order)
    for i, s in enumerate(order):
        ax.bar([j + (i - (len(order) - 1) / 2) * w for j in range(2)],
               [table[s]["digit_error"], table[s]["background_error"]], w, label=imagenet_mnist.ROW_NAMES[s])
    ax.set_xticks([0, 1], ["digit class", "background class"])
    ax.set_ylabel("kNN error (%)")
    ax.set_title("shared between the two views")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return save(plt, fig, args.out, "imagenet-mnist-bars.png")


COMMANDS = {"filters": cmd_filters, "top-images": cmd_top_images, "maximize": cmd_maximize, "views": cmd_views,
            "augment": cmd_augment, "curves": cmd_curves, "fewshot": cmd_fewshot, "embedding": cmd_embedding,
            "attention": cmd_attention, "cpc-grid": cmd_cpc_grid, "deepcluster-nmi": cmd_deepcluster_nmi,
            "rotnet-per-class": cmd_rotnet_per_class, "imagenet-mnist-bars": cmd_imagenet_mnist_bars,
            "inpaint": cmd_inpaint}


def main(argv=None):
    _, args = get_args(argv)
    if not hasattr(args, "device"):  # they only read files and draw
        return COMMANDS[args.command](args, None)
    if getattr(args, "batch_size", 1) < 1:
        fail(f"--batch-size must be at least 1, got {args.batch_size}")
    common.seed_everything(args.seed)
    return COMMANDS[args.command](args, common.get_device(args.device))


if __name__ == "__main__":
    main()
