"""Resampling statistics (one bootstrap, paired differences, McNemar) and the convergence
comparison of random- vs guided-mask MAE pre-training (paper Fig. 9, DESIGN.md "Convergence").

The bootstrap resamples images: row b of :func:`resamples` is the b-th draw of
``default_rng(seed).integers(0, n, n)``. A guided run that never reaches the threshold counts as
``epochs + 1`` (censored, a lower bound); see DESIGN.md.
"""
from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import pandas as pd
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


# ----------------------------------------------------------------------------- convergence


def epochs_to_threshold(acc, threshold: float, epochs=None) -> int | None:
    """First epoch (the ``epochs`` label, default 1-based position) with ``acc >= threshold``."""
    acc = np.asarray(acc, dtype=float)
    ep = np.arange(1, len(acc) + 1) if epochs is None else np.asarray(epochs)
    hit = np.flatnonzero(acc >= threshold - 1e-12)
    return int(ep[hit[0]]) if len(hit) else None


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


def curves(runs: dict[tuple[str, int], pd.DataFrame]) -> pd.DataFrame:
    """Long table of every run's metrics: mask, seed + the metrics columns."""
    frames = []
    for (mask, seed), df in sorted(runs.items()):
        d = df.copy()
        d.insert(0, "seed", int(seed))
        d.insert(0, "mask", mask)
        frames.append(d)
    return pd.concat(frames, ignore_index=True)


def convergence_table(runs: dict[tuple[str, int], pd.DataFrame], margin: float = 0.01,
                      metric: str = "knn_acc") -> pd.DataFrame:
    """One row per run: mask, seed, threshold (from that seed's random run), epochs_to_threshold
    (censored runs: epochs + 1, ``reached`` False), best / final ``metric``, final probe."""
    rows = []
    runs = {k: d[d[metric].notna()] for k, d in runs.items()}   # e.g. probes every k epochs
    seeds = sorted({s for _, s in runs})
    for seed in seeds:
        if ("random", seed) not in runs:
            raise ValueError(f"seed {seed} has no random-mask run to set the threshold")
        thr = float(runs[("random", seed)][metric].max()) - margin
        for mask in sorted({m for m, s in runs if s == seed}):
            df = runs[(mask, seed)]
            e = epochs_to_threshold(df[metric], thr, df["epoch"])
            n_ep = int(df["epoch"].max())
            probe = df["probe_acc"].dropna()
            rows.append({"mask": mask, "seed": seed, "threshold": thr,
                         "epochs_to_threshold": e if e is not None else n_ep + 1, "reached": e is not None,
                         f"best_{metric}": float(df[metric].max()),
                         "best_epoch": int(df.loc[df[metric].idxmax(), "epoch"]),
                         f"final_{metric}": float(df[metric].iloc[-1]),
                         "final_probe_acc": float(probe.iloc[-1]) if len(probe) else float("nan"),
                         "final_train_loss": float(df["train_loss"].iloc[-1]), "epochs": n_ep})
    return pd.DataFrame(rows)


def paired_differences(table: pd.DataFrame, a: str = "guided", b: str = "random",
                       level: float = 0.95) -> pd.DataFrame:
    """Per quantity of a :func:`convergence_table`: mean over seeds of (a - b) with a t confidence
    interval, and the per-seed values. Accuracies in percentage points, epochs in epochs."""
    ta = table[table["mask"] == a].set_index("seed")
    tb = table[table["mask"] == b].set_index("seed")
    seeds = sorted(set(ta.index) & set(tb.index))
    metrics = sorted({c[5:] for c in table.columns if c.startswith("best_") and c != "best_epoch"})
    qty = [("epochs_to_threshold", 1.0, "epochs")]
    for m in metrics:
        qty += [(f"best_{m}", 100.0, "points"), (f"final_{m}", 100.0, "points")]
    if "final_probe_acc" not in [q[0] for q in qty]:
        qty.append(("final_probe_acc", 100.0, "points"))
    qty.append(("final_train_loss", 1.0, "loss"))
    rows = []
    for col, scale, unit in qty:
        if col not in ta:
            continue
        d = (ta.loc[seeds, col] - tb.loc[seeds, col]).to_numpy(dtype=float) * scale
        m, lo, hi, n = mean_ci(d, level)
        rows.append({"quantity": f"{col} ({a} - {b})", "unit": unit, "mean_diff": m, "ci_low": lo,
                     "ci_high": hi, "n_seeds": n, "per_seed": ", ".join(f"{x:+.3g}" for x in d),
                     "censored_" + a: int((~ta.loc[seeds, "reached"]).sum()) if col == "epochs_to_threshold" else 0})
    return pd.DataFrame(rows)
