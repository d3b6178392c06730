"""DeepCluster: Deep Clustering for Unsupervised Learning of Visual Features (Caron et al. 2018).
Paper: https://arxiv.org/abs/1807.05520   Reference code: https://github.com/facebookresearch/deepcluster

Each epoch alternates two steps. (1) Cluster: features of every training image (no augmentation) are reduced by
PCA with whitening, L2-normalised and grouped by k-means into k clusters. (2) Learn: a freshly initialised linear
layer on top of the network is trained, together with the network, to predict each image's cluster id (its
pseudo-label) from an augmented view, with images drawn uniformly over the clusters. The k-means here is written
in torch (no faiss), runs on the training device in chunks and refills empty clusters as faiss does.
docs/deepcluster.md has the details.

    python deepcluster.py --data shapes --shapes-n 1000 300 --width 8 --epochs 6 --batch-size 32 --k 20 \
        --pca-dim 32 --samples-per-epoch 3000 --crop-min-scale 0.3 --device cpu      # offline, ~1 min on CPU
    python deepcluster.py --data cifar10 --width 32 --pca-dim 128 --epochs 100                  # small AlexNet, GPU
    python deepcluster.py --data imagenette --epochs 200 --k 1000                               # 128 px Imagenette
    torchrun --nproc_per_node=4 deepcluster.py --data imagenette --epochs 200                   # 4 GPUs
"""
import argparse
import math
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import common
from common import fail, normalize, random_flip, random_resized_crop, to_float

METHOD = "deepcluster"


def get_args(argv=None):
    p = argparse.ArgumentParser(description="DeepCluster pre-training (k-means pseudo-labels) with a kNN monitor",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--epochs", type=int, default=100, help="training epochs (one clustering per epoch)")
    p.add_argument("--batch-size", type=int, default=256, help="global batch size (split over torchrun ranks)")
    p.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (constant, as in the paper)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum of the network")
    p.add_argument("--top-momentum", type=float, default=0.0,
                   help="SGD momentum of the top layer, re-initialised every epoch")
    p.add_argument("--weight-decay", type=float, default=1e-5, help="SGD weight decay")
    p.add_argument("--k", type=int, default=None,
                   help="number of k-means clusters (default: 10 x the number of classes)")
    p.add_argument("--pca-dim", type=int, default=256, help="PCA-whitening dimension before k-means")
    p.add_argument("--kmeans-iters", type=int, default=20, help="k-means (Lloyd) iterations per clustering")
    p.add_argument("--kmeans-init", default="random", choices=["random", "k-means++"],
                   help="k-means start: k random points or greedy k-means++")
    p.add_argument("--samples-per-epoch", type=int, default=None,
                   help="images drawn over the clusters for each epoch's training (default: the training set size); "
                        "the clustering still sees all")
    p.add_argument("--train-subset", type=int, default=None,
                   help="pre-train on a fixed random subset of this many training images; the kNN monitor still "
                        "uses every labelled training image")
    p.add_argument("--crop-min-scale", type=float, default=0.08,
                   help="smallest crop area fraction of the random resized crop (paper: 0.08)")
    p.add_argument("--feature-batch-size", type=int, default=512, help="batch size of the feature extraction")
    common.add_knn_args(p, every=1)
    common.add_common_args(p, backbone="alexnet")
    return p, p.parse_args(argv)


def resolve_defaults(args, num_classes, n_train):
    """Defaults that depend on the data, written into args (so the checkpoint keeps them)."""
    if args.k is None:  # 10 x the number of classes
        args.k = 10 * num_classes
    if args.samples_per_epoch is None:  # the whole training set
        args.samples_per_epoch = n_train


def check_args(args):
    """The flags alone (before any data is loaded)."""
    if args.epochs < 1 or args.batch_size < 2:
        fail(f"--epochs must be >= 1 and --batch-size >= 2 (got {args.epochs}, {args.batch_size})")
    if args.pca_dim < 1 or args.kmeans_iters < 1 or args.feature_batch_size < 1 or args.knn_every < 1:
        fail(f"--pca-dim, --kmeans-iters, --feature-batch-size and --knn-every must be >= 1 (got {args.pca_dim}, "
             f"{args.kmeans_iters}, {args.feature_batch_size}, {args.knn_every})")
    if args.lr <= 0 or args.weight_decay < 0:
        fail(f"--lr must be > 0 and --weight-decay >= 0 (got {args.lr}, {args.weight_decay})")
    if not (0 <= args.momentum < 1 and 0 <= args.top_momentum < 1):
        fail(f"--momentum and --top-momentum must be in [0, 1) (got {args.momentum}, {args.top_momentum})")
    if not 0 < args.crop_min_scale <= 1:
        fail(f"--crop-min-scale must be in (0, 1], got {args.crop_min_scale}")
    if args.samples_per_epoch is not None and args.samples_per_epoch < args.batch_size:
        fail(f"--samples-per-epoch {args.samples_per_epoch} is smaller than --batch-size {args.batch_size}")


def check_data_args(args, n_train):
    """The flags against the training set of n_train images, to be cut into --k clusters."""
    if not 2 <= args.k <= n_train:
        fail(f"--k must be between 2 and the number of training images ({n_train}), got {args.k}")
    if args.batch_size > n_train:
        fail(f"batch size {args.batch_size} is larger than the dataset ({n_train} images)")


def training_subset(split, n):
    """--train-subset: a fixed random subset of n images (the same for every seed and rank); None keeps them all."""
    if n is None:
        return split
    if not 1 <= n <= len(split):
        fail(f"--train-subset must be between 1 and {len(split)}, got {n}")
    keep = torch.randperm(len(split), generator=torch.Generator().manual_seed(0))[:n]
    return common.Split(split.images[keep], split.labels[keep], split.classes)


# ----------------------------------------------------------------------------------------------------------------
# Step 1: clustering. PCA-whitening + L2 normalisation, then k-means (Lloyd) with faiss's rule for empty clusters.
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


def _means(x, assign, k):
    """Each cluster's mean; an empty cluster's is 0 (as faiss; _split_clusters replaces it)."""
    sums = torch.zeros(k, x.shape[1], device=x.device, dtype=x.dtype).index_add_(0, assign, x)
    return sums / torch.bincount(assign, minlength=k).clamp(min=1).to(x.dtype)[:, None]


def _split_clusters(centroids, counts, generator, eps=1 / 1024):
    """faiss's rule for empty clusters (Clustering.cpp, split_clusters; the paper's section 3.3): each empty cluster i
    takes the centroid of a cluster j drawn with probability proportional to (size_j - 1), with a small symmetric
    perturbation, c_i = c_j * (1 + eps s) and c_j = c_j * (1 - eps s), s = (+1, -1, +1, ...), eps = 1/1024; the next
    assignment shares j's points between the two. As in faiss, j's size is then booked as split evenly, so a second
    empty cluster prefers another large cluster. centroids (k, D) are changed in place and returned; counts (k,) are
    the sizes of the assignment the centroids were computed from."""
    counts = counts.cpu().clone()
    s = torch.ones(centroids.shape[1], device=centroids.device, dtype=centroids.dtype)
    s[1::2] = -1
    for i in (counts == 0).nonzero().flatten().tolist():  # some cluster has >= 2 points while one is empty (N >= k)
        j = torch.multinomial((counts - 1).clamp(min=0).double(), 1, generator=generator).item()
        c = centroids[j].clone()
        centroids[i], centroids[j] = c * (1 + eps * s), c * (1 - eps * s)
        counts[i] = counts[j] // 2
        counts[j] -= counts[i]
    return centroids


def _fill_empty(x, assign, k, generator):
    """The last resort, after the final assignment, for a cluster that the centroid split could not fill: identical
    points (no perturbation separates them) or a split cluster whose points all fell on one side. A cluster to split
    is drawn with probability proportional to (size - 1) and the half of its points nearest to one of its random
    members moves to the empty cluster, so that every cluster ends with at least one point (needs N >= k)."""
    counts = torch.bincount(assign, minlength=k).cpu()
    for e in (counts == 0).nonzero().flatten().tolist():
        j = torch.multinomial((counts - 1).clamp(min=0).double(), 1, generator=generator).item()
        members = (assign == j).nonzero().flatten()
        anchor = x[members[torch.randint(len(members), (1,), generator=generator).item()]]
        half = members[((x[members] - anchor) ** 2).sum(1).argsort()[:len(members) // 2]]
        assign[half] = e
        counts[e], counts[j] = len(half), counts[j] - len(half)
    return assign


def kmeans_plusplus(x, k, generator):
    """Greedy k-means++ seeding (Arthur and Vassilvitskii 2007; greedy as sklearn's default): the first centroid is a
    uniformly random row of x; each next one is the best of 2 + log(k) candidate rows, each drawn with probability
    proportional to its squared distance D(x)^2 to the nearest centroid so far, the best being the one that leaves
    the smallest sum of D^2. On x's device, with (N, 2 + log k) distances at a time. Returns (k, D)."""
    N, trials = x.shape[0], 2 + int(math.log(k))
    x_sq = (x * x).sum(1)  # (N,)

    def sq_dist(idx):  # (N, len(idx)) squared distances of every row to the rows idx
        c = x[idx]
        return (x_sq[:, None] - 2 * x @ c.T + (c * c).sum(1)).clamp(min=0)
    idx = torch.randint(N, (1,), generator=generator).to(x.device)
    chosen, d2 = [idx], sq_dist(idx)[:, 0]  # (N,) D(x)^2
    for _ in range(k - 1):
        cum = d2.cumsum(0)
        u = torch.rand(trials, generator=generator).to(x.device, x.dtype) * cum[-1]  # CPU draws: same on any device
        cand = torch.searchsorted(cum, u, right=True).clamp(max=N - 1)  # (trials,) rows whose D^2 intervals hold u
        d2_new = torch.minimum(d2[:, None], sq_dist(cand))  # (N, trials): D^2 if each candidate were added
        best = d2_new.sum(0).argmin(0, keepdim=True)  # (1,)
        chosen.append(cand[best])
        d2 = d2_new.index_select(1, best)[:, 0]
    return x[torch.cat(chosen)].clone()


@torch.no_grad()
def kmeans(x, k, n_iter=20, seed=0, init="random", chunk=None):
    """k-means by Lloyd's algorithm (paper, eq. 2; f_theta(x_n) are the rows of x):

        min_{C in R^{d x k}}  1/N sum_n  min_{y_n in {0,1}^k, y_n^T 1_k = 1}  || f_theta(x_n) - C y_n ||^2

    Start (`init`): "random" = k distinct random rows of x (faiss's start, the paper's; the default),
    "k-means++" = kmeans_plusplus, or a (k, D) tensor. Then `n_iter` times: assign each row to its nearest centroid,
    move each centroid to the mean of its rows, give each empty cluster a perturbed copy of a large cluster's
    centroid (_split_clusters). A last assignment to the final centroids gives the returned ids, with any cluster
    still empty refilled by _fill_empty. Distances are computed `chunk` rows at a time on x's device, so 100k x 256
    features with 10k centroids fit. Returns centroids (k, D) and assignments (N,) int64, every cluster non-empty.
    """
    N = x.shape[0]
    if not 1 <= k <= N:
        fail(f"k-means needs 1 <= k <= number of points, got k={k} for {N} points")
    g = torch.Generator().manual_seed(seed)  # CPU generator: the same clusters on every device and rank
    chunk = chunk or max(256, 2 ** 24 // k)  # (chunk, k) distance matrix of at most ~64 MB
    if isinstance(init, torch.Tensor):
        centroids = init.to(x).clone()
    elif init == "random":
        centroids = x[torch.randperm(N, generator=g)[:k].to(x.device)].clone()
    elif init == "k-means++":
        centroids = kmeans_plusplus(x, k, g)
    else:
        fail(f"k-means init must be 'random', 'k-means++' or a (k, D) tensor, got {init!r}")
    for _ in range(n_iter):
        assign = _nearest(x, centroids, chunk)
        centroids = _split_clusters(_means(x, assign, k), torch.bincount(assign, minlength=k), g)
    assign = _nearest(x, centroids, chunk)
    if torch.bincount(assign, minlength=k).min() == 0:  # rare: refill, and keep centroids = means of their points
        assign = _fill_empty(x, assign, k, g)
        centroids = _means(x, assign, k)
    return centroids, assign


def kmeans_objective(x, centroids, assign):
    """The k-means loss: mean squared distance of each row to its centroid."""
    return ((x - centroids[assign]) ** 2).sum(1).mean().item()


def nmi(a, b, average="geometric"):
    """Normalised mutual information of two labelings (N,), as the paper defines it (average="geometric"):

        NMI(A; B) = I(A; B) / sqrt(H(A) H(B)),   I = sum_ij p_ij log(p_ij / (p_i p_j)),  H = -sum_i p_i log p_i

    average="arithmetic" divides by (H(A) + H(B)) / 2 instead. 1 for identical labelings up to renaming the ids, ~0
    for independent ones; 1 if both put everything in one cluster, 0 if only one does (sklearn's conventions). Only
    the non-zero cells of the contingency table are formed (10k x 10k fits)."""
    if average not in ("geometric", "arithmetic"):
        fail(f"nmi average must be 'geometric' or 'arithmetic', got {average!r}")
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
    if h_a == 0 and h_b == 0:
        return 1.0
    if h_a == 0 or h_b == 0:  # one labeling is a single cluster: no information shared
        return 0.0
    norm = (h_a * h_b).sqrt() if average == "geometric" else (h_a + h_b) / 2
    return (mi / norm).clamp(0, 1).item()


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
    """The pseudo-label classification loss (paper, eq. 1), with g_W the top layer and f_theta the network:

        min_{theta, W}  1/N sum_n  l(g_W(f_theta(x_n)), y_n)      l = multinomial logistic loss (cross-entropy)

    logits: (B, k), pseudo_labels: (B,) k-means cluster ids of the images."""
    return F.cross_entropy(logits, pseudo_labels)


# ================================================================================================================
# ALGO LOGIC: DeepCluster's two steps -- cluster the features (once per epoch), then updates on the pseudo-labels
# ================================================================================================================
def cluster_step(encoder, split, k, n_samples, seed, args, device, autocast, rank=0, world=1, log=print):
    """Step 1, once per epoch: features of every training image (eval mode, no augmentation) -> PCA-whitening and L2
    normalisation -> k-means into k clusters (eq. 2) -> pseudo-labels (the cluster ids) -> n_samples image indices
    drawn uniformly over the clusters. Under torchrun every rank extracts its shard of the features, rank 0's
    clustering is broadcast, and every rank draws the same order. Returns the pseudo-labels (N,) and the order
    (n_samples,), int64 on the CPU, and the k-means objective."""
    feats = common.extract_features(encoder, split, device, args.feature_batch_size, autocast=autocast,
                                    workers=args.workers, rank=rank, world=world, log=log, log_every=args.log_every)
    x = preprocess_features(feats, args.pca_dim)  # (N, pca_dim)
    centroids, assign = kmeans(x, k, args.kmeans_iters, seed=seed, init=args.kmeans_init)
    if world > 1:  # one clustering for all ranks: rank 0's
        dist.broadcast(assign, 0)
    objective = kmeans_objective(x, centroids, assign)
    assign = assign.cpu()
    return assign, uniform_cluster_sampler(assign, n_samples, torch.Generator().manual_seed(seed)), objective


def train_step(model, v, y, optimizer, top_optimizer, scaler, autocast):
    """Step 2, one update (eq. 1): augmented images v (B, 3, S, S) and their pseudo-labels y (B,) -> one SGD step of
    the network (optimizer) and of the top layer (top_optimizer). Returns (loss, pseudo-label accuracy)."""
    with autocast():
        logits = model(v).float()  # (B, k); the loss is computed in fp32
    loss = deepcluster_loss(logits, y)
    optimizer.zero_grad(set_to_none=True)
    top_optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.step(top_optimizer)
    scaler.update()
    return loss.item(), (logits.argmax(1) == y).float().mean().item()


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
    data.train = training_subset(data.train, args.train_subset)
    resolve_defaults(args, data.num_classes, len(data.train))
    check_data_args(args, len(data.train))
    steps_per_epoch = args.samples_per_epoch // args.batch_size  # full batches
    has_labels = bool((data.train.labels >= 0).all())
    log.print(f"{data.name}: {len(data.train)} training images at {data.img_size}px, k-means into {args.k} clusters, "
              f"kNN on {len(data.memory)} labelled / {len(data.test)} test images, {data.num_classes} classes; device "
              f"{device} ({autocast.dtype or torch.float32}, {memory_format}), {world} process(es); run folder {out}")

    # --- model, optimizer ---
    bb_kwargs = common.backbone_kwargs(args, data.img_size)
    model = DeepCluster(common.build_backbone(args.backbone, **bb_kwargs), args.k)
    if world > 1:
        model = common.convert_sync_batchnorm(model, device)
    model = model.to(device, memory_format=memory_format)
    # the network's optimizer lives across epochs; the top layer gets a new one with each new clustering
    optimizer = torch.optim.SGD([p for p in model.encoder.parameters() if p.requires_grad], lr=args.lr,
                                momentum=args.momentum, weight_decay=args.weight_decay)
    start_epoch = common.restore(ckpt, rank, model=model, optimizer=optimizer, scaler=scaler)
    prev_assign = ckpt["assignments"] if ckpt else None
    train_model = common.compile_model(model, memory_format) if args.compile else model
    if world > 1:
        train_model = nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None)

    # --- training loop ---
    knn_top1, metrics, t_start = None, {}, time.time()
    for epoch in range(start_epoch, args.epochs):
        # 1. cluster, with this epoch's seed (the same on every rank); a new top layer for the new pseudo-classes
        t_epoch, seed = time.time(), args.seed * 100_003 + epoch
        assign, order, cluster_loss = cluster_step(model.encoder, data.train, args.k,
                                                   steps_per_epoch * args.batch_size, seed, args, device, autocast,
                                                   rank, world, log.print)
        sizes = torch.bincount(assign, minlength=args.k)
        log.print(f"epoch {epoch + 1}: k-means loss {cluster_loss:.4f}, cluster sizes {sizes.min()}..{sizes.max()} "
                  f"({time.time() - t_epoch:.0f}s for features + clustering)")
        model.reset_top_layer(torch.Generator().manual_seed(seed))
        top_optimizer = torch.optim.SGD(model.top_layer.parameters(), lr=args.lr, momentum=args.top_momentum,
                                        weight_decay=args.weight_decay)

        # 2. train on the pseudo-labels, each rank on its share of every batch
        model.train()
        batches = order.view(steps_per_epoch, world, -1)[:, rank]  # (steps, batch per rank)
        loader = torch.utils.data.DataLoader(  # Split reads a whole batch of indices at once
            data.train, batch_size=None, sampler=[b.tolist() for b in batches],
            num_workers=0 if data.img_size <= common.SMALL else args.workers, pin_memory=device.type == "cuda")
        sums = {"loss": 0.0, "acc": 0.0}
        for step, (x, _) in enumerate(loader):
            x = x.to(device, non_blocking=True)
            y = assign[batches[step]].to(device, non_blocking=True)  # pseudo-labels
            with torch.no_grad():  # augmented on the device
                v = deepcluster_augment(x, data.img_size, args.crop_min_scale).contiguous(memory_format=memory_format)
            loss, acc = train_step(train_model, v, y, optimizer, top_optimizer, scaler, autocast)
            sums["loss"] += loss
            sums["acc"] += acc
            log.step(epoch, step, steps_per_epoch, x.shape[0] * world, loss=loss, acc=acc)

        # --- end of epoch: kNN monitor, metrics, checkpoint ---
        metrics = {"epoch": epoch + 1, "loss": sums["loss"] / steps_per_epoch,
                   "pseudo_label_acc": sums["acc"] / steps_per_epoch, "clustering_loss": cluster_loss,
                   "nmi_prev": nmi(prev_assign, assign) if prev_assign is not None else None,
                   "nmi_labels": nmi(data.train.labels, assign) if has_labels else None,  # a monitor, never trained on
                   "min_cluster": int(sizes.min()), "max_cluster": int(sizes.max()),
                   "img_per_s": steps_per_epoch * args.batch_size / (time.time() - t_epoch)}
        prev_assign = assign
        if rank == 0 and common.knn_epoch(epoch, args):
            knn_top1 = metrics["knn_top1"] = common.knn_monitor(model.encoder, data, device, args.knn_k,
                                                                args.knn_temperature, autocast, args.workers)
        log.epoch(**metrics)
        common.save_training_checkpoint(
            os.path.join(out, "last.pt"), rank, world, method=METHOD, args=vars(args), epoch=epoch + 1,
            step=(epoch + 1) * steps_per_epoch, backbone={"name": args.backbone, "kwargs": bb_kwargs},
            encoder=model.encoder, model=model, optimizer=optimizer, scaler=scaler, img_size=data.img_size,
            data=args.data, metrics=metrics, assignments=assign, k=args.k)

    # --- summary ---
    wall = time.time() - t_start
    log.print(f"figure: python visualize.py deepcluster-nmi --run {out} --out {os.path.join(out, 'nmi.png')}")
    return common.finish(out, rank, world, log, {
        "method": METHOD, "data": args.data, "epochs": args.epochs, "k": args.k, "knn_top1": knn_top1,
        "nmi_prev": metrics.get("nmi_prev"), "nmi_labels": metrics.get("nmi_labels"),
        "img_per_s": log.images / wall if log.images else None, "wall_time_s": wall, "device": str(device),
        "precision": str(autocast.dtype or torch.float32), "world_size": world, "seed": args.seed,
        "checkpoint": os.path.join(out, "last.pt")})


if __name__ == "__main__":
    main()
