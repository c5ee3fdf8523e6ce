"""Convergence of random- vs guided-mask MAE (Fig. 9): epochs-to-threshold per seed, paired by seed."""
from __future__ import annotations

import numpy as np
import pandas as pd

from vitsift_core.method.stats import mean_ci


def epochs_to_threshold(acc, threshold: float, epochs=None) -> int | None:
    """First epoch (the ``epochs`` label, default 1-based position) with ``acc >= threshold``."""
    acc = np.asarray(acc, dtype=float)
    ep = np.arange(1, len(acc) + 1) if epochs is None else np.asarray(epochs)
    hit = np.flatnonzero(acc >= threshold - 1e-12)
    return int(ep[hit[0]]) if len(hit) else None


def curves(runs: dict[tuple[str, int], pd.DataFrame]) -> pd.DataFrame:
    """Long table of every run's metrics: mask, seed + the metrics columns."""
    return pd.concat([df.assign(mask=mask, seed=int(seed))[["mask", "seed", *df.columns]]
                      for (mask, seed), df in sorted(runs.items())], ignore_index=True)


def convergence_table(runs: dict[tuple[str, int], pd.DataFrame], margin: float = 0.01,
                      metric: str = "knn_acc") -> pd.DataFrame:
    """One row per run: threshold (the seed's best random ``metric`` - margin), epochs_to_threshold
    (epochs + 1 when not ``reached``), best / final metrics."""
    rows = []
    # trained epochs only (epoch 0 is the untrained encoder), with the metric (e.g. probes every k epochs)
    runs = {k: d[d[metric].notna() & (d["epoch"] >= 1)] for k, d in runs.items()}
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
    """Per quantity: mean over seeds of (a - b) with its t interval and the per-seed values."""
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
