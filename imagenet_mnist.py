"""What makes for good views: the optimal views depend on the downstream task (Tian et al. 2020), reproduced on
natural images with an MNIST digit added on top.
Paper: https://arxiv.org/abs/2005.10243 (section 3.2, Colorful-Moving-MNIST, table 1)

Every image is a background (a labelled natural image) plus an MNIST digit. Two contrastive views share only what
`--shared` says, and that decides what the representation keeps:
    digit       the same digit image, each view on its own random background  -> the encoder keys on the digit
    background  the same background image, each view with its own random digit -> it keys on the background
    both        the same background and the same digit                        -> the easier factor (background) wins
What is not shared is drawn independently for each view (as in the paper), so it is as often equal as chance says.
Each setting trains an encoder with SimCLR (its flags, model, loss and update, from simclr.py), then a weighted kNN
judges it on two tasks, digit class and background class, of a fixed, seeded set of composed images. A random-init
encoder is the reference row. Results: table.md and table.json in the run folder (`python visualize.py
imagenet-mnist-bars --run <folder>` draws them). One process (no torchrun). An experiment on SimCLR, it imports
simclr.py (a method file's flags, model and update) and common.py.
docs/imagenet_mnist.md has the details and the measured table.

    python imagenet_mnist.py --backgrounds shapes --shapes-n 2000 500 --img-size 32 --width 8 --epochs 5 \\
        --batch-size 128 --device cpu                                  # synthetic backgrounds, small CPU run
    python imagenet_mnist.py --shared all --backgrounds imagenette --img-size 72 --width 16 --epochs 20
    python imagenet_mnist.py --shared digit --backgrounds data/imagenette/imagenette2-224 --mnist-dir data/mnist
"""
import argparse
import json
import os
import time

import torch
import torch.nn.functional as F
import torchvision

import common
import simclr
from common import color_jitter, fail, gaussian_blur, normalize, random_flip, random_resized_crop, to_float

METHOD = "imagenet_mnist"
SETTINGS = ["digit", "background", "both"]  # the table's row order
ROW_NAMES = {"digit": "digit", "background": "background", "both": "digit, background", "random": "random init"}


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Tian et al. 2020: what two views share decides what is learnt",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--shared", default="all", choices=SETTINGS + ["all"],
                   help="what the two views share (all: the three settings in a row)")
    p.add_argument("--backgrounds", dest="data", default="imagenette",
                   help="background images: any dataset of common.py or a folder path (the same as --data)")
    p.add_argument("--digits", type=int, nargs="+", default=[1, 7], help="MNIST digit classes to use (0-9)")
    p.add_argument("--mnist-dir", default=None, help="torchvision MNIST root (default: <data-dir>/mnist)")
    p.add_argument("--digit-scale", type=float, default=0.5, help="digit side as a fraction of the image side")
    p.add_argument("--max-images", type=int, default=0,
                   help="use a seeded random subset of at most this many images of each background split (small CPU "
                        "budgets; 0 = all)")
    p.add_argument("--epochs", type=int, default=20, help="training epochs per setting")
    p.add_argument("--batch-size", type=int, default=256, help="batch size (pairs of views)")
    simclr.add_simclr_args(p)
    p.set_defaults(optimizer="sgd", weight_decay=1e-4, crop_min_scale=0.3)  # the crop is of the background only
    common.add_knn_args(p)  # the monitor judges both tasks
    common.add_common_args(p, backbone="resnet18")
    p.set_defaults(data="imagenette")  # --data and --backgrounds are one flag
    return p, p.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------------
# Digits: MNIST images of the chosen classes, resized once to the digit size, sorted by class.
# ----------------------------------------------------------------------------------------------------------------
def check_digits(digits):
    if len(digits) < 2 or len(set(digits)) != len(digits) or not all(0 <= d <= 9 for d in digits):
        fail(f"--digits needs at least two different classes from 0-9, got {digits}")


def load_digits(root, digits, train, size):
    """uint8 (n, 1, size, size) digit images and labels (n,) in 0..len(digits)-1 (the position in `digits`),
    sorted by label, so class c occupies one contiguous range."""
    try:
        ds = torchvision.datasets.MNIST(root, train=train, download=True)
        images, targets = ds.data, ds.targets
    except Exception as e:  # no network, missing or broken idx files
        fail(f"could not download or read MNIST in {root}: {type(e).__name__} {' '.join(str(e).split())[:200]}")
    labels = torch.full_like(targets, -1)
    for i, d in enumerate(digits):
        labels[targets == d] = i
    for i, d in enumerate(digits):
        if not (labels == i).any():
            fail(f"MNIST {'train' if train else 'test'} split in {root} has no images of digit {d}")
    keep = torch.nonzero(labels >= 0)[:, 0]
    order = keep[torch.sort(labels[keep], stable=True).indices]
    return common.resize_uint8(images[order][:, None], size), labels[order].long()


# ----------------------------------------------------------------------------------------------------------------
# Views: which background and which digit each of the two views gets, then composition and augmentation.
# ----------------------------------------------------------------------------------------------------------------
def sample_pairs(shared, bg_idx, num_backgrounds, num_digits, generator=None):
    """Indices (bg1, bg2, dg1, dg2), each (N,), of the two views of N samples whose first background is bg_idx.

    digit:      dg2 = dg1 (the same digit image),  bg2 a random background image, drawn independently of bg1
    background: bg2 = bg1 (the same background),   dg2 a random digit image, drawn independently of dg1
    both:       bg2 = bg1 and dg2 = dg1
    What is not shared is drawn as the first view's is (uniformly over the images), so the two views agree on it
    exactly as often as chance says (e.g. the same digit class with probability sum_c p_c^2): neither pulled
    together nor pushed apart, which is the paper's design."""
    N = bg_idx.shape[0]
    bg1 = bg_idx
    dg1 = torch.randint(0, num_digits, (N,), generator=generator)
    bg2 = torch.randint(0, num_backgrounds, (N,), generator=generator) if shared == "digit" else bg1
    dg2 = torch.randint(0, num_digits, (N,), generator=generator) if shared == "background" else dg1
    return bg1, bg2, dg1, dg2


def paste_digits(digits, size, corners):
    """Digits float (N, 1, d, d) placed on an empty (N, 1, size, size) canvas with their top-left pixel at
    corners (N, 2) = (x0, y0): one affine grid_sample for the batch (output pixel j reads digit pixel j - x0)."""
    N, d = digits.shape[0], digits.shape[-1]
    x0, y0 = corners[:, 0].float(), corners[:, 1].float()
    theta = torch.zeros(N, 2, 3, device=digits.device)
    theta[:, 0, 0] = theta[:, 1, 1] = size / d
    theta[:, 0, 2], theta[:, 1, 2] = (size - 2 * x0) / d - 1, (size - 2 * y0) / d - 1
    grid = F.affine_grid(theta, (N, 1, size, size), align_corners=False)
    return F.grid_sample(digits, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def compose(backgrounds, digits, generator=None):
    """Backgrounds float (N, 3, S, S) in [0, 1] plus uint8 digits (N, 1, d, d), each at a random position:
    clip(background + digit, 0, 1). Returns float (N, 3, S, S)."""
    N, S, d = backgrounds.shape[0], backgrounds.shape[-1], digits.shape[-1]
    corners = torch.randint(0, S - d + 1, (N, 2), generator=generator).to(backgrounds.device)
    return (backgrounds + paste_digits(to_float(digits), S, corners)).clamp(0, 1)


def augment_view(backgrounds, digits, size, min_scale=0.3, jitter_strength=0.5):
    """One training view: the background (uint8 (N, 3, H, W)) cropped, flipped, colour-jittered and blurred, then the
    digit (uint8 (N, 1, d, d)) added at a random position. Returns normalised float (N, 3, size, size)."""
    s = jitter_strength
    x = random_resized_crop(to_float(backgrounds), size, scale=(min_scale, 1.0))
    x = random_flip(x)
    x = color_jitter(x, 0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s, p=0.8)
    x = gaussian_blur(x, kernel_size=max(3, size // 10), sigma=(0.1, 2.0), p=0.5)
    return normalize(compose(x, digits))


# ----------------------------------------------------------------------------------------------------------------
# The experiment: the two views of one step share only `shared`; the update is simclr.train_step
# ----------------------------------------------------------------------------------------------------------------
def make_views(shared, idx, backgrounds, digit_images, size, min_scale, jitter_strength, device):
    """Two augmented views (normalised float (N, 3, size, size) each, on `device`) of the N samples whose first
    background is backgrounds[idx]: sample_pairs picks each view's background and digit, augment_view composes."""
    bg1, bg2, dg1, dg2 = sample_pairs(shared, idx, len(backgrounds), len(digit_images))
    return tuple(augment_view(backgrounds[bg].to(device, non_blocking=True), digit_images[dg].to(device), size,
                              min_scale, jitter_strength) for bg, dg in [(bg1, dg1), (bg2, dg2)])


# ----------------------------------------------------------------------------------------------------------------
# Evaluation set: fixed, seeded composed images
# ----------------------------------------------------------------------------------------------------------------
def subset(split, n, seed):
    """A seeded random subset of at most n images of a split (in their original order)."""
    if len(split) <= n:
        return split
    keep = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return common.Split(split.images[keep], split.labels[keep], split.classes)


def make_eval_split(background_split, digit_images, digit_labels, seed):
    """The fixed, seeded evaluation images: every background of the split plus a random digit at a random position.
    Returns (common.Split with the background labels, digit labels (N,)); the same seed gives the same images."""
    gen = torch.Generator().manual_seed(seed)
    N = len(background_split)
    pick = torch.randint(0, len(digit_labels), (N,), generator=gen)
    images = []
    for idx in torch.arange(N).split(1024):
        bg = to_float(background_split.images[idx])
        images.append((compose(bg, digit_images[pick[idx]], generator=gen) * 255).round().to(torch.uint8))
    split = common.Split(torch.cat(images), background_split.labels.clone(), background_split.classes)
    return split, digit_labels[pick]


# ----------------------------------------------------------------------------------------------------------------
# Evaluation: weighted kNN on the two tasks, the table
# ----------------------------------------------------------------------------------------------------------------
def two_task_errors(encoder, memory, test, device, k=200, temperature=0.1, autocast=None):
    """Weighted-kNN error (%) of digit class and background class. memory/test: (Split, digit_labels, n_digits).
    Leaves the RNG untouched (DataLoader draws a seed), so training does not depend on how often it runs."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        fm = common.extract_features(encoder, memory[0], device, autocast=autocast)
        ft = common.extract_features(encoder, test[0], device, autocast=autocast)
    errors = {}
    for task, mem_y, test_y, C in [("digit", memory[1], test[1], memory[2]),
                                   ("background", memory[0].labels, test[0].labels, len(test[0].classes))]:
        pred = common.knn_predict(fm, mem_y.to(device), ft, C, k, temperature).cpu()
        errors[f"{task}_error"] = 100.0 * (pred != test_y).float().mean().item()
    return errors


def write_table(rows, out):
    """rows: {setting: {"digit_error", "background_error", ...}} -> table.md and table.json in `out`. Returns the
    markdown table."""
    order = [s for s in SETTINGS + ["random"] if s in rows]
    md = ["| shared between views | digit error (%) | background error (%) |", "|---|---|---|"]
    md += [f"| {ROW_NAMES[s]} | {rows[s]['digit_error']:.1f} | {rows[s]['background_error']:.1f} |" for s in order]
    md = "\n".join(md) + "\n"
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(md)
    with open(os.path.join(out, "table.json"), "w") as f:
        json.dump({s: rows[s] for s in order}, f, indent=2)
    return md


def paper_pattern(rows):
    """Does each setting's shared factor have the lower error, as in the paper (only with all three settings)?"""
    if not all(s in rows for s in SETTINGS):
        return None
    d, b, both = rows["digit"], rows["background"], rows["both"]
    return {"digit_views_best_for_digits": d["digit_error"] < min(b["digit_error"], both["digit_error"]),
            "background_views_better_for_backgrounds": b["background_error"] < d["background_error"],
            "both_background_dominates": both["background_error"] < d["background_error"]
            and both["digit_error"] > d["digit_error"]}


# ----------------------------------------------------------------------------------------------------------------
# One setting, then the experiment
# ----------------------------------------------------------------------------------------------------------------
def train_setting(args, shared, data, digits, memory, test, device, autocast, scaler, out):
    """Pre-train one encoder with views that share `shared`, then return its two-task kNN errors.
    Continues from <out>/last.pt when the run is resumed."""
    ckpt_path = os.path.join(out, "last.pt")
    ckpt = common.load_checkpoint(ckpt_path) if args.resume and os.path.exists(ckpt_path) else None
    common.seed_everything(args.seed)  # every setting starts from the same initial weights
    log = common.RunLog(out, args, start_epoch=ckpt["epoch"] if ckpt else 0)
    memory_format = common.memory_format(device, args.channels_last)
    digit_images, _ = digits
    n_bg, bs = len(data.train), args.batch_size
    steps_per_epoch = n_bg // bs

    # --- model, optimizer, schedule (SimCLR's) ---
    bb_kwargs = common.backbone_kwargs(args, data.img_size)
    model = simclr.SimCLR(common.build_backbone(args.backbone, **bb_kwargs), args.proj_hidden, args.proj_dim)
    model = model.to(device, memory_format=memory_format)
    lr = common.scaled_lr(args.lr, bs, simclr.BASE_LR, args.optimizer)
    optimizer = common.make_optimizer(args.optimizer, common.param_groups(model, args.weight_decay), lr)
    total_steps, warmup_steps = args.epochs * steps_per_epoch, int(args.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: common.warmup_cosine(step, total_steps, warmup_steps))
    start_epoch = common.restore(ckpt, 0, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
    train_model = common.compile_model(model, memory_format) if args.compile else model
    log.print(f"[{shared}] views share: {ROW_NAMES[shared]}; {steps_per_epoch} steps per epoch, jitter "
              f"{args.jitter_strength}, warm-up {args.warmup_epochs:g} epochs"
              + (f"; resumed from {ckpt_path} at epoch {start_epoch}" if ckpt else ""))

    # --- training loop ---
    errors, t_start = {}, time.time()
    for epoch in range(start_epoch, args.epochs):
        model.train()
        order = torch.randperm(n_bg, generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
        sums, t_epoch = {"loss": 0.0, "acc": 0.0}, time.time()
        for step in range(steps_per_epoch):
            with torch.no_grad():  # the two views, composed and augmented on the device
                v1, v2 = (v.contiguous(memory_format=memory_format) for v in make_views(
                    shared, order[step * bs:(step + 1) * bs], data.train.images, digit_images, data.img_size,
                    args.crop_min_scale, args.jitter_strength, device))
            loss, acc = simclr.train_step(train_model, v1, v2, optimizer, scheduler, scaler, autocast,
                                          args.temperature)
            sums["loss"] += loss
            sums["acc"] += acc
            log.step(epoch, step, steps_per_epoch, bs, loss=loss, acc=acc, lr=scheduler.get_last_lr()[0])

        # --- end of epoch: two-task kNN monitor, metrics, checkpoint ---
        metrics = {"epoch": epoch + 1, "loss": sums["loss"] / steps_per_epoch,
                   "contrastive_acc": sums["acc"] / steps_per_epoch, "lr": scheduler.get_last_lr()[0],
                   "img_per_s": steps_per_epoch * bs / (time.time() - t_epoch)}
        if common.knn_epoch(epoch, args):
            errors = two_task_errors(model.encoder, memory, test, device, args.knn_k, args.knn_temperature, autocast)
            metrics.update(errors)
        log.epoch(**metrics)
        common.save_training_checkpoint(
            ckpt_path, 0, 1, method=METHOD, setting=shared, args=vars(args), epoch=epoch + 1,
            step=(epoch + 1) * steps_per_epoch, backbone={"name": args.backbone, "kwargs": bb_kwargs},
            encoder=model.encoder, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
            img_size=data.img_size, data=args.data, metrics=metrics, errors=errors)
    if not errors:  # resumed from a finished setting: judge the loaded encoder
        errors = ckpt.get("errors") or two_task_errors(model.encoder, memory, test, device, args.knn_k,
                                                       args.knn_temperature, autocast)
    return {**errors, "epochs": args.epochs, "train_wall_time_s": time.time() - t_start, "checkpoint": ckpt_path}


def main(argv=None):
    parser, args = get_args(argv)
    args, _ = common.resume_checkpoint(parser, argv, args, METHOD)  # the checkpoint's flags, except those given
    simclr.check_args(args)
    check_digits(args.digits)
    if not 0 < args.digit_scale <= 1:
        fail(f"--digit-scale must be in (0, 1], got {args.digit_scale}")
    if "RANK" in os.environ:
        fail("imagenet_mnist.py runs in one process; start it with python, not torchrun")

    # --- seeding, device ---
    device = common.get_device(args.device)
    common.seed_everything(args.seed)
    autocast, scaler = common.setup_amp(args.amp, device)
    # a resumed run continues in the folder holding the setting folders: <out>/<setting>/last.pt
    out = (os.path.dirname(os.path.dirname(os.path.abspath(args.resume))) if args.resume
           else common.run_folder(args, METHOD))
    os.makedirs(out, exist_ok=True)

    # --- data: backgrounds, digits, the fixed evaluation images ---
    data = common.dataset_from_args(args)
    if args.max_images < 0:
        fail(f"--max-images must be >= 0, got {args.max_images}")
    if args.max_images:
        data.train = data.memory = subset(data.train, args.max_images, args.seed)
        data.test = subset(data.test, args.max_images, args.seed + 1)
    if len(data.train) < 2 or (data.memory.labels < 0).any() or (data.test.labels < 0).any():
        fail(f"--backgrounds {args.data} needs labelled memory and test splits and at least 2 training images")
    if args.batch_size > len(data.train):
        fail(f"batch size {args.batch_size} is larger than the dataset ({len(data.train)} background images)")
    simclr.resolve_defaults(args, data.img_size)  # SimCLR's size-dependent jitter strength, capped warm-up
    d = max(4, round(args.digit_scale * data.img_size))
    mnist_dir = args.mnist_dir or os.path.join(args.data_dir, "mnist")
    digits_train = load_digits(mnist_dir, args.digits, True, d)
    digits_test = load_digits(mnist_dir, args.digits, False, d)
    K = len(args.digits)
    memory = (*make_eval_split(data.memory, *digits_train, seed=args.seed), K)
    test = (*make_eval_split(data.test, *digits_test, seed=args.seed + 1), K)
    print(f"backgrounds {data.name}: {len(data.train)} training images at {data.img_size}px, {data.num_classes} "
          f"classes; digits {args.digits} at {d}px: {len(digits_train[1])} train / {len(digits_test[1])} test; "
          f"kNN on {len(memory[1])} memory / {len(test[1])} test images; device {device}; run folder {out}",
          flush=True)

    # --- the settings, then the random-init reference ---
    t0 = time.time()
    rows = {}
    for shared in (SETTINGS if args.shared == "all" else [args.shared]):
        rows[shared] = train_setting(args, shared, data, digits_train, memory, test, device, autocast, scaler,
                                     os.path.join(out, shared))
    common.seed_everything(args.seed)  # the same initial weights as every trained encoder
    encoder = common.build_backbone(args.backbone, **common.backbone_kwargs(args, data.img_size)).to(device)
    rows["random"] = two_task_errors(encoder, memory, test, device, args.knn_k, args.knn_temperature, autocast)

    # --- summary: table.md, table.json, summary.json ---
    md = write_table(rows, out)
    pattern = paper_pattern(rows)
    summary = {"method": METHOD, "backgrounds": args.data, "digits": args.digits, "img_size": data.img_size,
               "epochs": args.epochs, "rows": rows, "paper_pattern": pattern, "wall_time_s": time.time() - t0,
               "device": str(device), "seed": args.seed}
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(md + (f"paper's pattern: {pattern}\n" if pattern else "") + f"results in {out}\nfigure: python visualize.py "
          f"imagenet-mnist-bars --run {out} --out {os.path.join(out, 'bars.png')}", flush=True)
    return summary


if __name__ == "__main__":
    main()
