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

import torch

FOCUS_KINDS = ("minmax", "softmax")


def attended_mask(attn: torch.Tensor, gamma: float = 1.0, exclude_self: bool = False) -> torch.Tensor:
    """Attended sets S_i of Eq. 2: ``alpha_ij >= gamma * mean_j alpha_ij``.

    attn: (..., N, N) -> bool (..., N, N). The detection line uses the mean over *all* N
    key patches (self included) even when ``exclude_self`` drops j = i from S_i, so the
    line itself does not move with that option.
    """
    n = attn.shape[-1]
    # sum/N rather than mean(): the slow reference in the tests does the same, so ties at
    # the line are decided identically.
    line = gamma * (attn.sum(dim=-1, keepdim=True) / n)
    mask = attn >= line
    if exclude_self:
        eye = torch.eye(n, dtype=torch.bool, device=attn.device)
        mask = mask & ~eye
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
    t = counts.to(dtype)
    if weighted:
        num_w = t
        den_w = torch.where(t > 0, t, torch.ones_like(t))
    else:
        num_w = (t > 0).to(dtype)
        den_w = torch.ones_like(t)
    # One matmul for numerator and denominator: (..., N, N) @ (..., N, 2) -> (..., N, 2).
    nd = m @ torch.stack([num_w, den_w], dim=-1)
    num, den = nd[..., 0], nd[..., 1]
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


def row_entropy(attn: torch.Tensor, kind: str = "minmax") -> torch.Tensor:
    """Entropy (nats) of each query row, the per-row term of Eq. 5.

    attn: (..., N, N) -> (..., N).
    kind='minmax' (default): min-max normalise the row to [0, 1], renormalise to sum 1,
    Shannon entropy. The max cancels in the renormalisation, so q_j = (a_j - min) /
    sum_k (a_k - min); a constant row has no min-max normalisation and gives NaN.
    kind='softmax': entropy of the row renormalised to sum 1 (plain attention entropy).
    """
    if kind == "minmax":
        shifted = attn - attn.amin(dim=-1, keepdim=True)
    elif kind == "softmax":
        shifted = attn
    else:
        raise ValueError(f"focus kind must be one of {FOCUS_KINDS}, got {kind!r}")
    total = shifted.sum(dim=-1, keepdim=True)
    q = shifted / total
    ent = -torch.xlogy(q, q).sum(dim=-1)
    return torch.where(total.squeeze(-1) > 0, ent, torch.full_like(ent, float("nan")))


def focus_index(attn: torch.Tensor, kind: str = "minmax") -> tuple[torch.Tensor, torch.Tensor]:
    """Attention focus index of Eq. 5: mean row entropy, and the same divided by log N.

    attn: (..., N, N) -> (focus (...), focus_norm (...)). Lower = more focused. Rows with
    undefined entropy are skipped; NaN if every row is undefined.
    """
    ent = row_entropy(attn, kind)
    mean = _masked_nanmean(ent, torch.ones_like(ent, dtype=torch.bool))
    return mean, mean / math.log(attn.shape[-1])


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
