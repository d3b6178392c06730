"""Speed of SimCLR's training step: the input pipeline and the model, in images/s and in achieved GFLOP/s.

Measures, in one run on the chosen device, precision (--amp) and memory format (--channels-last):
  1. the machine's matmul peak in the run's dtype (a 2048 x 2048 matmul, GFLOP/s),
  2. the model's FLOPs per training image (forward + backward of both views, torch.utils.flop_counter),
  3. batched on-device augmentation (this project's way): augmentation and model step timed separately; the model
     step's GFLOP/s and its fraction of the matmul peak,
  4. the usual pipeline: per-image PIL transforms of torchvision in DataLoader worker processes.

    python bench_pipeline.py --data shapes --width 16 --device cpu                 # offline, ~1 min
    python bench_pipeline.py --data cifar10 --width 32 --amp bf16 --device cpu     # bf16 autocast on a CPU
    python bench_pipeline.py --data cifar10 --width 64 --device cuda --pipelines batched
"""
import argparse
import json
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import common
import simclr


def get_args(argv=None):
    p = argparse.ArgumentParser(description="images/s and GFLOP/s of SimCLR's training step",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--batch-size", type=int, default=256, help="images per step (each gives two views)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per pipeline (after one warm-up step)")
    p.add_argument("--pipelines", default="batched,pil", help="comma-separated: batched, pil")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (its compilation is untimed)")
    simclr.add_simclr_args(p)
    common.add_common_args(p, backbone="resnet18", training=False)
    return p.parse_args(argv)


def matmul_peak(device, dtype, n=2048, reps=10):
    """GFLOP/s of an n x n matmul in `dtype`: the reference peak of the model's GFLOP/s."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e9


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_flops(model, views, autocast):
    """FLOPs of one forward + backward pass on `views` (counted once, on the real shapes)."""
    with FlopCounterMode(display=False) as counter:
        with autocast():
            model(views).float().sum().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def main(argv=None):
    args = get_args(argv)
    device = common.get_device(args.device)
    common.seed_everything(args.seed)
    autocast, scaler = common.setup_amp(args.amp, device)
    memory_format = common.memory_format(device, args.channels_last)
    data = common.dataset_from_args(args)
    size, bs = data.img_size, args.batch_size
    s = args.jitter_strength if args.jitter_strength is not None else (0.5 if size < 96 else 1.0)
    model = simclr.SimCLR(common.build_backbone(args.backbone, **common.backbone_kwargs(args, size)),
                          args.proj_hidden, args.proj_dim).to(device, memory_format=memory_format)
    lr = common.scaled_lr(args.lr, bs, simclr.BASE_LR, args.optimizer)
    optimizer = common.make_optimizer(args.optimizer, common.param_groups(model, args.weight_decay), lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    dtype = autocast.dtype or torch.float32
    print(f"{data.name} {size}px, {args.backbone} width {args.width}, batch {bs}, device {device}, {dtype}, "
          f"{memory_format}, {torch.get_num_threads()} threads{', compiled' if args.compile else ''}")

    train_model = common.compile_model(model, memory_format) if args.compile else model

    def train_step(v1, v2):
        simclr.train_step(train_model, v1, v2, optimizer, scheduler, scaler, autocast, args.temperature)
        sync(device)

    peak = matmul_peak(device, dtype)
    x0 = data.train[list(range(min(bs, len(data.train))))][0].to(device)
    views = torch.cat([simclr.simclr_augment(x0, size, s, args.crop_min_scale)] * 2)
    views = views.contiguous(memory_format=memory_format)
    flops_per_image = step_flops(model, views, autocast) / x0.shape[0]  # both views of one image
    result = {"matmul_peak_gflops": peak, "gflop_per_image": flops_per_image / 1e9, "dtype": str(dtype),
              "memory_format": str(memory_format)}
    print(f"matmul peak ({dtype}, 2048^2): {peak:.0f} GFLOP/s | model: {flops_per_image / 1e9:.3f} GFLOP per "
          f"training image (forward + backward, two views)")

    pipelines = args.pipelines.split(",")
    if "batched" in pipelines:
        loader = common.make_loader(data.train, bs, shuffle=True, drop_last=True, workers=args.workers)
        t_aug = t_model = 0.0
        n = 0
        for i, (x, _) in enumerate(loader):
            if i > args.steps:
                break
            sync(device)
            t0 = time.perf_counter()
            x = x.to(device, non_blocking=True)
            with torch.no_grad():
                v1, v2 = (simclr.simclr_augment(x, size, s, args.crop_min_scale)
                          .contiguous(memory_format=memory_format) for _ in range(2))
            sync(device)
            t1 = time.perf_counter()
            train_step(v1, v2)
            t2 = time.perf_counter()
            if i > 0:  # the first step warms up (and compiles with --compile)
                t_aug, t_model, n = t_aug + t1 - t0, t_model + t2 - t1, n + x.shape[0]
        gflops = flops_per_image * n / t_model / 1e9
        result.update(batched_img_s=n / (t_aug + t_model), model_img_s=n / t_model, aug_fraction=t_aug / (t_aug + t_model),
                      model_gflops=gflops, fraction_of_peak=gflops / peak)
        print(f"batched on-device augmentation: {n / (t_aug + t_model):.0f} img/s | augmentation "
              f"{t_aug / n * 1e3:.2f} ms/img ({100 * t_aug / (t_aug + t_model):.1f}% of a step) | model step "
              f"{n / t_model:.0f} img/s = {gflops:.0f} GFLOP/s = {100 * gflops / peak:.0f}% of the matmul peak")

    if "pil" in pipelines:
        from torchvision.transforms import v2
        tf = v2.Compose([v2.RandomResizedCrop(size, scale=(args.crop_min_scale, 1.0), antialias=True),
                         v2.RandomHorizontalFlip(),
                         v2.RandomApply([v2.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=0.8),
                         v2.RandomGrayscale(p=0.2), v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                         v2.Normalize(common.MEAN.tolist(), common.STD.tolist())])
        pil = torch.utils.data.DataLoader(PILPairs(data.train, tf), batch_size=bs, shuffle=True, drop_last=True,
                                          num_workers=args.workers, persistent_workers=args.workers > 0)
        t_wait = t_model = 0.0
        n = 0
        t0 = time.perf_counter()
        for i, (v1, v2_) in enumerate(pil):
            if i > args.steps:
                break
            v1, v2_ = (v.to(device).contiguous(memory_format=memory_format) for v in (v1, v2_))
            t1 = time.perf_counter()
            train_step(v1, v2_)
            t2 = time.perf_counter()
            if i > 0:
                t_wait, t_model, n = t_wait + t1 - t0, t_model + t2 - t1, n + v1.shape[0]
            t0 = time.perf_counter()
        result.update(pil_img_s=n / (t_wait + t_model), pil_wait_fraction=t_wait / (t_wait + t_model))
        print(f"per-image PIL + DataLoader ({args.workers} workers): {n / (t_wait + t_model):.0f} img/s | waiting "
              f"for data {t_wait / n * 1e3:.2f} ms/img ({100 * t_wait / (t_wait + t_model):.1f}% of a step)")
    print("result " + json.dumps(result))
    return result


class PILPairs(torch.utils.data.Dataset):
    """Two torchvision-transformed views of each image, made from a PIL image in a DataLoader worker."""
    def __init__(self, split, tf):
        self.split, self.tf = split, tf

    def __len__(self):
        return len(self.split)

    def __getitem__(self, i):
        from PIL import Image
        im = Image.fromarray(self.split.images[i].permute(1, 2, 0).numpy())
        return self.tf(im), self.tf(im)


if __name__ == "__main__":
    main()
