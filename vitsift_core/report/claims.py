"""The claims of Sec 4.1-4.3: each with a bootstrap 95 % CI over images (holds when it excludes 0;
the focus dip needs both of its sides' CIs to exclude 0). The semantic part of the KK bias is real
minus donor keypoints; content-free (mean) attention keeps position + smoothing only (DESIGN.md section 3)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from vitsift_core.experiments.study import Variant, heads, per_image_layer
from vitsift_core.method import stats as S
from vitsift_core.method.stages import fit_recipe, line_fit, stage_curves


@dataclass
class Claim:
    section: str
    claim: str
    measured: str
    value: float
    low: float
    high: float
    holds: bool
    n_images: int = 0               # images that counted in this row

    def row(self) -> dict:
        ci = "n/a" if np.isnan(self.low) else f"[{self.low:.4f}, {self.high:.4f}]"
        return {"section": self.section, "claim": self.claim, "measured": self.measured,
                "value": round(self.value, 4), "ci95": ci,
                "holds": "yes" if self.holds else "no", "n_images": self.n_images}


def kk_rise(m: np.ndarray, axis: int = 0) -> float:
    """Sec 4.1: trend slope over layers 1..L of the mean curve of m (I, L)."""
    c = np.nanmean(m, axis=0)
    return line_fit(np.arange(1, len(c) + 1, dtype=np.float64), c[None])[0][0]


def focus_dip(m: np.ndarray) -> tuple[int, float, float]:
    """Sec 4.2 on the mean curve c (L,) of m (I, L): (k = argmin c, 0-based; c[0] - c[k]; c[-1] - c[k]).
    A dip needs k interior and both sides > 0."""
    c = np.nanmean(m, axis=0)
    k = int(np.argmin(c))
    return k, float(c[0] - c[k]), float(c[-1] - c[k])


def dip_first(m: np.ndarray, axis: int = 0) -> float:
    """:func:`focus_dip`'s first side, as a bootstrap statistic (the resample's own argmin)."""
    return focus_dip(m)[1]


def dip_last(m: np.ndarray, axis: int = 0) -> float:
    """:func:`focus_dip`'s last side, as a bootstrap statistic (the resample's own argmin)."""
    return focus_dip(m)[2]


def dip_claim(fo: np.ndarray, n_boot: int, seed: int) -> Claim:
    """The 4.2 row from focus (I, L): holds when the argmin is interior and BOTH sides' bootstrap
    CIs (images resampled, curve, argmin and sides recomputed) exclude 0; value = the smaller side."""
    k, *_ = focus_dip(fo)
    sides = {name: S.bootstrap_ci(fo, n_boot=n_boot, seed=seed, stat=f)
             for name, f in (("first", dip_first), ("last", dip_last))}
    small = min(sides, key=lambda name: sides[name][0])
    interior = 0 < k < fo.shape[1] - 1
    holds = bool(interior and all(lo > 0 for _, lo, _ in sides.values()))
    each = ", ".join(f"{name} - min {v:.3f} [{lo:.3f}, {hi:.3f}]" for name, (v, lo, hi) in sides.items())
    measured = (f"focus curve minimum at layer {k + 1} of {fo.shape[1]} ({'interior' if interior else 'an end'}); "
                f"{each}; value: {small} side (both CIs must exclude 0)")
    v, lo, hi = sides[small]
    return Claim("4.2", "Focus index falls (attention narrows) and later rises again", measured, v, lo, hi,
                 holds, int((~np.isnan(fo).all(axis=1)).sum()))


# control -> (claim, measured) for "real KK exceeds this control's KK", per image
KK_CONTROLS = {
    "donor-keypoints": ("The KK bias is semantic: real KK exceeds donor-keypoint KK",
                        "mean over layers of theta_KK(real) - theta_KK(donor keypoints)"),
    "mean-attention": ("Real KK exceeds content-free (mean) attention's KK: more than position + smoothing",
                       "mean over layers of theta_KK(real) - theta_KK(mean attention)"),
}
# control -> (claim, measured) for "the KK-NK gap beats this control's", per image
GAP_CONTROLS = {
    "donor-keypoints": ("The KK-NK gap is semantic: another image's keypoints on the same maps give less of it",
                        "mean over layers of (KK-NK)(real) - (KK-NK)(donor keypoints)"),
    "mean-attention": ("The KK-NK gap is larger than content-free attention's gap (position + smoothing)",
                       "mean over layers of (KK-NK)(real) - (KK-NK)(mean attention)"),
    "shuffle-keypoints": ("The KK-NK gap needs the real keypoint positions (shuffled keypoints remove it)",
                          "mean over layers of (KK-NK)(real) - (KK-NK)(shuffled)"),
    "random-init": ("The gap is learned: a random-init model of the same architecture shows less of it",
                    "mean over layers of (KK-NK)(trained) - (KK-NK)(random init)"),
}


def stage_stability(stage, theta: np.ndarray, focus: np.ndarray, n_boot: int, seed: int) -> dict:
    """The fit and how often resampled images (theta, focus: (I, L)) give its boundaries / pass."""
    same, holds = 0, 0
    for i in S.resamples(len(theta), n_boot, seed):
        b, _ = fit_recipe(np.nanmean(theta[i], axis=0), np.nanmean(focus[i], axis=0))
        same += b is not None and b.boundaries == stage.boundaries
        holds += b is not None and b.holds
    return {"fit": stage.to_dict(), "summary": stage.summary(), "bootstrap_same_boundaries": same / n_boot,
            "bootstrap_shape_tests_pass": holds / n_boot, "n_boot": n_boot}


def claims(runs: dict[Variant, object], n_boot: int = 1000, seed: int = 0) -> tuple[pd.DataFrame, dict]:
    """Sec 4.1-4.3 claims over ``study.suite``'s runs, and the stage fit with :func:`stage_stability`."""
    real = heads(runs[("none", False)])
    kk, nk, ch, fo = (per_image_layer(real, m) for m in ("theta_kk", "theta_nk", "theta_chance", "focus"))
    # the stage recipe's images (KK and NK both defined) and curves serve every claim
    keep, curve_th, curve_fo = stage_curves(kk.to_numpy(), nk.to_numpy(), ch.to_numpy(), fo.to_numpy())
    both = kk.index[keep]
    kk, nk, ch, fo = kk.loc[both], nk.loc[both], ch.loc[both], fo.loc[both]
    rows: list[Claim] = []

    def add(section, claim, measured, values, stat=np.nanmean):
        # an image whose value is NaN everywhere (e.g. its donor had no keypoint patch) drops out
        values = np.asarray(values, dtype=np.float64)
        v, lo, hi = S.bootstrap_ci(values, n_boot=n_boot, seed=seed, stat=stat)
        n = int((~np.isnan(values).reshape(len(values), -1).all(axis=1)).sum())
        rows.append(Claim(section, claim, measured, v, lo, hi, bool(lo > 0), n))

    add("4.1", "Keypoint queries attend to keypoint patches more than non-keypoint queries do (KK > NK)",
        "mean over layers of theta_KK - theta_NK", (kk - nk).to_numpy().mean(axis=1))
    add("4.1", "KK is above what attending to everything gives",
        "mean over layers of theta_KK - theta_chance", (kk - ch).to_numpy().mean(axis=1))
    if ("none", True) in runs:
        rx = heads(runs[("none", True)])
        kx, nx, cx = (per_image_layer(rx, m) for m in ("theta_kk", "theta_nk", "theta_chance"))
        idx = both.intersection(kx.index)
        add("4.1", "The KK > NK gap survives excluding each query's own patch (exclude_self)",
            "mean over layers of theta_KK - theta_NK, j != i", (kx.loc[idx] - nx.loc[idx]).to_numpy().mean(axis=1))
        add("4.1", "KK stays above chance when each query's own patch is excluded (exclude_self)",
            "mean over layers of theta_KK - theta_chance, j != i", (kx.loc[idx] - cx.loc[idx]).to_numpy().mean(axis=1))
    for control, (claim, measured) in GAP_CONTROLS.items():
        if (control, False) not in runs:
            continue
        hc = heads(runs[(control, False)])
        ck, cn = (per_image_layer(hc, m).reindex(both) for m in ("theta_kk", "theta_nk"))
        if control in KK_CONTROLS:
            add("4.1", *KK_CONTROLS[control], (kk - ck).to_numpy().mean(axis=1))
        add("4.1", claim, measured, ((kk - nk) - (ck - cn)).to_numpy().mean(axis=1))
    add("4.1", "KK rises with depth", "trend slope of theta_KK - theta_chance per layer",
        (kk - ch).to_numpy(), stat=kk_rise)
    rows.append(dip_claim(fo.to_numpy(), n_boot, seed))
    stage, _ = fit_recipe(curve_th, curve_fo)
    stage_info: dict = {}
    if stage is not None:
        stage_info = stage_stability(stage, (kk - ch).to_numpy(), fo.to_numpy(), min(n_boot, 300), seed)
        rows.append(Claim("4.3", "Three stages: Retrieval, Capture (KK up, focus down), Coach (KK flat/down, focus up)",
                          f"3-segment fit (segments >= {stage.min_len} layers): {stage.summary()}; "
                          "share of bootstraps passing all shape tests",
                          stage_info["bootstrap_shape_tests_pass"], float("nan"), float("nan"), stage.holds,
                          int(len(both))))
    return pd.DataFrame([r.row() for r in rows]), {"n_images": int(len(both)), "stage": stage_info}
