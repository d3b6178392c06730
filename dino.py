"""DINO: Emerging Properties in Self-Supervised Vision Transformers (Caron et al. 2021).
Paper: https://arxiv.org/abs/2104.14294 -- reference code: https://github.com/facebookresearch/dino

Self-distillation without labels: a student network (encoder + DINO head) is trained to match, with a cross-entropy
over K outputs, a teacher network of the same architecture whose weights are an exponential moving average (EMA) of
the student's. The teacher sees only two large "global" crops of an image, the student those and several small
"local" crops (multi-crop), so the student learns to predict from a part what the teacher sees in the whole.
Centering (subtract a running mean of the teacher's outputs) and sharpening (a low teacher temperature) keep the
teacher's output from collapsing to one dimension or to the uniform distribution. The teacher's encoder is kept.
Optimiser, weight decay, crop scales and teacher temperature follow the backbone: the paper's recipe for the ViT,
the reference README's convnet line for ResNet and AlexNet (RECIPES). docs/dino.md has the details.

    python dino.py --data shapes --shapes-n 1000 500 --width 4 --epochs 6 --batch-size 64 --local-crops 2 \\
        --out-dim 256 --head-hidden 256 --bottleneck 64 --optimizer adamw --lr 2e-2 --weight-decay 0.04 \\
        --weight-decay-end 0.4 --global-scale 0.4 1 --local-scale 0.05 0.4 --momentum-teacher 0.9 \\
        --teacher-temp 0.04 --device cpu                                 # offline, under a minute on a CPU
    python dino.py --data cifar10 --width 8 --epochs 2 --batch-size 256 --local-crops 2 --momentum-teacher 0.99 \\
        --device cpu                    # CIFAR-10 on a CPU, the ResNet's default recipe (SGD): docs/dino.md, Results
    python dino.py --data cifar10 --backbone vit_tiny --epochs 300 --batch-size 256     # one GPU, ViT-Tiny/4
    torchrun --nproc_per_node=4 dino.py --data imagenette --backbone vit_tiny --epochs 100     # 4 GPUs
"""
import argparse
import copy
import math
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import common
from common import (color_jitter, gaussian_blur, normalize, random_flip, random_grayscale, random_resized_crop,
                    to_float, warmup_cosine)

METHOD = "dino"
# Defaults that follow the backbone: the paper's ViT recipe, and the reference README's line for convnets (ResNet-50:
# --optimizer sgd --lr 0.03 --weight_decay 1e-4 --weight_decay_end 1e-4 --global_crops_scale 0.14 1
# --local_crops_scale 0.05 0.14, with main_dino.py's teacher temperature 0.04 and no temperature warm-up).
RECIPES = {"vit": dict(optimizer="adamw", weight_decay=0.04, weight_decay_end=0.4, global_scale=[0.4, 1.0],
                       local_scale=[0.05, 0.4], teacher_temp=0.07),
           "convnet": dict(optimizer="sgd", weight_decay=1e-4, weight_decay_end=1e-4, global_scale=[0.14, 1.0],
                           local_scale=[0.05, 0.14], teacher_temp=0.04)}
BASE_LR = {"adamw": 5e-4, "sgd": 0.03, "lars": 0.03}  # --lr default of each --optimizer, per 256 images


def get_args(argv=None):
    p = argparse.ArgumentParser(description="DINO pre-training with a weighted-kNN monitor",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--epochs", type=int, default=100, help="training epochs")
    p.add_argument("--batch-size", type=int, default=256, help="global batch size (split over torchrun ranks)")
    p.add_argument("--optimizer", default=None, choices=list(BASE_LR),
                   help="optimizer (default: adamw for the ViT, sgd for ResNet and AlexNet)")
    p.add_argument("--lr", type=float, default=None,
                   help=f"base learning rate per 256 images, scaled by batch-size/256 (default: by --optimizer, "
                        f"{BASE_LR})")
    p.add_argument("--warmup-epochs", type=float, default=None,
                   help="linear lr warm-up epochs, then cosine decay (default: 10, at most 10%% of --epochs)")
    p.add_argument("--weight-decay", type=float, default=None,
                   help="weight decay at the start, not on biases/norms (default: ViT 0.04, ResNet/AlexNet 1e-4)")
    p.add_argument("--weight-decay-end", type=float, default=None,
                   help="weight decay at the end, cosine schedule (default: ViT 0.4, ResNet/AlexNet 1e-4)")
    p.add_argument("--clip-grad", type=float, default=3.0, help="clip each parameter's gradient norm (0 = off)")
    p.add_argument("--freeze-last-layer", type=int, default=1, help="epochs without updates of the head's last layer")
    p.add_argument("--momentum-teacher", type=float, default=0.996,
                   help="teacher EMA momentum at the start; cosine schedule to 1 at the end")
    p.add_argument("--out-dim", type=int, default=4096, help="K, the head's outputs (paper: 65536 on ImageNet)")
    p.add_argument("--head-hidden", type=int, default=2048, help="hidden size of the head's 3-layer MLP")
    p.add_argument("--bottleneck", type=int, default=256, help="size of the head's L2-normalised bottleneck")
    p.add_argument("--head-bn", default="auto", choices=["auto", "on", "off"],
                   help="BatchNorm after the head's two hidden layers. auto: on for ResNet and AlexNet backbones, "
                        "off for the ViT")
    p.add_argument("--student-temp", type=float, default=0.1, help="student temperature")
    p.add_argument("--teacher-temp", type=float, default=None,
                   help="teacher temperature after the warm-up (default: ViT 0.07, ResNet/AlexNet 0.04)")
    p.add_argument("--warmup-teacher-temp", type=float, default=0.04, help="teacher temperature at epoch 1")
    p.add_argument("--warmup-teacher-temp-epochs", type=int, default=None,
                   help="epochs of the linear teacher-temperature warm-up (default: ViT 30, at most 30%% of "
                        "--epochs; ResNet/AlexNet 0)")
    p.add_argument("--center-momentum", type=float, default=0.9,
                   help="momentum of the center of the teacher's outputs (1 = no centering)")
    p.add_argument("--local-crops", type=int, default=8,
                   help="small crops per image, besides the 2 global crops")
    p.add_argument("--local-size", type=int, default=None,
                   help="side of the local crops in px (default: 96/224 of the image side, rounded to a multiple of "
                        "8 px: 16 px at 32 px, 96 px at 224 px)")
    p.add_argument("--global-scale", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="area fraction range of the global crops (default: ViT 0.4 1, ResNet/AlexNet 0.14 1)")
    p.add_argument("--local-scale", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="area fraction range of the local crops (default: ViT 0.05 0.4, ResNet/AlexNet 0.05 0.14)")
    common.add_knn_args(p)
    common.add_common_args(p, backbone="resnet18")
    return p, p.parse_args(argv)


def resolve_defaults(args, img_size):
    """Defaults that depend on the data, the backbone or the run length, written into args (so the checkpoint keeps
    them). The optimiser, weight decay, crop scales and teacher temperature follow the backbone (RECIPES), each
    unless given; the lr follows the optimiser. Returns a line that says which recipe and what was given."""
    vit = args.backbone.startswith("vit")
    recipe = RECIPES["vit" if vit else "convnet"]
    given = [k for k in recipe if getattr(args, k) is not None] + ["lr"] * (args.lr is not None)
    for k, v in recipe.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.lr is None:
        args.lr = BASE_LR[args.optimizer]
    if args.local_size is None:  # 96/224 of the image side (the paper's 96 px on 224 px), a multiple of 8 px
        args.local_size = max(8, round(img_size * 96 / 224 / 8) * 8)
    if args.warmup_epochs is None:
        args.warmup_epochs = common.default_warmup_epochs(args.epochs)
    if args.warmup_teacher_temp_epochs is None:  # ViT: the paper's 30 epochs, at most 30% of the run; convnets: none
        args.warmup_teacher_temp_epochs = min(30, round(0.3 * args.epochs)) if vit else 0
    if args.head_bn == "auto":
        args.head_bn = "off" if vit else "on"
    return (f"{'the paper' if vit else 'the reference README'}'s {'ViT' if vit else 'convnet'} recipe: "
            f"{args.optimizer} lr {args.lr:g}, weight decay {args.weight_decay:g} -> {args.weight_decay_end:g}, "
            f"global crops {args.global_scale[0]:g}-{args.global_scale[1]:g}, local crops {args.local_scale[0]:g}-"
            f"{args.local_scale[1]:g}" + (f" (given: {', '.join('--' + k.replace('_', '-') for k in given)})"
                                         if given else ""))


def upgrade_checkpoint_args(args, saved):
    """--resume from a checkpoint written before --optimizer existed: it was trained with AdamW."""
    if "optimizer" not in saved:
        args.optimizer = "adamw"


def check_args(args):
    if args.epochs < 1 or args.batch_size < 2:
        common.fail(f"--epochs must be >= 1 and --batch-size >= 2 (got {args.epochs}, {args.batch_size})")
    if min(args.student_temp, 1 if args.teacher_temp is None else args.teacher_temp, args.warmup_teacher_temp) <= 0:
        common.fail("--student-temp, --teacher-temp and --warmup-teacher-temp must be > 0")
    if not (0 <= args.momentum_teacher <= 1 and 0 <= args.center_momentum <= 1):
        common.fail(f"--momentum-teacher and --center-momentum must be in [0, 1] (got {args.momentum_teacher}, "
                    f"{args.center_momentum})")
    if args.local_crops < 0 or (args.local_size is not None and args.local_size < 4):
        common.fail(f"--local-crops must be >= 0 and --local-size >= 4 (got {args.local_crops}, {args.local_size})")
    for name in ("global_scale", "local_scale"):
        lo, hi = getattr(args, name) or (1, 1)
        if not 0 < lo <= hi <= 1:
            common.fail(f"--{name.replace('_', '-')} must be 0 < MIN <= MAX <= 1 (got {lo} {hi})")
    if min(args.out_dim, args.head_hidden, args.bottleneck) < 1:
        common.fail("--out-dim, --head-hidden and --bottleneck must be >= 1")


# ----------------------------------------------------------------------------------------------------------------
# Augmentations (paper, appendix; reference DataAugmentationDINO): 2 global crops (224 px, area 0.4-1) and
# small local crops (96 px, area 0.05-0.4), each flipped, colour-jittered (0.4, 0.4, 0.2, 0.1; p 0.8), grayscaled
# (p 0.2) and blurred (p 1.0 first global, 0.1 second global, 0.5 local); the second global crop is solarized (p 0.2).
# Sizes scale with the data: global = the image side, local = 96/224 of it. Blur sigma (0.1-2 px at the paper's
# crop size) scales with the crop side. The blocks, solarize included, are common.py's.
# ----------------------------------------------------------------------------------------------------------------
def dino_augment(x, size, scale=(0.4, 1.0), blur_p=1.0, solarize_p=0.0, paper_size=224):
    """uint8 (N, 3, H, W) -> one normalised crop (N, 3, size, size); the defaults give the first global crop.
    paper_size: the side of this kind of crop in the paper (224 global, 96 local), which its blur sigma refers to."""
    sigma = (0.1 * size / paper_size, 2.0 * size / paper_size)
    x = random_resized_crop(to_float(x), size, scale=scale)
    x = random_flip(x)
    x = color_jitter(x, 0.4, 0.4, 0.2, 0.1, p=0.8)
    x = random_grayscale(x, p=0.2)
    x = gaussian_blur(x, kernel_size=2 * math.ceil(3 * sigma[1]) + 1, sigma=sigma, p=blur_p)
    x = common.solarize(x, p=solarize_p)
    return normalize(x)


def multi_crop(x, size, local_size, local_crops, global_scale=(0.4, 1.0), local_scale=(0.05, 0.4)):
    """uint8 (N, 3, H, W) -> (global crops (2N, 3, size, size), local crops (L*N, 3, local_size, local_size) or None).
    Rows are crop-major: crop v of image n is row v*N + n."""
    g1 = dino_augment(x, size, global_scale, blur_p=1.0)
    g2 = dino_augment(x, size, global_scale, blur_p=0.1, solarize_p=0.2)
    local = dino_augment(x.repeat(local_crops, 1, 1, 1), local_size, local_scale, blur_p=0.5,
                         paper_size=96) if local_crops else None
    return torch.cat([g1, g2]), local


# ----------------------------------------------------------------------------------------------------------------
# Model: encoder (from common.py) + DINO head, for the student and the teacher (its EMA copy).
# ----------------------------------------------------------------------------------------------------------------
class DINOHead(nn.Module):
    """3-layer MLP (GELU) to a bottleneck, L2-normalised, then a weight-normalised linear layer to K outputs whose
    norms are fixed to 1 (the reference's norm_last_layer=True: weight = v / |v| per output, only v is trained)."""
    def __init__(self, in_dim, out_dim, hidden_dim=2048, bottleneck_dim=256, use_bn=False):
        super().__init__()
        norm = (lambda: nn.BatchNorm1d(hidden_dim)) if use_bn else nn.Identity
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), norm(), nn.GELU(), nn.Linear(hidden_dim, hidden_dim),
                                 norm(), nn.GELU(), nn.Linear(hidden_dim, bottleneck_dim))
        for m in self.mlp:
            if isinstance(m, nn.Linear):  # the reference's initialisation
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        g = self.last_layer.parametrizations.weight.original0  # the norm of each output's weight vector
        g.data.fill_(1)
        g.requires_grad = False

    def forward(self, h):
        return self.last_layer(F.normalize(self.mlp(h), dim=-1))  # (N, K)


class DINO(nn.Module):
    def __init__(self, encoder, out_dim, hidden_dim, bottleneck_dim, use_bn=False):
        super().__init__()
        self.encoder = encoder
        self.head = DINOHead(encoder.feature_dim, out_dim, hidden_dim, bottleneck_dim, use_bn)

    def forward(self, *crops):
        """Batches of crops, one resolution each -> logits (sum of their N_i, K), in the same order. As the
        reference's MultiCropWrapper: the encoder runs once per resolution, the head once on everything."""
        return self.head(torch.cat([self.encoder(c) for c in crops if c is not None]))


# ----------------------------------------------------------------------------------------------------------------
# Loss, center, monitors
# ----------------------------------------------------------------------------------------------------------------
def dino_loss(student_logits, teacher_logits, center, student_temp, teacher_temp):
    """The DINO loss (paper, eq. 3 and Algorithm 1) over every pair of a teacher crop g and another student crop v:

        P_t^g = softmax((t_g - c) / tau_t)        (centered and sharpened; no gradient)
        P_s^v = softmax(s_v / tau_s)
        L = 1/(G (V-1)) sum_{g=1}^{G} sum_{v != g} 1/N sum_{n=1}^{N} - sum_{k=1}^{K} P_t^g[n, k] log P_s^v[n, k]

    student_logits: (V, N, K) for all V crops; teacher_logits: (G, N, K) for the G global crops, which are the
    student's crops 0..G-1; center: (1, K) or (K,). Returns the scalar L; gradients reach the student only."""
    G, V, N = teacher_logits.shape[0], student_logits.shape[0], student_logits.shape[1]
    p_t = F.softmax((teacher_logits - center) / teacher_temp, dim=-1).detach()  # (G, N, K)
    log_p_s = F.log_softmax(student_logits / student_temp, dim=-1)  # (V, N, K)
    ce = -torch.einsum("gnk,vnk->gv", p_t, log_p_s) / N  # (G, V): batch-mean cross-entropy of each pair
    return (ce.sum() - ce.diagonal().sum()) / (G * (V - 1))  # the mean over the pairs v != g


@torch.no_grad()
def update_center(center, teacher_logits, momentum, world=1):
    """c <- m c + (1 - m) mean_{g, n} t_g[n]: the teacher's batch mean over every crop and image (all ranks under
    torchrun). teacher_logits (G, N, K), center (1, K). Returns the new center."""
    batch_sum = teacher_logits.sum((0, 1))
    count = teacher_logits.shape[0] * teacher_logits.shape[1] * world
    if world > 1:
        dist.all_reduce(batch_sum)
    return center * momentum + (batch_sum / count) * (1 - momentum)


@torch.no_grad()
def teacher_entropy(teacher_logits, center, teacher_temp):
    """Mean entropy (nats) of the centered and sharpened teacher output P_t: log K for a uniform output (collapse
    by centering alone), 0 for a one-hot output (collapse by sharpening alone); the paper's Fig. 7 monitor."""
    log_p = F.log_softmax((teacher_logits - center) / teacher_temp, dim=-1)
    return -(log_p.exp() * log_p).sum(-1).mean().item()


def cosine_schedule(step, total_steps, start, end):
    """`start` at step 0, `end` at the last step (total_steps - 1), a half cosine in between (teacher momentum
    0.996 -> 1, weight decay 0.04 -> 0.4)."""
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * step / max(1, total_steps - 1)))


def teacher_temp_at(epoch, warmup_temp, temp, warmup_epochs):
    """Teacher temperature of an epoch (from 0): linear from warmup_temp (epoch 0) to temp (epoch warmup_epochs-1),
    then constant, as the reference's np.linspace schedule."""
    if epoch >= warmup_epochs:
        return temp
    return warmup_temp + (temp - warmup_temp) * epoch / max(1, warmup_epochs - 1)


# ================================================================================================================
# ALGO LOGIC: one DINO update
# ================================================================================================================
def train_step(student, teacher, global_crops, local_crops, optimizer, scheduler, scaler, autocast, args, now,
               world=1):
    """Global crops (2N, 3, S, S) and local crops (L*N, 3, s, s) or None -> one optimiser step, the teacher's EMA
    update and the center update. `now`: this step's teacher_temp, momentum, weight_decay, freeze_last_layer.
    Returns (loss, teacher entropy, KL(P_t || P_s) = loss - entropy)."""
    N = global_crops.shape[0] // 2
    optimizer.param_groups[0]["weight_decay"] = now["weight_decay"]  # group 0: the decayed weights
    with autocast():
        with torch.no_grad():
            t = teacher(global_crops).float().view(2, N, -1)  # (2, N, K): the teacher sees the global crops only
        s = student(global_crops, local_crops).float().view(-1, N, t.shape[-1])  # (2 + L, N, K)
    center = teacher.center
    loss = dino_loss(s, t, center, args.student_temp, now["teacher_temp"])
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    if args.clip_grad > 0:  # the reference clips each parameter's gradient on its own
        for p in student.parameters():
            if p.grad is not None:
                nn.utils.clip_grad_norm_(p, args.clip_grad)
    if now["freeze_last_layer"]:  # no update of the head's last layer in the first epoch(s)
        for name, p in student.named_parameters():
            if "last_layer" in name:
                p.grad = None
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    with torch.no_grad():  # teacher <- m teacher + (1 - m) student; then the center
        for p_t, p_s in zip(teacher.parameters(), student.parameters()):
            p_t.lerp_(p_s.detach(), 1 - now["momentum"])
        entropy = teacher_entropy(t, center, now["teacher_temp"])
        center.copy_(update_center(center, t, args.center_momentum, world))
    return loss.item(), entropy, loss.item() - entropy


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
    recipe = resolve_defaults(args, data.img_size)
    temp = (f"{args.warmup_teacher_temp} -> {args.teacher_temp} over {args.warmup_teacher_temp_epochs} epochs"
            if args.warmup_teacher_temp_epochs else f"{args.teacher_temp}")
    log.print(f"{data.name}: {len(data.train)} training images at {data.img_size}px, kNN on {len(data.memory)} "
              f"labelled / {len(data.test)} test images, {data.num_classes} classes; device {device} "
              f"({autocast.dtype or torch.float32}, {memory_format}), {world} process(es); {recipe}; crops 2 x "
              f"{data.img_size}px + {args.local_crops} x {args.local_size}px, warm-up {args.warmup_epochs:g} epochs, "
              f"teacher temperature {temp}, head BatchNorm {args.head_bn}; run folder {out}")

    # --- model, optimizer, schedule ---
    bb_kwargs = common.backbone_kwargs(args, data.img_size)
    model = DINO(common.build_backbone(args.backbone, **bb_kwargs), args.out_dim, args.head_hidden, args.bottleneck,
                 args.head_bn == "on")
    teacher = copy.deepcopy(model).requires_grad_(False)  # same initial weights; updated only by the EMA
    teacher.register_buffer("center", torch.zeros(1, args.out_dim))  # saved and moved with the teacher
    if world > 1:
        model = common.convert_sync_batchnorm(model, device)
        teacher = common.convert_sync_batchnorm(teacher, device)
    model, teacher = model.to(device, memory_format=memory_format), teacher.to(device, memory_format=memory_format)
    lr = common.scaled_lr(args.lr, args.batch_size)
    optimizer = common.make_optimizer(args.optimizer, common.param_groups(model, args.weight_decay), lr)
    total_steps, warmup_steps = args.epochs * steps_per_epoch, int(args.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, total_steps, warmup_steps))
    start_epoch = common.restore(ckpt, rank, model=model, teacher=teacher, optimizer=optimizer, scheduler=scheduler,
                                 scaler=scaler)
    train_model = common.compile_model(model, memory_format) if args.compile else model
    train_teacher = common.compile_model(teacher, memory_format) if args.compile else teacher
    if world > 1:
        train_model = nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None)

    # --- training loop ---
    knn_top1, t_start = None, time.time()
    for epoch in range(start_epoch, args.epochs):
        model.train()
        teacher.train()  # as the reference: the teacher's BatchNorm (ResNet) normalises with batch statistics
        loader.set_epoch(epoch)
        sums, t_epoch = {"loss": 0.0, "entropy": 0.0, "kl": 0.0}, time.time()
        for step, (x, _) in enumerate(loader):
            x = x.to(device, non_blocking=True)
            with torch.no_grad():  # 2 global + L local crops of every image, augmented on the device
                global_crops, local_crops = multi_crop(x, data.img_size, args.local_size, args.local_crops,
                                                       args.global_scale, args.local_scale)
                global_crops = global_crops.contiguous(memory_format=memory_format)
                local_crops = local_crops.contiguous(memory_format=memory_format) if local_crops is not None else None
            it = epoch * steps_per_epoch + step
            now = {"teacher_temp": teacher_temp_at(epoch, args.warmup_teacher_temp, args.teacher_temp,
                                                   args.warmup_teacher_temp_epochs),
                   "momentum": cosine_schedule(it, total_steps, args.momentum_teacher, 1.0),
                   "weight_decay": cosine_schedule(it, total_steps, args.weight_decay, args.weight_decay_end),
                   "freeze_last_layer": epoch < args.freeze_last_layer}
            loss, entropy, kl = train_step(train_model, train_teacher, global_crops, local_crops, optimizer, scheduler,
                                           scaler, autocast, args, now, world)
            sums["loss"] += loss
            sums["entropy"] += entropy
            sums["kl"] += kl
            log.step(epoch, step, steps_per_epoch, x.shape[0] * world, loss=loss, entropy=entropy,
                     lr=scheduler.get_last_lr()[0])

        # --- end of epoch: kNN monitor (the teacher's encoder, as the paper evaluates), metrics, checkpoint ---
        metrics = {"epoch": epoch + 1, "loss": sums["loss"] / steps_per_epoch,
                   "teacher_entropy": sums["entropy"] / steps_per_epoch, "kl": sums["kl"] / steps_per_epoch,
                   "lr": scheduler.get_last_lr()[0], "teacher_temp": now["teacher_temp"], "momentum": now["momentum"],
                   "img_per_s": steps_per_epoch * args.batch_size / (time.time() - t_epoch)}
        if rank == 0 and common.knn_epoch(epoch, args):
            knn_top1 = metrics["knn_top1"] = common.knn_monitor(teacher.encoder, data, device, args.knn_k,
                                                                args.knn_temperature, autocast, args.workers)
        log.epoch(**metrics)
        common.save_training_checkpoint(
            os.path.join(out, "last.pt"), rank, world, method=METHOD, args=vars(args), epoch=epoch + 1,
            step=(epoch + 1) * steps_per_epoch, backbone={"name": args.backbone, "kwargs": bb_kwargs},
            encoder=teacher.encoder, model=model, teacher=teacher, optimizer=optimizer, scheduler=scheduler,
            scaler=scaler, img_size=data.img_size, data=args.data, metrics=metrics)

    # --- summary ---
    wall = time.time() - t_start
    return common.finish(out, rank, world, log, {
        "method": METHOD, "data": args.data, "epochs": args.epochs, "knn_top1": knn_top1,
        "img_per_s": log.images / wall if log.images else None, "wall_time_s": wall, "device": str(device),
        "precision": str(autocast.dtype or torch.float32), "world_size": world, "seed": args.seed,
        "checkpoint": os.path.join(out, "last.pt")})


if __name__ == "__main__":
    main()
