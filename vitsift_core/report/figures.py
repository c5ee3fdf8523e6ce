"""Figure conventions of every notebook (colour-blind-safe palette, saving under reports/) and the
image and layer panels.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import cv2
import matplotlib
import numpy as np
import matplotlib.pyplot as plt
from matplotlib.patches import Patch, Rectangle
import pandas as pd
import seaborn as sns

from vitsift_core.experiments.study import PARTS
from vitsift_core.paths import reports_dir

PALETTE = sns.color_palette("colorblind")
COLORS = {
    "KK": PALETTE[0], "NK": PALETTE[1], "chance": "0.35", "shuffle-keypoints": PALETTE[2],
    "random-init": PALETTE[7], "mean-attention": PALETTE[4], "semantic": PALETTE[3],
    "donor-keypoints": PALETTE[6], "beyond_content_free": PALETTE[4],
    "focus": PALETTE[0], "top": PALETTE[3], "bottom": PALETTE[2], "random": "0.35",
    "keypoints": PALETTE[4], "guided": PALETTE[2], "top_other": PALETTE[5], "bottom_other": PALETTE[9],
}
STAGE_COLORS = (PALETTE[9], PALETTE[8], PALETTE[6])


def style() -> None:
    """Readable defaults for notebook and saved figures."""
    sns.set_theme(context="notebook", style="whitegrid", palette=PALETTE)
    matplotlib.rcParams.update({"figure.dpi": 110, "savefig.dpi": 150, "savefig.bbox": "tight",
                                "axes.titlesize": 11, "axes.labelsize": 10, "legend.fontsize": 8,
                                "figure.constrained_layout.use": True})


def _out_dir(folder: Path | None, sub: str) -> Path:
    d = Path(folder) if folder is not None else reports_dir() / sub
    d.mkdir(parents=True, exist_ok=True)
    return d


def save_figure(fig: plt.Figure, name: str, folder: Path | None = None) -> list[Path]:
    """Write ``name``.png and ``name``.svg to reports/figures/ (or ``folder``); returns the paths."""
    out = [_out_dir(folder, "figures") / f"{name}.{ext}" for ext in ("png", "svg")]
    for p in out:
        fig.savefig(p)
    return out


def save_table(df: pd.DataFrame, name: str, folder: Path | None = None) -> list[Path]:
    """Write ``name``.csv and ``name``.md (Markdown with tabulate) to reports/tables/ (or ``folder``)."""
    d = _out_dir(folder, "tables")
    csv, md = d / f"{name}.csv", d / f"{name}.md"
    df.to_csv(csv, index=False)
    has_tabulate = importlib.util.find_spec("tabulate") is not None
    md.write_text(df.to_markdown(index=False) if has_tabulate else df.to_string(index=False))
    return [csv, md]


def draw_patch_grid(ax, grid: tuple[int, int], patch_size: int, color: str = "white", lw: float = 0.3) -> None:
    rows, cols = grid
    for r in range(1, rows):
        ax.axhline(r * patch_size - 0.5, color=color, lw=lw, alpha=0.6)
    for c in range(1, cols):
        ax.axvline(c * patch_size - 0.5, color=color, lw=lw, alpha=0.6)


def show_keypoints(ax, crop, keypoints, grid, patch_size, title: str | None = None) -> None:
    """crop (S, S, 3) uint8 with SIFT keypoints (K, 4) [x, y, size, angle] and the patch grid."""
    ax.imshow(crop)
    if len(keypoints):
        ax.scatter(keypoints[:, 0], keypoints[:, 1], s=np.clip(keypoints[:, 2], 2, 40) * 2,
                   facecolors="none", edgecolors=PALETTE[8], linewidths=0.7)
    draw_patch_grid(ax, grid, patch_size)
    ax.set_xticks([]), ax.set_yticks([])
    if title:
        ax.set_title(title)


def show_counts(ax, counts, grid, title: str | None = None, annotate: bool = True):
    """Per-patch keypoint counts (N,) as a (rows, cols) heatmap; returns the image artist."""
    m = np.asarray(counts).reshape(grid)
    im = ax.imshow(m, cmap="viridis")
    if annotate and m.size <= 400:
        for (r, c), v in np.ndenumerate(m):
            ax.text(c, r, str(int(v)), ha="center", va="center", fontsize=6,
                    color="white" if v < m.max() / 2 else "black")
    ax.set_xticks([]), ax.set_yticks([])
    if title:
        ax.set_title(title)
    return im


def _patch_rect(ax, idx: int, grid, patch_size, **kw) -> None:
    r, c = divmod(int(idx), grid[1])
    ax.add_patch(Rectangle((c * patch_size - 0.5, r * patch_size - 0.5), patch_size, patch_size, fill=False, **kw))


def attention_overlay(ax, crop, row, grid, patch_size, query: int, attended=None, counts=None,
                      title: str | None = None):
    """One query's attention row (N,) over the crop, attended patches outlined by kind, query dashed."""
    s = crop.shape[0]
    heat = np.asarray(row, dtype=np.float32).reshape(grid)
    heat = cv2.resize(heat, (crop.shape[1], s), interpolation=cv2.INTER_NEAREST)
    ax.imshow(crop)
    im = ax.imshow(heat, cmap="magma", alpha=0.6)
    if attended is not None:
        for j in np.flatnonzero(attended):
            key = counts is not None and counts[j] > 0
            _patch_rect(ax, j, grid, patch_size, edgecolor=COLORS["KK"] if key else COLORS["NK"], lw=1.0)
    _patch_rect(ax, query, grid, patch_size, edgecolor="white", lw=2.0, linestyle="--")
    ax.set_xticks([]), ax.set_yticks([])
    if title:
        ax.set_title(title)
    return im


def attention_bars(ax, row, line: float, attended, counts, title: str | None = None) -> None:
    """Fig. 4b: alpha_ij per key patch j, the detection line, attended bars coloured by kind."""
    row = np.asarray(row)
    key = np.asarray(counts) > 0
    colors = np.where(np.asarray(attended), np.where(key, "KK", "NK"), "none")
    cmap = {"KK": COLORS["KK"], "NK": COLORS["NK"], "none": "0.8"}
    ax.bar(np.arange(len(row)), row, width=1.0, color=[cmap[c] for c in colors], linewidth=0)
    ax.axhline(line, color="black", lw=1, ls="--", label="detection line (Eq. 2)")
    handles = [Patch(color=COLORS["KK"], label="attended, keypoint patch"),
               Patch(color=COLORS["NK"], label="attended, no keypoint"),
               Patch(color="0.8", label="not attended"), ax.lines[-1]]
    ax.legend(handles=handles, loc="upper right")
    ax.set_xlabel("key patch j (row-major)")
    ax.set_ylabel("attention weight alpha_ij")
    ax.set_xlim(-0.5, len(row) - 0.5)
    if title:
        ax.set_title(title)


def heads_by_layer(ax, heads: pd.DataFrame, metric: str, color, label: str, trend: bool = True,
                   points: bool = True) -> None:
    """Fig. 5/6: each head a point (mean over images), head mean a line, trend dotted."""
    per_head = heads.groupby(["layer", "head"])[metric].mean().reset_index()
    mean = per_head.groupby("layer")[metric].mean()
    if points:
        jitter = (per_head["head"] - per_head["head"].mean()) / max(per_head["head"].max(), 1) * 0.3
        ax.scatter(per_head["layer"] + jitter, per_head[metric], s=8, color=color, alpha=0.35, linewidths=0)
    ax.plot(mean.index, mean.values, color=color, lw=2, label=label)
    if trend and mean.notna().sum() >= 2:
        ok = mean.notna()
        s, c = np.polyfit(mean.index[ok], mean.values[ok], 1)
        ax.plot(mean.index, s * mean.index + c, color=color, lw=1, ls=":", label=f"{label} trend")


def shade_stages(ax, segments, names=None, alpha: float = 0.15) -> None:
    """Shade 1-based inclusive layer segments [(a, b)] * 3 with the stage colours."""
    for k, (a, b) in enumerate(segments):
        ax.axvspan(a - 0.5, b + 0.5, color=STAGE_COLORS[k % 3], alpha=alpha, lw=0)
        label = names[k] if names else f"segment {k + 1}"
        ax.text((a + b) / 2, 1.0, label, transform=ax.get_xaxis_transform(), ha="center", va="bottom",
                fontsize=8)


CONTROL_NAMES = {"mean-attention": "content-free (position + smoothing)"}
CONTROL_STYLES = (("shuffle-keypoints", "-."), ("random-init", ":"), ("mean-attention", "--"), ("donor-keypoints", "-"))
PART_LABELS = dict(PARTS.values())     # column -> label: real - donor, real - content-free


def theta_layer_figure(real_heads: pd.DataFrame, cur: pd.DataFrame, title: str) -> plt.Figure:
    """Fig. 5 with its controls: left, theta_KK / theta_NK per head and layer (real run), chance paired
    with KK and with NK, each control's KK; right, the parts of the bias (``study.layer_curves``
    columns): semantic = real - donor keypoints, and real - content-free (mean attention, itself
    position + smoothing), for
    theta_KK and for the KK - NK gap, beside KK - chance (paired)."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6), gridspec_kw={"width_ratios": [3, 2]})
    ax = axes[0]
    heads_by_layer(ax, real_heads, "theta_kk", COLORS["KK"], "theta_KK (real)")
    heads_by_layer(ax, real_heads, "theta_nk", COLORS["NK"], "theta_NK (real)")
    ax.plot(cur.layer, cur.chance_kk, color=COLORS["chance"], lw=1.5, ls="--", label="chance (KK's images)")
    ax.plot(cur.layer, cur.chance_nk, color=COLORS["chance"], lw=1.0, ls=":", label="chance (NK's images)")
    for c, ls in CONTROL_STYLES:
        if f"kk_{c}" in cur:
            ax.plot(cur.layer, cur[f"kk_{c}"], color=COLORS[c], lw=1.5, ls=ls,
                    label=f"theta_KK, {CONTROL_NAMES.get(c, c)}")
    ax.set_xlabel("layer")
    ax.set_ylabel("theta (weighted, Eq. 3-4)")
    ax.set_title("each dot: one head (mean over images); line: head mean")
    ax.legend(ncol=2, fontsize=7)
    ax = axes[1]
    ax.axhline(0, color="black", lw=0.8)
    for part, label in PART_LABELS.items():
        if part in cur:
            ax.plot(cur.layer, cur[part], color=COLORS[part], lw=2, label=f"KK: {label}")
            ax.plot(cur.layer, cur[f"{part}_gap"], color=COLORS[part], lw=1.2, ls="--", label=f"KK-NK gap: {label}")
    ax.plot(cur.layer, cur.kk_minus_chance, color=COLORS["KK"], lw=1, ls=":", label="KK - chance (paired)")
    ax.set_xlabel("layer")
    ax.set_ylabel("theta difference")
    ax.set_title("the parts of the KK bias")
    ax.legend(fontsize=7)
    fig.suptitle(title)
    return fig
