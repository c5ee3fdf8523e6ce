"""Label-free evaluation of an encoder's features: k-NN accuracy and a linear probe.

DESIGN.md section 3, "Convergence": k-NN with k = 20 and cosine similarity on the encoder's CLS
features, the train split as memory and the val split as queries, after every epoch; a linear probe
at the end. Votes are weighted by ``exp(cos / T)`` (T = 0.07, as in DINO's k-NN evaluation;
``temperature=None`` gives a plain majority vote, ties to the lowest class index).

The linear probe is multinomial logistic regression on standardised features (train mean / std),
fitted full-batch with L-BFGS and a small L2 penalty: deterministic and seconds on a CPU for
the data sizes here (MAE's own probe uses BatchNorm + linear + LARS for 90 epochs; the standardised
input plays the BatchNorm's part).
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["knn_predict", "knn_accuracy", "linear_probe"]


def knn_predict(train_feats: torch.Tensor, train_labels: torch.Tensor, query_feats: torch.Tensor,
                n_classes: int, k: int = 20, temperature: float | None = 0.07,
                chunk: int = 1024) -> torch.Tensor:
    """Predicted class for each query, (Q,) int64. Features are L2-normalised here."""
    tr = torch.nn.functional.normalize(train_feats.float(), dim=1)
    q = torch.nn.functional.normalize(query_feats.float(), dim=1)
    labels = train_labels.long()
    k = min(int(k), tr.shape[0])
    out = []
    for s in range(0, q.shape[0], chunk):
        sim = q[s:s + chunk] @ tr.T                                  # (q, n)
        top_sim, top_idx = sim.topk(k, dim=1)                        # ties: lowest index first
        votes = torch.zeros(sim.shape[0], n_classes)
        w = torch.ones_like(top_sim) if temperature is None else (top_sim / float(temperature)).exp()
        votes.scatter_add_(1, labels[top_idx], w)
        out.append(votes.argmax(1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def knn_accuracy(train_feats, train_labels, query_feats, query_labels, n_classes: int, k: int = 20,
                 temperature: float | None = 0.07) -> float:
    """Top-1 accuracy (fraction, 0..1) of :func:`knn_predict`."""
    pred = knn_predict(torch.as_tensor(train_feats), torch.as_tensor(train_labels),
                       torch.as_tensor(query_feats), n_classes, k, temperature)
    return float((pred == torch.as_tensor(query_labels).long()).double().mean())


def linear_probe(train_feats, train_labels, val_feats, val_labels, n_classes: int,
                 weight_decay: float = 1e-4, max_iter: int = 200) -> dict:
    """Fit logistic regression on train features; ``{'train_acc', 'val_acc'}`` (fractions)."""
    xtr = torch.as_tensor(train_feats).double()
    xva = torch.as_tensor(val_feats).double()
    ytr = torch.as_tensor(train_labels).long()
    yva = torch.as_tensor(val_labels).long()
    mu, sd = xtr.mean(0), xtr.std(0).clamp_min(1e-6)
    xtr, xva = (xtr - mu) / sd, (xva - mu) / sd
    w = torch.zeros(xtr.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=int(max_iter), history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xtr @ w + b, ytr) + weight_decay * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        acc = lambda x, y: float(((x @ w + b).argmax(1) == y).double().mean()) if len(y) else float("nan")
        return {"train_acc": acc(xtr, ytr), "val_acc": acc(xva, yva)}
