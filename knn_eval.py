"""Judge a learned representation: the standard evaluation protocols, on any checkpoint of this project.

  1. weighted kNN   -- InstDisc (Wu et al. 2018, https://arxiv.org/abs/1805.01978), the MoCo / SimCLR monitor
  2. 1-NN           -- the same with k = 1: the label of the most cosine-similar training image
  3. linear probe   -- logistic regression on frozen, standardised features, L2 strength chosen on held-out
                       training images (the linear evaluation protocol of e.g. SimCLR, https://arxiv.org/abs/2002.05709)
  4. few-shot probe -- the same with 10, 20, 50, 100, 200, 500 labelled images per class
  5. layer probes   -- AlexNet and NIN: linear probes on the pooled conv1 ... conv5 maps (NIN: block1 ... block4) and
                       an MLP on the frozen conv features (DeepCluster, Caron et al. 2018,
                       https://arxiv.org/abs/1807.05520, table 2 / sec. 5; RotNet, Gidaris et al. 2018, table 1)
  6. supervised     -- the same backbone trained from scratch on the labels only (what pre-training buys)

Features are extracted once per (encoder, split), in eval mode (BatchNorm statistics frozen), without augmentation,
and every protocol reuses them. --features head reads a moco.py checkpoint's query network with its projection head
(the features of the reference MoCo CIFAR-10 demo's kNN monitor) instead of the backbone. Each protocol is one function (eval_knn, eval_linear, eval_fewshot, eval_layers,
eval_supervised) that returns rows of the result: one markdown table, also written as JSON.

    python knn_eval.py --random-init --data shapes --shapes-n 2000 500 --width 8 --device cpu   # offline, ~20 s CPU
    python knn_eval.py --ckpt runs/simclr-cifar10/last.pt                        # the data it was trained on
    python knn_eval.py --random-init --backbone resnet18 --width 16 --data cifar10    # untrained baseline
    python knn_eval.py --pixels --data cifar10                                       # raw-pixel baseline
    python knn_eval.py --ckpt runs/simclr-imagenette/last.pt --data cifar10          # transfer (resized to 128 px)
    python knn_eval.py --supervised --labels-per-class 100 --data cifar10 --width 16 # supervised from scratch
"""
import argparse
import json
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from common import extract_features, fail, normalize, to_float

SHOTS = [10, 20, 50, 100, 200, 500]
PROTOCOLS = ["knn", "1nn", "linear", "fewshot", "layers"]


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Evaluate an encoder: weighted kNN, 1-NN, linear and few-shot probes, "
                                "AlexNet/NIN layer probes, supervised baseline. A flag that would not act in this run "
                                "(e.g. --k without the knn protocol) is an error.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--ckpt", help="checkpoint of any script of this project (its encoder is evaluated)")
    what.add_argument("--random-init", action="store_true", help="baseline: a randomly initialised --backbone")
    what.add_argument("--pixels", action="store_true", help="baseline: the normalised raw pixels as features")
    what.add_argument("--supervised", action="store_true",
                      help="baseline: train --backbone from scratch on --labels-per-class labels, then evaluate it")
    p.add_argument("--protocols", default=",".join(PROTOCOLS),
                   help=f"comma-separated subset of {','.join(PROTOCOLS)} (layers: AlexNet and NIN only)")
    p.add_argument("--features", default="backbone", choices=["backbone", "head"],
                   help="--ckpt of moco.py: the backbone's h (as every script's monitor) or the query network's "
                        "projection-head output (the reference CIFAR-10 demo's kNN monitor); head: not with layers")
    p.add_argument("--k", type=int, default=200, help="weighted kNN: neighbours")
    p.add_argument("--temperature", type=float, default=0.1, help="weighted kNN: vote weight exp(s / temperature)")
    p.add_argument("--shots", default=",".join(map(str, SHOTS)), help="few-shot probe: labelled images per class")
    p.add_argument("--l2-grid", default="1e-6,1e-5,1e-4,1e-3,1e-2,1e-1",
                   help="linear, few-shot and layer probes: L2 strengths tried on the held-out part of the training "
                   "split")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="linear, few-shot and layer probes: fraction of each class held out to choose the L2 strength")
    p.add_argument("--probe-steps", type=int, default=100,
                   help="linear, few-shot and layer probes: L-BFGS iterations (full batch)")
    p.add_argument("--layer-dim", type=int, default=1024,
                   help="layer probes: each conv map is average-pooled to a grid of about this many features")
    p.add_argument("--mlp-epochs", type=int, default=30, help="MLP probe on frozen AlexNet/NIN conv features: epochs")
    p.add_argument("--mlp-hidden", type=int, default=512, help="MLP probe: hidden units of its two hidden layers")
    p.add_argument("--labels-per-class", type=int, default=None,
                   help="--supervised: labelled images per class (default: all), the few-shot subset of that size")
    p.add_argument("--sup-steps", type=int, default=2000, help="--supervised: SGD steps")
    p.add_argument("--sup-batch-size", type=int, default=256, help="--supervised: batch size")
    p.add_argument("--sup-lr", type=float, default=0.1, help="--supervised: SGD learning rate (cosine decay)")
    p.add_argument("--batch-size", type=int, default=512, help="feature extraction batch size")
    common.add_common_args(p, backbone="resnet18", training=False)
    p.set_defaults(data=None)  # --ckpt: the checkpoint's data; otherwise shapes
    return p, p.parse_args(argv)


def check_args(args):
    """Parse --protocols, --shots and --l2-grid into lists (in place) and check every value, before anything loads."""
    args.protocols = [p for p in args.protocols.split(",") if p]
    if not args.protocols or set(args.protocols) - set(PROTOCOLS):
        fail(f"--protocols: got {sorted(set(args.protocols) - set(PROTOCOLS)) or 'none'}; expected some of "
             f"{','.join(PROTOCOLS)}")
    try:
        args.shots, args.l2_grid = ([int(s) for s in args.shots.split(",") if s],
                                    [float(s) for s in args.l2_grid.split(",") if s])
    except ValueError:
        fail(f"--shots and --l2-grid must be comma-separated numbers (got '{args.shots}', '{args.l2_grid}')")
    for bad, need in [(args.k < 1, "--k >= 1"), (args.temperature <= 0, "--temperature > 0"),
                      (not args.shots or min(args.shots) < 1, "--shots >= 1"),
                      (not args.l2_grid or min(args.l2_grid) < 0, "a non-empty --l2-grid of values >= 0"),
                      (not 0 < args.val_fraction < 1, "0 < --val-fraction < 1"),
                      (args.probe_steps < 1, "--probe-steps >= 1"), (args.layer_dim < 1, "--layer-dim >= 1"),
                      (args.mlp_epochs < 1, "--mlp-epochs >= 1"), (args.mlp_hidden < 1, "--mlp-hidden >= 1"),
                      (args.labels_per_class is not None and args.labels_per_class < 1, "--labels-per-class >= 1"),
                      (args.sup_steps < 1, "--sup-steps >= 1"), (args.sup_batch_size < 1, "--sup-batch-size >= 1"),
                      (args.sup_lr <= 0, "--sup-lr > 0"), (args.batch_size < 1, "--batch-size >= 1"),
                      (args.log_every < 1, "--log-every >= 1")]:
        if bad:
            fail(f"need {need}")


def check_flags_act(args, given, backbone):
    """Every flag written on the command line must act in this run; stop with an error naming the flag otherwise
    (e.g. --k without the knn protocol, --width with --ckpt, whose encoder the checkpoint describes)."""
    layered = backbone in LAYERS and args.features == "backbone"
    runs = set(args.protocols) if layered else set(args.protocols) - {"layers"}
    if "protocols" in given and "layers" in args.protocols and not layered:
        fail(f"--protocols layers: the per-layer probes need an AlexNet or NIN encoder, this one is "
             f"{backbone if args.features == 'backbone' else 'a projection head (--features head)'}")
    probes = (bool(runs & {"linear", "fewshot", "layers"}), "the linear, fewshot or layers protocol")
    builds = args.random_init or args.supervised
    acts = {  # flag: (does it act in this run?, where it acts)
        "k": ("knn" in runs, "the knn protocol"), "temperature": ("knn" in runs, "the knn protocol"),
        "shots": ("fewshot" in runs, "the fewshot protocol"),
        "l2_grid": probes, "val_fraction": probes, "probe_steps": probes,
        **dict.fromkeys(["layer_dim", "mlp_epochs", "mlp_hidden"],
                        ("layers" in runs, "the layers protocol (AlexNet, NIN)")),
        **dict.fromkeys(["labels_per_class", "sup_steps", "sup_batch_size", "sup_lr"],
                        (args.supervised, "--supervised")),
        **dict.fromkeys(["backbone", "width"],
                        (builds, "--random-init or --supervised (a checkpoint names its own encoder)")),
        "sobel": (builds and args.backbone == "alexnet", "an AlexNet of --random-init or --supervised"),
        **dict.fromkeys(["amp", "channels_last"], (not args.pixels, "an encoder (not --pixels)")),
        "shapes_n": (args.data == "shapes", "--data shapes"),
        "imagenette_size": (args.data == "imagenette", "--data imagenette"),
        "data_dir": (args.data != "shapes", "data that is downloaded or read from a folder (not shapes)"),
        "features": (bool(args.ckpt), "--ckpt (head: of moco.py)"),
    }
    for dest, (acts_here, where) in acts.items():
        if dest in given and not acts_here:
            flag = "--sobel/--no-sobel" if dest == "sobel" else f"--{dest.replace('_', '-')}"
            fail(f"{flag} does nothing in this run: it acts only with {where}")


# ----------------------------------------------------------------------------------------------------------------
# 1-2. Weighted kNN and 1-NN, from one pass of common.knn_neighbours (the training scripts' kNN monitor)
# ----------------------------------------------------------------------------------------------------------------
def topk_accuracy(scores, labels, ks=(1, 5)):
    """Top-k accuracy (%) of class scores (N, C) for each k; None where k >= C (it would be 100 by definition)."""
    top = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices  # (N, kmax)
    hit = top == labels[:, None]
    return [hit[:, :k].any(1).float().mean().item() * 100 if k < scores.shape[1] or k == 1 else None for k in ks]


def eval_knn(train, train_y, test, test_y, num_classes, args):
    """Protocols 1 and 2 from one similarity pass: the weighted kNN (--k, --temperature) and the 1-NN, which is the
    same vote with k = 1. train, test: features (N, D); *_y: labels (N,). Returns the result rows."""
    k = args.k if "knn" in args.protocols else 1
    sim, idx = common.knn_neighbours(train, test, k)  # (Nq, k), most similar first
    rows = []
    if "knn" in args.protocols:
        top1, top5 = topk_accuracy(common.knn_votes(sim, idx, train_y, num_classes, k, args.temperature), test_y)
        rows.append({"protocol": "weighted kNN", "setting": f"k={min(k, len(train_y))}, τ={args.temperature}, cosine",
                     "top1": top1, "top5": top5})
    if "1nn" in args.protocols:  # one vote exp(s / 1) > 0 (with τ = 1 it cannot underflow to a tie at zero)
        top1 = topk_accuracy(common.knn_votes(sim, idx, train_y, num_classes, 1, 1.0), test_y, (1,))[0]
        rows.append({"protocol": "1-NN", "setting": "cosine", "top1": top1, "top5": None})
    return rows


# ----------------------------------------------------------------------------------------------------------------
# 3-4. Linear probe (logistic regression on standardised, cached features) and few-shot subsets
# ----------------------------------------------------------------------------------------------------------------
def fit_logreg(x, y, num_classes, l2, steps=100):
    """Multinomial logistic regression, full batch, L-BFGS from zero weights (convex, so deterministic):

        min_{W, b}  1/N sum_i CE(W x_i + b, y_i) + l2/2 ||W||^2

    x: (N, D) standardised features, y: (N,) labels. Returns the nn.Linear(D, C)."""
    lin = nn.Linear(x.shape[1], num_classes).to(x.device)
    nn.init.zeros_(lin.weight)
    nn.init.zeros_(lin.bias)
    opt = torch.optim.LBFGS(lin.parameters(), lr=1, max_iter=steps, history_size=10, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(lin(x), y) + l2 / 2 * lin.weight.pow(2).sum()
        loss.backward()
        return loss
    with torch.enable_grad():
        opt.step(closure)
    return lin.requires_grad_(False)


def per_class_indices(labels, n_per_class, seed=0, num_classes=None):
    """Exactly n_per_class indices of each class, drawn with a fixed seed (the same seed gives the same subset).
    Returns sorted indices, or None if a class has fewer images."""
    gen = torch.Generator().manual_seed(seed)  # on the CPU: the same subset on every device
    labels = labels.cpu()
    out = []
    for c in range(num_classes or int(labels.max()) + 1):
        of_c = (labels == c).nonzero()[:, 0]
        if len(of_c) < n_per_class:
            return None
        out.append(of_c[torch.randperm(len(of_c), generator=gen)[:n_per_class]])
    return torch.cat(out).sort().values


def heldout_split(labels, fraction, seed=0):
    """(train, val) indices: a seeded `fraction` of each class (at least one image if it has two) is held out."""
    gen = torch.Generator().manual_seed(seed + 1)
    labels = labels.cpu()
    tr, va = [], []
    for c in labels.unique():
        of_c = (labels == c).nonzero()[:, 0]
        of_c = of_c[torch.randperm(len(of_c), generator=gen)]
        n_val = max(1, round(fraction * len(of_c))) if len(of_c) > 1 else 0
        va.append(of_c[:n_val])
        tr.append(of_c[n_val:])
    return torch.cat(tr).sort().values, torch.cat(va).sort().values


def linear_probe(train_x, train_y, test_x, test_y, num_classes, l2_grid, val_fraction=0.1, steps=100, seed=0,
                 mean=None, std=None):
    """Standardise (with `mean`/`std`, default: the training features'), choose the L2 strength with the best
    accuracy on a held-out part of the training set, refit on the whole training set, score the test set.
    Returns (top1, top5, chosen l2)."""
    mean = train_x.mean(0) if mean is None else mean
    std = train_x.std(0) if std is None else std
    tx, qx = (train_x - mean) / (std + 1e-6), (test_x - mean) / (std + 1e-6)
    best = l2_grid[0]
    if len(l2_grid) > 1:
        tr, va = heldout_split(train_y, val_fraction, seed)
        tr, va = tr.to(tx.device), va.to(tx.device)
        acc = {}
        for l2 in l2_grid:
            lin = fit_logreg(tx[tr], train_y[tr], num_classes, l2, steps)
            acc[l2] = (lin(tx[va]).argmax(1) == train_y[va]).float().mean().item()
        best = max(l2_grid, key=lambda l2: (acc[l2], l2))  # ties: the stronger regularisation
    lin = fit_logreg(tx, train_y, num_classes, best, steps)
    top1, top5 = topk_accuracy(lin(qx), test_y)
    return top1, top5, best


def eval_linear(train, train_y, test, test_y, num_classes, args):
    """Protocol 3: the linear probe on every labelled training image. Returns the result rows."""
    top1, top5, l2 = linear_probe(train, train_y, test, test_y, num_classes, args.l2_grid, args.val_fraction,
                                  args.probe_steps, args.seed)
    return [{"protocol": "linear probe", "setting": f"all {len(train_y)} labels, L2 {l2:g} (chosen on "
             f"{args.val_fraction:.0%} held out)", "top1": top1, "top5": top5, "l2": l2}]


def eval_fewshot(train, train_y, test, test_y, num_classes, args):
    """Protocol 4: the linear probe on --shots labelled images per class (seeded subsets; a size that a class cannot
    fill is skipped), standardised with the statistics of every training image (they need no labels)."""
    mean, std = train.mean(0), train.std(0)
    rows = []
    for n in args.shots:
        sub = per_class_indices(train_y, n, args.seed, num_classes)
        if sub is None:
            print(f"few-shot {n} labels/class skipped: a class has fewer labelled images", flush=True)
            continue
        sub = sub.to(train.device)
        top1, top5, l2 = linear_probe(train[sub], train_y[sub], test, test_y, num_classes, args.l2_grid,
                                      args.val_fraction, args.probe_steps, args.seed, mean, std)
        rows.append({"protocol": "few-shot linear probe", "setting": f"{n} labels/class, L2 {l2:g}",
                     "top1": top1, "top5": top5, "labels_per_class": n, "l2": l2})
    return rows


# ----------------------------------------------------------------------------------------------------------------
# 5. AlexNet and NIN per-layer features and the MLP probe
# ----------------------------------------------------------------------------------------------------------------
class AlexNetLayers(nn.Module):
    """Frozen AlexNet -> concatenated features: each of conv1 ... conv5 (ReLU output) average-pooled to a p x p grid
    with C p^2 ~ layer_dim, then the input of the fc layers (pool5 + avgpool, flattened) for the MLP probe.
    `.sizes` lists the six feature sizes (to split the concatenation), `.names` the probed layers and the MLP's input."""
    names = ["conv1", "conv2", "conv3", "conv4", "conv5", "frozen conv1-5"]

    def __init__(self, alexnet, img_size, layer_dim=1024):
        super().__init__()
        self.net, self.layer_dim = alexnet, layer_dim
        probe = torch.zeros(1, 3, img_size, img_size, device=next(alexnet.parameters()).device)  # the encoder's device
        with torch.no_grad():
            was = alexnet.training
            self.sizes = [f.shape[1] for f in self.forward_list(probe, alexnet.eval())]
            alexnet.train(was)
        self.feature_dim = sum(self.sizes)

    def maps(self, x, net):
        """(the layer maps (N, C_l, H_l, W_l), the MLP probe's input (N, D))."""
        maps = net.conv_features(x)  # five (N, C_l, H_l, W_l)
        return maps, net.avgpool(net.pools[4](maps[4])).flatten(1)  # what fc6 sees

    def forward_list(self, x, net=None):
        maps, mlp_input = self.maps(x, net or self.net)
        out = []
        for m in maps:
            p = max(1, min(m.shape[-1], round(math.sqrt(self.layer_dim / m.shape[1]))))
            out.append(F.adaptive_avg_pool2d(m, p).flatten(1))  # (N, C_l p^2)
        return out + [mlp_input]

    def forward(self, x):
        return torch.cat(self.forward_list(x), 1)


class NINLayers(AlexNetLayers):
    """Frozen NIN (common.NIN) -> the same for its blocks: block1 ... block4 (each block's output after its pool)
    average-pooled to ~layer_dim features each, then block 2's whole map, flattened (192 x 8 x 8 on 32 px), for the
    MLP probe: the RotNet paper's non-linear classifier on the second block (its CIFAR-10 tables)."""
    names = ["block1", "block2", "block3", "block4", "frozen block1-2"]

    def maps(self, x, net):
        maps = net.block_features(x)  # four (N, C_b, H_b, W_b)
        return maps, maps[1].flatten(1)


LAYERS = {"alexnet": AlexNetLayers, "nin": NINLayers}  # the backbones with per-layer probes


def fit_mlp_probe(x, y, test_x, test_y, num_classes, hidden=512, epochs=30, seed=0, batch_size=256):
    """An MLP (dropout-linear-ReLU x2, linear, as AlexNet's classifier) trained with Adam on frozen, standardised
    features. Returns (top1, top5) on the test features."""
    torch.manual_seed(seed)
    mean, std = x.mean(0), x.std(0) + 1e-6
    x, test_x = (x - mean) / std, (test_x - mean) / std
    mlp = nn.Sequential(nn.Dropout(0.5), nn.Linear(x.shape[1], hidden), nn.ReLU(), nn.Dropout(0.5),
                        nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)).to(x.device)
    opt = torch.optim.Adam(mlp.parameters(), lr=1e-3, weight_decay=1e-4)
    steps = epochs * math.ceil(len(x) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    with torch.enable_grad():
        for _ in range(epochs):
            for b in torch.randperm(len(x), device=x.device).split(batch_size):
                loss = F.cross_entropy(mlp(x[b]), y[b])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
    mlp.eval()
    with torch.no_grad():
        return topk_accuracy(torch.cat([mlp(t) for t in test_x.split(4096)]), test_y)


def eval_layers(encoder, feats, train_y, test_y, num_classes, img_size, args):
    """Protocol 5 (AlexNet, NIN): a linear probe on each of conv1 ... conv5 (NIN: block1 ... block4), then the MLP
    probe on the frozen conv features, each next to chance. feats: the FeatureCache (the per-layer features are
    extracted once per split through it)."""
    t0, chance = time.time(), 100.0 / num_classes
    layers = (NINLayers if isinstance(encoder, common.NIN) else AlexNetLayers)(encoder, img_size, args.layer_dim)
    tr, te = feats("memory", layers).split(layers.sizes, 1), feats("test", layers).split(layers.sizes, 1)
    rows, n = [], len(layers.sizes) - 1
    for l in range(n):
        top1, top5, l2 = linear_probe(tr[l], train_y, te[l], test_y, num_classes, args.l2_grid, args.val_fraction,
                                      args.probe_steps, args.seed)
        rows.append({"protocol": "layer linear probe", "setting": f"{layers.names[l]}, {layers.sizes[l]}-d pooled "
                     f"(chance {chance:.1f})", "top1": top1, "top5": top5, "l2": l2})
        print(f"layer probe {layers.names[l]}: top-1 {top1:.2f} ({time.time() - t0:.0f}s; "
              f"{layers.names[l + 1] if l < n - 1 else 'MLP probe'} next)", flush=True)
    top1, top5 = fit_mlp_probe(tr[n], train_y, te[n], test_y, num_classes, args.mlp_hidden, args.mlp_epochs, args.seed)
    rows.append({"protocol": "MLP probe", "setting": f"{layers.names[n]}, {layers.sizes[n]}-d (chance {chance:.1f})",
                 "top1": top1, "top5": top5})
    return rows


# ----------------------------------------------------------------------------------------------------------------
# 6. Supervised baseline: the backbone trained from scratch on labels only, with the usual light augmentation
# ----------------------------------------------------------------------------------------------------------------
def train_supervised(args, data, device, autocast, memory_format=torch.contiguous_format, log=print):
    """Encoder + linear head trained with cross-entropy on `labels_per_class` images per class (all if None),
    SGD with momentum and cosine decay, in `memory_format`. Returns (encoder in eval mode, head, training
    indices). The indices and batch orders live on the CPU, where the images are held."""
    labels = data.memory.labels
    idx = (torch.arange(len(labels)) if args.labels_per_class is None
           else per_class_indices(labels, args.labels_per_class, args.seed, data.num_classes))
    if idx is None:
        fail(f"--labels-per-class {args.labels_per_class}: a class of {data.name} has fewer labelled images")
    images, targets = data.memory.images[idx], labels[idx].to(device)
    size = data.img_size
    encoder = common.build_backbone(args.backbone, **common.backbone_kwargs(args, size))
    model = nn.Sequential(encoder, nn.Linear(encoder.feature_dim, data.num_classes))
    model = model.to(device, memory_format=memory_format)
    groups = [{"params": [p for p in model.parameters() if p.ndim > 1], "weight_decay": 5e-4},
              {"params": [p for p in model.parameters() if p.ndim <= 1], "weight_decay": 0.0}]
    opt = torch.optim.SGD(groups, lr=args.sup_lr, momentum=0.9, nesterov=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.sup_steps)
    bs = min(args.sup_batch_size, len(idx))
    order, t0 = torch.randperm(len(idx)), time.time()
    model.train()
    for step in range(args.sup_steps):
        if len(order) < bs:  # a new epoch
            order = torch.cat([order, torch.randperm(len(idx))])
        b, order = order[:bs], order[bs:]
        x = normalize(common.light_augment(to_float(images[b].to(device)), size))
        x = x.contiguous(memory_format=memory_format)
        with autocast():
            loss = F.cross_entropy(model(x).float(), targets[b.to(device)])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % args.log_every == 0 or step + 1 == args.sup_steps:
            log(f"supervised step {step + 1}/{args.sup_steps} loss {loss.item():.4g} lr {sched.get_last_lr()[0]:.4g} "
                f"| {(step + 1) * bs / (time.time() - t0):.0f} img/s")
    return model[0].eval(), model[1].eval(), idx


def eval_supervised(args, data, device, autocast, memory_format, img_size, out_dir):
    """Protocol 6: train_supervised, score its classifier on the test split, save it as out_dir/supervised.pt
    (loadable by common.load_encoder). Returns (the trained encoder, to evaluate next, and the result row)."""
    encoder, head, idx = train_supervised(args, data, device, autocast, memory_format)
    logits = extract_features(nn.Sequential(encoder, head), data.test, device, args.batch_size, img_size, autocast,
                              args.workers)
    top1, top5 = topk_accuracy(logits, data.test.labels.to(device))
    os.makedirs(out_dir, exist_ok=True)
    common.save_checkpoint(os.path.join(out_dir, "supervised.pt"), method="supervised", args=vars(args), epoch=0,
                           step=args.sup_steps, backbone={"name": args.backbone,
                                                          "kwargs": common.backbone_kwargs(args, img_size)},
                           encoder=encoder.state_dict(), head=head.state_dict(), labelled_indices=idx,
                           img_size=img_size, data=args.data)
    n = args.labels_per_class or "all"
    return encoder, {"protocol": "supervised from scratch", "setting": f"{n} labels/class, {args.sup_steps} steps",
                     "top1": top1, "top5": top5}


# ----------------------------------------------------------------------------------------------------------------
# Encoders to evaluate, data, feature cache, input checks, output
# ----------------------------------------------------------------------------------------------------------------
class Pixels(nn.Module):
    """The raw-pixel baseline as an 'encoder': the normalised image, flattened."""
    def forward(self, x):
        return x.flatten(1)


def what_to_evaluate(args, given, device):
    """--ckpt: its encoder on `device`, and --data defaults to the data it was trained on, read as the training run
    did (its --data-dir, --img-size, --imagenette-size, --shapes-n, unless given again). Otherwise no encoder yet (it
    is built for the data's resolution) and --data defaults to shapes. Returns (encoder, ckpt, backbone, label)."""
    if not args.ckpt:
        args.data = args.data or "shapes"
        backbone = "pixels" if args.pixels else args.backbone
        label = "raw pixels" if args.pixels else f"{'supervised' if args.supervised else 'random-init'} {backbone}"
        return None, None, backbone, label
    try:
        encoder, ckpt = common.load_encoder(args.ckpt, device)
    except (KeyError, TypeError, RuntimeError) as e:
        fail(f"{args.ckpt}: the checkpoint's encoder cannot be rebuilt ({type(e).__name__}: "
             f"{str(e).splitlines()[0][:100]})")
    saved = ckpt.get("args", {})
    args.data = args.data or ckpt.get("data") or saved.get("data")
    if args.data is None:
        fail(f"{args.ckpt} does not say which data it was trained on; give --data")
    if args.data == saved.get("data"):
        for k in ("data_dir", "img_size", "imagenette_size", "shapes_n"):
            if k in saved and k not in given:
                setattr(args, k, saved[k])
        if args.data == "shapes" and "seed" in saved and "seed" not in given:
            args.seed = saved["seed"]  # shapes draws its images from the seed: the run's images, unless --seed
    label = f"{ckpt.get('method', '?')} checkpoint {args.ckpt} (epoch {ckpt.get('epoch')})"
    if args.features == "head":
        encoder, label = moco_query_network(encoder, ckpt, args.ckpt, device), label + ", projection-head output"
    return encoder, ckpt, ckpt["backbone"]["name"], label


def moco_query_network(encoder, ckpt, path, device):
    """--features head: the query network f then g (backbone and projection head) of a moco.py checkpoint, whose
    output the reference CIFAR-10 demo's kNN monitor reads (its ResNet keeps its fc layer, the 128-d head)."""
    saved = ckpt.get("args", {})
    if ckpt.get("method") != "moco" or "model" not in ckpt or "moco_dim" not in saved:
        fail(f"--features head: {path} is a {ckpt.get('method')} checkpoint; only moco.py checkpoints keep the "
             f"projection head it reads")
    import moco  # only here: the other protocols need no method file
    model = moco.MoCo(encoder, saved["moco_dim"], mlp=not saved.get("no_mlp", False))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval()


def load_labelled_data(args):
    data = common.dataset_from_args(args)
    if (data.memory.labels < 0).any() or (data.test.labels < 0).any():
        fail(f"--data {args.data} has unlabelled images in its evaluation splits; use a labelled dataset")
    return data


def check_input_fits(encoder, channels, img_size, what):
    """One forward pass on a blank batch: images of `channels` x img_size^2 must go through the encoder."""
    first = next(m for m in encoder.modules() if isinstance(m, nn.Conv2d))
    if first.in_channels != channels:
        fail(f"{what}: {channels}-channel images do not fit the encoder, which expects {first.in_channels} channels")
    try:
        with torch.no_grad():
            was = encoder.training
            encoder.eval()(torch.zeros(1, channels, img_size, img_size, device=next(encoder.parameters()).device))
            encoder.train(was)
    except RuntimeError as e:
        fail(f"{what}: {img_size}px images do not fit the encoder ({str(e).splitlines()[0][:120]})")


class FeatureCache:
    """feats(split) = encoder(images of split): float32 (N, D) on the device, extracted once per split and kept;
    feats(split, module): the same for another module (AlexNet's or NIN's per-layer features). split: "memory" (the
    labelled training split) or "test". Counts extractions and their seconds; a progress line every `log_every`
    batches."""
    def __init__(self, encoder, data, device, img_size, autocast, batch_size=512, workers=0, log_every=20):
        self.encoder, self.data, self.device, self.img_size = encoder, data, device, img_size
        self.autocast, self.batch_size, self.workers, self.log_every = autocast, batch_size, workers, log_every
        self.cache, self.extractions, self.seconds = {}, 0, 0.0

    def __call__(self, split, module=None):
        module = self.encoder if module is None else module
        if (split, module) not in self.cache:
            t0 = time.time()
            self.cache[split, module] = extract_features(
                module, getattr(self.data, split), self.device, self.batch_size, self.img_size, self.autocast,
                self.workers, log=lambda line: print(f"{split} split: {line}", flush=True), log_every=self.log_every)
            self.extractions += 1
            self.seconds += time.time() - t0
            print(f"features of the {split} split: {tuple(self.cache[split, module].shape)} in {time.time() - t0:.0f}s",
                  flush=True)
        return self.cache[split, module]


def timed(timings, key, fn, *a):
    """fn(*a), its seconds added to timings[key]."""
    t0 = time.time()
    out = fn(*a)
    timings[key] = timings.get(key, 0.0) + time.time() - t0
    return out


def output_path(args, backbone):
    """The JSON file: --out (a .json file, or a folder), else next to the checkpoint, else a new run folder."""
    name = f"eval-{os.path.basename(os.path.normpath(args.data))}.json"
    if args.out:
        return args.out if args.out.endswith(".json") else os.path.join(args.out, name)
    if args.ckpt:
        return os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), name)
    return os.path.join(common.run_folder(args, f"eval-{backbone}"), "eval.json")


def markdown_table(rows):
    f = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    lines = ["| protocol | setting | top-1 | top-5 |", "|---|---|---:|---:|"]
    lines += [f"| {r['protocol']} | {r['setting']} | {f(r['top1'])} | {f(r['top5'])} |" for r in rows]
    return "\n".join(lines)


def write_results(result, path):
    """Print the rows as a markdown table, write the result (with the table) as JSON. Returns the result."""
    result["table"] = markdown_table(result["rows"])
    print(result["table"], flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {path} ({result['wall_time_s']:.0f}s, features {result['extract_s']:.0f}s)", flush=True)
    return result


# ----------------------------------------------------------------------------------------------------------------
def main(argv=None):
    parser, args = get_args(argv)
    given = common.given_flags(parser, argv)
    check_args(args)
    t_start = time.time()
    common.seed_everything(args.seed)
    device = common.get_device(args.device)
    autocast, _ = common.setup_amp(args.amp, device)
    memory_format = common.memory_format(device, args.channels_last)

    # --- what is evaluated (a checkpoint's encoder, a random one, the pixels, a supervised one), on which data ---
    encoder, ckpt, backbone, label = what_to_evaluate(args, given, device)
    check_flags_act(args, given, backbone)
    data = load_labelled_data(args)
    C = data.num_classes
    img_size = args.img_size or (ckpt or {}).get("img_size") or data.img_size  # the evaluation resolution
    print(f"{label} on {data.name}: {len(data.memory)} labelled training / {len(data.test)} test images, {C} classes, "
          f"evaluated at {img_size}px on {device}", flush=True)
    out_json, rows = output_path(args, backbone), []
    if args.random_init:
        encoder = common.build_backbone(args.backbone, **common.backbone_kwargs(args, img_size))
    elif args.pixels:
        encoder = Pixels()
    elif args.supervised:
        encoder, row = eval_supervised(args, data, device, autocast, memory_format, img_size,
                                       os.path.dirname(out_json))
        rows.append(row)
    encoder = encoder.to(device, memory_format=memory_format)
    if not args.pixels:
        check_input_fits(encoder, data.test.images.shape[1], img_size, f"--data {args.data}")

    # --- the protocols, on features extracted once per split ---
    feats = FeatureCache(encoder, data, device, img_size, autocast, args.batch_size, args.workers, args.log_every)
    timings = {}
    train_y, test_y, run = data.memory.labels.to(device), data.test.labels.to(device), set(args.protocols)
    for key, protocols, fn in [("knn_s", {"knn", "1nn"}, eval_knn), ("linear_s", {"linear"}, eval_linear),
                               ("linear_s", {"fewshot"}, eval_fewshot)]:
        if run & protocols:
            rows += timed(timings, key, fn, feats("memory"), train_y, feats("test"), test_y, C, args)
    if "layers" in run and backbone in LAYERS and args.features == "backbone":
        rows += timed(timings, "layers_s", eval_layers, encoder, feats, train_y, test_y, C, img_size, args)
    rows.append({"protocol": "chance", "setting": f"uniform guess, {C} classes", "top1": 100.0 / C,
                 "top5": 500.0 / C if C > 5 else None})
    return write_results({
        "encoder": label, "method": ckpt.get("method") if ckpt else backbone, "backbone": backbone,
        "features": args.features,
        "data": args.data, "img_size": img_size, "num_classes": C, "train_images": len(data.memory),
        "test_images": len(data.test), "seed": args.seed, "device": str(device), "rows": rows,
        "extractions": feats.extractions, "extract_s": feats.seconds, **timings,
        "wall_time_s": time.time() - t_start}, out_json)


if __name__ == "__main__":
    main()
