"""The model-randomisation check read out (DESIGN.md section 3, control (e)): per step the KK-NK gap
and its semantic part (KK-NK)(real) - (KK-NK)(donor) with bootstrap CIs over images, the stage fit,
the randomisation-curve figure and the claim row "the semantic part vanishes".
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from vitsift_core.method import stats as S
from vitsift_core.method.stages import fit_recipe, stage_curves
from vitsift_core.report.claims import Claim
from vitsift_core.report.figures import COLORS

VANISH_FRAC = 0.1       # "vanishes": the randomised CI lies within +/- this share of the trained value


def per_image(rows: pd.DataFrame, kind: str, step: int, variant: str, metric: str) -> pd.DataFrame:
    """(images x layers) of one metric at one step and variant (rows: ``randomisation.ROW_COLS``)."""
    d = rows[(rows.kind == kind) & (rows.step == step) & (rows.variant == variant)]
    return d.pivot(index="image", columns="layer", values=metric).sort_index()


def kept_images(rows: pd.DataFrame) -> pd.Index:
    """Images whose KK and NK are defined in every layer with both their own and the donor's counts
    (counts do not change with the weights, so the same images count at every step)."""
    keep = None
    for v in ("real", "donor"):
        kk, nk = per_image(rows, "cascade", 0, v, "theta_kk"), per_image(rows, "cascade", 0, v, "theta_nk")
        ok = kk.index[~kk.isna().any(axis=1) & ~nk.isna().any(axis=1)]
        keep = ok if keep is None else keep.intersection(ok)
    return keep


def step_values(rows: pd.DataFrame, kind: str, step: int, images: pd.Index) -> tuple[np.ndarray, np.ndarray]:
    """Per image (I,) at one step: mean over layers of the real KK-NK gap, and of the semantic part
    (KK-NK)(real) - (KK-NK)(donor)."""
    gap = {v: (per_image(rows, kind, step, v, "theta_kk") - per_image(rows, kind, step, v, "theta_nk"))
           .loc[images].to_numpy() for v in ("real", "donor")}
    return gap["real"].mean(axis=1), (gap["real"] - gap["donor"]).mean(axis=1)


def layer_semantic(rows: pd.DataFrame, images: pd.Index | None = None) -> pd.DataFrame:
    """Per (kind, step, layer): the image mean of the semantic part (a curve per step)."""
    images = kept_images(rows) if images is None else images
    d = rows[rows.image.isin(images)]
    g = d.assign(gap=d.theta_kk - d.theta_nk).groupby(["kind", "step", "layer", "variant"]).gap.mean().unstack()
    return (g["real"] - g["donor"]).rename("semantic").reset_index()


def _stage(rows: pd.DataFrame, kind: str, step: int, images: pd.Index) -> str:
    """The one stage recipe on the real run of a step: its summary, or why there is no fit."""
    m = [per_image(rows, kind, step, "real", k).loc[images].to_numpy()
         for k in ("theta_kk", "theta_nk", "theta_chance", "focus")]
    _, th, fo = stage_curves(*m)
    fit, why = fit_recipe(th, fo)
    return fit.summary() if fit is not None else f"no fit: {why}"


def step_table(rows: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """One row per step (cascade first): blocks randomised, images, the KK-NK gap and the semantic part
    with percentile-bootstrap 95 % CIs (the same resamples of images at every step), the stage fit."""
    images = kept_images(rows)
    n_layers = int(rows.layer.max())
    steps = rows[["kind", "step"]].drop_duplicates()
    steps = steps.assign(o=steps.kind.map({"cascade": 0, "single": 1})).sort_values(["o", "step"])
    keys = list(steps[["kind", "step"]].itertuples(index=False, name=None))
    vals = np.column_stack([v for k in keys for v in step_values(rows, *k, images)])      # (I, 2 * steps)
    mean, lo, hi = S.bootstrap_means(vals, S.bootstrap_weights(len(images), n_boot, seed)) if len(images) \
        else (np.full(vals.shape[1], np.nan),) * 3
    out = []
    for i, (kind, step) in enumerate(keys):
        blocks = (f"{n_layers - step + 1}-{n_layers}" if step else "none") if kind == "cascade" else str(step)
        out.append({"kind": kind, "step": step, "blocks_random": blocks, "n_images": len(images),
                    "gap": mean[2 * i], "gap_low": lo[2 * i], "gap_high": hi[2 * i],
                    "semantic": mean[2 * i + 1], "semantic_low": lo[2 * i + 1], "semantic_high": hi[2 * i + 1],
                    "stages": _stage(rows, kind, step, images) if len(images) else "no images"})
    return pd.DataFrame(out)


def vanishes(trained: tuple[float, float, float], randomised: tuple[float, float, float],
             frac: float = VANISH_FRAC) -> bool:
    """The verdict rule, each argument (value, low, high) of the semantic part's bootstrap CI: holds when
    the trained model HAS a semantic part (its CI low > 0) and the fully randomised model's CI lies
    inside (-frac x trained, +frac x trained), i.e. with 95 % confidence less than ``frac`` (10 %) of
    the trained value is left. A randomised CI too wide to show that (few images) does not hold."""
    t, t_lo, _ = trained
    _, r_lo, r_hi = randomised
    if not t_lo > 0:
        return False
    band = frac * t
    return bool(-band < r_lo and r_hi < band)


def randomisation_claim(table: pd.DataFrame, frac: float = VANISH_FRAC) -> Claim:
    """Sec 4.1's row: value = the semantic part with every block random (CI), the trained one in
    ``measured``; holds by :func:`vanishes`."""
    casc = table[table.kind == "cascade"].sort_values("step")
    t, r = casc.iloc[0], casc.iloc[-1]
    trip = (lambda row: (float(row.semantic), float(row.semantic_low), float(row.semantic_high)))
    measured = (f"mean over layers of (KK-NK)(real) - (KK-NK)(donor) with all {int(r.step)} blocks re-initialised; "
                f"trained: {t.semantic:.4f} [{t.semantic_low:.4f}, {t.semantic_high:.4f}]; holds when the trained CI "
                f"excludes 0 and the randomised CI lies within +/-{100 * frac:.0f} % of the trained value")
    return Claim("4.1", "The semantic part vanishes when the weights are randomised", measured,
                 *trip(r), vanishes(trip(t), trip(r), frac),
                 int(r.n_images))


def randomisation_figure(table: pd.DataFrame, title: str = "") -> plt.Figure:
    """Left: cascade (x = last k blocks random); right: each block alone (x = the block, trained value
    dashed). Semantic part and KK-NK gap with their bootstrap 95 % CIs."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2), sharey=True)
    trained = table[(table.kind == "cascade") & (table.step == 0)].iloc[0]
    for ax, kind, xlabel in ((axes[0], "cascade", "blocks re-initialised from the last one down (0 = trained)"),
                             (axes[1], "single", "block re-initialised alone")):
        d = table[table.kind == kind].sort_values("step")
        for col, name, colour in (("gap", "KK-NK gap (real)", COLORS["KK"]),
                                  ("semantic", "semantic part: (KK-NK)(real) - (KK-NK)(donor)", COLORS["semantic"])):
            ax.plot(d.step, d[col], marker="o", ms=3, lw=2, color=colour, label=name)
            ax.fill_between(d.step, d[f"{col}_low"], d[f"{col}_high"], color=colour, alpha=0.2, lw=0)
            if kind == "single":
                ax.axhline(trained[col], color=colour, ls="--", lw=1)
        ax.axhline(0, color="0.3", lw=0.8)
        ax.set_xlabel(xlabel)
    axes[0].set_ylabel("mean over layers (bootstrap 95 % CI)")
    axes[0].legend(fontsize=8)
    axes[1].set_title("dashed: trained model", fontsize=9)
    fig.suptitle(f"Model randomisation (cascading and single blocks){' | ' + title if title else ''}")
    return fig
