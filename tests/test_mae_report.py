"""Verdict rules and figures of notebooks 01 and 07 (vitsift_core.report.mae) on small hand-made tables."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from vitsift_core.experiments.recovery import recovery_summary  # noqa: E402
from vitsift_core.method import guided as MM  # noqa: E402
from vitsift_core.report import convergence as C  # noqa: E402
from vitsift_core.report import mae as R  # noqa: E402


def run(acc, probe_every_epoch=False, share=0.3):
    n = len(acc)
    probe = acc if probe_every_epoch else [np.nan] * (n - 1) + [acc[-1]]
    return pd.DataFrame({"epoch": np.arange(1, n + 1), "knn_acc": acc, "probe_acc": probe,
                         "train_loss": np.linspace(1, .5, n), "key_share": [share] * n,
                         "beta": [0.1] * n, "lr": [1e-3] * n})


def runs(probe_every_epoch=False):
    """Guided reaches random's best sooner for both seeds."""
    r = lambda acc, mask: run(acc, probe_every_epoch, 0.4 if mask == "guided" else 0.3)
    return {("random", 0): r([.20, .30, .40, .50, .50], "random"), ("guided", 0): r([.20, .45, .50, .50, .51], "guided"),
            ("random", 1): r([.20, .25, .35, .45, .48], "random"), ("guided", 1): r([.20, .40, .47, .48, .49], "guided")}


def diff_row(lo, hi):
    return pd.Series({"mean_diff": (lo + hi) / 2, "ci_low": lo, "ci_high": hi})


def test_epochs_verdict_rule():
    assert "**sooner**" in R.epochs_verdict(diff_row(-3.0, -0.5))
    assert "**later**" in R.epochs_verdict(diff_row(0.5, 3.0))
    assert "**not**" in R.epochs_verdict(diff_row(-1.0, 2.0))
    assert "**not**" in R.epochs_verdict(diff_row(0.0, 0.0))            # touching 0 is no difference
    assert "**not**" in R.epochs_verdict(diff_row(np.nan, np.nan))      # one seed: no interval


def test_guided_mae_verdict_and_the_knn_caveat():
    t = C.convergence_table(runs(), margin=0.01)
    d = C.paired_differences(t)
    curves = C.curves(runs())
    low_init = pd.DataFrame({"seed": [0, 1], "knn_acc": [0.1, 0.1], "probe_acc": [0.1, 0.1]})
    text = R.guided_mae_verdict(d, None, curves, t, low_init, 0.75, 5)
    assert "With 2 paired seeds" in text and "0 guided run(s) censored" in text
    assert "40% of the masked patches under the guided curriculum and 30% under the random mask" in text
    assert "Caveat" not in text and "On the linear probe" not in text
    high_init = low_init.assign(knn_acc=[0.6, 0.6])                  # untrained >= every trained epoch
    assert "**Caveat:**" in R.guided_mae_verdict(d, d, curves, t, high_init, 0.75, 5)
    assert "On the linear probe" in R.guided_mae_verdict(d, d, curves, t, high_init, 0.75, 5)


def key_counts(n_keys, n=64):
    """(len(n_keys), n) counts: image i has n_keys[i] keypoint patches (at shuffled positions)."""
    c = np.zeros((len(n_keys), n), int)
    for i, k in enumerate(n_keys):
        c[i, np.random.default_rng(i).permutation(n)[:k]] = 2
    return c


def test_curriculum_table_hand_case():
    # 8x8 grid, r = 0.75 (48 masked), beta 0.1 in epoch 1 and 0.5 in epochs 2-3
    t = R.curriculum_table(key_counts([54, 0, 30, 10, 38, 20]), [0.75], MM.BetaSchedule((0.1, 0.5), 1), 3)
    assert list(t["tercile"][:4]) == ["all", "low", "mid", "high"] and list(t["epochs"].unique()) == ["1-1", "2-3"]
    hi1, hi2 = (t[(t.tercile == "high") & (t.step == s)].iloc[0] for s in (1, 2))
    assert hi1.own_share == "0.59-0.84" and hi1.n_images == 2 and hi1.random == pytest.approx(92 / 128)
    # 38 keypoint patches: 22 of 48 at both betas' floor, 24 at 0.5; 54: 38 (all 10 non-keypoint masked)
    assert hi1.guided == pytest.approx((22 + 38) / 96) and hi2.guided == pytest.approx((24 + 38) / 96)
    assert (hi1.raised, hi1.lowered, hi2.same_as_previous) == (1.0, 0.0, 0.5)
    mid1 = t[(t.tercile == "mid") & (t.step == 1)].iloc[0]     # 20: exactly 5 of 48 (44 non >= 43); 30: 14
    assert mid1.guided == pytest.approx((5 + 14) / 96) and (mid1.raised, mid1.lowered) == (0.5, 0.0)
    lo2 = t[(t.tercile == "low") & (t.step == 2)].iloc[0]      # 0 and 10 keypoint patches < quota 24
    assert lo2.guided == pytest.approx(10 / 96) and (lo2.lowered, lo2.raised) == (1.0, 0.0)
    assert np.isnan(t[t.step == 1]["same_as_previous"]).all()


def test_curriculum_table_against_drawn_masks():
    rng = np.random.default_rng(3)
    counts = key_counts(rng.integers(0, 50, 30).tolist(), 49)
    sched = MM.BetaSchedule((0.1, 0.2, 0.3), 2)
    t = R.curriculum_table(counts, [0.75, 0.5], sched, 5)
    own = (counts > 0).mean(1)
    order = sorted(range(30), key=lambda i: (own[i], i))
    for r in (0.75, 0.5):
        for step, beta in ((1, 0.1), (2, 0.2), (3, 0.3)):
            for name, grp in (("all", range(30)), ("low", order[:10]), ("mid", order[10:20]), ("high", order[20:])):
                shares = []
                for i in grp:
                    m = MM.guided_mask(counts[i], r, beta, MM.sample_rng(0, step, i))
                    shares.append((m & (counts[i] > 0)).sum() / m.sum())
                row = t[(t.ratio == r) & (t.step == step) & (t.tercile == name)].iloc[0]
                assert row.guided == pytest.approx(np.mean(shares))
                assert row.random == pytest.approx(np.mean([own[i] for i in grp]))
    assert set(t["epochs"]) == {"1-2", "3-4", "5-5"}


@pytest.mark.parametrize("n_key, expect", [(26, "4 of the 5 beta values lie below it. That is why guided masks fewer"),
                                           (4, "0 of the 5 beta values lie below it. So guided masks at least")])
def test_curriculum_verdict_both_ways(n_key, expect):
    t = R.curriculum_table(key_counts([n_key] * 6), [0.75, 0.5], MM.BetaSchedule(), 50)
    text = R.curriculum_verdict(t)
    assert expect in text and "At r = 0.75" in text and "At r = 0.5" in text
    fig = R.curriculum_figure(t, title="t")
    assert len(fig.axes) == 2
    plt.close(fig)


def test_has_probe_curves():
    assert not R.has_probe_curves(C.curves(runs()))
    assert R.has_probe_curves(C.curves(runs(probe_every_epoch=True)))


def errs_table(gap):
    """Two images, k = 1, 2: keypoint-dense error = non-keypoint + gap (+ noise)."""
    rows = []
    for k in (1, 2):
        for i, noise in enumerate((0.0, 0.1, -0.05)):
            for cond, e in (("keypoint-dense", 1 + gap + noise), ("non-keypoint", 1.0), ("random", 1.2)):
                rows.append({"image": f"im{i}", "k": k, "condition": cond, "error": e, "rel_error": e / 2,
                             "n_key": 5})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("gap, expect", [(1.0, ". Every interval is above 0."), (0.0, ". Not every interval is above 0.")])
def test_recovery_verdict_rule(gap, expect):
    e = errs_table(gap)
    text = R.recovery_verdict(recovery_summary(e, "error"), recovery_summary(e, "rel_error"))
    parts = text.split("\n\n")
    assert parts[0].startswith("**error** (keypoint-dense - non-keypoint): k=1: ")
    assert parts[1].startswith("**relative error**") and all(p.endswith(expect) for p in parts)


def test_mae_figures_build_on_small_tables():
    for probe in (False, True):
        rs = runs(probe_every_epoch=probe)
        curves, t = C.curves(rs), C.convergence_table(rs, margin=0.01)
        init = pd.DataFrame({"seed": [0, 1], "knn_acc": [0.1, 0.12], "probe_acc": [0.1, 0.11]})
        fig = R.accuracy_figure(curves, t, init, (0.1, 0.3), 2, 5, 0.01, title="t")
        assert isinstance(fig, plt.Figure) and len(fig.axes) == (3 if probe else 2)   # + the beta axis
        plt.close(fig)
    fig = R.paired_figure(t, C.paired_differences(t), title="t")
    assert isinstance(fig, plt.Figure) and "guided - random" in fig.axes[0].get_title()
    plt.close(fig)
    img = np.zeros((16, 16, 3), np.uint8)
    ex = [{"index": i, "id": f"a/im{i}", "region": r, "error": 0.5, "keypoints_in_region": 3,
           "original": img, "masked": img, "reconstruction": img} for i in (0, 1) for r in ("small", "large")]
    fig = R.recovery_examples_figure(ex, 1, 2, title="t")
    assert isinstance(fig, plt.Figure) and len(fig.axes) == 10
    plt.close(fig)
    fig = R.recovery_error_figure(errs_table(1.0), title="t")
    assert isinstance(fig, plt.Figure) and len(fig.axes) == 2
    plt.close(fig)


def arm(knn_by_seed, mask="random", probe=None):
    """Curves of one arm: {seed: [k-NN at epoch 0, 1, ...]} (probe = k-NN - 0.05 unless given)."""
    rows = []
    for seed, acc in knn_by_seed.items():
        for ep, a in enumerate(acc):
            rows.append({"mask": mask, "seed": seed, "epoch": ep, "knn_acc": a,
                         "probe_acc": (a - 0.05) if probe is None else probe, "key_share": np.nan if ep == 0 else 0.3})
    return pd.DataFrame(rows)


def test_learning_gate_both_ways_and_its_interval():
    # gains .15, .18, .21: mean .18, t(2) interval .18 +- 4.303 * .03 / sqrt(3) = [.1055, .2545]
    g = R.learning_gate(arm({0: [.20, .30, .35], 1: [.22, .33, .40], 2: [.19, .30, .40]}))
    assert g["learned"] and g["gain"] == pytest.approx(0.18) and g["n_seeds"] == 3
    assert (g["ci_low"], g["ci_high"]) == pytest.approx((0.18 - 4.302653 * 0.03 / 3 ** 0.5, 0.18 + 4.302653 * 0.03 / 3 ** 0.5), abs=1e-5)
    assert g["per_seed"] == pytest.approx([0.15, 0.18, 0.21])
    flat = R.learning_gate(arm({0: [.25, .26, .258], 1: [.276, .27, .262], 2: [.246, .25, .266]}))   # issue 18's runs
    assert not flat["learned"] and flat["gain"] == pytest.approx((0.008 - 0.014 + 0.02) / 3)
    # mean gain .10 >= threshold but the seeds disagree: the interval reaches below 0 -> not learned
    noisy = R.learning_gate(arm({0: [.2, .5], 1: [.2, .15], 2: [.2, .25]}))
    assert noisy["gain"] == pytest.approx(0.10) and noisy["ci_low"] < 0 and not noisy["learned"]
    # consistent but small gains: the interval excludes 0, the mean is below the threshold -> not learned
    small = R.learning_gate(arm({0: [.2, .25], 1: [.2, .26], 2: [.2, .24]}))
    assert small["ci_low"] > 0 and not small["learned"]
    assert R.learning_gate(arm({0: [.2, .25], 1: [.2, .26], 2: [.2, .24]}), min_gain=0.05)["learned"]
    # the last epoch counts, not the best; one seed: no interval, the threshold alone
    assert not R.learning_gate(arm({0: [.2, .45, .25]}))["learned"]
    one = R.learning_gate(arm({0: [.2, .25, .31]}))
    assert one["learned"] and one["n_seeds"] == 1 and np.isnan(one["ci_low"])
    # only the asked-for arm is read; a run without epoch 0 is an error
    both = pd.concat([arm({0: [.2, .2]}), arm({0: [.2, .6]}, mask="guided")])
    assert not R.learning_gate(both)["learned"] and R.learning_gate(both, mask="guided")["learned"]
    with pytest.raises(ValueError, match="epoch 0"):
        R.learning_gate(arm({0: [.2, .3]}).query("epoch > 0"))


def test_learning_verdict_and_the_inconclusive_comparison():
    good = R.learning_gate(arm({0: [.20, .30, .35], 1: [.22, .33, .40], 2: [.19, .30, .40]}))
    bad = R.learning_gate(arm({0: [.25, .26, .258], 1: [.276, .27, .262], 2: [.246, .25, .266]}))
    assert "**The random arm learned**" in R.learning_verdict(good, 500) and "inconclusive" not in R.learning_verdict(good, 500)
    text = R.learning_verdict(bad, 500)
    assert "did not learn" in text and "**inconclusive**" in text and "+0.5** points" in text
    assert "SE of at most 2.2 points" in text and ">= 10 points" in text
    t = C.convergence_table(runs(), margin=0.01)
    d = C.paired_differences(t)
    low_init = pd.DataFrame({"seed": [0, 1], "knn_acc": [0.1, 0.1], "probe_acc": [0.1, 0.1]})
    ok = R.guided_mae_verdict(d, None, C.curves(runs()), t, low_init, 0.75, 5, good)
    assert ok == R.guided_mae_verdict(d, None, C.curves(runs()), t, low_init, 0.75, 5)    # a passed gate changes nothing
    assert "nconclusive" not in ok and "do **not** show a difference" in ok     # the interval contains 0
    no = R.guided_mae_verdict(d, None, C.curves(runs()), t, low_init, 0.75, 5, bad)
    assert no.startswith("**Inconclusive**") and "**not** show" not in no and "**inconclusive**: the random" in no


def test_learning_curve_per_epoch_mean_and_interval():
    lc = R.learning_curve(pd.concat([arm({0: [.2, .3], 1: [.4, .5]}), arm({0: [.9, .9]}, mask="guided")]))
    assert list(lc.epoch) == [0, 1] and lc.knn.tolist() == pytest.approx([30, 40])
    assert lc.probe.tolist() == pytest.approx([25, 35]) and (lc.knn_n_seeds == 2).all()
    # two seeds 20 points apart: 10 +- 12.706 * 14.142 / sqrt(2) = 10 +- 127.06
    assert lc.knn_ci_high.iloc[0] == pytest.approx(30 + 12.7062 * 10, abs=1e-3)


def test_convergence_ignores_epoch0_and_probe_curves_need_two_trained_epochs():
    rs = {("random", 0): arm({0: [.9, .3, .5]}).drop(columns=["mask", "seed"]).assign(train_loss=1.0),
          ("guided", 0): arm({0: [.9, .45, .5]}, mask="guided").drop(columns=["mask", "seed"]).assign(train_loss=1.0)}
    t = C.convergence_table(rs, margin=0.01)
    assert t.threshold.tolist() == pytest.approx([0.49, 0.49]) and t.epochs_to_threshold.tolist() == [2, 2]
    end_only = arm({0: [.2, .3, .4]}).assign(probe_acc=[.2, np.nan, .4])      # epoch 0 + the last epoch
    assert not R.has_probe_curves(end_only) and R.has_probe_curves(arm({0: [.2, .3, .4]}))
