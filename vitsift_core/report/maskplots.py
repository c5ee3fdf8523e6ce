"""Figures and helpers of notebook 06 (spurious correlations, "mask as prompt") from mask-eval runs."""
from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Sequence

import cv2
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from PIL import Image

from vitsift_core.data.sources import IMAGENETTE_CLASSES, SAMPLE_NAMES, read_record, resolve_images
from vitsift_core.experiments.study import choose_images
from vitsift_core.method import masking as MK
from vitsift_core.method.metrics import theta_chance
from vitsift_core.report.figures import COLORS, _patch_rect

ORDER_LABELS = {"top": "Top (highest s_i)", "bottom": "Bottom (lowest s_i)", "random": "Random",
                "keypoints": "most keypoints (t_j)", "top_other": "Top of another image's map",
                "bottom_other": "Bottom of another image's map"}
MODE_LABELS = {"fill": "fill: masked pixels = mean", "drop": "drop: masked tokens removed"}


def choose_labelled_images(images: str, probe_train: str, folder: Path) -> tuple[str, str, str]:
    """(eval spec, probe-training spec, sentence): ``images`` when labelled; for ``samples`` a folder
    of the bundled photos, one class each, for training and evaluation (a smoke check, not a result)."""
    used, note = choose_images(images)
    if used != "samples":
        return used, probe_train, note
    folder = Path(folder)
    if not folder.exists():
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        for rec in resolve_images("samples"):
            name = rec.id.split("/", 1)[1]
            (tmp / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(read_record(rec)).save(tmp / name / f"{name}.png")
        tmp.rename(folder)
    return str(folder), str(folder), (note + f" Labelled stand-in: the {len(SAMPLE_NAMES)} bundled photos, one "
                                      "class each, for probe training *and* evaluation -- a check that the code "
                                      "runs, not a result.")


def class_names(classes: list[str]) -> dict[str, str]:
    """wnid -> short readable name (Imagenette names, else timm's ImageNet descriptions)."""
    out, info = {}, None
    for c in classes:
        if c in IMAGENETTE_CLASSES:
            out[c] = IMAGENETTE_CLASSES[c]
            continue
        try:
            if info is None:
                from timm.data import ImageNetInfo      # timm's class-info files: only when needed
                info = ImageNetInfo()
            out[c] = info.label_name_to_description(c).split(",")[0]
        except Exception:  # noqa: BLE001 - not a wnid: the label itself
            out[c] = c
    return out


def accuracy_figure(acc: pd.DataFrame, title: str) -> plt.Figure:
    """Top-1 vs mask ratio with bootstrap 95% CIs: a panel per mode, a line per order."""
    modes = [m for m in MK.MODES if m in set(acc["mode"])]
    fig, axes = plt.subplots(1, len(modes), figsize=(6.2 * len(modes), 4.4), sharey=True, squeeze=False,
                             layout="constrained")
    for ax, mode in zip(axes[0], modes):
        d = acc[acc["mode"] == mode]
        clean = d[d.ratio == 0].top1
        if len(clean):
            ax.axhline(clean.iloc[0], color="black", lw=0.8, ls=":", label="clean (r = 0)")
        present = [o for o in MK.ORDERS if o in set(d.order)]
        for k, order in enumerate(present):
            g = d[d.order == order].sort_values("ratio")
            x = g.ratio + (k - (len(present) - 1) / 2) * 0.25   # offsets so the error bars do not hide each other
            ax.errorbar(x, g.top1, yerr=[g.top1 - g.ci_low, g.ci_high - g.top1], color=COLORS[order],
                        marker="o", ms=4, lw=1.8, capsize=2, label=ORDER_LABELS[order],
                        ls="--" if order in MK.DONOR_ORDERS else "-")
        ax.set_title(MODE_LABELS[mode])
        ax.set_xlabel("patches masked, r (% of N)")
        ax.set_xticks(sorted(d.ratio.unique()))
        ax.grid(True, alpha=0.4)
    axes[0][0].set_ylabel("top-1 accuracy (%), 95% bootstrap CI")
    axes[0][-1].legend(loc="lower left", fontsize=8)
    fig.suptitle(title)
    return fig


def paired_figure(paired: pd.DataFrame, title: str, order: str = "bottom", highlight=(5, 10)) -> plt.Figure:
    """``order`` minus clean accuracy (points) with CIs per ratio and mode; ``highlight`` ratios annotated."""
    d = paired[paired.order == order]
    modes = [m for m in MK.MODES if m in set(d["mode"])]
    fig, ax = plt.subplots(figsize=(7.5, 4.2), layout="constrained")
    ax.axhline(0, color="black", lw=0.8)
    for k, mode in enumerate(modes):
        g = d[d["mode"] == mode].sort_values("ratio")
        x = np.arange(len(g)) + (k - (len(modes) - 1) / 2) * 0.3
        ax.errorbar(x, g["diff"], yerr=[g["diff"] - g.ci_low, g.ci_high - g["diff"]], fmt="o", capsize=3,
                    color=("0.15", COLORS[order])[k % 2], label=MODE_LABELS[mode])
        for xi, (_, r) in zip(x, g.iterrows()):
            if r.ratio in highlight:   # images gained / lost, exact McNemar p
                ax.annotate(f"+{r.n_gain}/-{r.n_loss}\np={r.p_mcnemar:.2g}", (xi, r.ci_low), fontsize=7,
                            ha="center", va="top", xytext=(0, -3), textcoords="offset points")
        ax.set_xticks(np.arange(len(g)), [f"{r:g}" for r in g.ratio])
    ax.set_xlabel("patches masked, r (% of N)")
    ax.set_ylabel(f"{order} minus clean, top-1 (percentage points)")
    ax.set_title(title + f"\n(+gained/-lost images and exact McNemar p at r = {', '.join(f'{h:g}' for h in highlight)} %)",
                 fontsize=10)
    ax.legend(fontsize=8, loc="lower left")
    ax.grid(True, alpha=0.4)
    return fig


def mask_grid_figure(examples: list[dict], ratios, orders, pred: pd.DataFrame, names: dict, classes: list[str],
                     grid, patch_size, fill_rgb, title: str, mode: str = "fill") -> plt.Figure:
    """Fig. 8: a row per (example, order), a column per ratio; masked patches in the fill colour,
    titled with the prediction."""
    rows = [(ex, o) for ex in examples for o in orders]
    fig, axes = plt.subplots(len(rows), len(ratios), figsize=(1.9 * len(ratios), 2.15 * len(rows)),
                             squeeze=False, layout="constrained")
    for (ex, order), axr in zip(rows, axes):
        other = ex.get("other_scores")   # rank_patches says so when a *_other order lacks it
        rank = MK.rank_patches(order, scores=ex["scores"][None], counts=ex["counts"][None], ids=[ex["id"]],
                               seed=ex.get("seed", 0), tiebreak=ex.get("tiebreak", "random"),
                               other_scores=None if other is None else other[None])
        for ax, r in zip(axr, ratios):
            idx = MK.mask_indices(rank, r)[0]
            ax.imshow(masked_crop(ex["crop"], idx, grid, patch_size, fill_rgb))
            row = pred[(pred.image == ex["id"]) & (pred.order == order) & (pred["mode"] == mode) & (pred.ratio == r)]
            if len(row):
                p = row.iloc[0]
                mark = "OK" if p.correct else "x"
                ax.set_title(f"r={r:g}%: {names.get(classes[int(p.pred)], classes[int(p.pred)])[:16]} [{mark}]",
                             fontsize=7)
            ax.set_xticks([]), ax.set_yticks([])
        axr[0].set_ylabel(f"{ORDER_LABELS[order].split(' (')[0]}\n{names.get(ex['label'], ex['label'])[:18]}", fontsize=8)
    fig.suptitle(title, fontsize=10)
    return fig


def spurious_figure(examples: list[dict], grid, patch_size, names: dict, title: str, k: int = 5) -> plt.Figure:
    """Per example: the ``k`` lowest-s_i keypoint patches on the image and on the s_i map, and where
    the lowest one attends (share of heads with j in S_i)."""
    fig, axes = plt.subplots(len(examples), 3, figsize=(15, 4.6 * len(examples)), squeeze=False,
                             layout="constrained")
    s_px = examples[0]["crop"].shape[0]
    for ex, (a0, a1, a2) in zip(examples, axes):
        sp = MK.spurious_patches(ex["scores"], ex["counts"], k)
        key = np.flatnonzero(ex["counts"] > 0)
        a0.imshow(ex["crop"])
        for j in key:
            _patch_rect(a0, j, grid, patch_size, edgecolor="white", lw=0.6)
        for j in sp:
            _patch_rect(a0, j, grid, patch_size, edgecolor="red", lw=2.2)
        a0.set_title(f"{names.get(ex['label'], ex['label'])}: {len(key)} keypoint patches (white);\n"
                     f"red = the {len(sp)} with the lowest s_i", fontsize=9)
        sc = ex["scores"].reshape(grid)
        im = a1.imshow(sc, cmap="viridis", vmin=np.nanmin(sc), vmax=np.nanmax(sc))
        for j in sp:
            r, c = divmod(int(j), grid[1])
            a1.add_patch(plt.Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="red", lw=2.2))
        fig.colorbar(im, ax=a1, fraction=0.046, label="patch score s_i (head-mean theta_i)")
        a1.set_title("s_i per patch (red: lowest-scoring keypoint patches)", fontsize=9)
        a2.imshow(ex["crop"])
        if len(sp) and ex.get("attended") is not None:
            frac = cv2.resize(ex["attended"].reshape(grid).astype(np.float32), (s_px, s_px),
                              interpolation=cv2.INTER_NEAREST)
            im2 = a2.imshow(frac, cmap="magma", alpha=0.6, vmin=0, vmax=1)
            fig.colorbar(im2, ax=a2, fraction=0.046, label="share of heads with j in S_i")
            for j in key:
                _patch_rect(a2, j, grid, patch_size, edgecolor=COLORS["KK"], lw=0.6)
            _patch_rect(a2, sp[0], grid, patch_size, edgecolor="red", lw=2.4, linestyle="--")
            a2.set_title(f"where query patch {sp[0]} (dashed, s_i = {ex['scores'][sp[0]]:.2f}) attends;\n"
                         "blue outline: keypoint patch", fontsize=9)
        for ax in (a0, a1, a2):
            ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    return fig


def score_distribution(scores: np.ndarray, counts: np.ndarray) -> pd.DataFrame:
    """Per image: mean s_i of keypoint / keypoint-free patches, theta_chance, and the share of
    keypoint patches with s_i below 0.5 and below chance."""
    chance = theta_chance(torch.from_numpy(np.asarray(counts))).numpy()
    key = counts > 0
    with np.errstate(invalid="ignore"):
        s_key = np.where(key, scores, np.nan)
        s_non = np.where(~key, scores, np.nan)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return pd.DataFrame({
                "s_key": np.nanmean(s_key, 1), "s_non": np.nanmean(s_non, 1),
                "chance": chance, "n_key": key.sum(1),
                "key_below_half": np.nansum((s_key < 0.5), 1) / np.maximum(key.sum(1), 1),
                "key_below_chance": np.nansum((s_key < chance[:, None]), 1) / np.maximum(key.sum(1), 1),
            })


def masked_crop(crop: np.ndarray, masked: Sequence[int], grid: tuple[int, int], patch_size: int,
                color: Sequence[float]) -> np.ndarray:
    """The (S, S, 3) uint8 crop with the masked patches painted ``color`` (0-255 RGB)."""
    out = np.array(crop, copy=True)
    gc, p = int(grid[1]), int(patch_size)
    for j in masked:
        r, c = divmod(int(j), gc)
        out[r * p:(r + 1) * p, c * p:(c + 1) * p] = np.asarray(color, dtype=np.float64).round().astype(np.uint8)
    return out
