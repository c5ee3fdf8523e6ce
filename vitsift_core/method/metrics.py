"""The paper's metrics (Eq. 2-5, patch score s_i; DESIGN.md section 3). ``attn``: (..., N, N) patch
block, rows = query i; ``counts``: keypoints per patch (..., N). Undefined values are NaN.
"""
from __future__ import annotations

import math
import os
import time

import numpy as np
import torch

FOCUS_KINDS = ("minmax", "softmax")


def attended_mask(attn: torch.Tensor, gamma: float = 1.0, exclude_self: bool = False,
                  dtype: torch.dtype = torch.bool, out: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 2, ``alpha_ij >= gamma * sum_j alpha_ij / N``: attn (..., N, N) -> (..., N, N) ``dtype``
    (bool or 0/1 floats, into ``out``). The line counts all N keys even with ``exclude_self``."""
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
    """Eq. 3: attn (..., N, N), counts (..., N) -> theta_i (..., N) float32 (float64 for float64 maps)."""
    return theta_from_mask(attended_mask(attn, gamma, exclude_self), counts, weighted,
                           torch.float64 if attn.dtype == torch.float64 else torch.float32)


def theta_weights(counts: torch.Tensor, weighted: bool = True,
                  dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 3's per-key weights: counts (..., N) -> (numerator, denominator) weights, each (..., N):
    (t_j, max(t_j, 1)) weighted, (1[t_j > 0], 1) unweighted; theta_i = sum over S_i of the first / of the second."""
    t = counts.to(dtype)
    if weighted:
        return t, torch.where(t > 0, t, torch.ones_like(t))
    return (t > 0).to(dtype), torch.ones_like(t)


def theta_from_mask(mask: torch.Tensor, counts: torch.Tensor, weighted: bool = True,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """theta_i from attended sets mask (..., N, N) and counts (..., N) -> (..., N); NaN if S_i is empty."""
    m = mask.to(dtype)
    num_w, den_w = theta_weights(counts.to(device=m.device), weighted, dtype)
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
    """Eq. 4: theta (..., N) -> theta_kk/kn/nk/nn (...), NaN-skipping means over (non-)keypoint queries."""
    key = (counts > 0).expand_as(theta)
    kk = _masked_nanmean(theta, key)
    nk = _masked_nanmean(theta, ~key)
    return {"theta_kk": kk, "theta_kn": 1.0 - kk, "theta_nk": nk, "theta_nn": 1.0 - nk}


def theta_chance(counts: torch.Tensor, weighted: bool = True) -> torch.Tensor:
    """theta_i with S_i = every patch: counts (..., N) -> (...)."""
    t = counts.to(torch.float32)
    key = t > 0
    if weighted:
        num = t.sum(dim=-1)
        den = num + (~key).sum(dim=-1).to(torch.float32)
    else:
        num = key.sum(dim=-1).to(torch.float32)
        den = torch.full_like(num, t.shape[-1])
    return num / den


_CPU_LOG: dict[torch.dtype, str] = {}      # dtype -> "numpy" or "torch", chosen once per process
CPU_LOGS = ("numpy", "torch")


def cpu_log_backend(dtype: torch.dtype = torch.float32) -> str:
    """Which natural log is faster on this CPU for ``dtype``: NumPy's or torch's, timed once per
    process (~1 ms); VITSIFT_CPU_LOG=numpy|torch fixes it. NumPy's AVX-512 log is ~3x torch's, but
    where NumPy has no SIMD log for the CPU (AVX2 only) it is ~2x slower than torch's (issue 17,
    benchmarks/README.md). Both give the same values to float rounding (<= 1e-6 in focus)."""
    env = os.environ.get("VITSIFT_CPU_LOG", "").strip().lower()
    if env:
        if env not in CPU_LOGS:
            raise ValueError(f"VITSIFT_CPU_LOG must be one of {CPU_LOGS}, got {env!r}")
        return env
    if dtype not in _CPU_LOG:
        x = torch.linspace(0.5, 1.5, 1 << 15, dtype=dtype)     # not torch.rand: leave the global RNG alone
        y = torch.empty_like(x)
        best = {"numpy": float("inf"), "torch": float("inf")}
        for _ in range(5):                      # interleaved, best of 5: robust to a busy machine
            for name in CPU_LOGS:
                t0 = time.perf_counter()
                np.log(x.numpy(), out=y.numpy()) if name == "numpy" else torch.log(x, out=y)
                best[name] = min(best[name], time.perf_counter() - t0)
        _CPU_LOG[dtype] = min(best, key=best.get)
    return _CPU_LOG[dtype]


def _xlogx_sums(s: torch.Tensor, work: torch.Tensor | None) -> torch.Tensor:
    """sum_j s_j log s_j over the last dim of s (..., N) >= 0 -> (...), with 0 log 0 = 0; ``work``:
    scratch like s. One pass per step, no clamp: on CPU the faster log (:func:`cpu_log_backend`)
    gives -inf at s_j = 0, the product NaN, and ``nansum`` drops it; elsewhere (CUDA)
    ``torch.special.xlogy`` is one fused kernel (on CPU it is not vectorised: > 20x slower)."""
    if s.device.type == "cpu" and s.dtype in (torch.float32, torch.float64) and not s.requires_grad:
        out = torch.empty(s.shape, dtype=s.dtype) if work is None else work
        if cpu_log_backend(s.dtype) == "numpy":
            with np.errstate(divide="ignore", invalid="ignore"):
                np.log(s.numpy(), out=out.numpy())
        else:
            torch.log(s, out=out)
        out.mul_(s)                                   # s_j = 0: 0 * -inf = NaN, skipped below
        return torch.nansum(out, dim=-1)
    return torch.special.xlogy(s, s, out=work).sum(dim=-1) if work is not None else \
        torch.special.xlogy(s, s).sum(dim=-1)


def row_entropy(attn: torch.Tensor, kind: str = "minmax",
                work: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Row entropy (nats) of Eq. 5, attn (..., N, N) -> (..., N); rows min-max shifted ('minmax')
    or as is ('softmax'), renormalised (NaN where a row sums to 0). ``work``: two scratch tensors
    like attn. Passes over the block: min, shift, sum, log, product, sum (minmax)."""
    if kind not in FOCUS_KINDS:
        raise ValueError(f"focus kind must be one of {FOCUS_KINDS}, got {kind!r}")
    w1, w2 = work if work is not None else (None, None)
    if kind == "minmax":
        shifted = torch.sub(attn, attn.amin(dim=-1, keepdim=True), out=w1) if w1 is not None else \
            attn - attn.amin(dim=-1, keepdim=True)
    else:
        shifted = attn
    total = shifted.sum(dim=-1)
    # -sum q log q with q = s / Z: log Z - sum s log s / Z, one pass for s log s
    ent = torch.log(total) - _xlogx_sums(shifted, w2) / total
    return torch.where(total > 0, ent, torch.full_like(ent, float("nan")))


def focus_index(attn: torch.Tensor, kind: str = "minmax",
                work: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 5: attn (..., N, N) -> (mean row entropy, the same / log N), each (...)."""
    return focus_from_rows(row_entropy(attn, kind, work))


def focus_from_rows(ent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`focus_index` from row entropies (..., N)."""
    mean = _masked_nanmean(ent, torch.ones_like(ent, dtype=torch.bool))
    return mean, mean / math.log(ent.shape[-1])


def head_metrics(attn: torch.Tensor, counts: torch.Tensor, gamma: float = 1.0, weighted: bool = True,
                 exclude_self: bool = False, focus_kind: str = "minmax") -> dict[str, torch.Tensor]:
    """attn (B, H, N, N), counts (B, N) -> (B, H) float32: theta_kk/kn/nk/nn/chance, focus, focus_norm."""
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
    """Patch score s_i (Sec 5.1), head-mean theta_i: attn (B, H, N, N), counts (B, N) -> (B, N)."""
    b = attn.shape[0]
    theta = theta_rows(attn.float(), counts.reshape(b, 1, -1), gamma, weighted, exclude_self).transpose(1, 2)
    return _masked_nanmean(theta, torch.ones_like(theta, dtype=torch.bool))
