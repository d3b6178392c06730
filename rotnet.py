"""RotNet: Unsupervised Representation Learning by Predicting Image Rotations (Gidaris, Singh, Komodakis 2018).
Paper: https://arxiv.org/abs/1803.07728 -- reference code: https://github.com/gidariss/FeatureLearningRotNet

Every image of a batch is shown at 0, 90, 180 and 270 degrees, all four copies in the same batch (4N images), and
a 4-way linear head on the encoder's features predicts which rotation it sees (cross-entropy). Telling up from
down needs the objects in the image and their orientation, so the encoder learns features of them. The encoder f
is kept; the rotation head is thrown away after training. docs/rotnet.md has the details.

    python rotnet.py --data shapes --shapes-n 1000 500 --width 8 --epochs 6 --batch-size 16 --lr 0.05 \\
        --schedule cosine --device cpu                     # offline quick start (AlexNet), ~35 s on one CPU core
    python rotnet.py --data cifar10 --width 8 --epochs 10 --schedule cosine --device cpu   # CIFAR-10 on a CPU
    python rotnet.py --data cifar10 --backbone nin         # GPU: the paper's CIFAR-10 recipe and network (NIN)
    torchrun --nproc_per_node=4 rotnet.py --data imagenette --batch-size 192  # 4 GPUs: the ImageNet recipe (AlexNet)
"""
import argparse
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from common import light_augment, normalize, to_float, warmup_cosine

METHOD = "rotnet"
ROTATIONS = 4  # 0, 90, 180, 270 degrees
# The reference's recipes (its LUT_lr tables as a start lr, a decay factor and the epochs where the lr drops): below
# 96 px CIFAR-10's (CIFAR10_RotNet_NIN4blocks: 0.1, x0.2 after epochs 60, 120, 160 of 200; the paper: 30, 60, 80 of
# 100), from 96 px ImageNet's (ImageNet_RotNet_AlexNet: 0.01, x0.1 after epochs 15, 30, 45 of 50).
RECIPES = {"small": {"epochs": 100, "lr": 0.1, "lr_decay": 0.2, "milestones": [0.3, 0.6, 0.8]},
           "large": {"epochs": 50, "lr": 0.01, "lr_decay": 0.1, "milestones": [0.3, 0.6, 0.9]}}


def get_args(argv=None):
    p = argparse.ArgumentParser(description="RotNet pre-training (predict the rotation) with a weighted-kNN monitor",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: 100 small / 50 large)")
    p.add_argument("--batch-size", type=int, default=128,
                   help="global batch size in images (split over torchrun ranks); the network sees 4x as many, "
                        "every image in its four rotations")
    p.add_argument("--lr", type=float, default=None,
                   help="SGD learning rate, not scaled with the batch size (default: 0.1 small / 0.01 large)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (Nesterov, as the reference code)")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="weight decay, on every parameter")
    p.add_argument("--schedule", default="step", choices=["step", "cosine"],
                   help="step: lr x --lr-decay after each of --milestones (paper); cosine: cosine decay to 0")
    p.add_argument("--milestones", type=float, nargs="+", default=None,
                   help="step schedule: fractions of --epochs after which the lr drops (default: 0.3 0.6 0.8 small / "
                        "0.3 0.6 0.9 large)")
    p.add_argument("--lr-decay", type=float, default=None,
                   help="step schedule: lr factor at each milestone (default: 0.2 small / 0.1 large)")
    common.add_knn_args(p)
    common.add_common_args(p, backbone="alexnet", sobel=False)  # the paper's AlexNet sees RGB (--sobel: edges)
    return p, p.parse_args(argv)


def resolve_defaults(args, img_size):
    """The recipe's values of the flags not given: RECIPES["small"] below 96 px, RECIPES["large"] from 96 px,
    written into args (so the checkpoint keeps them)."""
    for k, v in RECIPES["small" if img_size < 96 else "large"].items():
        if getattr(args, k) is None:
            setattr(args, k, v)


def check_args(args):
    """The given flags (None: the recipe's default, set later by resolve_defaults)."""
    if (args.epochs is not None and args.epochs < 1) or args.batch_size < 2:
        common.fail(f"--epochs must be >= 1 and --batch-size >= 2 (got {args.epochs}, {args.batch_size})")
    if (args.lr is not None and args.lr <= 0) or args.weight_decay < 0:
        common.fail(f"--lr must be > 0 and --weight-decay >= 0 (got {args.lr}, {args.weight_decay})")
    if (args.milestones is not None and not all(0 < m < 1 for m in args.milestones)) or \
            (args.lr_decay is not None and not 0 < args.lr_decay <= 1):
        common.fail(f"--milestones must be fractions of the run in (0, 1) and --lr-decay in (0, 1] "
                    f"(got {args.milestones}, {args.lr_decay})")


# ----------------------------------------------------------------------------------------------------------------
# Augmentation (reference code, CIFAR-10): random crop of the padded image and horizontal flip, then the rotations.
# ----------------------------------------------------------------------------------------------------------------
def rotnet_augment(x, size):
    """uint8 (N, 3, H, W) -> normalised float (N, 3, size, size): a random crop of the image padded by size/8
    (4 px at 32 px) and a horizontal flip (common.light_augment), one view per image."""
    return normalize(light_augment(to_float(x), size))


def rotate_batch(x):
    """(N, C, S, S) -> every image in its four rotations (4N, C, S, S) and the rotation labels (4N,) int64.

    Rows k*N ... k*N + N - 1 hold the N images rotated by k * 90 degrees counter-clockwise (torch.rot90 in the
    image plane; the reference code's rotate_img), with label k. Exact: pixels are moved, never interpolated."""
    N = x.shape[0]
    xr = torch.cat([torch.rot90(x, k, dims=(-2, -1)) for k in range(ROTATIONS)])  # (4N, C, S, S)
    labels = torch.arange(ROTATIONS, device=x.device).repeat_interleave(N)  # (4N,): 0 .. 0, 1 .. 1, 2 .., 3 ..
    return xr, labels


# ----------------------------------------------------------------------------------------------------------------
# Model: encoder f (from common.py) and the rotation head.
# ----------------------------------------------------------------------------------------------------------------
class RotNet(nn.Module):
    """Rotation scores = W ReLU(f(x)) + b: one linear layer on the encoder's features (AlexNet's fc7 after its
    ReLU, as the reference's AlexNet; the pooled features of a ResNet or of the NIN, whose classifier is this linear
    layer on the global average of block 4 in the reference, are non-negative already)."""
    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.feature_dim, ROTATIONS)

    def forward(self, x):
        return self.head(F.relu(self.encoder(x)))


# ----------------------------------------------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------------------------------------------
def rotation_loss(logits, labels):
    """The RotNet objective (paper, eq. 1-2), with g(X | y) the image X rotated by y * 90 degrees and F^y the
    network's softmax probability of rotation y:

        loss(X_i) = -1/K sum_{y=0}^{K-1} log F^y(g(X_i | y)),    K = 4
        min_theta  1/N sum_{i=1}^{N} loss(X_i)

    i.e. the mean cross-entropy over the 4N rotated images. logits: (4N, 4), labels: (4N,). Returns the scalar."""
    return F.cross_entropy(logits, labels)


# ----------------------------------------------------------------------------------------------------------------
# Monitor (the reference's evaluation: the pretext task on held-out images) and the learning-rate schedule
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def rotation_accuracy(model, split, device, autocast, batch_size=256):
    """The pretext task on held-out images, as the reference code's evaluation: every image in its four rotations,
    no augmentation, eval mode. Returns (accuracy, {class: accuracy}); per class because a class whose images look
    the same after a rotation (a circle, a square) cannot be told apart from its rotations (docs/rotnet.md)."""
    was_training = model.training
    model.eval()
    hits = []
    for x, _ in common.make_loader(split, batch_size, shuffle=False):
        v, y = rotate_batch(normalize(to_float(x.to(device, non_blocking=True))))
        with autocast():
            pred = model(v).argmax(1)
        hits.append((pred == y).float().view(ROTATIONS, -1).mean(0))  # per image: the fraction of its 4 rotations
    model.train(was_training)
    per_image, labels = torch.cat(hits).cpu(), split.labels
    per_class = {c: per_image[labels == i].mean().item() for i, c in enumerate(split.classes) if (labels == i).any()}
    return per_image.mean().item(), per_class


def lr_factor(step, steps_per_epoch, epochs, schedule="step", milestones=(0.3, 0.6, 0.8), decay=0.2):
    """Learning-rate factor at optimiser step `step`. step: decay ** (milestones passed), the milestones being
    fractions of the run rounded to whole epochs (the paper's CIFAR-10 schedule: x0.2 after epochs 30, 60 and 80
    of 100; the reference's ImageNet table: x0.1 after 15, 30 and 45 of 50); cosine: common.warmup_cosine without
    warm-up, per step."""
    if schedule == "cosine":
        return warmup_cosine(step, epochs * steps_per_epoch, 0)
    epoch = step // steps_per_epoch
    return decay ** sum(epoch >= round(m * epochs) for m in milestones)


# ================================================================================================================
# ALGO LOGIC: one RotNet update
# ================================================================================================================
def train_step(model, x, labels, optimizer, scheduler, scaler, autocast):
    """The four rotations of N images (4N, 3, S, S) and their rotation labels (4N,) -> one optimiser step.
    Returns (loss, rotation accuracy).

    All four rotations of every image are in the same batch, as the paper (better than one random rotation per
    image): BatchNorm sees all 4N. Under torchrun, DistributedDataParallel averages the gradients of the ranks'
    equal shards, which is the gradient of the loss on the global batch."""
    with autocast():
        logits = model(x).float()  # (4N, 4); the loss is computed in fp32
    loss = rotation_loss(logits, labels)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    return loss.item(), (logits.detach().argmax(1) == labels).float().mean().item()


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
    log.print(f"{data.name}: {len(data.train)} training images at {data.img_size}px (x4 rotations), kNN on "
              f"{len(data.memory)} labelled / {len(data.test)} test images, {data.num_classes} classes; device "
              f"{device} ({autocast.dtype or torch.float32}, {memory_format}), {world} process(es); {args.epochs} "
              f"epochs, lr {args.lr}, {args.schedule} schedule"
              f"{f' (x{args.lr_decay} after {args.milestones} of the run)' if args.schedule == 'step' else ''}; "
              f"run folder {out}")

    # --- model, optimizer, schedule ---
    bb_kwargs = common.backbone_kwargs(args, data.img_size)
    model = RotNet(common.build_backbone(args.backbone, **bb_kwargs))
    if world > 1:
        model = common.convert_sync_batchnorm(model, device)
    model = model.to(device, memory_format=memory_format)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                                momentum=args.momentum, weight_decay=args.weight_decay, nesterov=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(
        s, steps_per_epoch, args.epochs, args.schedule, args.milestones, args.lr_decay))
    start_epoch = common.restore(ckpt, rank, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
    train_model = common.compile_model(model, memory_format) if args.compile else model
    if world > 1:
        train_model = nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None)

    # --- training loop ---
    knn_top1, rot_acc, per_class, t_start = None, None, None, time.time()
    for epoch in range(start_epoch, args.epochs):
        model.train()
        loader.set_epoch(epoch)
        sums, t_epoch = {"loss": 0.0, "acc": 0.0}, time.time()
        for step, (x, _) in enumerate(loader):
            x = x.to(device, non_blocking=True)
            with torch.no_grad():  # one light augmentation per image, then its four rotations, on the device
                v, y = rotate_batch(rotnet_augment(x, data.img_size))
                v = v.contiguous(memory_format=memory_format)
            loss, acc = train_step(train_model, v, y, optimizer, scheduler, scaler, autocast)
            sums["loss"] += loss
            sums["acc"] += acc
            log.step(epoch, step, steps_per_epoch, x.shape[0] * world, loss=loss, rot_acc=acc,
                     lr=scheduler.get_last_lr()[0])

        # --- end of epoch: kNN monitor, metrics, checkpoint ---
        metrics = {"epoch": epoch + 1, "loss": sums["loss"] / steps_per_epoch,
                   "rotation_acc": sums["acc"] / steps_per_epoch, "lr": scheduler.get_last_lr()[0],
                   "img_per_s": steps_per_epoch * args.batch_size / (time.time() - t_epoch)}
        if rank == 0 and common.knn_epoch(epoch, args):
            knn_top1 = metrics["knn_top1"] = common.knn_monitor(model.encoder, data, device, args.knn_k,
                                                                args.knn_temperature, autocast, args.workers)
            rot_acc, per_class = rotation_accuracy(model, data.test, device, autocast)
            metrics["test_rotation_acc"] = rot_acc
        log.epoch(**metrics)
        common.save_training_checkpoint(
            os.path.join(out, "last.pt"), rank, world, method=METHOD, args=vars(args), epoch=epoch + 1,
            step=(epoch + 1) * steps_per_epoch, backbone={"name": args.backbone, "kwargs": bb_kwargs},
            encoder=model.encoder, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
            img_size=data.img_size, data=args.data, metrics=metrics)

    # --- summary ---
    wall = time.time() - t_start
    log.print(f"figure: python visualize.py rotnet-per-class --run {out} "
              f"--out {os.path.join(out, 'rotation_per_class.png')}")
    return common.finish(out, rank, world, log, {
        "method": METHOD, "data": args.data, "epochs": args.epochs, "knn_top1": knn_top1,
        "test_rotation_acc": rot_acc, "test_rotation_acc_per_class": per_class,
        "img_per_s": log.images / wall if log.images else None, "wall_time_s": wall, "device": str(device),
        "precision": str(autocast.dtype or torch.float32), "world_size": world, "seed": args.seed,
        "checkpoint": os.path.join(out, "last.pt")})


if __name__ == "__main__":
    main()
