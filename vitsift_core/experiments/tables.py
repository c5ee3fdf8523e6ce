"""The analysis' tables: the keypoint counts each count control scores (shuffled, donor), one row per
(image, layer, head), and the per-layer table with chance paired to KK and NK (DESIGN.md section 3)."""
from __future__ import annotations

import zlib

import numpy as np
import pandas as pd
import torch

from vitsift_core.method.masking import donor_rows
from vitsift_core.method.stages import recipe_json

HEAD_COLS = ["image", "layer", "head", "theta_kk", "theta_kn", "theta_nk", "theta_nn",
             "theta_chance", "focus", "focus_norm", "n_key", "n_non"]
METRIC_COLS = HEAD_COLS[3:10]
THETA_COLS = METRIC_COLS[:5]        # the columns that depend on the keypoint counts


def shuffled_counts(counts: np.ndarray, ids: list[str], seed: int) -> np.ndarray:
    """Each image's counts (B, N) permuted across patches by (seed, id) only: resume-safe."""
    out = np.empty_like(counts)
    for i, image_id in enumerate(ids):
        rng = np.random.default_rng([seed, zlib.crc32(image_id.encode())])
        out[i] = counts[i][rng.permutation(counts.shape[1])]
    return out


def donor_counts(counts: np.ndarray, ids: list[str], seed: int) -> np.ndarray | None:
    """Donor keypoints: each image gets the counts (n, N) of another image of ``ids``, by mask-eval's
    seeded derangement (``masking.donor_rows``); None when there are fewer than 2 images (no donor).
    The derangement depends only on (ids, seed), so a chunk's donors survive resume and batch size."""
    if len(ids) < 2:
        return None
    return np.asarray(counts)[donor_rows(ids, seed)]


def head_rows(ids: list[str], res: dict[str, torch.Tensor], counts: np.ndarray | None) -> pd.DataFrame:
    """res: metric -> (B, L, H); counts: (B, N) -> one row per (image, layer, head). ``counts`` None:
    an image without a donor: its theta columns NaN, n_key = n_non = 0 (focus kept: its own maps)."""
    b, n_layers, n_heads = res["focus"].shape
    df = pd.DataFrame({
        "image": np.repeat(np.asarray(ids, dtype=object), n_layers * n_heads),
        "layer": np.tile(np.repeat(np.arange(1, n_layers + 1), n_heads), b).astype(np.int16),
        "head": np.tile(np.arange(1, n_heads + 1), b * n_layers).astype(np.int16),
    })
    for k in METRIC_COLS:
        df[k] = res[k].reshape(-1).numpy().astype(np.float32)
    if counts is None:
        df[THETA_COLS] = np.float32("nan")
        n_key = n_non = np.zeros(b, np.int64)
    else:
        n_key = (counts > 0).sum(1)
        n_non = counts.shape[1] - n_key
    df["n_key"] = np.repeat(n_key, n_layers * n_heads).astype(np.int32)
    df["n_non"] = np.repeat(n_non, n_layers * n_heads).astype(np.int32)
    return df


def layer_table(heads: pd.DataFrame) -> pd.DataFrame:
    """Per layer: mean over (image, head) rows of each metric (NaN skipped); chance_kk / chance_nk:
    theta_chance over exactly the rows where theta_kk / theta_nk is defined, so kk_minus_chance =
    theta_kk - chance_kk is a per-row paired difference (theta_chance is the unpaired mean over all
    rows, kept for reference); images counted."""
    kk_ok, nk_ok = heads.theta_kk.notna(), heads.theta_nk.notna()
    h = heads.assign(chance_kk=heads.theta_chance.where(kk_ok), chance_nk=heads.theta_chance.where(nk_ok),
                     kk_minus_chance=heads.theta_kk - heads.theta_chance,
                     nk_minus_chance=heads.theta_nk - heads.theta_chance,
                     image_kk=heads.image.where(kk_ok), image_nk=heads.image.where(nk_ok))
    g = h.groupby("layer")
    out = g[METRIC_COLS + ["chance_kk", "chance_nk", "kk_minus_chance", "nk_minus_chance"]].mean()
    out["n_images"] = g["image"].nunique()
    out["n_images_kk"] = g["image_kk"].nunique()
    out["n_images_nk"] = g["image_nk"].nunique()
    return out.reset_index()


def stage_fit_json(layers: pd.DataFrame) -> dict:
    return recipe_json(layers["kk_minus_chance"].to_numpy(), layers["focus"].to_numpy())
