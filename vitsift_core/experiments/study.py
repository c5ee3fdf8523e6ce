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


def layer_curves(runs: dict[Variant, RunDir], exclude_self: bool = False) -> pd.DataFrame:
    """Per layer: the real run's kk, nk, chance, focus, each other control's kk_/nk_/focus_<control>,
    and semantic = kk - kk_mean-attention (when that control ran)."""
    real = layers(runs[("none", exclude_self)])
    out = pd.DataFrame({"layer": real.layer, "kk": real.theta_kk, "nk": real.theta_nk,
                        "chance": real.theta_chance, "focus": real.focus, "focus_norm": real.focus_norm})
    for (c, x), r in runs.items():
        if x == exclude_self and c != "none":
            lt = layers(r)
            out[f"kk_{c}"] = lt.theta_kk.to_numpy()
            out[f"nk_{c}"] = lt.theta_nk.to_numpy()
            out[f"focus_{c}"] = lt.focus.to_numpy()
    if "kk_mean-attention" in out:
        out["semantic"] = out.kk - out["kk_mean-attention"]
        out["semantic_nk"] = out.nk - out["nk_mean-attention"]
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
    """Rows (gamma, weighted, layer, kk, nk, chance, kk_minus_nk): one cached real run per setting."""
    rows = []
    for w in weighted:
        for g in gammas:
            p = base.replace(gamma=float(g), weighted=bool(w), limit=limit or base.limit)
            r = suite(p, controls=("none",), exclude_self=(False,), root=root, progress=progress)[("none", False)]
            lt = layers(r)
            for _, row in lt.iterrows():
                rows.append({"gamma": float(g), "weighted": bool(w), "layer": int(row.layer),
                             "kk": row.theta_kk, "nk": row.theta_nk, "chance": row.theta_chance,
                             "kk_minus_nk": row.theta_kk - row.theta_nk})
    return pd.DataFrame(rows)
