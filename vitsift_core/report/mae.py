"""Figures and verdicts of the MAE notebooks: 07 (Fig. 9, paired seeds) and 01 (recovery, Fig. 2)."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from vitsift_core.method.guided import BetaSchedule, realised_key_share
from vitsift_core.method.stats import mean_ci
from vitsift_core.report.figures import COLORS


def _row(diffs: pd.DataFrame, quantity: str) -> pd.Series:
    """The row of a ``paired_differences`` table for ``quantity``."""
    return diffs[diffs["quantity"].str.startswith(quantity)].iloc[0]


def has_probe_curves(curves: pd.DataFrame) -> bool:
    """True when the linear probe was fitted after more than one trained epoch (``probe_every`` > 0)."""
    trained = curves[curves["epoch"] >= 1]
    return bool(trained["probe_acc"].notna().groupby(trained["epoch"]).any().sum() > 1)


def epochs_verdict(e: pd.Series) -> str:
    """The verdict on a guided - random epochs-to-threshold row."""
    if np.isfinite(e.ci_high) and e.ci_high < 0:
        return "guided reaches the threshold **sooner**, and the interval excludes no difference"
    if np.isfinite(e.ci_low) and e.ci_low > 0:
        return "guided reaches the threshold **later**, and the interval excludes no difference"
    return "the data do **not** show a difference in epochs-to-threshold (the interval contains 0)"


#: the learning gate's threshold: the random arm's mean k-NN gain from epoch 0 to its last epoch must
#: reach this (and its 95% interval over seeds exclude 0). Why 10 points: one k-NN accuracy on n
#: queries has a binomial SE of at most 50 / sqrt(n) points (2.2 at 500), so a 10-point rise is > 4 SE
#: of a single reading, and ten times epochs-to-threshold's 1-point margin.
LEARN_MIN_GAIN = 0.10


def learning_curve(curves: pd.DataFrame, mask: str = "random", level: float = 0.95) -> pd.DataFrame:
    """Per epoch (0 = the untrained encoder) of the ``mask`` runs in ``curves`` (:func:`convergence.curves`,
    epoch 0 included): k-NN and linear-probe accuracy in points, mean over seeds and t interval."""
    rows = []
    for ep, g in curves[curves["mask"] == mask].groupby("epoch"):
        row = {"epoch": int(ep)}
        for col, name in (("knn_acc", "knn"), ("probe_acc", "probe")):
            m, lo, hi, n = mean_ci(g[col] * 100, level)
            row.update({name: m, f"{name}_ci_low": lo, f"{name}_ci_high": hi, f"{name}_n_seeds": n})
        rows.append(row)
    return pd.DataFrame(rows)


def learning_gate(curves: pd.DataFrame, mask: str = "random", metric: str = "knn_acc",
                  min_gain: float = LEARN_MIN_GAIN, level: float = 0.95) -> dict:
    """Did the ``mask`` arm learn? Per seed, gain = ``metric`` at its last epoch - at epoch 0 (the untrained
    encoder); ``learned`` iff the mean gain >= ``min_gain`` and, with >= 2 seeds, the interval's low end > 0.
    -> {learned, gain, ci_low, ci_high, n_seeds, per_seed, min_gain} (gains as fractions)."""
    c = curves[(curves["mask"] == mask) & curves[metric].notna()]
    gains = []
    for _, g in c.groupby("seed"):
        if (g["epoch"] == 0).sum() != 1 or g["epoch"].max() < 1:
            raise ValueError(f"seed {g['seed'].iloc[0]} of the {mask} arm lacks epoch 0 or a trained epoch")
        gains.append(float(g.loc[g["epoch"].idxmax(), metric] - g.loc[g["epoch"] == 0, metric].iloc[0]))
    if not gains:
        raise ValueError(f"no {mask}-mask runs with {metric} in the curves")
    m, lo, hi, n = mean_ci(gains, level)
    learned = bool(m >= min_gain - 1e-12 and (n < 2 or lo > 0))
    return {"learned": learned, "gain": m, "ci_low": lo, "ci_high": hi, "n_seeds": n, "per_seed": gains,
            "min_gain": float(min_gain)}


def learning_verdict(gate: dict, n_queries: int, mask: str = "random") -> str:
    """The gate in words (Markdown), with its threshold and why."""
    ci = (f"95% CI [{gate['ci_low'] * 100:+.1f}, {gate['ci_high'] * 100:+.1f}]" if gate["n_seeds"] > 1
          else "one seed: no interval")
    per = ", ".join(f"{g * 100:+.1f}" for g in gate["per_seed"])
    se = 50 / np.sqrt(max(int(n_queries), 1))
    head = ("**The {m} arm learned**" if gate["learned"] else "**The {m} arm did not learn**").format(m=mask)
    return (f"{head}: k-NN gain from the untrained encoder (epoch 0) to the last epoch = "
            f"**{gate['gain'] * 100:+.1f}** points ({ci}; per seed {per}). Gate: mean gain >= "
            f"{gate['min_gain'] * 100:.0f} points and the interval above 0 (one k-NN accuracy on {n_queries} "
            f"queries has a binomial SE of at most {se:.1f} points; epochs-to-threshold uses a 1-point margin)."
            + ("" if gate["learned"] else " So the guided-vs-random comparison below is **inconclusive**: "
               "encoders that have not learned can neither show nor rule out a difference."))


def guided_mae_verdict(diffs: pd.DataFrame, diffs_p: pd.DataFrame | None, curves: pd.DataFrame,
                       table: pd.DataFrame, init: pd.DataFrame, mask_ratio: float, epochs: int,
                       gate: dict | None = None) -> str:
    """Notebook 07's verdict (Markdown): the paired differences, keypoint share, and the k-NN caveat;
    with a :func:`learning_gate` that failed, the comparison is labelled inconclusive."""
    e, f, p = _row(diffs, "epochs_to_threshold"), _row(diffs, "final_knn_acc"), _row(diffs, "final_probe_acc")
    learned = gate is None or gate["learned"]
    reading = epochs_verdict(e) if learned else (
        "**inconclusive**: the random-mask arm did not learn (learning gate above), so this difference "
        "neither shows nor rules out an effect of the guided mask")
    n_cens = int(e[[c for c in diffs.columns if c.startswith("censored")][0]])
    share = curves.groupby("mask")["key_share"].mean()
    init_knn, init_probe = init["knn_acc"].mean() * 100, init["probe_acc"].mean() * 100
    probe_line = ""
    if diffs_p is not None:
        ep_ = _row(diffs_p, "epochs_to_threshold")
        probe_line = (f"On the linear probe, guided - random epochs-to-threshold = **{ep_.mean_diff:+.2f}** epochs "
                      f"(95% CI [{ep_.ci_low:+.2f}, {ep_.ci_high:+.2f}]; per seed {ep_.per_seed}).\n\n")
    mean_knn = curves[curves["epoch"] >= 1].groupby(["mask", "epoch"])["knn_acc"].mean().max() * 100
    knn_line = (f"**Caveat:** the untrained encoders' k-NN accuracy ({init_knn:.1f}%) is at least the best mean "
                f"k-NN accuracy of any trained epoch ({mean_knn:.1f}%): at this scale MAE training has not (yet) "
                f"produced features that k-NN can use, so k-NN epochs-to-threshold here measures noise.\n\n"
                if init_knn >= mean_knn else "")
    final = {m: table[table["mask"] == m][["final_knn_acc", "final_probe_acc"]].mean() * 100
             for m in ("random", "guided")}
    return (("**Inconclusive** (the random arm did not learn). " if not learned else "") +
        f"With {int(e.n_seeds)} paired seeds, guided - random epochs-to-threshold = **{e.mean_diff:+.2f}** epochs "
        f"(95% CI [{e.ci_low:+.2f}, {e.ci_high:+.2f}]; per seed {e.per_seed}; {n_cens} guided run(s) censored): "
        f"{reading}. Final k-NN accuracy differs by {f.mean_diff:+.2f} points "
        f"[{f.ci_low:+.2f}, {f.ci_high:+.2f}], the final linear probe by {p.mean_diff:+.2f} points "
        f"[{p.ci_low:+.2f}, {p.ci_high:+.2f}].\n\n" + probe_line + knn_line +
        f"Averaged over training, keypoint patches were {share.get('guided', float('nan')):.0%} of the masked "
        f"patches under the guided curriculum and {share.get('random', float('nan')):.0%} under the random mask "
        f"at r = {mask_ratio} (why: the realised curriculum above).\n\n"
        f"For scale: the untrained encoders score {init_knn:.1f}% (k-NN) and {init_probe:.1f}% (probe); after "
        f"{epochs} epochs the random-mask runs reach {final['random'].final_knn_acc:.1f}% and "
        f"{final['random'].final_probe_acc:.1f}%, the guided runs {final['guided'].final_knn_acc:.1f}% and "
        f"{final['guided'].final_probe_acc:.1f}%. An epochs-to-threshold read off curves that barely leave their "
        f"epoch-0 level measures noise, not convergence.")


def _terciles(own: np.ndarray) -> list[np.ndarray]:
    """Indices of the images in three equal-sized groups by ``own`` (ties by position), lowest first."""
    return np.array_split(np.argsort(own, kind="stable"), 3)


def curriculum_table(counts: np.ndarray, ratios, schedule: BetaSchedule, epochs: int) -> pd.DataFrame:
    """The guided curriculum as the images realise it: counts (n, N) keypoints per patch of the
    training images -> one row per mask ratio, beta step and tercile of the images' own keypoint-patch
    share (and ``all``): the mean realised keypoint share of the masked patches (``guided``, from
    :func:`realised_key_share`, its min and max over the images), the random mask's expected share
    (``random`` = the images' own share), the images whose non-keypoint list ran short (``raised``:
    the fill-in rule lifted their share above beta) or whose keypoint list did (``lowered``), and those
    whose share did not move from the previous step (``same_as_previous``)."""
    counts = np.asarray(counts)
    n_img, n_patches = counts.shape
    n_key = (counts > 0).sum(1)
    own = n_key / n_patches
    per_epoch = schedule.values(epochs)
    betas = list(dict.fromkeys(per_epoch.tolist()))            # the steps this many epochs reach
    groups = [("all", np.arange(n_img))] + [(name, g) for name, g in zip(("low", "mid", "high"), _terciles(own))]
    rows = []
    for r in ratios:
        share = realised_key_share(n_key, n_patches, r, betas)  # (n, steps)
        m = round(float(r) * n_patches)
        for j, b in enumerate(betas):
            ep = np.flatnonzero(per_epoch == b) + 1
            nominal = round(b * m) / m if m else np.nan
            for name, g in groups:
                s = share[g, j]
                rows.append({"ratio": float(r), "step": j + 1, "beta": b, "epochs": f"{ep[0]}-{ep[-1]}",
                             "tercile": name, "own_share": f"{own[g].min():.2f}-{own[g].max():.2f}" if len(g) else "",
                             "n_images": len(g), "guided": s.mean() if len(g) else np.nan,
                             "guided_min": s.min() if len(g) else np.nan, "guided_max": s.max() if len(g) else np.nan,
                             "random": own[g].mean() if len(g) else np.nan,
                             "raised": float(np.mean(s > nominal + 1e-12)) if len(g) else np.nan,
                             "lowered": float(np.mean(s < nominal - 1e-12)) if len(g) else np.nan,
                             "same_as_previous": float(np.mean(s == share[g, j - 1])) if j and len(g) else np.nan})
    return pd.DataFrame(rows)


def curriculum_figure(table: pd.DataFrame, title: str = "") -> plt.Figure:
    """Per mask ratio: realised guided keypoint share per beta step and tercile (solid), the random
    mask's expected share (dashed) and beta itself (dotted)."""
    ratios = sorted(table["ratio"].unique(), reverse=True)
    fig, axes = plt.subplots(1, len(ratios), figsize=(5.2 * len(ratios), 4), squeeze=False, sharey=True,
                             layout="constrained")
    shades = {"low": "0.75", "mid": "0.5", "high": "0.25", "all": COLORS["guided"]}
    for ax, r in zip(axes[0], ratios):
        t = table[table["ratio"] == r]
        for name, col in shades.items():
            g = t[t["tercile"] == name]
            lab = "all images" if name == "all" else f"{name} tercile (own share {g['own_share'].iloc[0]})"
            ax.plot(g["step"], g["guided"], color=col, marker="o", lw=2.2 if name == "all" else 1.4,
                    label=f"guided, {lab}")
            ax.plot(g["step"], g["random"], color=col, ls="--", lw=1, label=f"random, {lab}")
        b = t[t["tercile"] == "all"]
        ax.plot(b["step"], b["beta"], color="k", ls=":", lw=1.2, label="beta (nominal)")
        ax.set_xticks(b["step"], [f"{s}\nbeta {v:g}" for s, v in zip(b["step"], b["beta"])])
        ax.set_ylim(0, 1)
        ax.set_xlabel("curriculum step")
        ax.set_title(f"r = {r:g}", fontsize=10)
    axes[0, 0].set_ylabel("keypoint share of the masked patches")
    axes[0, -1].legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.suptitle(title, fontsize=9)
    return fig


def curriculum_verdict(table: pd.DataFrame) -> str:
    """What the realised curriculum says (Markdown): betas below the images' own share, the fill-in
    rule's direction, and how squashed the curriculum is per ratio."""
    a = table[table["tercile"] == "all"]
    own = float(a["random"].iloc[0])
    betas = a.drop_duplicates("step")["beta"]
    below = int((betas < own).sum())
    why = ("That is why guided masks fewer keypoint patches than random in most steps: its early steps are the "
           "paper's \"easy first\"." if 2 * below > len(betas) else
           "So guided masks at least as many keypoint patches as random in most steps: no \"easy first\" here.")
    lines = [f"The training images' own keypoint-patch share, which the random mask masks in expectation, is "
             f"**{own:.0%}**; {below} of the {len(betas)} beta values lie below it. {why} The fill-in rule is "
             f"not the cause: when an image's non-keypoint list runs short it *raises* the share above beta, when "
             f"its keypoint list runs short it lowers it, and either way only towards random's share, never past it."]
    for r, t in table.groupby("ratio", sort=False):
        al, hi = t[t["tercile"] == "all"], t[t["tercile"] == "high"]
        same = al["same_as_previous"].iloc[1] if len(al) > 1 else float("nan")
        lines.append(f"At r = {r:g} the realised share runs {al['guided'].iloc[0]:.2f} -> {al['guided'].iloc[-1]:.2f} "
                     f"over the steps (beta {al['beta'].iloc[0]:g} -> {al['beta'].iloc[-1]:g}; random "
                     f"{al['random'].iloc[0]:.2f}); in the top tercile (own share {hi['own_share'].iloc[0]}) it runs "
                     f"{hi['guided'].iloc[0]:.2f} -> {hi['guided'].iloc[-1]:.2f}, the fill-in rule raising it for "
                     f"{hi['raised'].iloc[0]:.0%} of those images at step 1; steps 1 and 2 mask the same numbers "
                     f"for {same:.0%} of all images.")
    return "\n\n".join(lines)


def _seed_band(ax, curves: pd.DataFrame, mask: str, value: str, singles: bool, label: str) -> None:
    """Mean over seeds (line), their range (band) and, if ``singles``, each seed."""
    c = curves[(curves["mask"] == mask) & curves[value].notna()]
    piv = c.pivot(index="epoch", columns="seed", values=value) * 100
    col = COLORS[mask]
    ax.fill_between(piv.index, piv.min(axis=1), piv.max(axis=1), color=col, alpha=0.18, lw=0)
    if singles:
        for s in piv.columns:
            ax.plot(piv.index, piv[s], color=col, lw=0.7, alpha=0.5)
    ax.plot(piv.index, piv.mean(axis=1), color=col, lw=2.2, marker="o", ms=4, label=label.format(n=piv.shape[1]))


def accuracy_figure(curves: pd.DataFrame, table: pd.DataFrame, init: pd.DataFrame, betas, beta_every: int,
                    epochs: int, margin: float, title: str = "") -> plt.Figure:
    """Fig. 9: k-NN accuracy per epoch over seeds, thresholds, beta and keypoint share; the probe too
    when fitted per epoch."""
    probe = has_probe_curves(curves)
    fig, axes = plt.subplots(1, 2 if probe else 1, figsize=(13 if probe else 7.5, 5.4), squeeze=False,
                             layout="constrained")
    ax = axes[0, 0]
    for mask in ("random", "guided"):
        _seed_band(ax, curves, mask, "knn_acc", True, f"{mask} mask (mean of {{n}} seeds)")
        t = table[table["mask"] == mask]
        ax.scatter(t["epochs_to_threshold"], [0.03 if mask == "random" else 0.08] * len(t), marker="v", s=60,
                   color=COLORS[mask], transform=ax.get_xaxis_transform(), clip_on=False,
                   label=f"{mask}: epochs to threshold (one per seed)")
    ax.scatter([0] * len(init), init["knn_acc"] * 100, marker="x", color="k", s=40, label="untrained encoder (epoch 0)")
    ax.axhline(table["threshold"].mean() * 100, color="0.3", ls=":", lw=1,
               label=f"threshold (random best - {margin * 100:.0f} pt, seed mean)")
    ax.set_xlim(-0.4, epochs + 1.5)
    ticks = list(range(0, epochs + 1, max(1, epochs // 10)))
    ax.set_xticks(ticks + [epochs + 1], [str(e) for e in ticks] + ["n.r."])
    ax.set_xlabel("epoch")
    ax.set_ylabel("k-NN top-1 accuracy on val (%)")
    ax2 = ax.twinx()
    ax2.step(np.arange(1, epochs + 1), BetaSchedule(tuple(betas), beta_every).values(epochs), where="mid",
             color=COLORS["keypoints"], lw=1.5, ls="--", label="beta (guided curriculum)")
    for mask in ("random", "guided"):
        ks = curves[curves["mask"] == mask].groupby("epoch")["key_share"].mean()
        ax2.plot(ks.index, ks.values, color=COLORS[mask], lw=1, ls="-.", label=f"keypoint share of masked, {mask}")
    ax2.set_ylim(0, 1)
    ax2.set_ylabel("beta / keypoint share of masked patches")
    ax2.grid(False)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, fontsize=7)
    ax.set_title("k-NN accuracy (k=20, cosine, CLS) per epoch")
    if probe:
        bx = axes[0, 1]
        for mask in ("random", "guided"):
            _seed_band(bx, curves, mask, "probe_acc", False, f"{mask} mask")
        bx.scatter([0] * len(init), init["probe_acc"] * 100, marker="x", color="k", s=40,
                   label="untrained encoder (epoch 0)")
        bx.set_xlabel("epoch")
        bx.set_ylabel("linear-probe top-1 accuracy on val (%)")
        bx.set_title("linear probe (logistic regression on CLS) per epoch")
        bx.legend(loc="lower right")
        bx.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    fig.suptitle(title, fontsize=10)
    return fig


def paired_figure(table: pd.DataFrame, diffs: pd.DataFrame, title: str = "") -> plt.Figure:
    """Epochs-to-threshold and final k-NN accuracy, random vs guided, one line per seed."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), layout="constrained")
    for ax, col, lab in ((axes[0], "epochs_to_threshold", "epochs to threshold"),
                         (axes[1], "final_knn_acc", "final k-NN accuracy (%)")):
        w = table.pivot(index="seed", columns="mask", values=col) * (100 if "acc" in col else 1)
        for s, r in w.iterrows():
            ax.plot([0, 1], [r["random"], r["guided"]], color="0.6", lw=1)
            ax.text(1.05, r["guided"], f"seed {s}", fontsize=7, va="center")
        ax.scatter([0] * len(w), w["random"], color=COLORS["random"], zorder=3, label="random")
        ax.scatter([1] * len(w), w["guided"], color=COLORS["guided"], zorder=3, label="guided")
        ax.set_xticks([0, 1], ["random", "guided"])
        ax.set_xlim(-0.3, 1.4)
        ax.set_ylabel(lab)
        d = _row(diffs, col)
        ax.set_title(f"guided - random: {d.mean_diff:+.2f} [{d.ci_low:+.2f}, {d.ci_high:+.2f}] {d.unit}", fontsize=9)
    fig.suptitle(title, fontsize=9)
    return fig


def _picture(ax, img: np.ndarray, head: str | None = None) -> None:
    """One image panel of an example grid: pixels as they are, no ticks, the column head on the first row."""
    ax.imshow(img, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if head is not None:
        ax.set_title(head, fontsize=9)


_PANELS = [("original", "small", "original"), ("masked", "small", "masked: small {s}x{s}"),
           ("reconstruction", "small", "reconstruction"), ("masked", "large", "masked: large {l}x{l}"),
           ("reconstruction", "large", "reconstruction")]


def recovery_examples_figure(examples: list[dict], small: int, large: int, title: str = "") -> plt.Figure:
    """Fig. 2: per image, original / masked / reconstruction for the small and the large region."""
    by_img = {}
    for e in examples:
        by_img.setdefault(e["index"], {})[e["region"]] = e
    fig, axes = plt.subplots(len(by_img), 5, figsize=(11, 2.45 * len(by_img)), squeeze=False)
    for r, d in enumerate(by_img.values()):
        for c, (key, region, head) in enumerate(_PANELS):
            e, ax = d[region], axes[r, c]
            _picture(ax, e[key], head.format(s=small, l=large) if r == 0 else None)
            if key == "reconstruction":
                ax.set_xlabel(f"MSE on region {e['error']:.3f}", fontsize=8)
            if key == "masked":
                ax.set_xlabel(f"{e['keypoints_in_region']} keypoints hidden", fontsize=8)
        axes[r, 0].set_ylabel(d["small"]["id"].split("/")[-1][:22], fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def random_mask_figure(examples: list[dict], title: str = "") -> plt.Figure:
    """MAE-style grid: per image, original / masked / prediction of the hidden patches / visible pixels
    pasted back (:func:`~vitsift_core.experiments.recovery.random_mask_examples`)."""
    heads = [("original", "original"), ("masked", "masked: {p:.0%} random patches"),
             ("prediction", "prediction of the hidden patches"), ("reconstruction", "reconstruction (visible pasted)")]
    fig, axes = plt.subplots(len(examples), 4, figsize=(9, 2.4 * len(examples)), squeeze=False)
    for r, e in enumerate(examples):
        for c, (key, head) in enumerate(heads):
            _picture(axes[r, c], e[key], head.format(p=e["ratio"]) if r == 0 else None)
        axes[r, 3].set_xlabel(f"masked-patch error / mean-colour fill {e['rel_error']:.2f}", fontsize=8)
        axes[r, 0].set_ylabel(e["id"].split("/")[-1][:22], fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def recovery_error_figure(errs: pd.DataFrame, title: str = "") -> plt.Figure:
    """Error and relative error vs k per condition (:func:`recovery_errors` rows), 95% t intervals."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    styles = {"keypoint-dense": (COLORS["keypoints"], "o"), "non-keypoint": (COLORS["bottom"], "s"),
              "random": (COLORS["random"], "^")}
    for ax, value, lab in ((axes[0], "error", "reconstruction error on masked patches (MSE)"),
                           (axes[1], "rel_error", "error relative to a mean-colour fill (MSE ratio)")):
        for j, (cond, (col, mk)) in enumerate(styles.items()):
            g = errs[errs.condition == cond]
            st = [mean_ci(g[g.k == k][value]) for k in sorted(g.k.unique())]
            x = np.array(sorted(g.k.unique())) * (1 + 0.04 * (j - 1))
            m = np.array([s[0] for s in st])
            ax.errorbar(x, m, yerr=[m - [s[1] for s in st], [s[2] for s in st] - m], color=col, marker=mk,
                        capsize=3, label=f"{cond} patches")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(errs.k.unique()), [str(k) for k in sorted(errs.k.unique())])
        ax.set_xlabel("k, number of masked patches")
        ax.set_ylabel(lab)
        ax.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def recovery_verdict(summ: pd.DataFrame, summ_rel: pd.DataFrame) -> str:
    """Notebook 01's verdict (Markdown): keypoint-dense - non-keypoint per k, and if all CIs are > 0."""
    lines = []
    for s_, name in ((summ, "error"), (summ_rel, "relative error")):
        dcol = [c for c in s_.columns if c.startswith("diff (")][0]
        rcol = [c for c in s_.columns if c.startswith("ratio (")][0]
        shcol = [c for c in s_.columns if c.startswith("share ")][0]
        parts = [f"k={int(r.k)}: {r[dcol]:+.3f} [{r.diff_ci_low:+.3f}, {r.diff_ci_high:+.3f}], "
                 f"ratio {r[rcol]:.2f}, {r[shcol]:.0%} of {int(r.n_images)} images" for _, r in s_.iterrows()]
        allpos = bool((s_.diff_ci_low > 0).all())
        lines.append(f"**{name}** (keypoint-dense - non-keypoint): " + "; ".join(parts) +
                     (". Every interval is above 0." if allpos else ". Not every interval is above 0."))
    return "\n\n".join(lines)
