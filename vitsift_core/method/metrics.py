"""The paper's patch-interrelation metrics, as DESIGN.md section 3 reads them.

Shapes: ``attn`` is post-softmax attention of the *patch block* (prefix tokens already
removed), ``(..., N, N)`` with rows = query patch i, columns = key patch j. ``counts`` are
SIFT keypoint counts per patch, ``(..., N)``, broadcastable against ``attn``'s leading dims
(e.g. attn ``(B, H, N, N)`` with counts ``(B, 1, N)``).

Every metric here is invariant to a per-row scale of ``attn`` (rows of the patch block sum
to < 1 once the prefix columns are dropped), and every undefined value is NaN, never 0.
"""
from __future__ import annotations

import math

import numpy as np
import torch

FOCUS_KINDS = ("minmax", "softmax")


def attended_mask(attn: torch.Tensor, gamma: float = 1.0, exclude_self: bool = False,
                  dtype: torch.dtype = torch.bool, out: torch.Tensor | None = None) -> torch.Tensor:
    """Attended sets S_i of Eq. 2: ``alpha_ij >= gamma * mean_j alpha_ij``.

    attn: (..., N, N) -> (..., N, N) of ``dtype``: bool by default; a floating dtype gives the
    same sets as 0/1 values, written by one comparison pass (what :func:`theta_from_mask`
    multiplies with, so the analysis path skips a bool -> float conversion). The detection line
    uses the mean over *all* N key patches (self included) even when ``exclude_self`` drops
    j = i from S_i, so the line itself does not move with that option. ``out``: a tensor of
    attn's shape and ``dtype`` to write the float mask into (saves an allocation per call).
    """
    n = attn.shape[-1]
    # sum/N rather than mean(): the slow reference in the tests does the same, so ties at
    # the line are decided identically.
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


def theta_rows(
    attn: torch.Tensor,
    counts: torch.Tensor,
    gamma: float = 1.0,
    weighted: bool = True,
    exclude_self: bool = False,
) -> torch.Tensor:
    """theta_i of Eq. 3 for every query patch.

    attn: (..., N, N); counts: (..., N) keypoints per key patch (broadcast over the
    leading dims of attn). Returns (..., N) float32; NaN where S_i is empty (possible
    only with gamma > 1 or exclude_self).

    weighted:   sum_{j in S_i^Key} t_j / (|S_i^Non| + sum_{j in S_i^Key} t_j)
    unweighted: |S_i^Key| / |S_i|
    """
    return theta_from_mask(attended_mask(attn, gamma, exclude_self), counts, weighted,
                           torch.float64 if attn.dtype == torch.float64 else torch.float32)


def theta_from_mask(mask: torch.Tensor, counts: torch.Tensor, weighted: bool = True,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """theta_i from precomputed attended sets. mask: (..., N, N) bool; counts: (..., N) -> (..., N).

    Split from :func:`theta_rows` so several keypoint variants can share one mask.
    float64 keeps reference comparisons exact; float32 is plenty for counts (integers).
    """
    m = mask.to(dtype)
    t = counts.to(dtype=dtype, device=m.device)
    if weighted:
        num_w = t
        den_w = torch.where(t > 0, t, torch.ones_like(t))
    else:
        num_w = (t > 0).to(dtype)
        den_w = torch.ones_like(t)
    # One matmul for numerator and denominator, in the (2, N) @ (N, N)^T orientation:
    # (..., 2, N) @ (..., N_j, N_i) -> (..., 2, N_i). CPU BLAS is several times faster this way
    # round than (N, N) @ (N, 2). The sums are of integers, hence exact in any order.
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
    """Eq. 4: theta_KK / KN / NK / NN from per-query theta_i.

    theta: (..., N); counts: (..., N) (broadcastable). Returns four (...) tensors.
    theta_KK averages theta_i over keypoint query patches (t_i > 0), theta_NK over the
    others. NaN when the image has no keypoint (resp. no non-keypoint) patch; query rows
    whose theta_i is NaN are skipped.
    """
    key = (counts > 0).expand_as(theta)
    kk = _masked_nanmean(theta, key)
    nk = _masked_nanmean(theta, ~key)
    return {"theta_kk": kk, "theta_kn": 1.0 - kk, "theta_nk": nk, "theta_nn": 1.0 - nk}


def theta_chance(counts: torch.Tensor, weighted: bool = True) -> torch.Tensor:
    """theta_i with S_i = all patches: the value a head attending to everything would get.

    counts: (..., N) -> (...). Weighted: sum_Key t / (#Non + sum_Key t); unweighted: #Key / N.
    """
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
    """In-place natural log. On CPU through NumPy, whose SIMD log is about 3x faster than
    torch's there (within 2 ulp); the log of every map entry is the focus index's largest cost."""
    if t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) and t.is_contiguous() \
            and not t.requires_grad:
        a = t.numpy()
        np.log(a, out=a)
        return t
    return t.log_()


def row_entropy(attn: torch.Tensor, kind: str = "minmax",
                work: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Entropy (nats) of each query row, the per-row term of Eq. 5.

    attn: (..., N, N) -> (..., N).
    kind='minmax' (default): min-max normalise the row to [0, 1], renormalise to sum 1,
    Shannon entropy. The max cancels in the renormalisation, so q_j = (a_j - min) /
    sum_k (a_k - min); a constant row has no min-max normalisation and gives NaN.
    kind='softmax': entropy of the row renormalised to sum 1 (plain attention entropy).
    ``work``: two float tensors of attn's shape and dtype to compute in (saves allocations).
    """
    if kind not in FOCUS_KINDS:
        raise ValueError(f"focus kind must be one of {FOCUS_KINDS}, got {kind!r}")
    w1, w2 = work if work is not None else (None, None)
    if kind == "minmax":
        shifted = torch.sub(attn, attn.amin(dim=-1, keepdim=True), out=w1) if w1 is not None else \
            attn - attn.amin(dim=-1, keepdim=True)
    else:
        shifted = attn
    total = shifted.sum(dim=-1)
    # -sum_j q_j log q_j with q = s / total equals log(total) - sum_j s_j log s_j / total: one
    # log pass and no division pass over the N x N map (xlogy is several times slower than
    # log on CPU). s_j = 0 contributes 0 (0 * log(tiny)), as in xlogy.
    tiny = torch.finfo(shifted.dtype).tiny
    slogs = torch.clamp_min(shifted, tiny, out=w2) if w2 is not None else shifted.clamp_min(tiny)
    _log_(slogs)
    slogs.mul_(shifted)
    ent = torch.log(total) - slogs.sum(dim=-1) / total
    return torch.where(total > 0, ent, torch.full_like(ent, float("nan")))


def focus_index(attn: torch.Tensor, kind: str = "minmax",
                work: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention focus index of Eq. 5: mean row entropy, and the same divided by log N.

    attn: (..., N, N) -> (focus (...), focus_norm (...)). Lower = more focused. Rows with
    undefined entropy are skipped; NaN if every row is undefined. ``work``: see :func:`row_entropy`.
    """
    return focus_from_rows(row_entropy(attn, kind, work))


def focus_from_rows(ent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`focus_index` from the row entropies (..., N) of :func:`row_entropy` -> (...)."""
    mean = _masked_nanmean(ent, torch.ones_like(ent, dtype=torch.bool))
    return mean, mean / math.log(ent.shape[-1])


def head_metrics(
    attn: torch.Tensor,
    counts: torch.Tensor,
    gamma: float = 1.0,
    weighted: bool = True,
    exclude_self: bool = False,
    focus_kind: str = "minmax",
) -> dict[str, torch.Tensor]:
    """All per-head metrics for one layer.

    attn: (B, H, N, N) patch-block attention; counts: (B, N). Returns a dict of (B, H)
    float32 tensors: theta_kk, theta_kn, theta_nk, theta_nn, theta_chance, focus,
    focus_norm. Computed in float32 whatever attn's dtype (bf16 forward passes included).
    """
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
    """Per-patch score s_i for masking (Sec 5.1): theta_i averaged over heads (NaN-skipping).

    attn: (B, H, N, N); counts: (B, N) -> (B, N). NaN only where theta_i is NaN in every head.
    """
    b = attn.shape[0]
    theta = theta_rows(attn.float(), counts.reshape(b, 1, -1), gamma, weighted, exclude_self)
    return _masked_nanmean(theta.transpose(1, 2), torch.ones_like(theta.transpose(1, 2), dtype=torch.bool))
