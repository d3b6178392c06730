"""DeepCluster: Deep Clustering for Unsupervised Learning of Visual Features (Caron et al. 2018).
Paper: https://arxiv.org/abs/1807.05520   Reference code: https://github.com/facebookresearch/deepcluster

Each epoch alternates two steps. (1) Cluster: features of every training image (no augmentation) are reduced by
PCA with whitening, L2-normalised and grouped by k-means into k clusters. (2) Learn: a freshly initialised linear
layer on top of the network is trained, together with the network, to predict each image's cluster id (its
pseudo-label) from an augmented view, with images drawn uniformly over the clusters. The k-means here is written
in torch (no faiss), runs on the training device in chunks and never leaves a cluster empty.

    python deepcluster.py --data shapes --shapes-n 1000 300 --width 8 --epochs 6 --batch-size 32 --k 20 \
        --pca-dim 32 --samples-per-epoch 3000 --crop-min-scale 0.3 --device cpu      # offline, ~1 min on CPU
    python deepcluster.py --data cifar10 --width 32 --epochs 100                                # small AlexNet, GPU
    python deepcluster.py --data imagenette --epochs 200 --k 1000                               # 128 px Imagenette
    torchrun --nproc_per_node=4 deepcluster.py --data imagenette --epochs 200                   # 4 GPUs
"""
import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import common
from common import fail, normalize, random_flip, random_resized_crop, to_float
from knn_eval import knn_monitor

METHOD = "deepcluster"


def get_args(argv=None):
    p = argparse.ArgumentParser(description="DeepCluster pre-training (k-means pseudo-labels) with a kNN monitor",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--epochs", type=int, default=100, help="training epochs (one clustering per epoch)")
    p.add_argument("--batch-size", type=int, default=256, help="global batch size (split over torchrun ranks)")
    p.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (constant, as in the paper)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--weight-decay", type=float, default=1e-5, help="SGD weight decay")
    p.add_argument("--k", type=int, default=None,
                   help="number of k-means clusters (default: 10 x the number of classes, e.g. 100 for CIFAR-10, "
                        "10000 for ImageNet)")
    p.add_argument("--pca-dim", type=int, default=256, help="PCA-whitening dimension before k-means")
    p.add_argument("--kmeans-iters", type=int, default=20, help="k-means (Lloyd) iterations per clustering")
    p.add_argument("--samples-per-epoch", type=int, default=None,
                   help="images drawn over the clusters for each epoch's training (default: the training set size, "
                        "as the paper); fewer makes an epoch cheaper on a small budget, the clustering still sees all")
    p.add_argument("--train-subset", type=int, default=None,
                   help="pre-train on a fixed random subset of this many training images (a CPU budget); the kNN "
                        "monitor still uses every labelled training image")
    p.add_argument("--crop-min-scale", type=float, default=0.08,
                   help="smallest crop area fraction of the random resized crop (paper: 0.08)")
    p.add_argument("--feature-batch-size", type=int, default=512, help="batch size of the feature extraction")
    p.add_argument("--knn-every", type=int, default=1, help="weighted-kNN monitor every N epochs (and the last)")
    p.add_argument("--knn-k", type=int, default=200, help="kNN monitor: neighbours")
    p.add_argument("--knn-temperature", type=float, default=0.1, help="kNN monitor: vote temperature")
    common.add_common_args(p, backbone="alexnet")
    return p, p.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------------
# Step 1: clustering. PCA-whitening + L2 normalisation, then k-means (Lloyd) with faiss's empty-cluster rule.
# ----------------------------------------------------------------------------------------------------------------
def pca_whiten(x, dim):
    """Project (N, D) features on their top `dim` principal axes and scale each axis to unit variance:
    y = (x - mean) V diag(lambda)^(-1/2), with (lambda, V) the largest eigenpairs of the covariance (faiss PCAMatrix
    with eigen_power=-0.5). Returns float32 (N, min(dim, D)) on x's device."""
    x = x.float()
    dim = min(dim, x.shape[1])
    xc = x - x.mean(0, keepdim=True)
    cov = (xc.T @ xc / max(1, x.shape[0] - 1)).double().cpu()  # (D, D), small: eigendecomposed on the CPU
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    evals, evecs = evals.flip(0)[:dim], evecs.flip(1)[:, :dim]
    proj = (evecs / evals.clamp(min=1e-10).sqrt()).float().to(x.device)  # (D, dim)
    return xc @ proj


def preprocess_features(x, pca_dim):
    """What DeepCluster clusters: PCA-whitened to `pca_dim` dimensions, then each row L2-normalised."""
    return F.normalize(pca_whiten(x, pca_dim), dim=1)


def _nearest(x, centroids, chunk):
    """Index of the nearest centroid (squared Euclidean) of every row of x, `chunk` rows at a time:
    |x - c|^2 = |x|^2 - 2 x.c + |c|^2, and |x|^2 does not change the argmin."""
    c_sq = (centroids * centroids).sum(1)  # (k,)
    return torch.cat([(c_sq - 2 * xb @ centroids.T).argmin(1) for xb in x.split(chunk)])


def _split_into_empty(x, assign, k, generator):
    """faiss's rule for an empty cluster: it takes over half of a large cluster. The cluster to split is drawn
    with probability proportional to (size - 1); the half of its points nearest to one of its random members
    moves to the empty cluster. Afterwards every cluster has at least one point (needs N >= k)."""
    counts = torch.bincount(assign, minlength=k).cpu()
    for e in (counts == 0).nonzero().flatten().tolist():
        j = torch.multinomial((counts - 1).clamp(min=0).double(), 1, generator=generator).item()
        members = (assign == j).nonzero().flatten()
        anchor = x[members[torch.randint(len(members), (1,), generator=generator).item()]]
        half = members[((x[members] - anchor) ** 2).sum(1).argsort()[:len(members) // 2]]
        assign[half] = e
        counts[e], counts[j] = len(half), counts[j] - len(half)
    return assign


def _means(x, assign, k):
    sums = torch.zeros(k, x.shape[1], device=x.device, dtype=x.dtype).index_add_(0, assign, x)
    return sums / torch.bincount(assign, minlength=k).clamp(min=1).to(x.dtype)[:, None]


@torch.no_grad()
def kmeans(x, k, n_iter=20, seed=0, init=None, chunk=None):
    """k-means by Lloyd's algorithm (paper, eq. 1):

        min_{C in R^{d x k}}  1/N sum_n  min_{y_n in {0,1}^k, y_n^T 1_k = 1}  || x_n - C y_n ||^2

    Start from k distinct random rows of x (or `init`), then `n_iter` times: assign each row to its nearest
    centroid, refill empty clusters (see _split_into_empty), move each centroid to the mean of its rows. A last
    assignment to the final centroids gives the returned ids. Distances are computed `chunk` rows at a time on x's
    device, so 100k x 256 features with 10k centroids fit. Returns centroids (k, D) and assignments (N,) int64,
    every cluster non-empty.
    """
    N = x.shape[0]
    if not 1 <= k <= N:
        fail(f"k-means needs 1 <= k <= number of points, got k={k} for {N} points")
    g = torch.Generator().manual_seed(seed)  # CPU generator: the same clusters on every device and rank
    chunk = chunk or max(256, 2 ** 24 // k)  # (chunk, k) distance matrix of at most ~64 MB
    centroids = x[torch.randperm(N, generator=g)[:k].to(x.device)].clone() if init is None else init.to(x).clone()
    for _ in range(n_iter):
        assign = _split_into_empty(x, _nearest(x, centroids, chunk), k, g)
        centroids = _means(x, assign, k)
    assign = _nearest(x, centroids, chunk)
    if torch.bincount(assign, minlength=k).min() == 0:  # rare: refill, and keep centroids = means of their points
        assign = _split_into_empty(x, assign, k, g)
        centroids = _means(x, assign, k)
    return centroids, assign


def kmeans_objective(x, centroids, assign):
    """The k-means loss: mean squared distance of each row to its centroid."""
    return ((x - centroids[assign]) ** 2).sum(1).mean().item()


def nmi(a, b):
    """Normalised mutual information of two labelings (N,) with the arithmetic-mean normalisation:

        NMI(A; B) = I(A; B) / ((H(A) + H(B)) / 2),   I = sum_ij p_ij log(p_ij / (p_i p_j)),  H = -sum_i p_i log p_i

    1 for identical labelings up to renaming the ids, ~0 for independent ones; 1 if both put everything in one
    cluster (sklearn's convention). Only the non-zero cells of the contingency table are formed (10k x 10k fits)."""
    a, b = torch.as_tensor(a).flatten().cpu(), torch.as_tensor(b).flatten().cpu()
    if a.shape != b.shape or a.numel() == 0:
        fail(f"nmi needs two non-empty labelings of the same length, got {a.numel()} and {b.numel()}")
    _, ia = torch.unique(a, return_inverse=True)
    nb_values, ib = torch.unique(b, return_inverse=True)
    n, nb = a.numel(), len(nb_values)
    cells, counts = torch.unique(ia * nb + ib, return_counts=True)
    p_ij = counts.double() / n
    p_i, p_j = torch.bincount(ia).double() / n, torch.bincount(ib).double() / n
    mi = (p_ij * (p_ij / (p_i[cells // nb] * p_j[cells % nb])).log()).sum()
    h_a, h_b = -(p_i * p_i.log()).sum(), -(p_j * p_j.log()).sum()
    if h_a + h_b == 0:
        return 1.0
    return (mi / ((h_a + h_b) / 2)).clamp(0, 1).item()


def uniform_cluster_sampler(assign, n, generator=None):
    """n image indices drawn uniformly over the clusters (DeepCluster's UnifLabelSampler): about n/k' images from
    each of the k' non-empty clusters, without replacement, or with replacement where a cluster has fewer images.
    Shuffled; returns int64 (n,). Keeps a few huge clusters from dominating the pseudo-label training."""
    assign = torch.as_tensor(assign).cpu()
    counts = torch.bincount(assign)
    per = n // int((counts > 0).sum()) + 1
    groups = torch.argsort(assign, stable=True).split(counts.tolist())  # the indices of each cluster
    picks = [g[torch.randperm(len(g), generator=generator)[:per]] if len(g) >= per
             else g[torch.randint(len(g), (per,), generator=generator)] for g in groups if len(g) > 0]
    picks = torch.cat(picks)
    return picks[torch.randperm(len(picks), generator=generator)[:n]]


# ----------------------------------------------------------------------------------------------------------------
# Step 2: learning. Augmentation, the network + re-initialised classification layer, the loss.
# ----------------------------------------------------------------------------------------------------------------
def deepcluster_augment(x, size, min_scale=0.08):
    """uint8 (N, 3, H, W) -> normalised float (N, 3, size, size): random resized crop + horizontal flip (the paper's
    only augmentations; colour is removed by the Sobel layer anyway)."""
    return normalize(random_flip(random_resized_crop(to_float(x), size, scale=(min_scale, 1.0))))


class DeepCluster(nn.Module):
    """Encoder (AlexNet returns fc7 before its ReLU), the ReLU, and the top layer W: k pseudo-class scores."""
    def __init__(self, encoder, k):
        super().__init__()
        self.encoder = encoder
        self.top_layer = nn.Linear(encoder.feature_dim, k)

    def forward(self, x):
        return self.top_layer(F.relu(self.encoder(x)))

    @torch.no_grad()
    def reset_top_layer(self, generator):
        """New clusters, new classes: the top layer starts from scratch each epoch (N(0, 0.01), zero bias)."""
        w = torch.randn(self.top_layer.weight.shape, generator=generator) * 0.01
        self.top_layer.weight.copy_(w)
        self.top_layer.bias.zero_()


def deepcluster_loss(logits, pseudo_labels):
    """The pseudo-label classification loss (paper, eq. 2), with g_W the top layer and f_theta the network:

        min_{theta, W}  1/N sum_n  l(g_W(f_theta(x_n)), y_n)      l = multinomial logistic loss (cross-entropy)

    logits: (B, k), pseudo_labels: (B,) k-means cluster ids of the images."""
    return F.cross_entropy(logits, pseudo_labels)


# ----------------------------------------------------------------------------------------------------------------
# Features of the whole training set: each rank extracts its shard, all ranks get all features.
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def train_features(encoder, split, device, batch_size, autocast, workers, rank, world, log, log_every):
    """encoder(normalize(image)) for every training image, no augmentation, eval mode; float32 (N, D) on device.
    Under torchrun each rank computes every world-th image and the shards are all-gathered back in order."""
    was_training = encoder.training
    encoder.eval()
    loader = common.make_loader(split, batch_size, shuffle=False, workers=workers, rank=rank, world=world)
    feats, t0 = [], time.time()
    for i, (x, _) in enumerate(loader):
        with autocast():
            feats.append(encoder(normalize(to_float(x.to(device, non_blocking=True)))).float())
        if (i + 1) % log_every == 0 or i + 1 == len(loader):
            el = time.time() - t0
            log(f"features {i + 1}/{len(loader)} batches | {(i + 1) * batch_size * world / el:.0f} img/s | "
                f"ETA {common.fmt_time(el / (i + 1) * (len(loader) - i - 1))}")
    encoder.train(was_training)
    feats = torch.cat(feats)  # this rank's images rank, rank + world, ... (DistributedSampler pads to equal sizes)
    if world > 1:
        parts = [torch.empty_like(feats) for _ in range(world)]
        dist.all_gather(parts, feats)
        feats = torch.stack(parts, 1).flatten(0, 1)  # interleave back: row r*world + rank = image r*world + rank
    return feats[:len(split)]


def plot_nmi(metrics_path, png_path):
    """The paper's Fig. 2: NMI between consecutive clusterings, and NMI of the clusters with the true labels."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(line) for line in open(metrics_path) if line.strip()]
    fig, ax = plt.subplots(figsize=(4.5, 3))
    for key, label in [("nmi_prev", "NMI(t-1, t)"), ("nmi_labels", "NMI(clusters, labels)")]:
        pts = [(r["epoch"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=3, label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("NMI")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=80)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------
def main(argv=None):
    parser, args = get_args(argv)
    ckpt = common.load_checkpoint(args.resume) if args.resume else None
    if ckpt is not None:  # continue with the checkpoint's flags, except those given again on the command line
        if ckpt.get("method") != METHOD:
            fail(f"{args.resume} is a {ckpt.get('method')} checkpoint, not {METHOD}")
        given = [t for t in (sys.argv[1:] if argv is None else argv) if t.split("=")[0] != "--resume"]
        args = common.merge_resume_args(parser, given, args, ckpt["args"])  # (--resume itself: always this one)
    if args.epochs < 1 or args.batch_size < 2:
        fail(f"--epochs must be >= 1 and --batch-size >= 2 (got {args.epochs}, {args.batch_size})")
    if args.pca_dim < 1 or args.kmeans_iters < 1 or args.feature_batch_size < 1:
        fail(f"--pca-dim, --kmeans-iters and --feature-batch-size must be >= 1 "
             f"(got {args.pca_dim}, {args.kmeans_iters}, {args.feature_batch_size})")
    if not 0 < args.crop_min_scale <= 1:
        fail(f"--crop-min-scale must be in (0, 1], got {args.crop_min_scale}")

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
    if args.train_subset is not None:
        if not 1 <= args.train_subset <= len(data.train):
            fail(f"--train-subset must be between 1 and {len(data.train)}, got {args.train_subset}")
        keep = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(0))[:args.train_subset]
        data.train = common.Split(data.train.images[keep], data.train.labels[keep], data.train.classes)
    N = len(data.train)
    k = args.k if args.k is not None else 10 * data.num_classes
    if not 2 <= k <= N:
        fail(f"--k must be between 2 and the number of training images ({N}), got {k}")
    if args.batch_size > N:
        fail(f"batch size {args.batch_size} is larger than the dataset ({N} images)")
    samples = args.samples_per_epoch or N
    if samples < args.batch_size:
        fail(f"--samples-per-epoch {samples} is smaller than --batch-size {args.batch_size}")
    steps_per_epoch = samples // args.batch_size  # images drawn uniformly over the clusters, full batches
    labels = data.train.labels
    has_labels = bool((labels >= 0).all())
    log.print(f"{data.name}: {N} training images at {data.img_size}px, k-means into {k} clusters, kNN on "
              f"{len(data.memory)} labelled / {len(data.test)} test images, {data.num_classes} classes; device "
              f"{device}, {world} process(es); run folder {out}")

    # --- model, optimizer ---
    bb_kwargs = common.backbone_kwargs(args, data.img_size)
    encoder = common.build_backbone(args.backbone, **bb_kwargs)
    model = DeepCluster(encoder, k)
    if world > 1:
        model = common.convert_sync_batchnorm(model, device)
    model = model.to(device)
    # the network's optimizer lives across epochs; the top layer gets a new one with each new clustering
    optimizer = torch.optim.SGD([p for p in model.encoder.parameters() if p.requires_grad], lr=args.lr,
                                momentum=args.momentum, weight_decay=args.weight_decay)
    start_epoch, prev_assign = 0, None
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        common.set_rng_state(ckpt["rng"][rank] if rank < len(ckpt["rng"]) else ckpt["rng"][0])
        start_epoch, prev_assign = ckpt["epoch"], ckpt["assignments"]
        log.print(f"resumed from {args.resume} at epoch {start_epoch}, step {ckpt['step']}")
    train_model = common.compile_model(model, device) if args.compile else model
    if world > 1:
        train_model = nn.parallel.DistributedDataParallel(train_model, device_ids=[device.index] if device.type == "cuda" else None)

    # --- training loop ---
    knn_top1, t_start, images_seen, metrics = None, time.time(), 0, {}
    total_steps = (args.epochs - start_epoch) * steps_per_epoch
    for epoch in range(start_epoch, args.epochs):
        # 1. features of every training image, PCA-whitened and L2-normalised, k-means (a new seed every epoch)
        t_epoch = time.time()
        feats = train_features(model.encoder, data.train, device, args.feature_batch_size, autocast, args.workers,
                               rank, world, log.print, args.log_every)
        x = preprocess_features(feats, args.pca_dim)  # (N, pca_dim)
        centroids, assign = kmeans(x, k, args.kmeans_iters, seed=args.seed * 100_003 + epoch)
        if world > 1:  # one clustering for all ranks: rank 0's
            dist.broadcast(assign, 0)
        assign = assign.cpu()
        cluster_loss = kmeans_objective(x, centroids, assign.to(device))
        sizes = torch.bincount(assign, minlength=k)
        del feats, x
        t_cluster = time.time() - t_epoch
        log.print(f"epoch {epoch + 1}: k-means loss {cluster_loss:.4f}, cluster sizes {sizes.min()}..{sizes.max()} "
                  f"({t_cluster:.0f}s for features + clustering)")

        # 2. a new top layer, N images drawn uniformly over the clusters, train on their cluster ids
        g = torch.Generator().manual_seed(args.seed * 100_003 + epoch)  # the same on every rank
        model.reset_top_layer(g)
        top_optimizer = torch.optim.SGD(model.top_layer.parameters(), lr=args.lr, momentum=args.momentum,
                                        weight_decay=args.weight_decay)
        order = uniform_cluster_sampler(assign, steps_per_epoch * args.batch_size, g)
        batches = order.view(steps_per_epoch, world, -1)[:, rank]  # (steps, batch per rank): this rank's share
        loader = torch.utils.data.DataLoader(  # Split reads a whole batch of indices at once
            data.train, batch_size=None, sampler=[b.tolist() for b in batches],
            num_workers=0 if data.img_size <= common.SMALL else args.workers, pin_memory=device.type == "cuda")
        model.train()
        sums = {"loss": 0.0, "acc": 0.0}
        for step, (xb, _) in enumerate(loader):
            y = assign[batches[step]].to(device, non_blocking=True)  # pseudo-labels
            xb = xb.to(device, non_blocking=True)
            with torch.no_grad():
                v = deepcluster_augment(xb, data.img_size, args.crop_min_scale)
            with autocast():
                logits = train_model(v).float()
            loss = deepcluster_loss(logits, y)
            optimizer.zero_grad(set_to_none=True)
            top_optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.step(top_optimizer)
            scaler.update()

            acc = (logits.argmax(1) == y).float().mean().item()
            sums["loss"] += loss.item()
            sums["acc"] += acc
            images_seen += xb.shape[0] * world
            done = (epoch - start_epoch) * steps_per_epoch + step + 1
            if (step + 1) % args.log_every == 0 or step + 1 == steps_per_epoch:
                log.progress(epoch + 1, args.epochs, step + 1, steps_per_epoch, images_seen, done, total_steps,
                             loss=loss.item(), acc=acc)

        # --- end of epoch: kNN monitor, metrics, checkpoint (rank 0) ---
        metrics = {"epoch": epoch + 1, "loss": sums["loss"] / steps_per_epoch,
                   "pseudo_label_acc": sums["acc"] / steps_per_epoch, "clustering_loss": cluster_loss,
                   "nmi_prev": nmi(prev_assign, assign) if prev_assign is not None else None,
                   "nmi_labels": nmi(labels, assign) if has_labels else None,  # monitor only, never trained on
                   "min_cluster": int(sizes.min()), "max_cluster": int(sizes.max()),
                   "img_per_s": steps_per_epoch * args.batch_size / (time.time() - t_epoch)}
        prev_assign = assign
        if rank == 0 and ((epoch + 1) % args.knn_every == 0 or epoch + 1 == args.epochs):
            knn_top1 = knn_monitor(model.encoder, data, device, args.knn_k, args.knn_temperature, autocast, args.workers)
            metrics["knn_top1"] = knn_top1
        if rank == 0:
            log.epoch(**metrics)
            plot_nmi(os.path.join(out, "metrics.jsonl"), os.path.join(out, "nmi.png"))
            log.print(" ".join(f"{k_} {v:.4g}" if isinstance(v, float) else f"{k_} {v}" for k_, v in metrics.items()))
            common.save_checkpoint(
                os.path.join(out, "last.pt"), method=METHOD, args=vars(args), epoch=epoch + 1,
                step=(epoch + 1) * steps_per_epoch, backbone={"name": args.backbone, "kwargs": bb_kwargs},
                encoder=model.encoder.state_dict(), model=model.state_dict(), optimizer=optimizer.state_dict(),
                scheduler=None, scaler=scaler.state_dict(), rng=common.all_rng_states(world),
                img_size=data.img_size, data=args.data, metrics=metrics, assignments=assign, k=k)
        elif world > 1:
            common.all_rng_states(world)
        if world > 1:
            dist.barrier()

    # --- summary ---
    wall = time.time() - t_start
    summary = {"method": METHOD, "data": args.data, "epochs": args.epochs, "k": k, "knn_top1": knn_top1,
               "nmi_prev": metrics.get("nmi_prev"), "nmi_labels": metrics.get("nmi_labels"),
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
