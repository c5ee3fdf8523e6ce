"""Emergence over training read out (notebook 10): the semantic part by layer vs epoch per objective
(figure), the first-appearance table and the guided-vs-random verdict in words."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from vitsift_core.experiments.emergence import ALL_LAYERS, first_appearance, guided_earlier
from vitsift_core.report.figures import PALETTE


def semantic_figure(curves: pd.DataFrame, title: str) -> plt.Figure:
    """One panel per objective: x epoch, one line per layer (shaded: its 95 % bootstrap CI) and the
    mean over layers in black; the dotted line is 0 (no semantic part)."""
    names = list(dict.fromkeys(curves.objective))
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.4), sharey=True, squeeze=False)
    for ax, name in zip(axes[0], names):
        c = curves[curves.objective == name]
        layers = sorted(int(x) for x in c.layer.unique() if x != ALL_LAYERS)
        for i, layer in enumerate([*layers, ALL_LAYERS]):
            d = c[c.layer == layer].sort_values("epoch")
            color = "black" if layer == ALL_LAYERS else PALETTE[i % len(PALETTE)]
            label = "mean over layers" if layer == ALL_LAYERS else f"layer {layer}"
            ax.plot(d.epoch, d.semantic, marker="o", ms=3, color=color, lw=2 if layer == ALL_LAYERS else 1.2,
                    label=label)
            ax.fill_between(d.epoch, d.low, d.high, color=color, alpha=0.12 if layer == ALL_LAYERS else 0.08)
        first = first_appearance(c[c.layer == ALL_LAYERS])
        if first is not None:
            ax.axvline(first["epoch"], color="black", ls="--", lw=0.8)
        ax.axhline(0, color="0.4", ls=":", lw=1)
        ax.set(title=f"{name} (first: {first['epoch'] if first else 'n.r.'})", xlabel="epoch")
    axes[0][0].set_ylabel("semantic part\n(KK-NK)(real) - (KK-NK)(donor)")
    axes[0][-1].legend(loc="best", fontsize=7)
    fig.suptitle(title, fontsize=10)
    return fig


def first_table_display(table: pd.DataFrame) -> pd.DataFrame:
    """The first-appearance table with the CI as one column ``semantic [low, high]``."""
    t = table.copy()
    t["semantic [95% CI] at first epoch"] = [
        "not reached" if np.isnan(s) else f"{s:.4f} [{lo:.4f}, {hi:.4f}]"
        for s, lo, hi in zip(t.semantic, t.low, t.high)]
    t["first_epoch"] = t.first_epoch.map(lambda e: "n.r." if pd.isna(e) else
                                         "0 (untrained)" if e == 0 else str(int(e)))
    return t[["objective", "layer", "first_epoch", "semantic [95% CI] at first epoch", "epochs_seen"]]


def verdict(table: pd.DataFrame) -> str:
    """Sentences: per objective the first epoch of the mean-over-layers semantic part, then the
    guided-vs-random rule (:func:`guided_earlier`)."""
    overall = table[table.layer == "all (mean)"].set_index("objective")
    parts = []
    for name, r in overall.iterrows():
        parts.append(f"{name}: " + ("the semantic part (mean over layers) never stays above 0 (CI) "
                                    f"through the last snapshot in epochs {r.epochs_seen}" if pd.isna(r.first_epoch) else
                                    ("above 0 already in the untrained encoder (epoch 0) and through the last snapshot"
                                     if r.first_epoch == 0 else f"above 0 from epoch {int(r.first_epoch)} on") +
                                    f", {r.semantic:.4f} [{r.low:.4f}, {r.high:.4f}]"))
    text = "; ".join(parts) + "."
    if {"mae-guided", "mae-random"} <= set(overall.index):
        holds, why = guided_earlier(overall.first_epoch["mae-guided"], overall.first_epoch["mae-random"])
        text += (f" **Guided masking makes it appear earlier: {'yes' if holds else 'no'}** ({why}; one seed "
                 "per objective, snapshots every few epochs: an epoch resolution, not a CI on the epoch).")
    return text
