"""The study's statistics: one bootstrap over images (percentile CIs, paired differences), the exact
McNemar test, and Student-t intervals over seeds. Row b of :func:`resamples` is the b-th draw of
``default_rng(seed).integers(0, n, n)``, so every caller resamples the same images.
"""
from __future__ import annotations

import math
from typing import Iterator

import numpy as np
from scipy import stats


# ----------------------------------------------------------------------------- the bootstrap
def resamples(n: int, n_boot: int, seed: int = 0) -> Iterator[np.ndarray]:
    """The one bootstrap draw: ``n_boot`` rows of ``n`` indices (int64) drawn with replacement.

    Row by row from ``np.random.default_rng(seed)``: the same numbers as one (n_boot, n) draw."""
    rng = np.random.default_rng(seed)
    for _ in range(n_boot):
        yield rng.integers(0, n, n)


def bootstrap_ci(values, n_boot: int = 2000, seed: int = 0, stat=np.nanmean,
                 level: float = 0.95) -> tuple[float, float, float]:
    """(statistic, low, high): percentile bootstrap over the first axis (images).

    values: (n,) or (n, ...); rows are resampled together (all-NaN rows dropped first) and
    ``stat(rows, axis=0)`` reduces them."""
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v).reshape(len(v), -1).all(axis=1)]
    if len(v) == 0:
        return float("nan"), float("nan"), float("nan")
    boots = np.array([stat(v[i], axis=0) for i in resamples(len(v), n_boot, seed)])
    a = (1 - level) / 2
    return float(stat(v, axis=0)), float(np.nanquantile(boots, a)), float(np.nanquantile(boots, 1 - a))


def bootstrap_weights(n: int, n_boot: int = 2000, seed: int = 0) -> np.ndarray:
    """(n_boot, n) float32: how often each image is drawn in each :func:`resamples` row."""
    w = np.empty((n_boot, n), dtype=np.float32)
    for b, idx in enumerate(resamples(n, n_boot, seed)):
        w[b] = np.bincount(idx, minlength=n)
    return w


def bootstrap_means(values: np.ndarray, weights: np.ndarray,
                    level: float = 0.95) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """values (n, K) per image -> (mean (K,), low (K,), high (K,)): percentile bootstrap of the
    column means, the resamples given as :func:`bootstrap_weights` (one matmul for all columns)."""
    v = np.asarray(values, dtype=np.float64).reshape(values.shape[0], -1)
    boot = (weights.astype(np.float64) @ v) / v.shape[0]                 # (n_boot, K)
    a = (1 - level) / 2
    return v.mean(0), np.quantile(boot, a, axis=0), np.quantile(boot, 1 - a, axis=0)


def mcnemar_p(gain: int, loss: int) -> float:
    """Exact two-sided McNemar p on the discordant pairs (1 when there are none)."""
    return 1.0 if gain + loss == 0 else float(stats.binomtest(min(gain, loss), gain + loss, 0.5).pvalue)


def paired_bootstrap(d: np.ndarray, weights: np.ndarray) -> list[dict]:
    """d (n, K) per-image differences in {-1, 0, 1} -> per column: diff and its bootstrap CI in
    percentage points, images gained (d > 0) and lost (d < 0), and :func:`mcnemar_p` on those."""
    mean, lo, hi = bootstrap_means(d, weights)
    out = []
    for i in range(d.shape[1]):
        gain, loss = int((d[:, i] > 0).sum()), int((d[:, i] < 0).sum())
        out.append({"diff": 100 * mean[i], "ci_low": 100 * lo[i], "ci_high": 100 * hi[i],
                    "gain": gain, "loss": loss, "p_mcnemar": mcnemar_p(gain, loss)})
    return out


def mean_ci(values, level: float = 0.95) -> tuple[float, float, float, int]:
    """``(mean, low, high, n)``: Student-t interval over the finite values (NaN if n < 2)."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    n = len(v)
    if n == 0:
        return float("nan"), float("nan"), float("nan"), 0
    m = float(v.mean())
    if n < 2:
        return m, float("nan"), float("nan"), n
    half = float(stats.t.ppf(0.5 + level / 2, n - 1) * v.std(ddof=1) / math.sqrt(n))
    return m, m - half, m + half, n
