"""Mask-eval's summaries for the report: the ordering Top < Random < Bottom (point estimates and
paired per-image contrasts), Top's damage split into content and shape, and the masks' shape.

Inputs are a run's tables (``maskeval.summarize``'s accuracy table, the predictions, the scores);
the resampling statistics are :mod:`vitsift_core.method.stats`'.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from vitsift_core.experiments.maskeval import wide_correct
from vitsift_core.method import masking as MK
from vitsift_core.method import stats as S


def ordering_check(acc: pd.DataFrame) -> pd.DataFrame:
    """Per mode and ratio > 0: does Top < Random < Bottom hold (point estimates), and do the CIs
    of neighbours overlap? Columns: mode, ratio, top, random, bottom, holds, separated."""
    rows = []
    for (mode, ratio), g in acc[acc.ratio > 0].groupby(["mode", "ratio"]):
        g = g.set_index("order")
        if not {"top", "random", "bottom"} <= set(g.index):
            continue
        t, r, b = (g.loc[o] for o in ("top", "random", "bottom"))
        rows.append({"mode": mode, "ratio": ratio, "top": t.top1, "random": r.top1, "bottom": b.top1,
                     "holds": bool(t.top1 < r.top1 < b.top1),
                     "separated": bool(t.ci_high < r.ci_low and r.ci_high < b.ci_low)})
    return pd.DataFrame(rows)


CONTRAST_COLS = ["mode", "ratio", "a", "b", "n", "diff", "ci_low", "ci_high", "n_a_only", "n_b_only", "p_mcnemar"]


def order_contrasts(pred: pd.DataFrame, pairs=(("top", "random"), ("random", "bottom")),
                    n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Paired per-image accuracy differences between two orders at the same mode and ratio > 0.

    Top < Random < Bottom is a claim about the same images masked three ways, so it is tested
    per image (more power than comparing three separate CIs): diff = accuracy(a) - accuracy(b) in
    percentage points, a percentile bootstrap CI over images (the resamples of ``maskeval.summarize``),
    the images right only under a / only under b, and the exact McNemar p on those.
    Returns one row per (mode, ratio, pair) with columns ``CONTRAST_COLS``.
    """
    if pred.empty:
        return pd.DataFrame(columns=CONTRAST_COLS)
    wide = wide_correct(pred).astype(np.float64)
    w = S.bootstrap_weights(len(wide), n_boot, seed)
    keys, cols = [], []
    for mode in dict.fromkeys(wide.columns.get_level_values(1)):
        for ratio in sorted({r for (_, m, r) in wide.columns if m == mode and r > 0}):
            for a, b in pairs:
                if (a, mode, ratio) in wide.columns and (b, mode, ratio) in wide.columns:
                    keys.append((mode, ratio, a, b))
                    cols.append(wide[(a, mode, ratio)].to_numpy() - wide[(b, mode, ratio)].to_numpy())
    if not keys:
        return pd.DataFrame(columns=CONTRAST_COLS)
    d = np.stack(cols, axis=1)                                             # (n images, K)
    if np.isnan(d).any():
        raise ValueError("order_contrasts: every image needs a prediction under both orders of a pair")
    rows = [{"mode": mode, "ratio": ratio, "a": a, "b": b, "n": len(d), "diff": st["diff"], "ci_low": st["ci_low"],
             "ci_high": st["ci_high"], "n_a_only": st["gain"], "n_b_only": st["loss"], "p_mcnemar": st["p_mcnemar"]}
            for (mode, ratio, a, b), st in zip(keys, S.paired_bootstrap(d, w))]
    return pd.DataFrame(rows, columns=CONTRAST_COLS)


def paired_ordering(contrasts: pd.DataFrame) -> pd.DataFrame:
    """From :func:`order_contrasts` (pairs top-random and random-bottom): per mode and ratio, the two
    differences and whether Top < Random and Random < Bottom hold with CIs excluding 0.
    Columns: mode, ratio, top_minus_random, tr_ci, random_minus_bottom, rb_ci, top_below_random,
    random_below_bottom, holds."""
    rows = []
    for (mode, ratio), g in contrasts.groupby(["mode", "ratio"], sort=False):
        g = g.set_index(["a", "b"])
        if ("top", "random") not in g.index or ("random", "bottom") not in g.index:
            continue
        tr, rb = g.loc[("top", "random")], g.loc[("random", "bottom")]
        rows.append({"mode": mode, "ratio": ratio, "top_minus_random": tr["diff"],
                     "tr_ci": f"[{tr.ci_low:.1f}, {tr.ci_high:.1f}]", "random_minus_bottom": rb["diff"],
                     "rb_ci": f"[{rb.ci_low:.1f}, {rb.ci_high:.1f}]", "top_below_random": bool(tr.ci_high < 0),
                     "random_below_bottom": bool(rb.ci_high < 0),
                     "holds": bool(tr.ci_high < 0 and rb.ci_high < 0)})
    return pd.DataFrame(rows)


CONTENT_SHAPE_PAIRS = (("top", "random"), ("top", "top_other"), ("top_other", "random"))


def content_vs_shape(contrasts: pd.DataFrame) -> pd.DataFrame:
    """Split Top's damage over Random into *content* and *shape and place*, per mode and ratio.

    Top − Random = (Top − top_other) + (top_other − Random), image by image (accuracy differences
    are linear), so from :func:`order_contrasts` with :data:`CONTENT_SHAPE_PAIRS`: ``content`` is
    Top − top_other (this image's own high-score patches against the same mask shape and place
    taken from another image), ``shape_place`` is top_other − Random (a Top-shaped, Top-placed
    mask that knows nothing of the image, against scattered patches). Differences in percentage
    points with their paired 95 % CIs; ``content_share`` = content / (Top − Random), NaN when
    Top − Random is 0.
    Columns: mode, ratio, top_minus_random, content, content_ci, shape_place, shape_place_ci,
    content_share.
    """
    rows = []
    for (mode, ratio), g in contrasts.groupby(["mode", "ratio"], sort=False):
        g = g.set_index(["a", "b"])
        if not all(pair in g.index for pair in CONTENT_SHAPE_PAIRS):
            continue
        tr, tt, orr = (g.loc[pair] for pair in CONTENT_SHAPE_PAIRS)
        rows.append({"mode": mode, "ratio": ratio, "top_minus_random": tr["diff"],
                     "content": tt["diff"], "content_ci": f"[{tt.ci_low:.1f}, {tt.ci_high:.1f}]",
                     "shape_place": orr["diff"], "shape_place_ci": f"[{orr.ci_low:.1f}, {orr.ci_high:.1f}]",
                     "content_share": tt["diff"] / tr["diff"] if tr["diff"] != 0 else float("nan")})
    return pd.DataFrame(rows)


def mask_shape(scores: dict, params, grid: tuple[int, int]) -> pd.DataFrame:
    """How clumped each order's masks are and what they cover: for every order and ratio > 0 of
    ``params``, means over images of :func:`masking.mask_adjacency` (share of masked patches'
    neighbours also masked) and of the share of masked patches holding at least one keypoint.
    ``params``: the run's MaskEvalParams; ``scores``: ``MaskEvalRun.scores()`` (ids, scores (n, N),
    counts (n, N)); the masks are rebuilt exactly as the mask pass built them.
    Columns: order, ratio, n_masked, adjacency, keypoint_share."""
    ids = [str(i) for i in scores["ids"]]
    other = MK.donor_scores(scores["scores"], ids, params.orders, params.seed)
    has_kp = np.asarray(scores["counts"]) > 0                                   # (n, N)
    rows = []
    for order in params.orders:
        rank = MK.rank_patches(order, scores=scores["scores"], counts=scores["counts"], ids=ids,
                               seed=params.seed, tiebreak=params.tiebreak, other_scores=other)
        for r in params.ratios:
            if r > 0:
                idx = MK.mask_indices(rank, r)
                rows.append({"order": order, "ratio": float(r), "n_masked": idx.shape[1],
                             "adjacency": float(np.nanmean(MK.mask_adjacency(idx, grid))),
                             "keypoint_share": float(np.take_along_axis(has_kp, idx, 1).mean())})
    return pd.DataFrame(rows, columns=["order", "ratio", "n_masked", "adjacency", "keypoint_share"])


# ----------------------------------------------------------------------------------- verdicts (notebook 06)
def change_verdict(ci_low: float, ci_high: float) -> str:
    """A paired difference's verdict from its 95 % CI."""
    if ci_low > 0:
        return "a gain whose CI excludes 0"
    if ci_high < 0:
        return "a loss whose CI excludes 0"
    return "indistinguishable from no change (CI includes 0)"


def paired_verdicts(paired: pd.DataFrame, order: str = "bottom", ratios=(5, 10)) -> tuple[pd.DataFrame, list[str]]:
    """The rows of ``paired.parquet`` (masked minus clean) for ``order`` at ``ratios``, and one line
    per row: difference, CI, images gained / lost, McNemar p and :func:`change_verdict`."""
    key = paired[(paired.order == order) & paired.ratio.isin(list(ratios))]
    lines = [f"- {r['mode']}, r = {r.ratio:g} %: {r['diff']:+.2f} points (95 % CI {r.ci_low:+.2f} to "
             f"{r.ci_high:+.2f}), {r.n_gain} images gained / {r.n_loss} lost, McNemar p = {r.p_mcnemar:.3g}: "
             f"{change_verdict(r.ci_low, r.ci_high)}." for _, r in key.iterrows()]
    return key, lines


def ordering_summary(check: pd.DataFrame, paired: pd.DataFrame) -> str:
    """In how many (mode, ratio) cells Top < Random < Bottom holds: point estimates and separated
    CIs (:func:`ordering_check`), and per image (:func:`paired_ordering`). "" without cells."""
    if not len(check):
        return ""
    count = (lambda col: int(paired[col].sum())) if len(paired) else (lambda col: 0)
    return (f"Top < Random < Bottom holds (point estimates) at {int(check.holds.sum())} of {len(check)} (mode, ratio) "
            f"cells; with non-overlapping CIs at {int(check.separated.sum())}. Paired per image (95 % CI of "
            f"Top - Random and Random - Bottom both below 0) at {count('holds')}; Top < Random alone at "
            f"{count('top_below_random')}, Random < Bottom alone at {count('random_below_bottom')}.")


def top_vs_top_other(contrasts: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """The Top - top_other rows of :func:`order_contrasts` and a sentence: in how many cells its CI
    lies below 0 (this image's own high-score patches hurt more than the same mask shape)."""
    t = contrasts[(contrasts.a == "top") & (contrasts.b == "top_other")].reset_index(drop=True)
    if not len(t):
        return t, ""
    return t, (f"Top − top_other has a 95 % CI below 0 at {int((t.ci_high < 0).sum())} of {len(t)} (mode, ratio) "
               f"cells (largest gap {t['diff'].min():+.1f} points).")


def content_summary(split: pd.DataFrame) -> str:
    """:func:`content_vs_shape` at the largest ratio in a sentence ("" when empty)."""
    if not len(split):
        return ""
    far = split[split.ratio == split.ratio.max()]
    return "At the largest ratio, content is " + ", ".join(
        f"{r.content_share:.0%} of Top − Random in {r.mode} ({r.content:+.1f} of {r.top_minus_random:+.1f} points; "
        f"shape and place {r.shape_place:+.1f} {r.shape_place_ci})" for r in far.itertuples()) + "."
