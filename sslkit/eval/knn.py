"""Weighted k-nearest-neighbour classification on frozen features (DINO eval_knn).

Features are L2-normalised; each query takes its k most cosine-similar training samples, and each
neighbour votes for its class with weight exp(similarity / T), T = 0.07. Classes are ranked by their
summed votes; top-1 and top-5 accuracy follow from that ranking.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .defaults import DEFAULT_KS, DEFAULT_TEMPERATURE


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[int, float]:
    """Fraction of rows whose label is among the k highest scores, for each k (clipped to the number
    of classes; ties broken towards the lower class id, as argmax does)."""
    out = {}
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    hits = order == labels.view(-1, 1)
    for k in ks:
        out[k] = hits[:, :min(k, scores.shape[1])].any(dim=1).float().mean().item()
    return out


def knn_scores(train_x: torch.Tensor, train_y: torch.Tensor, query_x: torch.Tensor, num_classes: int,
               ks=DEFAULT_KS, temperature: float = DEFAULT_TEMPERATURE, device="cpu",
               max_elements: int = 1 << 27) -> dict[int, torch.Tensor]:
    """Per-class vote scores [Nq, num_classes] (on the CPU) of every query for each k in `ks` (k above
    the number of training samples is clipped to it). Neighbours are found once, for the largest k,
    on `device`, with query chunks of at most `max_elements` similarities (512 MB)."""
    train = F.normalize(train_x.to(device, torch.float32), dim=1)
    labels = train_y.to(device)
    kmax = min(max(ks), train.shape[0])
    chunk = max(1, min(4096, max_elements // train.shape[0]))
    out = {k: [] for k in ks}
    for lo in range(0, query_x.shape[0], chunk):
        query = F.normalize(query_x[lo:lo + chunk].to(device, torch.float32), dim=1)
        sims, idx = (query @ train.t()).topk(kmax, dim=1)   # sorted, most similar first
        weights = (sims / temperature).exp()
        votes = labels[idx]
        for k in ks:
            kk = min(k, kmax)
            scores = torch.zeros(votes.shape[0], num_classes, dtype=weights.dtype, device=device)
            out[k].append(scores.scatter_add_(1, votes[:, :kk], weights[:, :kk]).cpu())
    return {k: torch.cat(v) for k, v in out.items()}


def knn_eval(train_x, train_y, val_x, val_y, num_classes: int, ks=DEFAULT_KS,
             temperature: float = DEFAULT_TEMPERATURE, device="cpu") -> dict:
    """{"top1": {k: acc}, "top5": {k: acc}, "best_k": k with the best top-1, "temperature": T}
    (k as strings, JSON keys)."""
    scores = knn_scores(train_x, train_y, val_x, num_classes, ks, temperature, device)
    top1, top5 = {}, {}
    for k, s in scores.items():
        acc = topk_accuracy(s, val_y)
        top1[str(k)], top5[str(k)] = acc[1], acc[5]
    best = max(top1, key=top1.get)
    return {"top1": top1, "top5": top5, "best_k": int(best), "temperature": temperature}
