"""What the section notebooks (02-05) compute: the analysis suite's runs read back, per-layer curves,
the sensitivity runs, and single images as the model sees them."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from vitsift_core.data.images import ImageDecodeError, model_input
from vitsift_core.data.keypoints import SiftParams, keypoint_counts, rule_effect
from vitsift_core.data.sources import imagenette_root, read_record
from vitsift_core.method import metrics as M
from vitsift_core.model.capture import attention_maps
from vitsift_core.paths import results_dir
from vitsift_core.experiments.analysis import CONTROLS, AnalysisParams, RunDir, run_suite, variant_dir

Variant = tuple[str, bool]   # (control, exclude_self)


def choose_images(images: str, fallback: str = "samples") -> tuple[str, str]:
    """(spec to use, a sentence saying which): Imagenette falls back to ``fallback`` when absent."""
    if images.startswith("imagenette"):
        try:
            root = imagenette_root()
        except (FileNotFoundError, ValueError, RuntimeError) as e:
            return fallback, (f"Imagenette was not found ({e}); this run uses {fallback!r} instead, "
                              "so its numbers are from a handful of photos, not the data set.")
        return images, f"Images: {images} from {root}."
    return images, f"Images: {images}."


def suite(base: AnalysisParams, controls=CONTROLS, exclude_self=(False, True),
          root: Path | None = None, progress: bool = True) -> dict[Variant, RunDir]:
    """Run (or read back) every requested (control, exclude_self) variant of ``base``."""
    root = Path(root) if root is not None else results_dir() / "analysis"
    variants = {(c, x): variant_dir(root, base.replace(control=c, exclude_self=x))
                for c in controls for x in exclude_self}
    runs = {v: RunDir(d, base.replace(control=v[0], exclude_self=v[1])) for v, d in variants.items()}
    todo = {v: d for v, d in variants.items() if not runs[v].is_complete()}
    if todo:
        runs.update(run_suite(base, todo, progress=progress))
    return runs


def heads(run: RunDir) -> pd.DataFrame:
    return pd.read_parquet(run.path / "heads.parquet")


def layers(run: RunDir) -> pd.DataFrame:
    return pd.read_parquet(run.path / "layers.parquet")


def per_image_layer(run_or_heads, metric: str) -> pd.DataFrame:
    """Head means per (image, layer): DataFrame indexed by image, one column per layer."""
    h = heads(run_or_heads) if isinstance(run_or_heads, RunDir) else run_or_heads
    return h.groupby(["image", "layer"])[metric].mean().unstack("layer")


def paired_part(real: pd.DataFrame, control: pd.DataFrame) -> pd.DataFrame:
    """Per layer (index), real minus control heads over the (image, layer, head) rows where both are
    defined: kk (theta_KK), nk (theta_NK) and gap ((KK - NK)(real) - (KK - NK)(control))."""
    cols = ["image", "layer", "head", "theta_kk", "theta_nk"]
    m = real[cols].merge(control[cols], on=cols[:3], suffixes=("", "_c"))
    d = pd.DataFrame({"layer": m.layer, "kk": m.theta_kk - m.theta_kk_c, "nk": m.theta_nk - m.theta_nk_c,
                      "gap": (m.theta_kk - m.theta_nk) - (m.theta_kk_c - m.theta_nk_c)})
    return d.groupby("layer")[["kk", "nk", "gap"]].mean()


# the two readings of a control difference (DESIGN.md section 3): donor keypoints keep each image's
# maps (semantic part); the data-set-mean map keeps position + smoothing only, so real minus it
# mixes semantics with what smoothing changes
PARTS = {"donor-keypoints": ("semantic", "semantic (real - donor keypoints)"),
         "mean-attention": ("beyond_content_free", "real - content-free (what position + smoothing leave)")}


def layer_curves(runs: dict[Variant, RunDir], exclude_self: bool = False) -> pd.DataFrame:
    """Per layer: the real run's kk, nk, gap (kk - nk), chance_kk / chance_nk (paired: over the rows
    where kk / nk is defined), kk_minus_chance / nk_minus_chance (paired), focus; each other
    control's kk_/nk_/gap_/focus_<control>; and, from per-row paired differences (:func:`paired_part`),
    semantic / semantic_nk / semantic_gap = real - donor keypoints and beyond_content_free /
    beyond_content_free_nk / beyond_content_free_gap = real - mean attention (when those ran)."""
    real = layers(runs[("none", exclude_self)])
    out = pd.DataFrame({"layer": real.layer, "kk": real.theta_kk, "nk": real.theta_nk,
                        "gap": real.theta_kk - real.theta_nk, "chance_kk": real.chance_kk,
                        "chance_nk": real.chance_nk, "kk_minus_chance": real.kk_minus_chance,
                        "nk_minus_chance": real.nk_minus_chance, "focus": real.focus,
                        "focus_norm": real.focus_norm})
    real_heads = None
    for (c, x), r in runs.items():
        if x == exclude_self and c != "none":
            lt = layers(r)
            out[f"kk_{c}"] = lt.theta_kk.to_numpy()
            out[f"nk_{c}"] = lt.theta_nk.to_numpy()
            out[f"gap_{c}"] = (lt.theta_kk - lt.theta_nk).to_numpy()
            out[f"focus_{c}"] = lt.focus.to_numpy()
            if c in PARTS:
                real_heads = heads(runs[("none", exclude_self)]) if real_heads is None else real_heads
                part = paired_part(real_heads, heads(r)).reindex(out.layer)
                name = PARTS[c][0]
                out[name], out[f"{name}_nk"], out[f"{name}_gap"] = (part[k].to_numpy() for k in ("kk", "nk", "gap"))
    return out


@dataclass
class Example:
    """One image as the model sees it. crop: (S, S, 3) uint8; x: (3, S, S); counts: (N,);
    keypoints: (K, 4) [x, y, size, angle]; maps: layer -> (H, N, N) attention (when asked)."""

    id: str
    crop: np.ndarray
    x: "object"
    counts: np.ndarray
    keypoints: np.ndarray
    grid: tuple[int, int]
    patch_size: int
    maps: dict | None = None


def example(lm, record, sift=None, with_attention: bool = True) -> Example:
    """Everything the figures of one image need, computed once."""
    crop, x = model_input(read_record(record), lm.data_config)
    t, kp = keypoint_counts(crop, lm.grid, lm.patch_size, sift or SiftParams())
    maps = None
    if with_attention:
        dev = next(lm.model.parameters()).device
        m = attention_maps(lm.model, lm.num_prefix_tokens, x[None].to(dev))
        maps = {l: a[0] for l, a in m.items()}
    return Example(record.id, crop, x, t, kp, tuple(lm.grid), lm.patch_size, maps)


def densest_keypoint_patch(counts: np.ndarray) -> int:
    """Index of the patch with most keypoints (ties: lowest index)."""
    return int(np.argmax(counts))


def query_view(ex: Example, layer: int, head: int | None, query: int, gamma: float = 1.0,
               exclude_self: bool = False) -> dict:
    """One query patch's attention row and its attended set, as the figures show it: layer 1-based,
    head 1-based or None for the head mean -> :func:`query_numbers`."""
    a = ex.maps[layer - 1]
    return query_numbers(a.mean(0) if head is None else a[head - 1], ex.counts, query, gamma, exclude_self)


def query_numbers(a: torch.Tensor, counts: np.ndarray, query: int, gamma: float = 1.0,
                  exclude_self: bool = False) -> dict:
    """One query of an (N, N) map a: row (N,), attended (N,) bool (S_i), line (the detection
    line), theta (weighted theta_i) and chance (theta_chance of counts (N,))."""
    row = a[query]
    att = M.attended_mask(a, gamma, exclude_self)[query]
    t = torch.from_numpy(np.asarray(counts))
    theta = M.theta_rows(a[None], t[None], gamma=gamma, exclude_self=exclude_self)[0, query]
    return {"row": row.numpy(), "attended": att.numpy(), "line": float(gamma * row.sum() / row.numel()),
            "theta": float(theta), "chance": float(M.theta_chance(t))}


def keypoint_share(run: RunDir) -> pd.DataFrame:
    """Per image: keypoints, keypoint patches and their share of all patches."""
    with np.load(run.path / "keypoints.npz") as z:
        ids, c = z["ids"], z["counts"]
    return pd.DataFrame({"image": ids, "n_keypoints": c.sum(1), "n_key_patches": (c > 0).sum(1),
                         "key_share": (c > 0).mean(1) if c.size else []})


def threshold_effect(lm, records, thresholds, progress: bool = True) -> pd.DataFrame:
    """Rows (threshold, image, key_share, data.keypoints.rule_effect's counts: n_keypoints, n_locations,
    ...): SIFT on the model's input crop per threshold."""
    crops = []
    for r in records:
        try:
            crops.append((r.id, model_input(read_record(r), lm.data_config)[0]))
        except ImageDecodeError:
            continue
    rows = []
    for th in tqdm(thresholds, desc="SIFT thresholds", disable=not progress):
        sp = SiftParams(contrast_threshold=float(th))
        for rid, crop in crops:
            t, kp = keypoint_counts(crop, lm.grid, lm.patch_size, sp)
            rows.append({"threshold": float(th), "image": rid, "key_share": float((t > 0).mean()),
                         **rule_effect(kp, lm.grid, lm.patch_size)})
    return pd.DataFrame(rows)


def sensitivity(base: AnalysisParams, gammas=(0.5, 1.0, 2.0), weighted=(True, False),
                limit: int | None = None, root: Path | None = None, progress: bool = True) -> pd.DataFrame:
    """Rows (gamma, weighted, layer, kk, nk, chance_kk, chance_nk, kk_minus_nk): one cached real run
    per setting (chance paired with kk / nk, as in :func:`layer_curves`)."""
    rows = []
    for w in weighted:
        for g in gammas:
            p = base.replace(gamma=float(g), weighted=bool(w), limit=limit or base.limit)
            r = suite(p, controls=("none",), exclude_self=(False,), root=root, progress=progress)[("none", False)]
            lt = layers(r)
            for _, row in lt.iterrows():
                rows.append({"gamma": float(g), "weighted": bool(w), "layer": int(row.layer),
                             "kk": row.theta_kk, "nk": row.theta_nk, "chance_kk": row.chance_kk,
                             "chance_nk": row.chance_nk, "kk_minus_nk": row.theta_kk - row.theta_nk})
    return pd.DataFrame(rows)
