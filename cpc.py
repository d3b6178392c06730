"""CPC: Contrastive Predictive Coding on images (van den Oord et al. 2018), with CPC v2's practical choices
(Hénaff et al. 2020). Papers: https://arxiv.org/abs/1807.03748, https://arxiv.org/abs/1905.09272

Each image is cut into a grid of overlapping patches (64-px patches with stride 32 on 256 px in the papers, 8-px
patches with stride 4 on 32 px here: a 7x7 grid). An encoder g_enc (a ResNet) turns every patch into a vector z_ij;
a context network g_ar of masked convolutions summarises the rows above into c_ij (c at row i sees rows <= i only);
a linear map W_k of c_ij predicts the patch k rows below, z_{i+k,j}, and InfoNCE asks that prediction to pick the
true z among every other patch of the batch. The representation is z mean-pooled over the grid (an image encoder:
common.PatchGridEncoder). docs/cpc.md has the details and a figure of the grid and the targets.

    python cpc.py --data shapes --shapes-n 1920 500 --width 4 --epochs 1 --batch-size 32 --lr 0.08 --device cpu
                                                        # offline quick start (the test's run), < 1 min on a CPU
    python cpc.py --data cifar10 --width 8 --epochs 1 --batch-size 256 --device cpu  # CIFAR-10, ~1 h on a CPU core
    python cpc.py --data cifar10 --epochs 200 --batch-size 512           # GPU: ResNet-18 on the 7x7 grid
    torchrun --nproc_per_node=4 cpc.py --data imagenette --epochs 100    # 4 GPUs, negatives of the global batch
    python visualize.py cpc-grid --data shapes --out grid.png            # the figure of the grid and the targets
"""
import argparse
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from common import (color_jitter, normalize, patch_grid, random_flip, random_grayscale, random_resized_crop, to_float,
                    warmup_cosine)

METHOD = "cpc"
BASE_LR = {"adamw": 1e-2, "sgd": 0.3, "lars": 1.0}  # --lr default of each --optimizer, per 256 images


def add_cpc_args(p):
    """CPC's method flags."""
    p.add_argument("--optimizer", default="adamw", choices=list(BASE_LR), help="optimizer")
    p.add_argument("--lr", type=float, default=None,
                   help=f"base learning rate per 256 images, scaled by batch-size/256 (default: by --optimizer, "
                        f"{BASE_LR})")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="weight decay (not on biases and BatchNorm)")
    p.add_argument("--warmup-epochs", type=float, default=None,
                   help="linear warm-up epochs, then cosine decay (default: 10, at most 10%% of --epochs)")
    p.add_argument("--patch-size", type=int, default=None,
                   help="side of a patch in px (default: image size / 4)")
    p.add_argument("--patch-stride", type=int, default=None,
                   help="step between patches in px (default: half the patch size)")
    p.add_argument("--pred-steps", type=int, default=5,
                   help="K: predict the patches k = 1..K rows below each context")
    p.add_argument("--context-dim", type=int, default=None,
                   help="channels of the context network (default: the encoder's feature size)")
    p.add_argument("--context-layers", type=int, default=3,
                   help="residual blocks of masked 3x3 convolutions in the context network (each sees one row up)")
    p.add_argument("--crop-min-scale", type=float, default=0.3,
                   help="smallest area fraction of the image-level random resized crop, before the grid is cut")


def get_args(argv=None):
    p = argparse.ArgumentParser(description="CPC pre-training with a weighted-kNN monitor",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--epochs", type=int, default=100, help="training epochs")
    p.add_argument("--batch-size", type=int, default=256, help="global batch size (split over torchrun ranks)")
    add_cpc_args(p)
    common.add_knn_args(p)
    common.add_common_args(p, backbone="resnet18")
    return p, p.parse_args(argv)


def resolve_defaults(args, img_size):
    """Defaults that depend on the data or the run length, written into args (so the checkpoint keeps them)."""
    args.patch_size, args.patch_stride = patch_defaults(img_size, args.patch_size, args.patch_stride)
    if args.warmup_epochs is None:
        args.warmup_epochs = common.default_warmup_epochs(args.epochs)


def patch_defaults(img_size, patch=None, stride=None):
    """(patch, stride), each as given or by default the papers' 64-px patches on 256 px scaled to the image (8 px on
    32 px), neighbours overlapping by half (stride = patch / 2): a 7x7 grid."""
    patch = patch if patch is not None else max(1, img_size // 4)
    return patch, stride if stride is not None else max(1, patch // 2)


def check_args(args):
    if args.epochs < 1 or args.batch_size < 2:
        common.fail(f"--epochs must be >= 1 and --batch-size >= 2 (got {args.epochs}, {args.batch_size})")
    if args.pred_steps < 1:
        common.fail(f"--pred-steps must be >= 1 (got {args.pred_steps})")
    if args.context_layers < 1 or (args.context_dim is not None and args.context_dim < 1):
        common.fail(f"--context-layers and --context-dim must be >= 1 (got {args.context_layers}, {args.context_dim})")
    if not 0 < args.crop_min_scale <= 1:
        common.fail(f"--crop-min-scale must be in (0, 1] (got {args.crop_min_scale})")


def check_grid(img_size, patch, stride, pred_steps):
    """Patches must tile the image exactly, and the grid must have more than K rows. Returns the grid side G."""
    if patch < 1 or stride < 1 or patch > img_size or (img_size - patch) % stride:
        common.fail(f"--patch-size {patch} with --patch-stride {stride} does not fit the {img_size}px image: need "
                    f"1 <= patch <= {img_size} and ({img_size} - patch) divisible by the stride")
    G = (img_size - patch) // stride + 1
    if pred_steps >= G:
        common.fail(f"--pred-steps {pred_steps} is too large for the {G}x{G} grid of patches (at most {G - 1}: "
                    f"a context at row 0 predicts row K)")
    return G


# ----------------------------------------------------------------------------------------------------------------
# Augmentations: the image is cropped and flipped as a whole, then every patch gets its own colour distortion and
# flip (CPC v2's patch-level augmentation: neighbouring patches share pixels, and identical shared pixels would let
# the network match patches by their overlap instead of predicting their content).
# ----------------------------------------------------------------------------------------------------------------
def cpc_augment(x, size, patch, stride, min_scale=0.3):
    """uint8 (N, 3, H, W) -> normalised float patches (N, G, G, 3, patch, patch), each patch augmented on its own."""
    x = to_float(x)
    x = random_resized_crop(x, size, scale=(min_scale, 1.0))
    x = random_flip(x)
    p = patch_grid(x, patch, stride)  # (N, G, G, 3, P, P)
    grid = p.shape[:3]
    p = p.reshape(-1, 3, patch, patch)  # (N*G*G, 3, P, P): the blocks draw their parameters per patch
    p = color_jitter(p, 0.4, 0.4, 0.4, 0.1, p=0.8)
    p = random_grayscale(p, p=0.2)
    p = random_flip(p)
    return normalize(p).view(*grid, 3, patch, patch)


# ----------------------------------------------------------------------------------------------------------------
# Model: encoder g_enc (common.PatchGridEncoder: a common.py backbone on every patch), context network g_ar of
# masked convolutions over the grid, predictions W_1 .. W_K.
# ----------------------------------------------------------------------------------------------------------------
class MaskedConv2d(nn.Conv2d):
    """A 3x3 convolution over the grid whose kernel row below the centre is zeroed:

        mask = [[1, 1, 1],    <- grid row i-1
                [1, 1, 1],    <- grid row i (the centre)
                [0, 0, 0]]    <- grid row i+1: never seen

    so the output at row i depends on input rows i-1 and i only. Stacking L of them (and 1x1 convolutions, which
    look at one position) gives c at row i a receptive field of rows i-L .. i and columns j-L .. j+L."""
    def __init__(self, channels):
        super().__init__(channels, channels, 3, padding=1)
        self.register_buffer("mask", torch.tensor([[1.0, 1, 1], [1, 1, 1], [0, 0, 0]]).view(1, 1, 3, 3),
                             persistent=False)

    def forward(self, x):
        return F.conv2d(x, self.weight * self.mask, self.bias, padding=1)


class ContextNetwork(nn.Module):
    """g_ar: z (N, D, G, G) -> c (N, H, G, G), a 1x1 convolution to H channels, then residual blocks
    x <- x + conv1x1(ReLU(masked3x3(ReLU(x)))) (PixelCNN-style, as CPC v2's; no normalisation: BatchNorm statistics
    would mix in rows below)."""
    def __init__(self, dim, hidden, layers):
        super().__init__()
        self.inp = nn.Conv2d(dim, hidden, 1)
        self.blocks = nn.ModuleList(nn.Sequential(nn.ReLU(), MaskedConv2d(hidden), nn.ReLU(),
                                                  nn.Conv2d(hidden, hidden, 1)) for _ in range(layers))

    def forward(self, z):
        x = self.inp(z)
        for block in self.blocks:
            x = x + block(x)
        return x


class CPC(nn.Module):
    def __init__(self, encoder, context_dim, context_layers, pred_steps):
        super().__init__()
        self.encoder = encoder  # common.PatchGridEncoder; its .backbone is g_enc
        D = encoder.feature_dim
        self.context = ContextNetwork(D, context_dim or D, context_layers)
        self.predict = nn.ModuleList(nn.Linear(context_dim or D, D, bias=False) for _ in range(pred_steps))  # W_k

    def forward(self, patches):
        """patches (N, G, G, 3, P, P) -> z (N, G, G, D) and the predictions z_hat (K, N, G, G, D), where
        z_hat[k-1, n, i, j] = W_k c_nij predicts z[n, i+k, j] (rows i >= G-k predict off the grid: unused)."""
        N, G = patches.shape[:2]
        z = self.encoder.backbone(patches.flatten(0, 2)).view(N, G, G, -1)  # g_enc on all N*G*G patches
        c = self.context(z.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # (N, G, G, H)
        return z, torch.stack([W(c) for W in self.predict])


# ----------------------------------------------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------------------------------------------
def cpc_loss(z, z_hat, candidates=None, first=0):
    """InfoNCE over the grid (CPC, eq. 4; CPC v2, eq. 3). For each prediction step k = 1..K and each position
    (n, i, j) with i + k < G, with z_hat_nij^k = W_k c_nij:

        L_nijk = -log  exp(z_hat_nij^k . z_{n,i+k,j}) / sum_{m} exp(z_hat_nij^k . z_m)
        L = 1/K sum_k  mean_{n, j, i < G-k}  L_nijk

    where m runs over every patch of the batch (N*G*G of them, as CPC v2: the positive, the other positions of the
    same image and all patches of the other images). Each step k weighs the same, whatever its number of positions.
    z: (N, G, G, D) this batch's patch vectors; z_hat: (K, N, G, G, D). `candidates`: the patches the sum runs over,
    (M, G, G, D) (default z; under torchrun every rank's z), of which z is images first .. first+N-1.
    Returns (L, the fraction of predictions whose most similar candidate is the true patch, a 0-d tensor)."""
    N, G, _, D = z.shape
    cand = (z if candidates is None else candidates).reshape(-1, D)  # (M*G*G, D), row (n*G + i)*G + j
    index = torch.arange(cand.shape[0], device=z.device).view(-1, G, G)[first:first + N]  # (N, G, G) rows of z
    losses, hits = [], []
    for k in range(1, z_hat.shape[0] + 1):
        logits = z_hat[k - 1, :, :G - k].reshape(-1, D) @ cand.T  # (N*(G-k)*G, M*G*G)
        target = index[:, k:].reshape(-1)  # z_{n, i+k, j}
        losses.append(F.cross_entropy(logits, target))
        hits.append((logits.detach().argmax(1) == target).float().mean())
    return torch.stack(losses).mean(), torch.stack(hits).mean()


# ================================================================================================================
# ALGO LOGIC: one CPC update
# ================================================================================================================
def train_step(model, patches, optimizer, scheduler, scaler, autocast, world=1, rank=0):
    """Augmented patches (N, G, G, 3, P, P) -> one optimiser step. Returns (loss, prediction accuracy).

    Under torchrun every rank's z are gathered: each rank's predictions pick their target among the patches of the
    global batch (as SimCLR's negatives), and the gather back-propagates to the rank that owns each patch."""
    with autocast():
        z, z_hat = model(patches)
    z, z_hat = z.float(), z_hat.float()  # the loss is computed in fp32
    candidates = common.all_gather_with_grad(z) if world > 1 else z  # (world*N, G, G, D), rank order
    loss, acc = cpc_loss(z, z_hat, candidates, first=rank * z.shape[0])
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    return loss.item(), acc.item()


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
    G = check_grid(data.img_size, args.patch_size, args.patch_stride, args.pred_steps)
    log.print(f"{data.name}: {len(data.train)} training images at {data.img_size}px, kNN on {len(data.memory)} "
              f"labelled / {len(data.test)} test images, {data.num_classes} classes; device {device} "
              f"({autocast.dtype or torch.float32}, {memory_format}), {world} process(es); {G}x{G} grid of "
              f"{args.patch_size}px patches (stride {args.patch_stride}), predicting K={args.pred_steps} rows ahead "
              f"among {args.batch_size * G * G} patches; warm-up {args.warmup_epochs:g} epochs; run folder {out}")

    # --- model, optimizer, schedule ---
    bb_kwargs = {"backbone": args.backbone, "patch": args.patch_size, "stride": args.patch_stride,
                 "backbone_kwargs": common.backbone_kwargs(args, args.patch_size)}  # small stem: it sees patches
    model = CPC(common.build_backbone("patch_grid", **bb_kwargs), args.context_dim, args.context_layers,
                args.pred_steps)
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
            with torch.no_grad():  # the grid of independently augmented patches, on the device
                patches = cpc_augment(x, data.img_size, args.patch_size, args.patch_stride, args.crop_min_scale)
            loss, acc = train_step(train_model, patches, optimizer, scheduler, scaler, autocast, world, rank)
            sums["loss"] += loss
            sums["acc"] += acc
            log.step(epoch, step, steps_per_epoch, x.shape[0] * world, loss=loss, acc=acc,
                     lr=scheduler.get_last_lr()[0])

        # --- end of epoch: kNN monitor, metrics, checkpoint ---
        metrics = {"epoch": epoch + 1, "loss": sums["loss"] / steps_per_epoch,
                   "prediction_acc": sums["acc"] / steps_per_epoch, "lr": scheduler.get_last_lr()[0],
                   "img_per_s": steps_per_epoch * args.batch_size / (time.time() - t_epoch)}
        if rank == 0 and common.knn_epoch(epoch, args):
            knn_top1 = metrics["knn_top1"] = common.knn_monitor(model.encoder, data, device, args.knn_k,
                                                                args.knn_temperature, autocast, args.workers)
        log.epoch(**metrics)
        common.save_training_checkpoint(
            os.path.join(out, "last.pt"), rank, world, method=METHOD, args=vars(args), epoch=epoch + 1,
            step=(epoch + 1) * steps_per_epoch, backbone={"name": "patch_grid", "kwargs": bb_kwargs},
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
