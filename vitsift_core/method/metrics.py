"""The paper's patch-interrelation metrics (Eq. 2-5 and the patch score s_i), DESIGN.md section 3.

``attn``: post-softmax attention of the patch block (prefix tokens removed), (..., N, N), rows =
query patch i, columns = key patch j; ``counts``: SIFT keypoints per patch, (..., N), broadcast
against attn's leading dims. Every metric is invariant to a per-row scale of attn; undefined is NaN.
"""
from __future__ import annotations

import math

import numpy as np
import torch

FOCUS_KINDS = ("minmax", "softmax")


def attended_mask(attn: torch.Tensor, gamma: float = 1.0, exclude_self: bool = False,
                  dtype: torch.dtype = torch.bool, out: torch.Tensor | None = None) -> torch.Tensor:
    """Attended sets S_i of Eq. 2: ``alpha_ij >= gamma * sum_j alpha_ij / N``.

    attn: (..., N, N) -> (..., N, N) of ``dtype`` (bool, or 0/1 floats written in one pass, into
    ``out`` when given). The line counts all N keys even when ``exclude_self`` drops j = i from S_i.
    """
    n = attn.shape[-1]
    line = gamma * (attn.sum(dim=-1, keepdim=True) / n)
    if dtype == torch.bool:
        mask = attn >= line
        if exclude_self:
            eye = torch.eye(n, dtype=torch.bool, device=attn.device)
            mask = mask & ~eye
        return mask
    mask = torch.empty(attn.shape, dtype=dtype, device=attn.device) if out is None else out
    torch.ge(attn, line, out=mask)
    if exclude_self:
        mask.diagonal(dim1=-2, dim2=-1).zero_()
    return mask


def theta_rows(attn: torch.Tensor, counts: torch.Tensor, gamma: float = 1.0, weighted: bool = True,
               exclude_self: bool = False) -> torch.Tensor:
    """theta_i of Eq. 3 for every query patch: attn (..., N, N), counts (..., N) -> (..., N) float32
    (float64 for float64 maps); NaN where S_i is empty (only with gamma > 1 or exclude_self).

    weighted:   sum_{j in S_i^Key} t_j / (|S_i^Non| + sum_{j in S_i^Key} t_j)
    unweighted: |S_i^Key| / |S_i|
    """
    return theta_from_mask(attended_mask(attn, gamma, exclude_self), counts, weighted,
                           torch.float64 if attn.dtype == torch.float64 else torch.float32)


def theta_from_mask(mask: torch.Tensor, counts: torch.Tensor, weighted: bool = True,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """theta_i from attended sets (so keypoint variants share one mask): mask (..., N, N) bool or
    0/1, counts (..., N) -> (..., N) in ``dtype``. Sums of integer counts: exact in float32."""
    m = mask.to(dtype)
    t = counts.to(dtype=dtype, device=m.device)
    if weighted:
        num_w = t
        den_w = torch.where(t > 0, t, torch.ones_like(t))
    else:
        num_w = (t > 0).to(dtype)
        den_w = torch.ones_like(t)
    # numerator and denominator in one (2, N) @ (N_j, N_i) matmul (faster on CPU than (N, N) @ (N, 2))
    w = torch.stack([num_w, den_w], dim=-2)                                  # (..., 2, N)
    if m.ndim == 4 and w.ndim == 4 and w.shape[1] == 1 and m.shape[0] == w.shape[0] and m.is_contiguous():
        # counts shared by the heads of each image: one (2, N) @ (N, H*N) product per image
        b, h, n_i, n_j = m.shape
        nd = (w[:, 0] @ m.reshape(b, h * n_i, n_j).transpose(1, 2)).reshape(b, 2, h, n_i)
        num, den = nd[:, 0], nd[:, 1]
    else:
        nd = w @ m.transpose(-1, -2)
        num, den = nd[..., 0, :], nd[..., 1, :]
    return torch.where(den > 0, num / den.clamp_min(1e-30), torch.full_like(num, float("nan")))


def _masked_nanmean(values: torch.Tensor, select: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over the last dim where ``select`` and not NaN; NaN if none."""
    ok = select & ~torch.isnan(values)
    n = ok.sum(dim=-1)
    s = torch.where(ok, values, torch.zeros_like(values)).sum(dim=-1)
    return torch.where(n > 0, s / n.clamp_min(1), torch.full_like(s, float("nan")))


def aggregate_theta(theta: torch.Tensor, counts: torch.Tensor) -> dict[str, torch.Tensor]:
    """Eq. 4: theta_KK / KN / NK / NN from theta (..., N) -> four (...) tensors.

    theta_KK (theta_NK) averages theta_i over keypoint (keypoint-free) query patches, NaN rows
    skipped; NaN when the image has no such patch."""
    key = (counts > 0).expand_as(theta)
    kk = _masked_nanmean(theta, key)
    nk = _masked_nanmean(theta, ~key)
    return {"theta_kk": kk, "theta_kn": 1.0 - kk, "theta_nk": nk, "theta_nn": 1.0 - nk}


def theta_chance(counts: torch.Tensor, weighted: bool = True) -> torch.Tensor:
    """theta_i with S_i = every patch, counts (..., N) -> (...): sum t / (#Non + sum t) weighted,
    #Key / N unweighted."""
    t = counts.to(torch.float32)
    key = t > 0
    if weighted:
        num = t.sum(dim=-1)
        den = num + (~key).sum(dim=-1).to(torch.float32)
    else:
        num = key.sum(dim=-1).to(torch.float32)
        den = torch.full_like(num, t.shape[-1])
    return num / den


def _log_(t: torch.Tensor) -> torch.Tensor:
    """In-place natural log; on CPU through NumPy (its SIMD log is ~3x faster than torch's there)."""
    if t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) and t.is_contiguous() \
            and not t.requires_grad:
        a = t.numpy()
        np.log(a, out=a)
        return t
    return t.log_()


def row_entropy(attn: torch.Tensor, kind: str = "minmax",
                work: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Entropy (nats) of each query row, the per-row term of Eq. 5: attn (..., N, N) -> (..., N).

    kind='minmax': q_j = (a_j - min) / sum_k (a_k - min) (min-max normalised, renormalised; a
    constant row gives NaN); 'softmax': the row renormalised to sum 1. ``work``: two scratch
    tensors of attn's shape and dtype."""
    if kind not in FOCUS_KINDS:
        raise ValueError(f"focus kind must be one of {FOCUS_KINDS}, got {kind!r}")
    w1, w2 = work if work is not None else (None, None)
    if kind == "minmax":
        shifted = torch.sub(attn, attn.amin(dim=-1, keepdim=True), out=w1) if w1 is not None else \
            attn - attn.amin(dim=-1, keepdim=True)
    else:
        shifted = attn
    total = shifted.sum(dim=-1)
    # -sum q log q = log(total) - sum s log s / total: one log pass, no division over the map;
    # s_j = 0 contributes 0 * log(tiny) = 0
    tiny = torch.finfo(shifted.dtype).tiny
    slogs = torch.clamp_min(shifted, tiny, out=w2) if w2 is not None else shifted.clamp_min(tiny)
    _log_(slogs)
    slogs.mul_(shifted)
    ent = torch.log(total) - slogs.sum(dim=-1) / total
    return torch.where(total > 0, ent, torch.full_like(ent, float("nan")))


def focus_index(attn: torch.Tensor, kind: str = "minmax",
                work: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 5: attn (..., N, N) -> (mean row entropy (...), the same / log N); lower = more focused.
    Undefined rows are skipped (NaN if all are). ``work``: see :func:`row_entropy`."""
    return focus_from_rows(row_entropy(attn, kind, work))


def focus_from_rows(ent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`focus_index` from the row entropies (..., N) of :func:`row_entropy` -> (...)."""
    mean = _masked_nanmean(ent, torch.ones_like(ent, dtype=torch.bool))
    return mean, mean / math.log(ent.shape[-1])


def head_metrics(attn: torch.Tensor, counts: torch.Tensor, gamma: float = 1.0, weighted: bool = True,
                 exclude_self: bool = False, focus_kind: str = "minmax") -> dict[str, torch.Tensor]:
    """All per-head metrics of one layer: attn (B, H, N, N), counts (B, N) -> (B, H) float32 tensors
    theta_kk, theta_kn, theta_nk, theta_nn, theta_chance, focus, focus_norm (float32 for any attn)."""
    attn = attn.float()
    b, h = attn.shape[:2]
    c = counts.reshape(b, 1, -1)
    theta = theta_rows(attn, c, gamma=gamma, weighted=weighted, exclude_self=exclude_self)
    out = aggregate_theta(theta, c)
    out["theta_chance"] = theta_chance(counts.reshape(b, -1), weighted=weighted)[:, None].expand(b, h)
    out["focus"], out["focus_norm"] = focus_index(attn, focus_kind)
    return out


def patch_scores(attn: torch.Tensor, counts: torch.Tensor, gamma: float = 1.0,
                 weighted: bool = True, exclude_self: bool = False) -> torch.Tensor:
    """Patch score s_i (Sec 5.1): theta_i averaged over heads, NaN-skipping. attn (B, H, N, N),
    counts (B, N) -> (B, N); NaN only where theta_i is NaN in every head."""
    b = attn.shape[0]
    theta = theta_rows(attn.float(), counts.reshape(b, 1, -1), gamma, weighted, exclude_self)
    return _masked_nanmean(theta.transpose(1, 2), torch.ones_like(theta.transpose(1, 2), dtype=torch.bool))
