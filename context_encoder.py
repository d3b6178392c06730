"""Context Encoders: Feature Learning by Inpainting (Pathak, Kraehenbuehl, Donahue, Darrell, Efros 2016).
Paper: https://arxiv.org/abs/1604.07379 -- reference code: https://github.com/pathak22/context-encoder (Torch);
the CIFAR-10 demo of Berkeley's CS294-158: https://github.com/wilson1yan/cs294-158-ssl
(deepul_helper/tasks/context_encoder.py)

Part of every image is hidden: filled with the mean pixel (the central square, random blocks or random blob-shaped
regions), or the whole image gets Gaussian noise (the denoising autoencoder the paper compares with). An encoder f
reads the corrupted image, a decoder g paints what is missing, and an L2 loss on the hidden pixels (eq. 1) compares
it with the original (optionally plus an adversarial loss, eq. 2-3). To fill a hole the encoder has to recognise
what surrounds it. The encoder f is kept: its code is the representation; the decoder is thrown away.
docs/context_encoder.md has the details.

    python context_encoder.py --data shapes --shapes-n 2000 500 --width 8 --epochs 8 --batch-size 32 \\
        --device cpu                                           # offline quick start (the test's run), ~20 s, 1 core
    python context_encoder.py --data cifar10 --width 16 --epochs 5 --device cpu   # CIFAR-10 on a CPU, ~15 min
    python context_encoder.py --data cifar10 --img-size 128 --epochs 200     # GPU: the demo's recipe (128 px)
    python context_encoder.py --data imagenette --mask region --adv          # random regions, L2 + adversarial
    python visualize.py inpaint --ckpt runs/<run>/last.pt                    # corrupted, reconstruction, original
"""
import argparse
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from common import STD, normalize, to_float, warmup_cosine

METHOD = "context_encoder"
MASKS = ["center", "block", "region", "noise"]
BACKBONES = ["conv_stack", "alexnet", "resnet18", "resnet34", "resnet50"]  # those with a map for the decoder
BASE_LR = {"sgd": 0.1, "adam": 2e-3}  # the demo's SGD; the reference's Adam (2e-4, x10 for the generator)
REGION_CELLS = 8  # random regions: the reference's pattern has ~8 noise cells across a 128-px crop (res 0.06)
DECODER_START = 4  # the decoder starts from a 4x4 map and doubles it with each up-convolution


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Context-encoder pre-training (inpainting) with a weighted-kNN monitor",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--epochs", type=int, default=200, help="training epochs (the demo's 200)")
    p.add_argument("--batch-size", type=int, default=128, help="global batch size (split over torchrun ranks)")
    p.add_argument("--optimizer", default="sgd", choices=list(BASE_LR),
                   help="sgd: Nesterov momentum (the demo's); adam: betas (0.5, 0.999) (the reference's)")
    p.add_argument("--lr", type=float, default=None, help=f"learning rate (default: {BASE_LR})")
    p.add_argument("--schedule", default="cosine", choices=["cosine", "constant"],
                   help="cosine: per-step cosine decay to 0 (the demo's, per epoch); constant: the reference's")
    p.add_argument("--momentum", type=float, default=0.9, help="sgd: momentum")
    p.add_argument("--weight-decay", type=float, default=None,
                   help="weight decay on every parameter (default: 5e-4 with sgd, the demo's; 0 with adam)")
    p.add_argument("--mask", default="center", choices=MASKS,
                   help="center: the central square of a quarter of the image (the demo's); block: --blocks random "
                        "squares; region: random blob-shaped regions; noise: Gaussian noise on the whole image")
    p.add_argument("--overlap", type=int, default=None,
                   help="center: the decoder also paints a band this wide around the hole, visible in the input "
                        "(default: image size / 32, the demo's 4 px at 128 px)")
    p.add_argument("--overlap-weight", type=float, default=10.0, help="center: L2 weight of that band (paper: 10)")
    p.add_argument("--hole-area", type=float, default=0.25,
                   help="block, region: hidden fraction of the image (paper: up to a quarter)")
    p.add_argument("--blocks", type=int, default=4, help="block: squares per image, each of --hole-area / --blocks")
    p.add_argument("--noise-std", type=float, default=0.2, help="noise: standard deviation, in pixel units [0, 1]")
    p.add_argument("--code-dim", type=int, default=None,
                   help="conv_stack: size of the code (default: the demo's 4000 x width/64)")
    p.add_argument("--adv", action="store_true",
                   help="add the adversarial loss (eq. 3) with a discriminator on the painted pixels")
    p.add_argument("--adv-weight", type=float, default=0.001,
                   help="--adv: lambda_adv of eq. 3 (lambda_rec = 1 - lambda_adv; paper: 0.001, 0.999)")
    p.add_argument("--d-lr", type=float, default=2e-4, help="--adv: the discriminator's Adam learning rate")
    common.add_knn_args(p)
    common.add_common_args(p, backbone="conv_stack", sobel=False)  # an AlexNet here sees RGB (--sobel: edges)
    return p, p.parse_args(argv)


def resolve_defaults(args, img_size):
    """Defaults that depend on the optimizer or the image size, written into args (so the checkpoint keeps them)."""
    if args.lr is None:
        args.lr = BASE_LR[args.optimizer]
    if args.weight_decay is None:
        args.weight_decay = 5e-4 if args.optimizer == "sgd" else 0.0
    if args.overlap is None:
        args.overlap = img_size // 32


def check_args(args):
    if args.epochs < 1 or args.batch_size < 2:
        common.fail(f"--epochs must be >= 1 and --batch-size >= 2 (got {args.epochs}, {args.batch_size})")
    if (args.lr is not None and args.lr <= 0) or (args.weight_decay is not None and args.weight_decay < 0):
        common.fail(f"--lr must be > 0 and --weight-decay >= 0 (got {args.lr}, {args.weight_decay})")
    if args.backbone not in BACKBONES:
        common.fail(f"--backbone {args.backbone}: context_encoder.py takes {', '.join(BACKBONES)}")
    if not 0 < args.hole_area < 1 or args.blocks < 1 or args.noise_std <= 0 or args.overlap_weight <= 0:
        common.fail(f"--hole-area must be in (0, 1), --blocks >= 1, --noise-std > 0 and --overlap-weight > 0 (got "
                    f"{args.hole_area}, {args.blocks}, {args.noise_std}, {args.overlap_weight})")
    if (args.overlap is not None and args.overlap < 0) or (args.code_dim is not None and args.code_dim < 1):
        common.fail(f"--overlap must be >= 0 and --code-dim >= 1 (got {args.overlap}, {args.code_dim})")
    if not 0 < args.adv_weight < 1 or args.d_lr <= 0:
        common.fail(f"--adv-weight must be in (0, 1) and --d-lr > 0 (got {args.adv_weight}, {args.d_lr})")


def check_sizes(img_size, overlap):
    """The decoder doubles a 4x4 map up to the centre (img_size / 2) or the image: a power of two >= 16 px."""
    if img_size < 16 or img_size & (img_size - 1):
        common.fail(f"context_encoder.py needs an image size that is a power of two, at least 16 px (got {img_size}; "
                    f"use --img-size 32, 64 or 128)")
    if img_size // 2 - 2 * overlap < 1:
        common.fail(f"--overlap {overlap} leaves no hidden pixels in the {img_size // 2}-px centre")


# ----------------------------------------------------------------------------------------------------------------
# Corruptions (paper, section 3.3), on normalised images (N, 3, S, S), each image with its own random parameters.
# Hidden pixels get the mean pixel: ImageNet's mean (common.MEAN), which is 0 after normalisation.
# Each returns the corrupted batch and `hidden` (N, 1, S, S) bool: the pixels the loss is on.
# ----------------------------------------------------------------------------------------------------------------
def fill_mean(x, hidden):
    """x with the hidden pixels set to the mean pixel (0 in normalised units)."""
    return x.masked_fill(hidden, 0.0)


def corrupt_center(x, overlap):
    """The central square of half the side (a quarter of the area, the demo's 64 x 64 of 128 x 128), less a band of
    `overlap` px on each side that stays visible (the decoder paints the whole square, the band included). The same
    square in every image (the paper's fixed central region)."""
    N, _, S, _ = x.shape
    hidden = torch.zeros(N, 1, S, S, dtype=torch.bool, device=x.device)
    a, b = S // 4 + overlap, S // 4 + S // 2 - overlap
    hidden[..., a:b, a:b] = True
    return fill_mean(x, hidden), hidden


def corrupt_blocks(x, blocks, area, generator=None):
    """`blocks` squares per image, each of `area / blocks` of the image, at uniform random positions of their own
    (they may overlap): at most `area` of the image in all (the paper's random blocks, up to a quarter)."""
    N, _, S, _ = x.shape
    side = max(1, round(S * math.sqrt(area / blocks)))
    corner = torch.randint(0, S - side + 1, (2, N, blocks, 1), device=x.device, generator=generator)  # rows, cols
    r = torch.arange(S, device=x.device)
    inside = (r >= corner) & (r < corner + side)  # (2, N, blocks, S)
    hidden = (inside[0, :, :, :, None] & inside[1, :, :, None, :]).any(1, keepdim=True)  # (N, 1, S, S)
    return fill_mean(x, hidden), hidden


def corrupt_region(x, area, generator=None):
    """Random blob-shaped regions: per image, uniform noise on a REGION_CELLS x REGION_CELLS grid, upsampled
    bicubically to S x S, and its `area` lowest pixels hidden (exactly round(area * S^2) pixels). The reference
    thresholds one such smoothed pattern (at 25%) in place of the paper's PASCAL VOC object masks, which need a
    download."""
    N, _, S, _ = x.shape
    noise = torch.rand(N, 1, REGION_CELLS, REGION_CELLS, device=x.device, generator=generator)
    smooth = F.interpolate(noise, size=(S, S), mode="bicubic", align_corners=False).flatten(1)  # (N, S*S)
    k = max(1, round(area * S * S))
    threshold = smooth.kthvalue(k, dim=1, keepdim=True).values  # (N, 1): this image's k-th lowest value
    hidden = (smooth <= threshold).view(N, 1, S, S)
    return fill_mean(x, hidden), hidden


def corrupt_noise(x, std, generator=None):
    """The denoising autoencoder: Gaussian noise of `std` (in pixel units, [0, 1]) on every pixel; the loss is on
    the whole image."""
    N, C, S, _ = x.shape
    eps = torch.randn(x.shape, device=x.device, generator=generator)
    hidden = torch.ones(N, 1, S, S, dtype=torch.bool, device=x.device)
    return x + std * eps / STD.to(x.device).view(1, C, 1, 1), hidden


def corrupt(x, args, generator=None):
    """The --mask corruption of normalised images x (N, 3, S, S) -> (corrupted x, hidden (N, 1, S, S) bool)."""
    if args.mask == "center":
        return corrupt_center(x, args.overlap)
    if args.mask == "block":
        return corrupt_blocks(x, args.blocks, args.hole_area, generator)
    if args.mask == "region":
        return corrupt_region(x, args.hole_area, generator)
    return corrupt_noise(x, args.noise_std, generator)


def centre(t):
    """The central square of half the side: (..., S, S) -> (..., S/2, S/2)."""
    S = t.shape[-1]
    return t[..., S // 4:S // 4 + S // 2, S // 4:S // 4 + S // 2]


def targets(x, hidden, args):
    """What the decoder must paint and the L2 weight of each pixel: (target (N, 3, T, T), weight (N, 1, T, T)).
    center: the central square (T = S/2), weight 1 on the hidden pixels and --overlap-weight on the visible band
    around them (the reference's overlapPred); the other masks: the whole image (T = S), weight 1 on the hidden
    pixels (noise: every pixel), 0 elsewhere."""
    if args.mask == "center":
        h = centre(hidden)
        return centre(x), torch.where(h, 1.0, args.overlap_weight).to(x.dtype)
    return x, hidden.to(x.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Model: encoder f (from common.py), the channel-wise fully connected layer, the up-convolution decoder g, and
# the discriminator of the adversarial loss.
# ----------------------------------------------------------------------------------------------------------------
class ChannelwiseFC(nn.Module):
    """The paper's bottleneck (section 3.1): m maps of n x n, each fully connected to an n_out x n_out map of its own
    (m n^2 n_out^2 weights, no weights across channels), then a stride-1 1x1 convolution that mixes the channels.
    (N, m, n, n) -> (N, out_channels, n_out, n_out)."""
    def __init__(self, channels, n, n_out, out_channels):
        super().__init__()
        self.n_out = n_out
        bound = 1 / n  # nn.Linear's default initialisation for n^2 inputs
        self.weight = nn.Parameter(torch.empty(channels, n * n, n_out * n_out).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(channels, n_out * n_out).uniform_(-bound, bound))
        self.mix = nn.Conv2d(channels, out_channels, 1)

    def forward(self, x):
        y = torch.einsum("bci,cio->bco", x.flatten(2), self.weight) + self.bias  # (N, m, n_out^2)
        return self.mix(y.view(x.shape[0], x.shape[1], self.n_out, self.n_out))


def encoder_map(encoder, x):
    """The encoder's last map, which the decoder reads: conv_stack: its code as a 1x1 map (N, D, 1, 1); ResNet:
    layer4's map (its average is the representation); AlexNet (built without fc layers): pool5."""
    if isinstance(encoder, common.ConvStack):
        return encoder(x)[:, :, None, None]
    if isinstance(encoder, common.ResNet):
        x = encoder.maxpool(encoder.relu(encoder.bn1(encoder.conv1(x))))
        return encoder.layer4(encoder.layer3(encoder.layer2(encoder.layer1(x))))
    h = encoder(x)  # AlexNet(head=False): pool5 flattened
    c = encoder.convs[-1][0].out_channels
    n = math.isqrt(h.shape[1] // c)
    return h.view(x.shape[0], c, n, n)


def up(c_in, c_out, stride=2):
    """A decoder step: BatchNorm and ReLU, then a 4x4 up-convolution (stride 2 doubles the side; stride 1 without
    padding turns a 1x1 map into 4x4), as the demo's decoder."""
    return nn.Sequential(nn.BatchNorm2d(c_in), nn.ReLU(inplace=True),
                         nn.ConvTranspose2d(c_in, c_out, 4, stride, 1 if stride == 2 else 0))


class ContextEncoder(nn.Module):
    """g(f(x~)): encoder f, a bottleneck to a (8 x width)-channel 4x4 map, up-convolutions that halve the channels and
    double the side up to out_size (the centre S/2 for `center`, else the image), then tanh as the reference (whose
    images are in [-1, 1]), read as pixels in [0, 1] and normalised like the input.

    The bottleneck: conv_stack's code is already a fully connected layer over the last map (the reference and the
    demo), so a 4x4 up-convolution reads it (1x1 -> 4x4); AlexNet's pool5 and ResNet's layer4 map go through the
    paper's channel-wise fully connected layer to 4x4."""
    def __init__(self, encoder, img_size, out_size, width, channels=3):
        super().__init__()
        self.encoder = encoder
        d = max(1, round(512 * width / 64))  # the demo's 512 channels at 4x4
        with torch.no_grad():
            was = encoder.training
            m = encoder_map(encoder.eval(), torch.zeros(1, channels, img_size, img_size))  # (1, C, n, n)
            encoder.train(was)
        if m.shape[-1] == 1:
            self.bottleneck = up(m.shape[1], d, stride=1)
        else:
            self.bottleneck = ChannelwiseFC(m.shape[1], m.shape[-1], DECODER_START, d)
        steps = int(math.log2(out_size // DECODER_START))
        chans = [max(1, d >> i) for i in range(steps)] + [channels]
        self.decoder = nn.Sequential(*[up(chans[i], chans[i + 1]) for i in range(steps)])

    def forward(self, x):
        out = self.decoder(self.bottleneck(encoder_map(self.encoder, x)))  # (N, 3, T, T)
        return normalize((torch.tanh(out) + 1) / 2)


def build_model(args, img_size):
    """The encoder (common.build_backbone; an AlexNet without fc layers) and the context encoder around it.
    Returns (model, the encoder's backbone kwargs)."""
    kwargs = common.backbone_kwargs(args, img_size)
    if args.backbone == "alexnet":
        kwargs["head"] = False
    model = ContextEncoder(common.build_backbone(args.backbone, **kwargs), img_size,
                           img_size // 2 if args.mask == "center" else img_size, args.width)
    return model, kwargs


def build_discriminator(args, img_size):
    """The adversarial loss's discriminator on the painted pixels (the centre or the whole image): the encoder's
    stack of 4x4 stride-2 convs (common.ConvStack, as the reference's netD) ending in one logit."""
    return common.ConvStack(args.width, img_size // 2 if args.mask == "center" else img_size, code_dim=1)


# ----------------------------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------------------------
def reconstruction_loss(pred, target, weight):
    """The paper's reconstruction loss (eq. 1), with M^ the binary mask of the hidden pixels:

        L_rec(x) = || M^ (.) (x - F((1 - M^) (.) x)) ||_2^2

    as a mean: the squared error of every channel of every loss pixel, weighted by w (M^ with the overlap band at 10
    for `center`, as the reference code), divided by the number of loss values:

        L_rec = sum_{n,c,i,j} w_nij (x_ncij - F(x~)_ncij)^2 / (C #{(n, i, j): w_nij > 0})

    pred, target: (N, C, T, T); weight: (N, 1, T, T), 0 outside the loss region. Returns the scalar."""
    se = (pred - target).pow(2) * weight  # (N, C, T, T)
    return se.sum() / ((weight > 0).sum() * pred.shape[1]).clamp_min(1)


def discriminator_loss(real_logits, fake_logits):
    """The discriminator's side of the adversarial loss (eq. 2), D = sigmoid(logit):

        max_D  E_x [ log D(x) + log(1 - D(F((1 - M^) (.) x))) ]

    as the binary cross-entropy to minimise: real painted regions labelled 1, the decoder's labelled 0. (N,) each."""
    return (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
            + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))


def generator_adv_loss(fake_logits):
    """The context encoder's side of eq. 2: -log D(F(x~)), the decoder's output labelled real (the reference code's
    and DCGAN's non-saturating form of min_F log(1 - D(F(x~))))."""
    return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))


def joint_loss(rec, adv, adv_weight):
    """Eq. 3: L = lambda_rec L_rec + lambda_adv L_adv, lambda_rec = 1 - lambda_adv (paper: 0.999 and 0.001)."""
    return (1 - adv_weight) * rec + adv_weight * adv


# ----------------------------------------------------------------------------------------------------------------
# Monitor: the reconstruction loss on held-out images (the same corruptions for every run and epoch)
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def inpaint(model, x, args, generator=None):
    """Normalised images (N, 3, S, S) -> (corrupted input, the output pasted into its hidden pixels, the raw output,
    target, weight). eval or train mode as the model is."""
    xt, hidden = corrupt(x, args, generator)
    pred = model(xt).float()
    target, weight = targets(x, hidden, args)
    full = xt.clone()
    if args.mask == "center":
        centre(full).copy_(pred)
    else:
        full = pred
    return xt, torch.where(hidden, full, xt), pred, target, weight


@torch.no_grad()
def heldout_loss(model, split, args, device, autocast, n=512, batch_size=256):
    """L_rec on the first n images of a split (eval mode, corruptions drawn from seed 0), and the L_rec of the
    corrupted input itself (holes: the mean pixel; noise: the noisy image), what a network that learned nothing
    about the context would score. Returns (loss, the input's loss)."""
    was = model.training
    model.eval()
    gen = torch.Generator(device=device).manual_seed(0)
    tot, base, count = 0.0, 0.0, 0
    for x, _ in common.make_loader(common.Split(split.images[:n], split.labels[:n], split.classes), batch_size, False):
        x = normalize(to_float(x.to(device)))
        with autocast():
            xt, _, pred, target, weight = inpaint(model, x, args, gen)
        tot += reconstruction_loss(pred, target, weight).item() * len(x)
        base += reconstruction_loss(centre(xt) if args.mask == "center" else xt, target, weight).item() * len(x)
        count += len(x)
    model.train(was)
    return tot / count, base / count


# ================================================================================================================
# ALGO LOGIC: one context-encoder update
# ================================================================================================================
def train_step(model, x, args, optimizer, scheduler, scaler, autocast, disc=None, d_optimizer=None):
    """Normalised images x (N, 3, S, S) -> one optimiser step of the encoder and decoder (and, with --adv, one of the
    discriminator before it). Returns {loss, rec_loss[, adv_loss, d_loss]}.

    Each image is corrupted with its own random parameters (corrupt), the model paints the target (the centre, or
    the image), L_rec (eq. 1) compares it with the original on the loss pixels. With --adv (eq. 2-3), as the
    reference: the discriminator first takes a step on the real target vs. the painting (detached), then the
    model one on lambda_rec L_rec + lambda_adv L_adv. Under torchrun, DistributedDataParallel averages the
    gradients of the ranks' equal shards."""
    with torch.no_grad():
        xt, hidden = corrupt(x, args)
        target, weight = targets(x, hidden, args)
    with autocast():
        pred = model(xt).float()  # (N, 3, T, T); the loss is computed in fp32
    rec = reconstruction_loss(pred, target, weight)
    out = {"rec_loss": rec.item()}
    loss = rec
    if disc is not None:
        with autocast():
            real, fake = disc(target).float().squeeze(1), disc(pred.detach()).float().squeeze(1)  # (N,) logits
        d_loss = discriminator_loss(real, fake)
        d_optimizer.zero_grad(set_to_none=True)
        scaler.scale(d_loss).backward()
        scaler.step(d_optimizer)
        with autocast():  # the updated discriminator judges the painting (its own gradients are not used)
            adv = generator_adv_loss(getattr(disc, "module", disc)(pred).float().squeeze(1))
        loss = joint_loss(rec, adv, args.adv_weight)
        out.update(adv_loss=adv.item(), d_loss=d_loss.item())
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    return {"loss": loss.item(), **out}


# ================================================================================================================
def main(argv=None):
    parser, args = get_args(argv)
    args, ckpt = common.resume_checkpoint(parser, argv, args, METHOD)
    check_args(args)
    if ckpt is not None and args.adv and ckpt.get("disc") is None:
        common.fail(f"--adv: {args.resume} was trained without the adversarial loss (no discriminator to resume)")
    device, rank, world = common.setup_run(args)
    autocast, scaler = common.setup_amp(args.amp, device)
    memory_format = common.memory_format(device, args.channels_last)
    out = common.run_folder(args, METHOD)
    log = common.RunLog(out, args, enabled=rank == 0, start_epoch=ckpt["epoch"] if ckpt else 0)

    # --- data ---
    data = common.dataset_from_args(args, log=log.print)
    resolve_defaults(args, data.img_size)
    check_sizes(data.img_size, args.overlap)
    loader = common.make_loader(data.train, args.batch_size // world, shuffle=True, drop_last=True,
                                workers=args.workers, seed=args.seed, rank=rank, world=world)
    steps_per_epoch = len(loader)
    log.print(f"{data.name}: {len(data.train)} training images at {data.img_size}px, kNN on {len(data.memory)} "
              f"labelled / {len(data.test)} test images, {data.num_classes} classes; device {device} "
              f"({autocast.dtype or torch.float32}, {memory_format}), {world} process(es); mask {args.mask}, "
              f"{args.backbone}, {args.optimizer} lr {args.lr}{', adversarial loss' if args.adv else ''}; "
              f"run folder {out}")

    # --- model, optimizers, schedule ---
    model, bb_kwargs = build_model(args, data.img_size)
    disc = build_discriminator(args, data.img_size) if args.adv else None
    if world > 1:
        model = common.convert_sync_batchnorm(model, device)
        disc = common.convert_sync_batchnorm(disc, device) if disc is not None else None
    model = model.to(device, memory_format=memory_format)
    params = [p for p in model.parameters() if p.requires_grad]
    if args.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
                                    nesterov=True)
    else:
        optimizer = torch.optim.Adam(params, lr=args.lr, betas=(0.5, 0.999), weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(
        s, args.epochs * steps_per_epoch, 0) if args.schedule == "cosine" else 1.0)
    d_optimizer = None
    if disc is not None:
        disc = disc.to(device, memory_format=memory_format)
        d_optimizer = torch.optim.Adam(disc.parameters(), lr=args.d_lr, betas=(0.5, 0.999))
    start_epoch = common.restore(ckpt, rank, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                                 disc=disc, d_optimizer=d_optimizer)
    train_model = common.compile_model(model, memory_format) if args.compile else model
    train_disc = disc
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        train_model = nn.parallel.DistributedDataParallel(train_model, device_ids=ids)
        if disc is not None:
            train_disc = nn.parallel.DistributedDataParallel(disc, device_ids=ids)

    # --- training loop ---
    knn_top1, test_loss, input_loss, t_start = None, None, None, time.time()
    for epoch in range(start_epoch, args.epochs):
        model.train()
        if disc is not None:
            disc.train()
        loader.set_epoch(epoch)
        sums, t_epoch = {}, time.time()
        for step, (x, _) in enumerate(loader):
            x = normalize(to_float(x.to(device, non_blocking=True))).contiguous(memory_format=memory_format)
            losses = train_step(train_model, x, args, optimizer, scheduler, scaler, autocast, train_disc, d_optimizer)
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v
            log.step(epoch, step, steps_per_epoch, x.shape[0] * world, **losses, lr=scheduler.get_last_lr()[0])

        # --- end of epoch: kNN monitor, held-out inpainting loss, metrics, checkpoint ---
        metrics = {"epoch": epoch + 1, **{k: v / steps_per_epoch for k, v in sums.items()},
                   "lr": scheduler.get_last_lr()[0],
                   "img_per_s": steps_per_epoch * args.batch_size / (time.time() - t_epoch)}
        if rank == 0 and common.knn_epoch(epoch, args):
            knn_top1 = metrics["knn_top1"] = common.knn_monitor(model.encoder, data, device, args.knn_k,
                                                                args.knn_temperature, autocast, args.workers)
            test_loss, input_loss = heldout_loss(model, data.test, args, device, autocast)
            metrics.update(test_rec_loss=test_loss, test_rec_loss_input=input_loss)
        log.epoch(**metrics)
        common.save_training_checkpoint(
            os.path.join(out, "last.pt"), rank, world, method=METHOD, args=vars(args), epoch=epoch + 1,
            step=(epoch + 1) * steps_per_epoch, backbone={"name": args.backbone, "kwargs": bb_kwargs},
            encoder=model.encoder, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
            disc=disc, d_optimizer=d_optimizer, img_size=data.img_size, data=args.data, metrics=metrics)

    # --- summary ---
    wall = time.time() - t_start
    log.print(f"figure: python visualize.py inpaint --ckpt {os.path.join(out, 'last.pt')} "
              f"--out {os.path.join(out, 'inpaint.png')}")
    return common.finish(out, rank, world, log, {
        "method": METHOD, "data": args.data, "epochs": args.epochs, "mask": args.mask, "knn_top1": knn_top1,
        "test_rec_loss": test_loss, "test_rec_loss_input": input_loss,
        "img_per_s": log.images / wall if log.images else None, "wall_time_s": wall, "device": str(device),
        "precision": str(autocast.dtype or torch.float32), "world_size": world, "seed": args.seed,
        "checkpoint": os.path.join(out, "last.pt")})


if __name__ == "__main__":
    main()
