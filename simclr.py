"""SimCLR: A Simple Framework for Contrastive Learning of Visual Representations (Chen et al. 2020).
Paper: https://arxiv.org/abs/2002.05709

Two random augmentations of each image go through an encoder f (a ResNet) and a projection head g (an MLP);
the NT-Xent loss pulls the two views of an image together and pushes them away from the other 2N-2 views in the
batch. The representation h = f(x) is kept; g is thrown away after training.

    python simclr.py --data shapes --shapes-n 2000 500 --width 8 --epochs 8 --batch-size 64 --optimizer adamw \
        --lr 4e-3 --weight-decay 1e-4 --warmup-epochs 1 --crop-min-scale 0.2 --device cpu   # offline, ~2 min on CPU
    python simclr.py --data cifar10 --epochs 100 --width 32                                   # small images, GPU
    python simclr.py --data imagenette --epochs 100                                           # 128 px Imagenette
    torchrun --nproc_per_node=4 simclr.py --data imagenette --epochs 100                      # 4 GPUs, one batch
    python simclr.py --benchmark --data shapes --width 16 --device cpu                        # input pipeline cost
"""
import argparse
import json
import math
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import common
from common import (color_jitter, fail, gaussian_blur, normalize, random_flip, random_grayscale,
                    random_resized_crop, to_float)
from knn_eval import knn_monitor

METHOD = "simclr"


def get_args(argv=None):
    p = argparse.ArgumentParser(description="SimCLR pre-training with a weighted-kNN monitor",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--epochs", type=int, default=100, help="training epochs")
    p.add_argument("--batch-size", type=int, default=512, help="global batch size (split over torchrun ranks)")
    p.add_argument("--optimizer", default="lars", choices=["lars", "sgd", "adamw"], help="optimizer")
    p.add_argument("--lr", type=float, default=None,
                   help="base learning rate per 256 images, scaled by batch-size/256 (default: lars 1.0, sgd 0.3, "
                        "adamw 1e-3)")
    p.add_argument("--weight-decay", type=float, default=1e-6, help="weight decay (not on biases and BatchNorm)")
    p.add_argument("--warmup-epochs", type=float, default=10, help="linear warm-up epochs, then cosine decay")
    p.add_argument("--temperature", type=float, default=0.5, help="NT-Xent temperature tau")
    p.add_argument("--proj-hidden", type=int, default=None, help="projection head hidden size (default: feature size)")
    p.add_argument("--proj-dim", type=int, default=128, help="projection head output size")
    p.add_argument("--crop-min-scale", type=float, default=0.08,
                   help="smallest crop area fraction of the random resized crop (paper: 0.08)")
    p.add_argument("--jitter-strength", type=float, default=1.0, help="colour jitter strength s (0.8s, .., 0.2s)")
    p.add_argument("--knn-every", type=int, default=5, help="weighted-kNN monitor every N epochs (and the last)")
    p.add_argument("--knn-k", type=int, default=200, help="kNN monitor: neighbours")
    p.add_argument("--knn-temperature", type=float, default=0.1, help="kNN monitor: vote temperature")
    p.add_argument("--benchmark", action="store_true",
                   help="time the batched augmentation vs the model, and a per-image PIL + DataLoader pipeline")
    p.add_argument("--benchmark-steps", type=int, default=10, help="timed steps per pipeline with --benchmark")
    common.add_common_args(p, backbone="resnet18")
    return p, p.parse_args(argv)


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
    """g(h) = W2 ReLU(BN(W1 h)): the MLP whose output z the loss sees."""
    def __init__(self, in_dim, hidden_dim, out_dim):
        super().__init__(nn.Linear(in_dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                         nn.Linear(hidden_dim, out_dim))


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


# ----------------------------------------------------------------------------------------------------------------
# Optimisation: LARS (You et al. 2017) as used by SimCLR, with biases and BatchNorm excluded from weight decay and
# trust-ratio adaptation; linear warm-up then cosine decay, stepped every iteration.
# ----------------------------------------------------------------------------------------------------------------
class LARS(torch.optim.Optimizer):
    """SGD with momentum where each weight tensor's step is scaled by the trust ratio eta |w| / |g + wd w|.
    Parameter groups with `lars_exclude=True` (biases, BatchNorm) get plain SGD with momentum and no decay."""
    def __init__(self, params, lr, momentum=0.9, weight_decay=0.0, eta=0.001):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta,
                                      lars_exclude=False))

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if not g["lars_exclude"]:
                    d = d.add(p, alpha=g["weight_decay"])
                    w_norm, d_norm = p.norm(), d.norm()
                    trust = torch.where((w_norm > 0) & (d_norm > 0), g["eta"] * w_norm / d_norm, 1.0)
                    d = d.mul(trust)
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.mul_(g["momentum"]).add_(d)
                p.add_(buf, alpha=-g["lr"])


def param_groups(model, weight_decay):
    """Weights get weight decay (and LARS adaptation); biases and BatchNorm parameters (1-D tensors) do not."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0, "lars_exclude": True}]


def make_optimizer(name, groups, lr):
    if name == "lars":
        return LARS(groups, lr=lr, momentum=0.9)
    if name == "sgd":
        return torch.optim.SGD([{k: v for k, v in g.items() if k != "lars_exclude"} for g in groups], lr=lr,
                               momentum=0.9)
    return torch.optim.AdamW([{k: v for k, v in g.items() if k != "lars_exclude"} for g in groups], lr=lr)


def warmup_cosine(step, total_steps, warmup_steps):
    """Learning-rate factor: linear from ~0 to 1 over warm-up, then cosine from 1 to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, total_steps - warmup_steps)))


# ----------------------------------------------------------------------------------------------------------------
# Input pipeline benchmark: batched on-device augmentation vs per-image PIL transforms in DataLoader workers.
# ----------------------------------------------------------------------------------------------------------------
def benchmark(args, data, model, optimizer, device):
    from torchvision.transforms import v2
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    bs, size, s = args.batch_size, data.img_size, args.jitter_strength

    def train_step(v1, v2_):
        loss = nt_xent_loss(model(v1), model(v2_), args.temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    loader = common.make_loader(data.train, bs, shuffle=True, drop_last=True, workers=args.workers)
    t_aug = t_model = 0.0
    n = 0
    for i, (x, _) in enumerate(loader):
        if i > args.benchmark_steps:
            break
        sync(); t0 = time.time()
        x = x.to(device, non_blocking=True)
        v1, v2_ = simclr_augment(x, size, s, args.crop_min_scale), simclr_augment(x, size, s, args.crop_min_scale)
        sync(); t1 = time.time()
        train_step(v1, v2_)
        sync(); t2 = time.time()
        if i > 0:  # the first step warms up
            t_aug, t_model, n = t_aug + t1 - t0, t_model + t2 - t1, n + x.shape[0]
    batched = n / (t_aug + t_model)
    print(f"batched on-device augmentation: {batched:.0f} img/s | augmentation {t_aug / n * 1e3:.2f} ms/img "
          f"({100 * t_aug / (t_aug + t_model):.1f}% of a step), model {t_model / n * 1e3:.2f} ms/img")

    # the usual pipeline: PIL images, per-image torchvision transforms, in DataLoader worker processes
    tf = v2.Compose([v2.RandomResizedCrop(size, scale=(args.crop_min_scale, 1.0), antialias=True), v2.RandomHorizontalFlip(),
                     v2.RandomApply([v2.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=0.8),
                     v2.RandomGrayscale(p=0.2), v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                     v2.Normalize(common.MEAN.tolist(), common.STD.tolist())])

    class PILPairs(torch.utils.data.Dataset):
        def __len__(self):
            return len(data.train)

        def __getitem__(self, i):
            from PIL import Image
            im = Image.fromarray(data.train.images[i].permute(1, 2, 0).numpy())
            return tf(im), tf(im)
    pil = torch.utils.data.DataLoader(PILPairs(), batch_size=bs, shuffle=True, drop_last=True,
                                      num_workers=args.workers, persistent_workers=args.workers > 0)
    t_wait = t_model = 0.0
    n = 0
    t0 = time.time()
    for i, (v1, v2_) in enumerate(pil):
        if i > args.benchmark_steps:
            break
        v1, v2_ = v1.to(device), v2_.to(device)
        sync(); t1 = time.time()
        train_step(v1, v2_)
        sync(); t2 = time.time()
        if i > 0:
            t_wait, t_model, n = t_wait + t1 - t0, t_model + t2 - t1, n + v1.shape[0]
        t0 = time.time()
    print(f"per-image PIL + DataLoader ({args.workers} workers): {n / (t_wait + t_model):.0f} img/s | waiting for "
          f"data {t_wait / n * 1e3:.2f} ms/img ({100 * t_wait / (t_wait + t_model):.1f}% of a step), model "
          f"{t_model / n * 1e3:.2f} ms/img")
    return {"batched_img_s": batched, "aug_fraction": t_aug / (t_aug + t_model), "pil_img_s": n / (t_wait + t_model)}


# ----------------------------------------------------------------------------------------------------------------
def main(argv=None):
    parser, args = get_args(argv)
    ckpt = common.load_checkpoint(args.resume) if args.resume else None
    if ckpt is not None:  # continue with the checkpoint's flags, except those given again on the command line
        if ckpt.get("method") != METHOD:
            fail(f"{args.resume} is a {ckpt.get('method')} checkpoint, not {METHOD}")
        args = common.merge_resume_args(parser, argv, args, ckpt["args"])
    if args.epochs < 1 or args.batch_size < 2:
        fail(f"--epochs must be >= 1 and --batch-size >= 2 (got {args.epochs}, {args.batch_size})")

    # --- seeding, device, distributed ---
    device = common.get_device(args.device)
    rank, world = common.setup_distributed(device)
    common.seed_everything(args.seed + rank)  # each rank draws its own augmentations
    autocast, scaler = common.setup_amp(args.amp, device)
    if args.batch_size % world:
        fail(f"--batch-size {args.batch_size} is not divisible by the {world} torchrun processes")
    out = common.run_folder(args, METHOD)
    log = common.RunLog(out, args, enabled=rank == 0, start_epoch=ckpt["epoch"] if ckpt else 0)

    # --- data ---
    data = common.dataset_from_args(args, log=log.print)
    log.print(f"{data.name}: {len(data.train)} training images at {data.img_size}px, kNN on {len(data.memory)} "
              f"labelled / {len(data.test)} test images, {data.num_classes} classes; device {device}, {world} "
              f"process(es); run folder {out}")
    loader = common.make_loader(data.train, args.batch_size // world, shuffle=True, drop_last=True,
                                workers=args.workers, seed=args.seed, rank=rank, world=world)
    steps_per_epoch = len(loader)

    # --- model, optimizer, schedule ---
    bb_kwargs = common.backbone_kwargs(args, data.img_size)
    encoder = common.build_backbone(args.backbone, **bb_kwargs)
    model = SimCLR(encoder, args.proj_hidden, args.proj_dim)
    if world > 1:
        model = common.convert_sync_batchnorm(model, device)
    fmt = common.memory_format(device)
    model = model.to(device, memory_format=fmt)
    lr = (args.lr or {"lars": 1.0, "sgd": 0.3, "adamw": 1e-3}[args.optimizer]) * args.batch_size / 256
    optimizer = make_optimizer(args.optimizer, param_groups(model, args.weight_decay), lr)
    total_steps, warmup_steps = args.epochs * steps_per_epoch, int(args.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, total_steps, warmup_steps))
    if args.benchmark:
        return benchmark(args, data, model, optimizer, device)
    start_epoch = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        common.set_rng_state(ckpt["rng"][rank] if rank < len(ckpt["rng"]) else ckpt["rng"][0])
        start_epoch = ckpt["epoch"]
        log.print(f"resumed from {args.resume} at epoch {start_epoch}, step {ckpt['step']}, lr {scheduler.get_last_lr()[0]:.4g}")
    train_model = common.compile_model(model, device) if args.compile else model
    if world > 1:
        train_model = nn.parallel.DistributedDataParallel(train_model, device_ids=[device.index] if device.type == "cuda" else None)

    # --- training loop ---
    knn_top1, t_start, images_seen = None, time.time(), 0
    for epoch in range(start_epoch, args.epochs):
        model.train()
        loader.sampler.sampler.set_epoch(epoch)
        sums = {"loss": 0.0, "acc": 0.0}
        t_epoch = time.time()
        for step, (x, _) in enumerate(loader):
            x = x.to(device, non_blocking=True)
            with torch.no_grad():  # two independent views of every image, augmented on the device
                v1 = simclr_augment(x, data.img_size, args.jitter_strength, args.crop_min_scale).contiguous(memory_format=fmt)
                v2 = simclr_augment(x, data.img_size, args.jitter_strength, args.crop_min_scale).contiguous(memory_format=fmt)
            with autocast():
                z1, z2 = train_model(v1).float(), train_model(v2).float()
            if world > 1:  # negatives from every rank; the gather back-propagates, so this is the global-batch loss
                z1, z2 = common.all_gather_with_grad(z1), common.all_gather_with_grad(z2)
            loss = nt_xent_loss(z1, z2, args.temperature)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()

            acc = contrastive_accuracy(z1.detach(), z2.detach())
            sums["loss"] += loss.item()
            sums["acc"] += acc
            images_seen += x.shape[0] * world
            done = epoch * steps_per_epoch + step + 1
            if (step + 1) % args.log_every == 0 or step + 1 == steps_per_epoch:
                log.progress(epoch + 1, args.epochs, step + 1, steps_per_epoch, images_seen,
                             done - start_epoch * steps_per_epoch, total_steps - start_epoch * steps_per_epoch,
                             loss=loss.item(), acc=acc, lr=scheduler.get_last_lr()[0])

        # --- end of epoch: kNN monitor, metrics, checkpoint (rank 0) ---
        metrics = {"epoch": epoch + 1, "loss": sums["loss"] / steps_per_epoch, "contrastive_acc": sums["acc"] / steps_per_epoch,
                   "lr": scheduler.get_last_lr()[0], "img_per_s": steps_per_epoch * args.batch_size / (time.time() - t_epoch)}
        if rank == 0 and ((epoch + 1) % args.knn_every == 0 or epoch + 1 == args.epochs):
            knn_top1 = knn_monitor(model.encoder, data, device, args.knn_k, args.knn_temperature, autocast, args.workers)
            metrics["knn_top1"] = knn_top1
        if rank == 0:
            log.epoch(**metrics)
            log.print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))
            common.save_checkpoint(
                os.path.join(out, "last.pt"), method=METHOD, args=vars(args), epoch=epoch + 1,
                step=(epoch + 1) * steps_per_epoch, backbone={"name": args.backbone, "kwargs": bb_kwargs},
                encoder=model.encoder.state_dict(), model=model.state_dict(), optimizer=optimizer.state_dict(),
                scheduler=scheduler.state_dict(), scaler=scaler.state_dict(), rng=common.all_rng_states(world),
                img_size=data.img_size, data=args.data, metrics=metrics)
        elif world > 1:
            common.all_rng_states(world)
        if world > 1:
            dist.barrier()

    # --- summary ---
    wall = time.time() - t_start
    summary = {"method": METHOD, "data": args.data, "epochs": args.epochs, "knn_top1": knn_top1,
               "img_per_s": images_seen / wall if images_seen else None, "wall_time_s": wall, "device": str(device),
               "world_size": world, "seed": args.seed, "checkpoint": os.path.join(out, "last.pt")}
    if rank == 0:
        with open(os.path.join(out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        log.print("summary " + json.dumps(summary))
    if world > 1:
        dist.destroy_process_group()
    return summary


if __name__ == "__main__":
    main()
