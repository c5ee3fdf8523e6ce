import itertools

import numpy as np
import pytest

from vitsift_core.method.stages import fit_stages, zscore


def piecewise(n, b1, b2, slopes, intercepts):
    y = np.empty(n)
    x = np.arange(1, n + 1)
    for (lo, hi), s, c in zip(((0, b1), (b1, b2), (b2, n)), slopes, intercepts):
        y[lo:hi] = c + s * x[lo:hi]
    return y


def brute_force(th, fo, min_len=2):
    """Obvious reference: every breakpoint pair, np.polyfit per segment."""
    ys = [zscore(th), zscore(fo)]
    n = len(th)
    x = np.arange(1, n + 1)
    best = None
    for b1, b2 in itertools.combinations(range(1, n), 2):
        segs = [(0, b1), (b1, b2), (b2, n)]
        if any(hi - lo < min_len for lo, hi in segs):
            continue
        sse = 0
        for lo, hi in segs:
            for y in ys:
                p = np.polyfit(x[lo:hi], y[lo:hi], 1)
                sse += ((np.polyval(p, x[lo:hi]) - y[lo:hi]) ** 2).sum()
        if best is None or sse < best[0] - 1e-12:
            best = (sse, b1, b2)
    return best


def test_recovers_paper_shaped_curves():
    n = 24
    # Retrieval flat-low theta & broad focus, Capture theta up focus down, Coach slight reversal
    th = piecewise(n, 6, 16, [0.0, 0.1, -0.01], [0.1, -0.3, 1.5])
    fo = piecewise(n, 6, 16, [0.0, -0.2, 0.02], [5.0, 6.0, 2.5])
    fit = fit_stages(th, fo)
    assert fit.boundaries == (6, 16)
    assert fit.segments == [(1, 6), (7, 16), (17, 24)]
    assert fit.holds and fit.names == ["Retrieval", "Capture", "Coach"]
    assert fit.slopes[1]["theta"] > 0 and fit.slopes[1]["focus"] < 0
    assert fit.sse == pytest.approx(0, abs=1e-9)


def test_does_not_force_stages():
    n = 12
    th = np.linspace(1, 0, n)          # theta falls everywhere: no Capture stage
    fo = np.linspace(0, 1, n)
    fit = fit_stages(th, fo)
    assert not fit.holds and fit.names is None
    assert "capture_theta_rises" in fit.failed()
    assert "failed" in fit.summary()


@pytest.mark.parametrize("seed", range(8))
def test_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(6, 16))
    th, fo = rng.normal(size=n), rng.normal(size=n)
    fit = fit_stages(th, fo)
    sse, b1, b2 = brute_force(th, fo)
    assert fit.boundaries == (b1, b2)
    assert fit.sse == pytest.approx(sse, rel=1e-6, abs=1e-9)


def test_bad_input():
    with pytest.raises(ValueError):
        fit_stages(np.zeros(5), np.zeros(5))
    with pytest.raises(ValueError):
        fit_stages(np.zeros(8), np.zeros(7))
    with pytest.raises(ValueError):
        fit_stages(np.r_[np.zeros(7), np.nan], np.zeros(8))


def test_stage_recipe_curves_and_guards():
    from vitsift_core.method.stages import fit_recipe, recipe_json, stage_curves

    kk = np.array([[0.5, 0.6], [np.nan, 0.7], [0.3, 0.2]])
    nk = np.array([[0.1, 0.1], [0.1, 0.1], [0.2, np.nan]])
    ch = np.full((3, 2), 0.25)
    fo = np.array([[1.0, 2.0], [5.0, 5.0], [3.0, 4.0]])
    keep, th, f = stage_curves(kk, nk, ch, fo)
    assert keep.tolist() == [True, False, False]
    np.testing.assert_array_equal(th, [0.25, 0.35])
    np.testing.assert_array_equal(f, [1.0, 2.0])
    assert not stage_curves(kk[1:], nk[1:], ch[1:], fo[1:])[0].any()
    assert fit_recipe(th, f) == (None, "2 layers: a 3-stage fit needs at least 6")
    assert recipe_json(np.r_[np.zeros(5), np.nan], np.zeros(6))["reason"].startswith("undefined (NaN)")
    x = np.arange(12.0)
    d = recipe_json(x, -x)
    assert d["fitted"] and d["segments"] == fit_recipe(x, -x)[0].segments and "summary" in d
