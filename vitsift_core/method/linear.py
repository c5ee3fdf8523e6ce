"""Encoder features evaluated: cosine k-NN (DINO's exp(cos / 0.07) votes) and the one logistic fit."""
from __future__ import annotations

import torch

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


def fit_logistic(x: torch.Tensor, y: torch.Tensor, n_classes: int, weight_decay: float, max_iter: int,
                 init_std: float = 0.0, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Multinomial logistic regression on standardised x (n, D) float64, y (n,): full-batch L-BFGS
    from W = init_std * N(0, 1) (0: zeros) -> (w (C, D), b (C,), mu (D,), sd (D,))."""
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mu) / sd
    if init_std:
        g = torch.Generator().manual_seed(seed)
        w = init_std * torch.randn(n_classes, x.shape[1], generator=g, dtype=torch.float64)
    else:
        w = torch.zeros(n_classes, x.shape[1], dtype=torch.float64)
    w.requires_grad_()
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=int(max_iter), history_size=20, tolerance_grad=1e-9,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z @ w.T + b, y) + weight_decay * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach(), mu, sd


def linear_probe(train_feats, train_labels, val_feats, val_labels, n_classes: int,
                 weight_decay: float = 1e-4, max_iter: int = 200) -> dict:
    """:func:`fit_logistic` (zeros start) on train features; ``{'train_acc', 'val_acc'}`` (fractions)."""
    xtr = torch.as_tensor(train_feats).double()
    ytr = torch.as_tensor(train_labels).long()
    w, b, mu, sd = fit_logistic(xtr, ytr, n_classes, weight_decay, max_iter)

    def acc(x, y):
        y = torch.as_tensor(y).long()
        z = (torch.as_tensor(x).double() - mu) / sd
        return float(((z @ w.T + b).argmax(1) == y).double().mean()) if len(y) else float("nan")

    return {"train_acc": acc(train_feats, train_labels), "val_acc": acc(val_feats, val_labels)}
