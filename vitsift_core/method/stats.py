"""The study's statistics: one bootstrap over images, paired differences with McNemar, t intervals."""
from __future__ import annotations

import math
from typing import Iterator

import numpy as np
from scipy import stats


def resamples(n: int, n_boot: int, seed: int = 0) -> Iterator[np.ndarray]:
    """The one bootstrap draw: ``n_boot`` rows of ``n`` indices from ``default_rng(seed)``."""
    rng = np.random.default_rng(seed)
    for _ in range(n_boot):
        yield rng.integers(0, n, n)


def bootstrap_ci(values, n_boot: int = 2000, seed: int = 0, stat=np.nanmean,
                 level: float = 0.95) -> tuple[float, float, float]:
    """(statistic, low, high): percentile bootstrap of ``stat(rows, axis=0)``, values (n, ...);
    all-NaN rows dropped."""
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
    """values (n, K) -> (mean, low, high), each (K,): percentile bootstrap of column means."""
    v = np.asarray(values, dtype=np.float64).reshape(values.shape[0], -1)
    boot = (weights.astype(np.float64) @ v) / v.shape[0]                 # (n_boot, K)
    a = (1 - level) / 2
    return v.mean(0), np.quantile(boot, a, axis=0), np.quantile(boot, 1 - a, axis=0)


def paired_bootstrap(d: np.ndarray, weights: np.ndarray) -> list[dict]:
    """d (n, K) per-image differences in {-1, 0, 1} -> per column: diff and CI in points, images
    gained / lost, exact two-sided McNemar p on those (1 without any)."""
    mean, lo, hi = bootstrap_means(d, weights)
    out = []
    for i in range(d.shape[1]):
        gain, loss = int((d[:, i] > 0).sum()), int((d[:, i] < 0).sum())
        p = 1.0 if gain + loss == 0 else float(stats.binomtest(min(gain, loss), gain + loss, 0.5).pvalue)
        out.append({"diff": 100 * mean[i], "ci_low": 100 * lo[i], "ci_high": 100 * hi[i],
                    "gain": gain, "loss": loss, "p_mcnemar": p})
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
