"""MoCo v2: Momentum Contrast for Unsupervised Visual Representation Learning (He et al. 2020) with the improvements
of "Improved Baselines with Momentum Contrastive Learning" (Chen et al. 2020).
Papers: https://arxiv.org/abs/1911.05722, https://arxiv.org/abs/2003.04297 -- reference code:
https://github.com/facebookresearch/moco (ImageNet) and its CIFAR-10 demo (colab/moco_cifar10_demo.ipynb)

A query q = g(f(x1)) of one augmented view must pick out the key k+ of another view of the same image among K
negative keys kept in a queue (the keys of past batches). The keys come from a key encoder that gets no gradients:
a momentum (EMA) copy of the query encoder, so that keys computed over many past steps stay consistent. The queue
decouples the number of negatives from the batch size. Shuffling BatchNorm keeps the query and its positive key
from sharing BatchNorm statistics. The representation h = f(x) is kept. docs/moco.md has the details.

    python moco.py --data shapes --shapes-n 2000 500 --width 4 --epochs 5 --batch-size 64 --lr 1.0 \\
        --moco-k 512 --device cpu                                  # offline quick start, ~40 s on one CPU core
    python moco.py --data cifar10 --width 8 --epochs 6 --batch-size 256 --lr 0.5 --device cpu  # CIFAR-10, CPU
    python moco.py --data cifar10 --epochs 200 --batch-size 512 --no-mlp --temperature 0.1 --crop-min-scale 0.08 \\
        --blur-prob 0 --knn-features head  # GPU: the reference CIFAR-10 demo (ResNet-18, its kNN monitor on the
                                           # 128-d head: 82.6%; add --symmetric for 85.3%)
    torchrun --nproc_per_node=4 moco.py --data imagenette --epochs 200   # 4 GPUs: keys shuffled across the GPUs
"""
import argparse
import copy
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import common
from common import (color_jitter, gaussian_blur, normalize, random_flip, random_grayscale, random_resized_crop,
                    to_float, warmup_cosine)

METHOD = "moco"
BASE_LR = {"sgd": 0.03, "adamw": 1e-3}  # --lr default of each --optimizer, per 256 images


def add_moco_args(p):
    """MoCo's method flags. "small / large": the default for images below 96 px / from 96 px."""
    p.add_argument("--optimizer", default="sgd", choices=list(BASE_LR), help="optimizer (SGD: momentum 0.9)")
    p.add_argument("--lr", type=float, default=None,
                   help=f"base learning rate per 256 images, scaled by batch-size/256 (default: by --optimizer, "
                        f"{BASE_LR})")
    p.add_argument("--weight-decay", type=float, default=None,
                   help="weight decay on every parameter (default: 5e-4 small / 1e-4 large)")
    p.add_argument("--warmup-epochs", type=float, default=0.0, help="linear warm-up epochs, then cosine decay")
    p.add_argument("--temperature", type=float, default=None,
                   help="softmax temperature tau of the InfoNCE loss (default: 0.2; 0.07 with --no-mlp)")
    p.add_argument("--moco-dim", type=int, default=128, help="output size of the projection head (key size)")
    p.add_argument("--no-mlp", action="store_true",
                   help="a linear projection head (MoCo v1's) instead of the 2-layer MLP (v2's)")
    p.add_argument("--moco-k", type=int, default=None,
                   help="queue size K, the number of negative keys; a multiple of the keys enqueued per step (global "
                        "batch, x2 with --symmetric), smaller than the training set (default: 4096 small / 65536 "
                        "large, at most a tenth of the training images, rounded down to a multiple of the keys per "
                        "step)")
    p.add_argument("--force-queue", action="store_true",
                   help="accept a --moco-k at or above the number of training images (each query then meets older "
                        "keys of its own image among its negatives)")
    p.add_argument("--moco-m", type=float, default=None,
                   help="key encoder momentum m in [0, 1): theta_k <- m theta_k + (1 - m) theta_q every step; 0 = the "
                        "key encoder is the query encoder (default: 0.99 small / 0.999 large)")
    p.add_argument("--symmetric", action="store_true",
                   help="also use view 2 as query and view 1 as key and add that loss")
    p.add_argument("--bn-splits", type=int, default=None,
                   help="shuffling BatchNorm on one device: BatchNorm statistics over this many sub-batches and the "
                        "key batch shuffled before the key encoder; 1 = plain BatchNorm over the whole batch "
                        "(default: 8 in one process, 1 under torchrun, where the keys are shuffled across processes)")
    p.add_argument("--crop-min-scale", type=float, default=0.2,
                   help="smallest crop area fraction of the random resized crop")
    p.add_argument("--blur-prob", type=float, default=0.5, help="probability of the Gaussian blur")
    p.add_argument("--knn-features", default="backbone", choices=["backbone", "head"],
                   help="what the kNN monitor reads: the backbone's h (kept after training) or the query network's "
                        "projection-head output (the reference CIFAR-10 demo's monitor)")


def get_args(argv=None):
    p = argparse.ArgumentParser(description="MoCo v2 pre-training with a weighted-kNN monitor",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--epochs", type=int, default=200, help="training epochs")
    p.add_argument("--batch-size", type=int, default=512, help="global batch size (split over torchrun ranks)")
    add_moco_args(p)
    common.add_knn_args(p)
    common.add_common_args(p, backbone="resnet18")
    return p, p.parse_args(argv)


def keys_per_step(batch_size, symmetric):
    """Keys enqueued per step: the global batch (under torchrun every rank's), twice with --symmetric."""
    return batch_size * (2 if symmetric else 1)


def default_queue_size(img_size, n_train, per_step):
    """K: the CIFAR-10 demo's 4096 below 96 px, the ImageNet code's 65536 from 96 px, but at most a tenth of the
    n_train training images (the paper's K is 5% of ImageNet's 1.28M, the demo's 8% of CIFAR-10's 50k: a query
    rarely meets a key of its own image), rounded down to a multiple of the keys per step (at least one step's)."""
    K = min(4096 if img_size < 96 else 65536, n_train // 10)
    return max(per_step, K // per_step * per_step)


def resolve_defaults(args, img_size, world, n_train):
    """Defaults that depend on the image size (below 96 px: the CIFAR-10 demo's; else the ImageNet code's), the
    number of training images or torchrun, written into args (so the checkpoint keeps them)."""
    small = img_size < 96
    if args.moco_k is None:
        args.moco_k = default_queue_size(img_size, n_train, keys_per_step(args.batch_size, args.symmetric))
    if args.moco_m is None:
        args.moco_m = 0.99 if small else 0.999
    if args.weight_decay is None:
        args.weight_decay = 5e-4 if small else 1e-4
    if args.temperature is None:  # v1 (linear head) 0.07, v2 (MLP head) 0.2
        args.temperature = 0.07 if args.no_mlp else 0.2
    if args.bn_splits is None:  # one process: simulate 8 GPUs; torchrun: each rank's batch is one split
        args.bn_splits = 8 if world == 1 else 1


def check_args(args):
    if args.epochs < 1 or args.batch_size < 2:
        common.fail(f"--epochs must be >= 1 and --batch-size >= 2 (got {args.epochs}, {args.batch_size})")
    if args.temperature is not None and args.temperature <= 0:
        common.fail(f"--temperature must be > 0 (got {args.temperature})")
    if not 0 < args.crop_min_scale <= 1:
        common.fail(f"--crop-min-scale must be in (0, 1] (got {args.crop_min_scale})")
    if not 0 <= args.blur_prob <= 1:
        common.fail(f"--blur-prob must be in [0, 1] (got {args.blur_prob})")
    if args.moco_m is not None and not 0 <= args.moco_m < 1:
        common.fail(f"--moco-m must be in [0, 1) (got {args.moco_m})")
    if args.moco_k is not None and args.moco_k < 1:
        common.fail(f"--moco-k must be >= 1 (got {args.moco_k})")
    if args.bn_splits is not None and args.bn_splits < 1:
        common.fail(f"--bn-splits must be >= 1 (got {args.bn_splits})")
    if args.moco_dim < 1:
        common.fail(f"--moco-dim must be >= 1 (got {args.moco_dim})")


def check_sizes(K, batch_size, symmetric, bn_splits, world, n_train, force_queue=False):
    """The queue takes whole batches of keys and is smaller than the training set (unless forced); every process's
    batch splits into equal BatchNorm sub-batches."""
    per_step = keys_per_step(batch_size, symmetric)
    if K % per_step:
        common.fail(f"--moco-k {K} must be a multiple of the {per_step} keys enqueued per step (global batch "
                    f"{batch_size}{' x 2 with --symmetric' if symmetric else ''})")
    if (batch_size // world) % bn_splits:
        common.fail(f"--bn-splits {bn_splits} must divide the batch of each process ({batch_size // world} images)")
    if K >= n_train and not force_queue:
        common.fail(f"--moco-k {K} is not smaller than the {n_train} training images: each query would meet older "
                    f"keys of its own image among its negatives; use a smaller --moco-k (or --batch-size) or add "
                    f"--force-queue")


# ----------------------------------------------------------------------------------------------------------------
# Augmentations: MoCo v2's recipe (the reference's --aug-plus, SimCLR's with blur), in the reference's order.
# ----------------------------------------------------------------------------------------------------------------
def moco_augment(x, size, min_scale=0.2, blur_prob=0.5):
    """uint8 (N, 3, H, W) -> one normalised float view (N, 3, size, size); call twice for query and key views."""
    x = to_float(x)
    x = random_resized_crop(x, size, scale=(min_scale, 1.0))
    x = color_jitter(x, 0.4, 0.4, 0.4, 0.1, p=0.8)
    x = random_grayscale(x, p=0.2)
    if blur_prob > 0:  # the kernel is ~10% of the side, as SimCLR's (3 taps at 32 px: a mild blur)
        x = gaussian_blur(x, kernel_size=max(3, size // 10), sigma=(0.1, 2.0), p=blur_prob)
    x = random_flip(x)
    return normalize(x)


# ----------------------------------------------------------------------------------------------------------------
# Model: query encoder f_q = backbone + projection head, key encoder f_k = its momentum copy, the queue of keys,
# split BatchNorm (one device) and the key batch shuffle (shuffling BN).
# ----------------------------------------------------------------------------------------------------------------
class MoCo(nn.Module):
    """f_q: encoder f (from common.py) and projection head g: v2's Linear-ReLU-Linear (with biases, no BatchNorm,
    as the reference's --mlp) or v1's single Linear (mlp=False)."""
    def __init__(self, encoder, dim=128, mlp=True):
        super().__init__()
        self.encoder = encoder
        d = encoder.feature_dim
        self.head = nn.Sequential(nn.Linear(d, d), nn.ReLU(inplace=True), nn.Linear(d, dim)) if mlp else \
            nn.Linear(d, dim)

    def forward(self, x):
        return self.head(self.encoder(x))


def make_key_encoder(model):
    """f_k: a copy of f_q that gets no gradients (its weights only move by momentum_update)."""
    return copy.deepcopy(model).requires_grad_(False)


@torch.no_grad()
def momentum_update(key_model, model, m):
    """theta_k <- m theta_k + (1 - m) theta_q for every parameter (paper, eq. 2); BatchNorm running statistics are
    not parameters: each encoder keeps its own, as the reference. m = 0 makes f_k a copy of f_q."""
    for pk, pq in zip(key_model.parameters(), model.parameters()):
        pk.mul_(m).add_(pq.detach(), alpha=1 - m)


class Queue(nn.Module):
    """The dictionary: K L2-normalised keys (K, D), first in first out. `ptr` is the row where the next batch of keys
    goes; it wraps around to 0, so the oldest batch is always the one replaced. Initialised with random unit vectors
    (from `seed`, the same on every torchrun rank), as the reference."""
    def __init__(self, K, dim, seed=0):
        super().__init__()
        self.register_buffer("keys", F.normalize(torch.randn(K, dim, generator=torch.Generator().manual_seed(seed)),
                                                 dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def push(self, k, world=1):
        """Enqueue this step's keys (n, D); under torchrun every rank's keys, gathered in rank order."""
        if world > 1:
            k = common.all_gather_with_grad(k)  # (world*n, D); under no_grad a plain all_gather
        i, n = int(self.ptr), k.shape[0]
        self.keys[i:i + n] = k  # K is a multiple of n: a batch never straddles the end
        self.ptr.fill_((i + n) % self.keys.shape[0])


class SplitBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics come from `num_splits` sub-batches (images j, j+s, j+2s, ... form split
    j), as the reference CIFAR-10 demo's SplitBatchNorm: it simulates the per-GPU BatchNorm of s GPUs on one device.
    The running statistics are the average over the splits; in eval mode it is a plain BatchNorm2d (same state_dict,
    so the encoder loads into common.build_backbone's network)."""
    def __init__(self, num_features, num_splits, **kwargs):
        super().__init__(num_features, **kwargs)
        self.num_splits = num_splits

    def forward(self, x):
        if not self.training or self.num_splits == 1:
            return super().forward(x)
        N, C, H, W = x.shape
        s = self.num_splits
        mean, var = self.running_mean.repeat(s), self.running_var.repeat(s)  # (s*C,), updated in place below
        y = F.batch_norm(x.reshape(N // s, s * C, H, W), mean, var, self.weight.repeat(s), self.bias.repeat(s),
                         True, self.momentum, self.eps)  # split j = channels j*C ... j*C + C-1
        with torch.no_grad():
            self.running_mean.copy_(mean.view(s, C).mean(0))
            self.running_var.copy_(var.view(s, C).mean(0))
            self.num_batches_tracked += 1
        return y.reshape(N, C, H, W)


def convert_split_batchnorm(module, num_splits):
    """Replace every BatchNorm2d of `module` by a SplitBatchNorm with the same state."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            new = SplitBatchNorm(child.num_features, num_splits, eps=child.eps, momentum=child.momentum,
                                 device=child.running_mean.device)
            new.load_state_dict(child.state_dict())
            setattr(module, name, new)
        else:
            convert_split_batchnorm(child, num_splits)
    return module


@torch.no_grad()
def shuffled_keys(key_model, x, autocast, world=1, rank=0):
    """Keys k = normalize(f_k(x)) (n, D) of this rank's key views x (n, 3, S, S), computed with shuffling BN: the
    key encoder sees the batch in a random order and the keys are put back in the images' order. Under torchrun the
    global batch is shuffled across the ranks (one permutation, from rank 0), so every rank's BatchNorm sees other
    images than its queries' (the reference's batch_shuffle_ddp / batch_unshuffle_ddp); on one device the order
    changes which images share a SplitBatchNorm split."""
    x_all = common.all_gather_with_grad(x) if world > 1 else x  # (world*n, ...) in rank order
    perm = torch.randperm(x_all.shape[0], device=x.device)
    if world > 1:
        dist.broadcast(perm, src=0)
    with autocast():
        k = key_model(x_all[perm.view(world, -1)[rank]]).float()  # this rank's share of the shuffled batch
    k_all = common.all_gather_with_grad(k) if world > 1 else k  # keys of x_all[perm]
    return F.normalize(k_all[perm.argsort().view(world, -1)[rank]], dim=1)  # unshuffled: the keys of x


# ----------------------------------------------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------------------------------------------
def moco_loss(q, k, queue, temperature=0.2):
    """InfoNCE (MoCo, eq. 1), for each query q with its positive key k+ and the K queue keys k_i as negatives:

        L_q = -log  exp(q.k+ / tau) / (exp(q.k+ / tau) + sum_{i=1}^{K} exp(q.k_i / tau))

    i.e. a (1+K)-way cross-entropy over the logits [q.k+ ; q.queue^T] / tau with the positive in column 0,
    averaged over the N queries. q, k: (N, D), L2-normalised here; queue: (K, D) of normalised keys. k and queue
    carry no gradient (they come from the key encoder). Returns the scalar mean of L_q."""
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    l_pos = (q * k).sum(1, keepdim=True)  # (N, 1)
    l_neg = q @ queue.T  # (N, K)
    logits = torch.cat([l_pos, l_neg], 1) / temperature  # (N, 1+K)
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


@torch.no_grad()
def instance_accuracy(q, k, queue):
    """Fraction of queries whose positive key scores above every queue key (the reference's acc@1)."""
    q = F.normalize(q, dim=1)
    return ((q * k).sum(1) > (q @ queue.T).max(1).values).float().mean().item()


# ================================================================================================================
# ALGO LOGIC: one MoCo update
# ================================================================================================================
def train_step(model, key_model, queue, v1, v2, optimizer, scheduler, scaler, autocast, temperature, momentum,
               symmetric=False, world=1, rank=0):
    """Two views (N, 3, S, S) of the same N images -> one optimiser step of f_q. Returns (loss, instance accuracy).

    As the reference: f_k first takes its momentum step towards f_q (eq. 2; before the keys, i.e. after the previous
    step's update), view 1 is the query and view 2 the key (--symmetric: also the other way round, losses summed),
    and after the update this step's keys replace the oldest ones in the queue (under torchrun every rank's)."""
    momentum_update(key_model, model, momentum)
    loss, acc, keys = 0.0, 0.0, []
    for vq, vk in [(v1, v2), (v2, v1)] if symmetric else [(v1, v2)]:
        k = shuffled_keys(key_model, vk, autocast, world, rank)  # (N, D), no gradient
        with autocast():
            q = model(vq).float()  # (N, D); the loss is computed in fp32
        loss = loss + moco_loss(q, k, queue.keys, temperature)
        acc += instance_accuracy(q.detach(), k, queue.keys) / (2 if symmetric else 1)
        keys.append(k)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    queue.push(torch.cat(keys), world)
    return loss.item(), acc


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
    resolve_defaults(args, data.img_size, world, len(data.train))
    check_sizes(args.moco_k, args.batch_size, args.symmetric, args.bn_splits, world, len(data.train),
                args.force_queue)
    log.print(f"{data.name}: {len(data.train)} training images at {data.img_size}px, kNN on {len(data.memory)} "
              f"labelled / {len(data.test)} test images, {data.num_classes} classes; device {device} "
              f"({autocast.dtype or torch.float32}, {memory_format}), {world} process(es); queue K {args.moco_k} "
              f"({100 * args.moco_k / len(data.train):.1f}% of the training images), "
              f"momentum m {args.moco_m}, tau {args.temperature}, BatchNorm splits {args.bn_splits}, weight decay "
              f"{args.weight_decay}; kNN monitor on the {args.knn_features} features; run folder {out}")

    # --- model, key encoder, queue, optimizer, schedule ---
    bb_kwargs = common.backbone_kwargs(args, data.img_size)
    model = MoCo(common.build_backbone(args.backbone, **bb_kwargs), args.moco_dim, mlp=not args.no_mlp)
    if args.bn_splits > 1:  # no SyncBatchNorm under torchrun: shuffling BN needs each rank's own statistics
        model = convert_split_batchnorm(model, args.bn_splits)
    model = model.to(device, memory_format=memory_format)
    key_model = make_key_encoder(model)
    queue = Queue(args.moco_k, args.moco_dim, args.seed).to(device)
    lr = common.scaled_lr(args.lr, args.batch_size, BASE_LR, args.optimizer)
    groups = [{"params": list(model.parameters()), "weight_decay": args.weight_decay}]  # all decayed, as the reference
    optimizer = common.make_optimizer(args.optimizer, groups, lr)
    total_steps, warmup_steps = args.epochs * steps_per_epoch, int(args.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, total_steps, warmup_steps))
    start_epoch = common.restore(ckpt, rank, model=model, key_model=key_model, queue=queue, optimizer=optimizer,
                                 scheduler=scheduler, scaler=scaler)
    train_model = common.compile_model(model, memory_format) if args.compile else model
    key_train_model = common.compile_model(key_model, memory_format) if args.compile else key_model
    if world > 1:
        train_model = nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None)
        if ckpt is None:  # f_k starts as f_q, whose weights DDP has just broadcast from rank 0
            key_model.load_state_dict(model.state_dict())

    # --- training loop ---
    knn_top1, t_start = None, time.time()
    for epoch in range(start_epoch, args.epochs):
        model.train()
        key_model.train()  # as the reference: the keys use batch statistics (of shuffled batches)
        loader.set_epoch(epoch)
        sums, t_epoch = {"loss": 0.0, "acc": 0.0}, time.time()
        for step, (x, _) in enumerate(loader):
            x = x.to(device, non_blocking=True)
            with torch.no_grad():  # two independent views of every image, augmented on the device
                v1, v2 = (moco_augment(x, data.img_size, args.crop_min_scale, args.blur_prob)
                          .contiguous(memory_format=memory_format) for _ in range(2))
            loss, acc = train_step(train_model, key_train_model, queue, v1, v2, optimizer, scheduler, scaler,
                                   autocast, args.temperature, args.moco_m, args.symmetric, world, rank)
            sums["loss"] += loss
            sums["acc"] += acc
            log.step(epoch, step, steps_per_epoch, x.shape[0] * world, loss=loss, acc=acc,
                     lr=scheduler.get_last_lr()[0])

        # --- end of epoch: kNN monitor, metrics, checkpoint ---
        metrics = {"epoch": epoch + 1, "loss": sums["loss"] / steps_per_epoch,
                   "instance_acc": sums["acc"] / steps_per_epoch, "lr": scheduler.get_last_lr()[0],
                   "img_per_s": steps_per_epoch * args.batch_size / (time.time() - t_epoch)}
        if rank == 0 and common.knn_epoch(epoch, args):  # --knn-features head: f then g, as the demo's monitor
            monitored = model.encoder if args.knn_features == "backbone" else model
            knn_top1 = metrics["knn_top1"] = common.knn_monitor(monitored, data, device, args.knn_k,
                                                                args.knn_temperature, autocast, args.workers)
        log.epoch(**metrics)
        common.save_training_checkpoint(
            os.path.join(out, "last.pt"), rank, world, method=METHOD, args=vars(args), epoch=epoch + 1,
            step=(epoch + 1) * steps_per_epoch, backbone={"name": args.backbone, "kwargs": bb_kwargs},
            encoder=model.encoder, model=model, key_model=key_model, queue=queue, optimizer=optimizer,
            scheduler=scheduler, scaler=scaler, img_size=data.img_size, data=args.data, metrics=metrics)

    # --- summary ---
    wall = time.time() - t_start
    return common.finish(out, rank, world, log, {
        "method": METHOD, "data": args.data, "epochs": args.epochs, "knn_top1": knn_top1,
        "img_per_s": log.images / wall if log.images else None, "wall_time_s": wall, "device": str(device),
        "knn_features": args.knn_features, "precision": str(autocast.dtype or torch.float32), "world_size": world,
        "seed": args.seed, "checkpoint": os.path.join(out, "last.pt")})


if __name__ == "__main__":
    main()
