"""Mask-eval's summaries: Top < Random < Bottom (point estimates and paired per image), Top's damage
split into content and shape, the masks' shape, and notebook 06's verdict sentences.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from vitsift_core.experiments.maskeval import wide_correct
from vitsift_core.method import masking as MK
from vitsift_core.method import stats as S


def ordering_check(acc: pd.DataFrame) -> pd.DataFrame:
    """Per mode and ratio > 0: Top < Random < Bottom on point estimates (holds) and CIs (separated)."""
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
    """Per (mode, ratio > 0, pair): accuracy(a) - accuracy(b) per image in points, its bootstrap CI,
    images right only under a / b, McNemar p (columns ``CONTRAST_COLS``)."""
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


def _cells(contrasts: pd.DataFrame, pairs):
    """(mode, ratio, the rows of ``pairs``) for every cell of :func:`order_contrasts` holding them all."""
    for (mode, ratio), g in contrasts.groupby(["mode", "ratio"], sort=False):
        g = g.set_index(["a", "b"])
        if all(pair in g.index for pair in pairs):
            yield mode, ratio, [g.loc[pair] for pair in pairs]


def _ci(r) -> str:
    return f"[{r.ci_low:.1f}, {r.ci_high:.1f}]"


def paired_ordering(contrasts: pd.DataFrame) -> pd.DataFrame:
    """Per mode and ratio: Top - Random and Random - Bottom, and whether their CIs lie below 0."""
    rows = []
    for mode, ratio, (tr, rb) in _cells(contrasts, (("top", "random"), ("random", "bottom"))):
        rows.append({"mode": mode, "ratio": ratio, "top_minus_random": tr["diff"],
                     "tr_ci": _ci(tr), "random_minus_bottom": rb["diff"],
                     "rb_ci": _ci(rb), "top_below_random": bool(tr.ci_high < 0),
                     "random_below_bottom": bool(rb.ci_high < 0),
                     "holds": bool(tr.ci_high < 0 and rb.ci_high < 0)})
    return pd.DataFrame(rows)


CONTENT_SHAPE_PAIRS = (("top", "random"), ("top", "top_other"), ("top_other", "random"))


def content_vs_shape(contrasts: pd.DataFrame) -> pd.DataFrame:
    """Top - Random = content (Top - top_other) + shape and place (top_other - Random), per mode and
    ratio, with CIs and content_share = content / (Top - Random) (NaN when that is 0)."""
    rows = []
    for mode, ratio, (tr, tt, orr) in _cells(contrasts, CONTENT_SHAPE_PAIRS):
        rows.append({"mode": mode, "ratio": ratio, "top_minus_random": tr["diff"],
                     "content": tt["diff"], "content_ci": _ci(tt),
                     "shape_place": orr["diff"], "shape_place_ci": _ci(orr),
                     "content_share": tt["diff"] / tr["diff"] if tr["diff"] != 0 else float("nan")})
    return pd.DataFrame(rows)


def mask_shape(scores: dict, params, grid: tuple[int, int]) -> pd.DataFrame:
    """Per order and ratio > 0 of ``params`` (MaskEvalParams): mean mask adjacency and keypoint share
    of the masks rebuilt from ``scores`` (``MaskEvalRun.scores()``)."""
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


def change_verdict(ci_low: float, ci_high: float) -> str:
    """A paired difference's verdict from its 95 % CI."""
    if ci_low > 0:
        return "a gain whose CI excludes 0"
    if ci_high < 0:
        return "a loss whose CI excludes 0"
    return "indistinguishable from no change (CI includes 0)"


def paired_verdicts(paired: pd.DataFrame, order: str = "bottom", ratios=(5, 10)) -> tuple[pd.DataFrame, list[str]]:
    """The ``paired.parquet`` rows for ``order`` at ``ratios`` and one verdict line per row."""
    key = paired[(paired.order == order) & paired.ratio.isin(list(ratios))]
    lines = [f"- {r['mode']}, r = {r.ratio:g} %: {r['diff']:+.2f} points (95 % CI {r.ci_low:+.2f} to "
             f"{r.ci_high:+.2f}), {r.n_gain} images gained / {r.n_loss} lost, McNemar p = {r.p_mcnemar:.3g}: "
             f"{change_verdict(r.ci_low, r.ci_high)}." for _, r in key.iterrows()]
    return key, lines


def ordering_summary(check: pd.DataFrame, paired: pd.DataFrame) -> str:
    """In how many cells Top < Random < Bottom holds, from both checks ("" without cells)."""
    if not len(check):
        return ""
    count = (lambda col: int(paired[col].sum())) if len(paired) else (lambda col: 0)
    return (f"Top < Random < Bottom holds (point estimates) at {int(check.holds.sum())} of {len(check)} (mode, ratio) "
            f"cells; with non-overlapping CIs at {int(check.separated.sum())}. Paired per image (95 % CI of "
            f"Top - Random and Random - Bottom both below 0) at {count('holds')}; Top < Random alone at "
            f"{count('top_below_random')}, Random < Bottom alone at {count('random_below_bottom')}.")


def top_vs_top_other(contrasts: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """The Top - top_other rows of :func:`order_contrasts` and in how many cells its CI is below 0."""
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
