"""Judge a learned representation: weighted kNN (InstDisc / MoCo monitor).

    python knn_eval.py --ckpt runs/simclr-cifar10/last.pt
"""
import torch
import torch.nn.functional as F

from common import extract_features


@torch.no_grad()
def knn_scores(train_feats, train_labels, test_feats, num_classes, k=200, temperature=0.1, chunk=1024):
    """Class scores (Nq, C) of the weighted kNN: cosine similarity s on L2-normalised features, the k most similar
    training images vote for their class with weight exp(s / temperature) (Wu et al. 2018). Runs in chunks of
    `chunk` queries on the features' device, so 50,000 x 10,000 fits in memory."""
    train = F.normalize(train_feats.float(), dim=1)  # (Nt, D)
    k = min(k, train.shape[0])
    scores = []
    for q in F.normalize(test_feats.float(), dim=1).split(chunk):  # q: (B, D)
        sim, idx = (q @ train.T).topk(k, dim=1)  # (B, k)
        votes = torch.zeros(q.shape[0], num_classes, device=q.device)
        votes.scatter_add_(1, train_labels[idx], (sim / temperature).exp())
        scores.append(votes)
    return torch.cat(scores)


def knn_predict(train_feats, train_labels, test_feats, num_classes, k=200, temperature=0.1):
    """Predicted labels (Nq,) of the weighted kNN classifier (see knn_scores)."""
    return knn_scores(train_feats, train_labels, test_feats, num_classes, k, temperature).argmax(1)


def knn_monitor(encoder, data, device, k=200, temperature=0.1, autocast=None, workers=0):
    """Top-1 (%) of the weighted kNN: memory bank = labelled training split, queries = test split."""
    train = extract_features(encoder, data.memory, device, autocast=autocast, workers=workers)
    test = extract_features(encoder, data.test, device, autocast=autocast, workers=workers)
    pred = knn_predict(train, data.memory.labels.to(device), test, data.num_classes, k, temperature)
    return (pred.cpu() == data.test.labels).float().mean().item() * 100
