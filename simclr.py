"""SimCLR: A Simple Framework for Contrastive Learning of Visual Representations (Chen et al. 2020).
Paper: https://arxiv.org/abs/2002.05709 -- reference code: https://github.com/google-research/simclr

Two random augmentations of each image go through an encoder f (a ResNet) and a projection head g (an MLP);
the NT-Xent loss pulls the two views of an image together and pushes them away from the other 2N-2 views in the
batch. The representation h = f(x) is kept; g is thrown away after training. docs/simclr.md has the details.

    python simclr.py --data shapes --shapes-n 2000 500 --width 4 --epochs 8 --batch-size 64 --optimizer adamw \\
        --lr 4e-3 --weight-decay 1e-4 --crop-min-scale 0.2 --device cpu      # offline quick start, < 1 min on a CPU
    python simclr.py --data cifar10 --width 16 --epochs 30 --batch-size 256 --optimizer sgd --lr 0.3 \\
        --weight-decay 5e-4 --temperature 0.2 --device cpu                   # CIFAR-10 on a laptop CPU
    python simclr.py --data cifar10 --epochs 1000 --batch-size 512 --lr 1.0 --weight-decay 1e-4  # GPU: the
        # reference code's CIFAR-10 command (ResNet-18, LARS, tau 0.5, jitter 0.5 and no blur at 32 px by default)
    torchrun --nproc_per_node=4 simclr.py --data imagenette --epochs 100     # 4 GPUs, one global batch
"""
import argparse
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from common import (color_jitter, gaussian_blur, normalize, random_flip, random_grayscale, random_resized_crop,
                    to_float, warmup_cosine)

METHOD = "simclr"
BASE_LR = {"lars": 1.0, "sgd": 0.3, "adamw": 1e-3}  # --lr default of each --optimizer, per 256 images


def add_simclr_args(p):
    """SimCLR's method flags (imagenet_mnist.py reuses them with its own defaults)."""
    p.add_argument("--optimizer", default="lars", choices=list(BASE_LR), help="optimizer")
    p.add_argument("--lr", type=float, default=None,
                   help=f"base learning rate per 256 images, scaled by batch-size/256 (default: by --optimizer, "
                        f"{BASE_LR})")
    p.add_argument("--weight-decay", type=float, default=1e-6, help="weight decay (not on biases and BatchNorm)")
    p.add_argument("--warmup-epochs", type=float, default=None,
                   help="linear warm-up epochs, then cosine decay (default: 10, at most 10%% of --epochs)")
    p.add_argument("--temperature", type=float, default=0.5, help="NT-Xent temperature tau")
    p.add_argument("--proj-hidden", type=int, default=None, help="projection head hidden size (default: feature size)")
    p.add_argument("--proj-dim", type=int, default=128, help="projection head output size")
    p.add_argument("--crop-min-scale", type=float, default=0.08,
                   help="smallest crop area fraction of the random resized crop (paper: 0.08)")
    p.add_argument("--jitter-strength", type=float, default=None,
                   help="colour jitter strength s (0.8s, 0.8s, 0.8s, 0.2s); default: the paper's 0.5 for images "
                        "below 96 px (CIFAR), 1.0 for larger ones (ImageNet)")


def get_args(argv=None):
    p = argparse.ArgumentParser(description="SimCLR pre-training with a weighted-kNN monitor",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--epochs", type=int, default=100, help="training epochs")
    p.add_argument("--batch-size", type=int, default=512, help="global batch size (split over torchrun ranks)")
    add_simclr_args(p)
    common.add_knn_args(p)
    common.add_common_args(p, backbone="resnet18")
    return p, p.parse_args(argv)


def resolve_defaults(args, img_size):
    """Defaults that depend on the data or the run length, written into args (so the checkpoint keeps them)."""
    if args.jitter_strength is None:  # the paper's CIFAR-10 strength for small images, ImageNet's for large ones
        args.jitter_strength = 0.5 if img_size < 96 else 1.0
    if args.warmup_epochs is None:
        args.warmup_epochs = common.default_warmup_epochs(args.epochs)


def check_args(args):
    if args.epochs < 1 or args.batch_size < 2:
        common.fail(f"--epochs must be >= 1 and --batch-size >= 2 (got {args.epochs}, {args.batch_size})")
    if args.temperature <= 0:
        common.fail(f"--temperature must be > 0 (got {args.temperature})")
    if not 0 < args.crop_min_scale <= 1:
        common.fail(f"--crop-min-scale must be in (0, 1] (got {args.crop_min_scale})")


# ----------------------------------------------------------------------------------------------------------------
# Augmentations (paper, appendix A): crop + resize, flip, colour distortion, blur for large images.
# ----------------------------------------------------------------------------------------------------------------
def simclr_augment(x, size, jitter_strength=1.0, min_scale=0.08):
    """uint8 (N, 3, H, W) -> one normalised float view (N, 3, size, size); call twice for two views."""
    s = jitter_strength
    x = to_float(x)
    x = random_resized_crop(x, size, scale=(min_scale, 1.0))
    x = random_flip(x)
    x = color_jitter(x, 0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s, p=0.8)
    x = random_grayscale(x, p=0.2)
    if size >= 96:  # the paper blurs ImageNet-size images only; the kernel is ~10% of the side
        x = gaussian_blur(x, kernel_size=size // 10, sigma=(0.1, 2.0), p=0.5)
    return normalize(x)


# ----------------------------------------------------------------------------------------------------------------
# Model: encoder f (from common.py) and projection head g.
# ----------------------------------------------------------------------------------------------------------------
class ProjectionHead(nn.Sequential):
    """g(h) = BN(W2 ReLU(BN(W1 h))), as the reference code: no biases, BatchNorm after both layers; the output
    BatchNorm has a scale but no shift (its bias stays 0, not trained)."""
    def __init__(self, in_dim, hidden_dim, out_dim):
        out_bn = nn.BatchNorm1d(out_dim)
        out_bn.bias.requires_grad_(False)
        super().__init__(nn.Linear(in_dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                         nn.Linear(hidden_dim, out_dim, bias=False), out_bn)


class SimCLR(nn.Module):
    def __init__(self, encoder, proj_hidden, proj_dim):
        super().__init__()
        self.encoder = encoder
        self.head = ProjectionHead(encoder.feature_dim, proj_hidden or encoder.feature_dim, proj_dim)

    def forward(self, x):
        return self.head(self.encoder(x))


# ----------------------------------------------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------------------------------------------
def nt_xent_loss(z1, z2, temperature=0.5):
    """NT-Xent, the normalised temperature-scaled cross entropy (paper, eq. 1).

    With the 2N views z = [z1; z2], sim(u, v) = u.v / (|u| |v|) and j(i) the other view of image i:

        l(i, j) = -log  exp(sim(z_i, z_j) / tau) / sum_{k != i} exp(sim(z_i, z_k) / tau)
        L = 1/(2N) sum_{i=1}^{2N} l(i, j(i))

    i.e. a (2N-1)-way cross-entropy per anchor over the similarity matrix with its diagonal masked.
    z1, z2: (N, D), need not be normalised. Returns the scalar L.
    """
    N = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)  # (2N, D)
    logits = z @ z.T / temperature  # (2N, 2N) cosine similarities / tau
    logits.fill_diagonal_(float("-inf"))  # k != i
    target = torch.cat([torch.arange(N, 2 * N), torch.arange(0, N)]).to(z.device)  # j(i)
    return F.cross_entropy(logits, target)


@torch.no_grad()
def contrastive_accuracy(z1, z2):
    """Fraction of the 2N anchors whose most similar other view is their positive."""
    N = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    sim = (z @ z.T).fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(N, 2 * N), torch.arange(0, N)]).to(z.device)
    return (sim.argmax(1) == target).float().mean().item()


# ================================================================================================================
# ALGO LOGIC: one SimCLR update
# ================================================================================================================
def train_step(model, v1, v2, optimizer, scheduler, scaler, autocast, temperature, world=1):
    """Two views (N, 3, S, S) of the same N images -> one optimiser step. Returns (loss, contrastive accuracy).

    Both views go through the network as one batch of 2N (as the reference code: BatchNorm sees all 2N views);
    under torchrun every rank's z are gathered, so the negatives and the loss are those of the global batch."""
    with autocast():
        z = model(torch.cat([v1, v2])).float()  # (2N, D); the loss is computed in fp32
    z1, z2 = z.chunk(2)
    if world > 1:  # the gather back-propagates to every rank
        z1, z2 = common.all_gather_with_grad(z1), common.all_gather_with_grad(z2)
    loss = nt_xent_loss(z1, z2, temperature)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    return loss.item(), contrastive_accuracy(z1.detach(), z2.detach())


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
    resolve_defaults(args, data.img_size)
    log.print(f"{data.name}: {len(data.train)} training images at {data.img_size}px, kNN on {len(data.memory)} "
              f"labelled / {len(data.test)} test images, {data.num_classes} classes; device {device} "
              f"({autocast.dtype or torch.float32}, {memory_format}), {world} process(es); jitter "
              f"{args.jitter_strength}, warm-up {args.warmup_epochs:g} epochs; run folder {out}")

    # --- model, optimizer, schedule ---
    bb_kwargs = common.backbone_kwargs(args, data.img_size)
    model = SimCLR(common.build_backbone(args.backbone, **bb_kwargs), args.proj_hidden, args.proj_dim)
    if world > 1:
        model = common.convert_sync_batchnorm(model, device)
    model = model.to(device, memory_format=memory_format)
    lr = common.scaled_lr(args.lr, args.batch_size, BASE_LR, args.optimizer)
    optimizer = common.make_optimizer(args.optimizer, common.param_groups(model, args.weight_decay), lr)
    total_steps, warmup_steps = args.epochs * steps_per_epoch, int(args.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, total_steps, warmup_steps))
    start_epoch = common.restore(ckpt, rank, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
    train_model = common.compile_model(model, memory_format) if args.compile else model
    if world > 1:
        train_model = nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None)

    # --- training loop ---
    knn_top1, t_start = None, time.time()
    for epoch in range(start_epoch, args.epochs):
        model.train()
        loader.set_epoch(epoch)
        sums, t_epoch = {"loss": 0.0, "acc": 0.0}, time.time()
        for step, (x, _) in enumerate(loader):
            x = x.to(device, non_blocking=True)
            with torch.no_grad():  # two independent views of every image, augmented on the device
                v1, v2 = (simclr_augment(x, data.img_size, args.jitter_strength, args.crop_min_scale)
                          .contiguous(memory_format=memory_format) for _ in range(2))
            loss, acc = train_step(train_model, v1, v2, optimizer, scheduler, scaler, autocast, args.temperature, world)
            sums["loss"] += loss
            sums["acc"] += acc
            log.step(epoch, step, steps_per_epoch, x.shape[0] * world, loss=loss, acc=acc,
                     lr=scheduler.get_last_lr()[0])

        # --- end of epoch: kNN monitor, metrics, checkpoint ---
        metrics = {"epoch": epoch + 1, "loss": sums["loss"] / steps_per_epoch,
                   "contrastive_acc": sums["acc"] / steps_per_epoch, "lr": scheduler.get_last_lr()[0],
                   "img_per_s": steps_per_epoch * args.batch_size / (time.time() - t_epoch)}
        if rank == 0 and common.knn_epoch(epoch, args):
            knn_top1 = metrics["knn_top1"] = common.knn_monitor(model.encoder, data, device, args.knn_k,
                                                                args.knn_temperature, autocast, args.workers)
        log.epoch(**metrics)
        common.save_training_checkpoint(
            os.path.join(out, "last.pt"), rank, world, method=METHOD, args=vars(args), epoch=epoch + 1,
            step=(epoch + 1) * steps_per_epoch, backbone={"name": args.backbone, "kwargs": bb_kwargs},
            encoder=model.encoder, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
            img_size=data.img_size, data=args.data, metrics=metrics)

    # --- summary ---
    wall = time.time() - t_start
    return common.finish(out, rank, world, log, {
        "method": METHOD, "data": args.data, "epochs": args.epochs, "knn_top1": knn_top1,
        "img_per_s": log.images / wall if log.images else None, "wall_time_s": wall, "device": str(device),
        "precision": str(autocast.dtype or torch.float32), "world_size": world, "seed": args.seed,
        "checkpoint": os.path.join(out, "last.pt")})


if __name__ == "__main__":
    main()
