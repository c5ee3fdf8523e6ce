import itertools

import numpy as np
import pytest

from vitsift_core.method.stages import fit_recipe, fit_stages, min_segment, recipe_json, zscore


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
    """Random curves of 6-15 layers: the default search (segments >= 3 layers from 12 layers on,
    DESIGN.md) and an explicit min_len=2 search both equal the brute-force reference."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(6, 16))
    th, fo = rng.normal(size=n), rng.normal(size=n)
    fit = fit_stages(th, fo)
    sse, b1, b2 = brute_force(th, fo, min_len=3 if n >= 12 else 2)
    assert fit.boundaries == (b1, b2) and fit.min_len == (3 if n >= 12 else 2)
    assert fit.sse == pytest.approx(sse, rel=1e-6, abs=1e-9)
    sse2, *b = brute_force(th, fo, min_len=2)
    assert fit_stages(th, fo, min_len=2).boundaries == tuple(b)


def test_segments_of_three_layers_from_twelve_layers():
    """A 12-layer curve pair whose exact fit has a 2-layer first segment (breakpoints 2, 7): the
    default (>= 3 layers) must not find it; min_len=2 does. 8 and 11 layers keep >= 2."""
    th = piecewise(12, 2, 7, [0.0, 0.3, -0.05], [0.0, -0.4, 2.0])
    fo = piecewise(12, 2, 7, [0.0, -0.4, 0.1], [3.0, 3.5, 0.0])
    assert fit_stages(th, fo, min_len=2).boundaries == (2, 7)
    fit = fit_stages(th, fo)
    assert fit.min_len == 3 and fit.boundaries != (2, 7)
    assert min(b - a + 1 for a, b in fit.segments) >= 3
    assert fit_recipe(th, fo)[0].boundaries == fit.boundaries          # the recipe uses the same rule
    assert recipe_json(th, fo)["min_len"] == 3
    th8 = piecewise(8, 2, 5, [0.0, 0.3, -0.05], [0.0, -0.4, 2.0])
    fo8 = piecewise(8, 2, 5, [0.0, -0.4, 0.1], [3.0, 3.5, 0.0])
    fit8 = fit_stages(th8, fo8)
    assert fit8.min_len == 2 and fit8.boundaries == (2, 5) and fit8.sse == pytest.approx(0, abs=1e-9)
    assert fit_recipe(th8, fo8)[0].boundaries == (2, 5)
    assert [min_segment(n) for n in (6, 8, 11, 12, 24)] == [2, 2, 2, 3, 3]


# one passing Retrieval / Capture / Coach pair on 12 layers, breakpoints (4, 8): per curve and
# segment (intercept at the segment's first layer, slope per layer)
PASSING = {"theta": [(0.0, 0.0), (2.0, 1.0), (4.5, -0.2)],
           "focus": [(9.0, 0.0), (7.0, -1.0), (4.0, 0.3)]}
# each shape test failing alone: (curve, segment, replacement)
ONE_FAILS = {
    "capture_theta_rises": ("theta", 1, (4.0, -0.3)),        # Capture theta falls, still above Retrieval
    "capture_focus_falls": ("focus", 1, (6.0, 0.3)),         # Capture focus rises, still below Retrieval
    "coach_theta_not_rising": ("theta", 2, (0.0, 1.5)),      # Coach theta climbs steeply
    "coach_focus_not_falling": ("focus", 2, (10.0, -1.5)),   # Coach focus keeps falling
    "retrieval_theta_low": ("theta", 0, (9.0, 0.0)),         # Retrieval theta above Capture's mean
    "retrieval_focus_broad": ("focus", 0, (0.0, 0.0)),       # Retrieval focus below Capture's mean
}


def _curves(spec, n=12, bounds=(4, 8)):
    return [np.concatenate([c + s * np.arange(hi - lo) for (c, s), (lo, hi) in
                            zip(spec[k], ((0, bounds[0]), bounds, (bounds[1], n)))]) for k in ("theta", "focus")]


def test_shape_tests_pass_on_the_paper_shape():
    fit = fit_stages(*_curves(PASSING))
    assert fit.boundaries == (4, 8) and fit.sse == pytest.approx(0, abs=1e-9)
    assert fit.holds and not fit.failed() and fit.names == ["Retrieval", "Capture", "Coach"]


@pytest.mark.parametrize("test", sorted(ONE_FAILS))
def test_each_shape_test_fails_alone(test):
    """The passing pair with one segment of one curve changed: the fit keeps the breakpoints, only
    that shape test fails, and the stages are not named."""
    curve, seg, repl = ONE_FAILS[test]
    spec = {k: list(v) for k, v in PASSING.items()}
    spec[curve][seg] = repl
    fit = fit_stages(*_curves(spec))
    assert fit.boundaries == (4, 8) and fit.sse == pytest.approx(0, abs=1e-9)
    assert fit.failed() == [test]
    assert not fit.holds and fit.names is None and test in fit.summary()


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
