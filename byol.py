"""BYOL: Bootstrap Your Own Latent, a new approach to self-supervised learning (Grill et al. 2020).
Paper: https://arxiv.org/abs/2006.07733 -- reference code: https://github.com/deepmind/deepmind-research (byol/)

No negatives: an online network (encoder f, projector g, predictor q) predicts the projection that a target network
(encoder and projector only) gives another augmented view of the same image. The target gets no gradients; its
weights are an exponential moving average (EMA) of the online ones. The representation h = f(x) of the online encoder
is kept. A collapse monitor (the spread of the online projections, ~1 spread out, 0 when every image gets the same
projection) is logged every epoch, and --no-predictor, --ema 0 and --no-bn each take away one piece that is said to
prevent collapse. lr (LARS), weight decay and tau_base default to the reference's preset of the nearest epoch count
(40, 100, 300 or 1000). docs/byol.md has the details and the collapse study.

    python byol.py --data shapes --shapes-n 1000 500 --width 4 --batch-size 32 --epochs 12 --optimizer sgd \
        --lr 0.4 --weight-decay 1e-3 --crop-min-scale 0.2 --device cpu      # offline, a few minutes on a CPU
    python byol.py --data shapes --shapes-n 1000 500 --width 4 --batch-size 32 --epochs 12 --optimizer sgd \
        --lr 0.4 --weight-decay 1e-3 --crop-min-scale 0.2 --device cpu --no-predictor   # watch collapse_std fall
    python byol.py --data cifar10 --epochs 1000 --batch-size 256 --lr 1.0 --weight-decay 1e-5 --ema 0.99  # GPU
    torchrun --nproc_per_node=4 byol.py --data imagenette --epochs 300        # 4 GPUs, the 300-epoch preset
"""
import argparse
import copy
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from common import (color_jitter, gaussian_blur, normalize, random_flip, random_grayscale, random_resized_crop,
                    to_float, warmup_cosine)

METHOD = "byol"
# The reference's presets (byol/configs/byol.py), per number of epochs: LARS lr per 256 images, weight decay, tau_base.
PRESETS = {40: dict(lr=0.45, weight_decay=1e-6, ema=0.97), 100: dict(lr=0.45, weight_decay=1e-6, ema=0.99),
           300: dict(lr=0.3, weight_decay=1e-6, ema=0.99), 1000: dict(lr=0.2, weight_decay=1.5e-6, ema=0.996)}
BASE_LR = {"sgd": 0.4, "adamw": 1e-3}  # --lr default of the other optimizers, per 256 images (lars: the preset's)


def add_byol_args(p):
    """BYOL's method flags."""
    p.add_argument("--optimizer", default="lars", choices=["lars", *BASE_LR], help="optimizer")
    p.add_argument("--lr", type=float, default=None,
                   help=f"base learning rate per 256 images, scaled by batch-size/256 (default: lars the preset's "
                        f"of --epochs, else {BASE_LR})")
    p.add_argument("--weight-decay", type=float, default=None,
                   help="weight decay, not on biases and BatchNorm (default: the preset's of --epochs)")
    p.add_argument("--warmup-epochs", type=float, default=None,
                   help="linear warm-up epochs, then cosine decay (default: 10, at most 10%% of --epochs)")
    p.add_argument("--ema", type=float, default=None,
                   help="tau_base of the target EMA; tau rises from it to 1 over the run (cosine). 0: no EMA, the "
                        "target is a copy of the online network at every step (default: the preset's of --epochs)")
    p.add_argument("--proj-hidden", type=int, default=None,
                   help="hidden size of projector and predictor (default: min(4096, 8 x the encoder's feature size))")
    p.add_argument("--proj-dim", type=int, default=None,
                   help="output size of projector and predictor (default: min(256, feature size / 2))")
    p.add_argument("--no-predictor", action="store_true", help="collapse study: no predictor (p = z)")
    p.add_argument("--no-bn", action="store_true", help="collapse study: no BatchNorm in projector and predictor")
    p.add_argument("--head-bias", action="store_true",
                   help="collapse study: a bias in the last Linear of projector and predictor (the reference has none)")
    p.add_argument("--crop-min-scale", type=float, default=0.08,
                   help="smallest crop area fraction of the random resized crop (paper: 0.08)")


def get_args(argv=None):
    p = argparse.ArgumentParser(description="BYOL pre-training with a weighted-kNN and a collapse monitor",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--epochs", type=int, default=100, help="training epochs")
    p.add_argument("--batch-size", type=int, default=512, help="global batch size (split over torchrun ranks)")
    add_byol_args(p)
    common.add_knn_args(p)
    common.add_common_args(p, backbone="resnet18")
    return p, p.parse_args(argv)


def nearest_preset(epochs):
    """The reference's preset for a run of `epochs`: the one of the nearest epoch count (the shorter on a tie)."""
    return min(PRESETS, key=lambda e: (abs(e - epochs), e))


def resolve_defaults(args, resumed=False):
    """Defaults that depend on the run length, written into args (so the checkpoint keeps them): lr (LARS), weight
    decay and tau_base from the reference's preset of the nearest epoch count, each unless given. Returns a line
    that says which preset and which flags were given (on --resume: the checkpoint's values are kept)."""
    if args.warmup_epochs is None:
        args.warmup_epochs = common.default_warmup_epochs(args.epochs)
    args.preset_epochs = getattr(args, "preset_epochs", None) or nearest_preset(args.epochs)  # a checkpoint's kept
    preset = PRESETS[args.preset_epochs]
    given = ", ".join(f"--{k.replace('_', '-')}" for k in ("lr", "weight_decay", "ema") if getattr(args, k) is not None)
    if args.lr is None:
        args.lr = preset["lr"] if args.optimizer == "lars" else BASE_LR[args.optimizer]
    if args.weight_decay is None:
        args.weight_decay = preset["weight_decay"]
    if args.ema is None:
        args.ema = preset["ema"]
    return (f"the reference's {args.preset_epochs}-epoch preset"
            + ("" if resumed else f" (nearest to --epochs {args.epochs})")
            + f": lr {args.lr:g} ({args.optimizer}), weight decay {args.weight_decay:g}, tau_base {args.ema:g}"
            + (" (kept from the checkpoint)" if resumed else f" ({given} given)" if given else ""))


def upgrade_checkpoint_args(args, saved):
    """--resume from a checkpoint written before the presets and the bias-free heads (its args have no
    preset_epochs): there --lr None meant LARS lr 0.2 whatever --epochs, and the heads' last Linear had a bias."""
    if "preset_epochs" not in saved:
        if args.lr is None and args.optimizer == "lars":
            args.lr = 0.2
        args.head_bias = True


def check_args(args):
    if args.epochs < 1 or args.batch_size < 2:
        common.fail(f"--epochs must be >= 1 and --batch-size >= 2 (got {args.epochs}, {args.batch_size})")
    if args.ema is not None and not 0 <= args.ema <= 1:
        common.fail(f"--ema must be in [0, 1] (got {args.ema})")
    if not 0 < args.crop_min_scale <= 1:
        common.fail(f"--crop-min-scale must be in (0, 1] (got {args.crop_min_scale})")
    for name in ("proj_hidden", "proj_dim"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            common.fail(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(args, name)})")


# ----------------------------------------------------------------------------------------------------------------
# Augmentations (paper, appendix B, table 6): the same crop, flip and colour distortion for both views, but an
# asymmetric pair: view 1 is always blurred and never solarized, view 2 blurred with p 0.1 and solarized with p 0.2.
# ----------------------------------------------------------------------------------------------------------------
VIEW1 = dict(blur_p=1.0, solarize_p=0.0)
VIEW2 = dict(blur_p=0.1, solarize_p=0.2)


def byol_augment(x, size, blur_p, solarize_p, min_scale=0.08):
    """uint8 (N, 3, H, W) -> one normalised float view (N, 3, size, size); byol_augment(x, size, **VIEW1) and
    byol_augment(x, size, **VIEW2) give the two views."""
    x = to_float(x)
    x = random_resized_crop(x, size, scale=(min_scale, 1.0))
    x = random_flip(x)
    x = color_jitter(x, 0.4, 0.4, 0.2, 0.1, p=0.8)
    x = random_grayscale(x, p=0.2)
    x = gaussian_blur(x, kernel_size=size // 10, sigma=(0.1, 2.0), p=blur_p)  # kernel ~10% of the side
    x = common.solarize(x, p=solarize_p)
    return normalize(x)


# ----------------------------------------------------------------------------------------------------------------
# Model: online network (encoder f, projector g, predictor q) and its target (f, g), an EMA of the online weights.
# ----------------------------------------------------------------------------------------------------------------
def head_sizes(feature_dim, hidden=None, out=None):
    """Projector/predictor sizes: the paper's 4096 hidden / 256 out for a ResNet-50 (2048 features), kept for the
    standard ResNet-18 (512, as the CIFAR reference implementations) and scaled down with the feature size d below:
    hidden = min(4096, 8d), out = min(256, d/2) (width-8 ResNet-18, d = 64: 512 / 32)."""
    return hidden or min(4096, 8 * feature_dim), out or min(256, max(1, feature_dim // 2))


class MLP(nn.Sequential):
    """Linear - BatchNorm - ReLU - Linear without a bias (the paper's projector and predictor; the reference's `MLP`
    ends in hk.Linear(with_bias=False)). --no-bn drops the BatchNorm, --head-bias (last_bias) adds the bias."""
    def __init__(self, in_dim, hidden_dim, out_dim, bn=True, last_bias=False):
        super().__init__(nn.Linear(in_dim, hidden_dim), *([nn.BatchNorm1d(hidden_dim)] if bn else []),
                         nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim, bias=last_bias))


class BYOL(nn.Module):
    """The online network. forward(x1, x2) -> (z1, z2, p1, p2): projections and predictions of both views, each
    view a batch of its own (BatchNorm statistics per view, as the reference code)."""
    def __init__(self, encoder, proj_hidden, proj_dim, predictor=True, bn=True, head_bias=False):
        super().__init__()
        self.encoder = encoder
        self.projector = MLP(encoder.feature_dim, proj_hidden, proj_dim, bn, head_bias)
        self.predictor = MLP(proj_dim, proj_hidden, proj_dim, bn, head_bias) if predictor else nn.Identity()

    def forward(self, x1, x2):
        z1, z2 = self.projector(self.encoder(x1)), self.projector(self.encoder(x2))
        return z1, z2, self.predictor(z1), self.predictor(z2)


def make_target(online):
    """The target network: a copy of the online encoder and projector (no predictor: forward gives p = z), with no
    gradients. It stays in train mode: its BatchNorm uses batch statistics, as the reference code's."""
    target = copy.deepcopy(online)
    target.predictor = nn.Identity()
    return target.requires_grad_(False)


def target_tau(step, total_steps, base):
    """EMA coefficient of step k of K (paper, section 3.2): tau = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2,
    tau_base at the first step, rising to 1 at the end. base 0 means no EMA: tau 0 at every step (the schedule
    would raise it from 0 to 1)."""
    if base == 0:
        return 0.0
    return 1 - (1 - base) * (math.cos(math.pi * step / total_steps) + 1) / 2


@torch.no_grad()
def ema_update(target, online, tau):
    """xi <- tau xi + (1 - tau) theta for every target parameter xi and the online parameter theta of the same name
    (tau 0: an exact copy). Buffers (BatchNorm running statistics) are the target's own."""
    theta = dict(online.named_parameters())
    for name, xi in target.named_parameters():
        xi.mul_(tau).add_(theta[name], alpha=1 - tau)


# ----------------------------------------------------------------------------------------------------------------
# Loss and collapse monitor
# ----------------------------------------------------------------------------------------------------------------
def byol_loss(p, z):
    """BYOL's regression loss (paper, eq. 2): the mean squared error of the L2-normalised prediction and target
    projection, i.e. 2 - 2 cos:

        L = 1/N sum_i || p_i/|p_i| - z_i/|z_i| ||^2 = 1/N sum_i (2 - 2 <p_i, z_i> / (|p_i| |z_i|))

    p: online predictions (N, D); z: target projections of the other view (N, D), detached by the caller (no
    gradient into the target). The caller symmetrises: byol_loss(p1, z2) + byol_loss(p2, z1). Returns the scalar L.
    """
    return (2 - 2 * F.cosine_similarity(p, z, dim=1)).mean()


@torch.no_grad()
def collapse_std(z):
    """Collapse monitor: the standard deviation over the batch of the L2-normalised projections z (N, D), averaged
    over the D dimensions and multiplied by sqrt(D): ~1 for vectors spread uniformly over the sphere (each
    coordinate has std 1/sqrt(D)), 0 when every image gets the same projection."""
    return (F.normalize(z.float(), dim=1).std(0).mean() * z.shape[1] ** 0.5).item()


# ================================================================================================================
# ALGO LOGIC: one BYOL update
# ================================================================================================================
def train_step(net, model, target, v1, v2, optimizer, scheduler, scaler, autocast, tau):
    """Two views (N, 3, S, S) of the same N images -> one optimiser step of the online network, then the target's EMA
    step with coefficient tau. `net` is `model` or its compiled / DistributedDataParallel wrapper.
    Returns (loss, collapse monitor of the online projections)."""
    with autocast():
        z1, z2, p1, p2 = net(v1, v2)  # online projections and predictions of both views
        with torch.no_grad():
            t1, t2, _, _ = target(v1, v2)  # target projections: no gradient
    loss = byol_loss(p1.float(), t2.float()) + byol_loss(p2.float(), t1.float())  # symmetrised, in fp32
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    ema_update(target, model, tau)
    return loss.item(), collapse_std(torch.cat([z1, z2]).detach())


# ================================================================================================================
def main(argv=None):
    parser, args = get_args(argv)
    args, ckpt = common.resume_checkpoint(parser, argv, args, METHOD)
    check_args(args)
    device, rank, world = common.setup_run(args)
    autocast, scaler = common.setup_amp(args.amp, device)
    memory_format = common.memory_format(device, args.channels_last)
    out = common.run_folder(args, METHOD)
    log = common.RunLog(out, args, enabled=rank == 0, start_epoch=ckpt["epoch"] if ckpt else 0)

    # --- data ---
    data = common.dataset_from_args(args, log=log.print)
    loader = common.make_loader(data.train, args.batch_size // world, shuffle=True, drop_last=True,
                                workers=args.workers, seed=args.seed, rank=rank, world=world)
    steps_per_epoch = len(loader)
    if ckpt:
        upgrade_checkpoint_args(args, ckpt["args"])
    recipe = resolve_defaults(args, resumed=ckpt is not None)
    log.print(f"{data.name}: {len(data.train)} training images at {data.img_size}px, kNN on {len(data.memory)} "
              f"labelled / {len(data.test)} test images, {data.num_classes} classes; device {device} "
              f"({autocast.dtype or torch.float32}, {memory_format}), {world} process(es); {recipe}; warm-up "
              f"{args.warmup_epochs:g} epochs; run folder {out}")

    # --- model, target, optimizer, schedule ---
    bb_kwargs = common.backbone_kwargs(args, data.img_size)
    encoder = common.build_backbone(args.backbone, **bb_kwargs)
    args.proj_hidden, args.proj_dim = head_sizes(encoder.feature_dim, args.proj_hidden, args.proj_dim)
    model = BYOL(encoder, args.proj_hidden, args.proj_dim, predictor=not args.no_predictor, bn=not args.no_bn,
                 head_bias=args.head_bias)
    if world > 1:
        model = common.convert_sync_batchnorm(model, device)
    model = model.to(device, memory_format=memory_format)
    target = make_target(model)
    h, d = args.proj_hidden, args.proj_dim
    log.print(f"projector {encoder.feature_dim}-{h}-{d}, predictor {'none' if args.no_predictor else f'{d}-{h}-{d}'}, "
              f"BatchNorm in the heads: {not args.no_bn}, bias in their last Linear: {args.head_bias}")
    lr = common.scaled_lr(args.lr, args.batch_size)
    optimizer = common.make_optimizer(args.optimizer, common.param_groups(model, args.weight_decay), lr)
    total_steps, warmup_steps = args.epochs * steps_per_epoch, int(args.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, total_steps, warmup_steps))
    start_epoch = common.restore(ckpt, rank, model=model, target=target, optimizer=optimizer, scheduler=scheduler,
                                 scaler=scaler)
    train_model = common.compile_model(model, memory_format) if args.compile else model  # the target runs eagerly
    if world > 1:
        train_model = nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None)

    # --- training loop ---
    knn_top1, collapse, t_start = None, None, time.time()
    for epoch in range(start_epoch, args.epochs):
        model.train()
        target.train()
        loader.set_epoch(epoch)
        sums, t_epoch = {"loss": 0.0, "collapse_std": 0.0}, time.time()
        for step, (x, _) in enumerate(loader):
            x = x.to(device, non_blocking=True)
            with torch.no_grad():  # BYOL's asymmetric pair of views, augmented on the device
                v1, v2 = (byol_augment(x, data.img_size, min_scale=args.crop_min_scale, **view)
                          .contiguous(memory_format=memory_format) for view in (VIEW1, VIEW2))
            tau = target_tau(epoch * steps_per_epoch + step, total_steps, args.ema)
            loss, spread = train_step(train_model, model, target, v1, v2, optimizer, scheduler, scaler,
                                      autocast, tau)
            sums["loss"] += loss
            sums["collapse_std"] += spread
            log.step(epoch, step, steps_per_epoch, x.shape[0] * world, loss=loss, collapse_std=spread, tau=tau,
                     lr=scheduler.get_last_lr()[0])

        # --- end of epoch: kNN monitor, metrics, checkpoint ---
        metrics = {"epoch": epoch + 1, "loss": sums["loss"] / steps_per_epoch,
                   "collapse_std": sums["collapse_std"] / steps_per_epoch, "tau": tau,
                   "lr": scheduler.get_last_lr()[0],
                   "img_per_s": steps_per_epoch * args.batch_size / (time.time() - t_epoch)}
        if rank == 0 and common.knn_epoch(epoch, args):
            knn_top1 = metrics["knn_top1"] = common.knn_monitor(model.encoder, data, device, args.knn_k,
                                                                args.knn_temperature, autocast, args.workers)
        collapse = metrics["collapse_std"]
        log.epoch(**metrics)
        common.save_training_checkpoint(
            os.path.join(out, "last.pt"), rank, world, method=METHOD, args=vars(args), epoch=epoch + 1,
            step=(epoch + 1) * steps_per_epoch, backbone={"name": args.backbone, "kwargs": bb_kwargs},
            encoder=model.encoder, model=model, target=target, optimizer=optimizer, scheduler=scheduler,
            scaler=scaler, img_size=data.img_size, data=args.data, metrics=metrics)

    # --- summary ---
    wall = time.time() - t_start
    return common.finish(out, rank, world, log, {
        "method": METHOD, "data": args.data, "epochs": args.epochs, "knn_top1": knn_top1,
        "collapse_std": collapse,
        "img_per_s": log.images / wall if log.images else None, "wall_time_s": wall, "device": str(device),
        "precision": str(autocast.dtype or torch.float32), "world_size": world, "seed": args.seed,
        "checkpoint": os.path.join(out, "last.pt")})


if __name__ == "__main__":
    main()
