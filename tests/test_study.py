"""study.py: bootstrap CIs and the claims table on a tiny model."""
import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from vitsift_core.experiments import study as study
from vitsift_core.method import stats as S
from vitsift_core.method.stages import line_fit
from vitsift_core.report import claims as RC
from vitsift_core.experiments.analysis import AnalysisParams


def test_bootstrap_ci_basic():
    v, lo, hi = S.bootstrap_ci(np.full(50, 3.0))
    assert v == lo == hi == 3.0
    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 1.0, size=400)
    v, lo, hi = S.bootstrap_ci(x, n_boot=2000)
    assert v == pytest.approx(x.mean())
    assert lo < v < hi
    # a normal 95% interval of the mean has half-width ~1.96 * sd / sqrt(n)
    assert (hi - lo) / 2 == pytest.approx(1.96 * x.std() / np.sqrt(len(x)), rel=0.15)
    assert np.isnan(S.bootstrap_ci(np.full(5, np.nan))[0])


def test_trend_rules():
    """The slope and dip rules of the claims table (the slope is the stage fit's line_fit):
    hand-made (images, layers) tables -> expected statistics."""
    slopes, _ = line_fit(np.arange(1.0, 4.0), np.array([[1.0, 3.0, 5.0], [2.0, 2.0, 2.0]]))
    assert slopes.tolist() == pytest.approx([2.0, 0.0])
    assert RC.kk_rise(np.array([[1.0, 3.0, 5.0], [1.0, np.nan, 5.0]])) == pytest.approx(2.0)
    # curve 3, 1, 3.5: minimum at layer index 1, sides 2 and 2.5
    assert RC.focus_dip(np.array([[3.0, 1.0, 2.0], [3.0, 1.0, 5.0]])) == pytest.approx((1, 2.0, 2.5))
    assert RC.focus_dip(np.array([[3.0, 2.0, 1.0]])) == pytest.approx((2, 2.0, 0.0))         # no dip
    assert RC.dip_first(np.array([[4.0, 1.0, 2.0]])) == 3.0 and RC.dip_last(np.array([[4.0, 1.0, 2.0]])) == 1.0


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("study")
    torch.manual_seed(0)
    m = timm.create_model("test_vit", pretrained=False)
    with torch.no_grad():
        for blk in m.blocks:
            blk.attn.qkv.weight.mul_(4.0)
    save_file(m.state_dict(), str(d / "w.safetensors"))
    imgs = d / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        a = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
        a[:32] = 128
        Image.fromarray(a).save(imgs / f"{i}.png")
    base = AnalysisParams(model=f"test_vit@{d / 'w.safetensors'}", images=str(imgs), device="cpu",
                          num_workers=0, batch_size=4)
    mp = pytest.MonkeyPatch()
    mp.setenv("VITSIFT_CACHE", str(d / "cache"))
    runs = study.suite(base, root=d / "results", progress=False)
    yield base, runs, d
    mp.undo()


def test_claims_table(tiny_runs):
    base, runs, d = tiny_runs
    table, info = RC.claims(runs, n_boot=100)
    assert {"section", "claim", "measured", "value", "ci95", "holds"} <= set(table.columns)
    assert len(table) >= 9
    # first claim's value is the mean over images of the layer-mean KK - NK gap
    h = study.heads(runs[("none", False)])
    g = h.groupby(["image", "layer"])[["theta_kk", "theta_nk"]].mean()
    per_img = (g.theta_kk - g.theta_nk).groupby("image").mean().dropna()
    assert table.value.iloc[0] == pytest.approx(per_img.mean(), abs=1e-4)


def _heads(kk, nk, ch, fo):
    """A heads table from per-image, per-layer arrays (I, L), one head."""
    import pandas as pd
    kk, nk, ch, fo = (np.broadcast_to(np.asarray(a, float), np.shape(kk)) for a in (kk, nk, ch, fo))
    i, l = np.meshgrid(np.arange(kk.shape[0]), np.arange(1, kk.shape[1] + 1), indexing="ij")
    return pd.DataFrame({"image": [f"im{j}" for j in i.ravel()], "layer": l.ravel(), "head": 0,
                         "theta_kk": kk.ravel(), "theta_nk": nk.ravel(), "theta_chance": ch.ravel(),
                         "focus": fo.ravel()})


def _hand_claims(real, controls, monkeypatch, xself=None):
    monkeypatch.setattr(RC, "heads", lambda run: run)          # the "runs" are heads tables here
    runs = {("none", False): real, **{(c, False): h for c, h in controls.items()}}
    if xself is not None:
        runs[("none", True)] = xself
    table, _ = RC.claims(runs, n_boot=200)
    return table.set_index("measured")


def _dip_row(t):
    rows = [m for m in t.index if m.startswith("focus curve minimum")]
    assert len(rows) == 1
    return t.loc[rows[0]], rows[0]


def test_claims_holds_and_control_signs_on_hand_tables(monkeypatch):
    """Hand-made per-image tables (10 images, 4 layers): each verdict with both outcomes.
    KK - NK is 0.3 in every image and layer; the controls' gaps are 0.1 (mean attention),
    0.0 (shuffled), 0.2 (random init), so real minus control is +0.2, +0.3, +0.1."""
    meas = {c: m for c, (_, m) in RC.GAP_CONTROLS.items()}
    jitter = np.linspace(-0.05, 0.05, 10)[:, None]             # per image, common to kk and nk
    dip = np.array([[3.0, 1.0, 1.5, 3.0]]) + jitter           # focus: a clear interior minimum
    real = _heads(0.6 + jitter + np.zeros((10, 4)), 0.3 + jitter, 0.4 + jitter, dip)
    ctl = {"mean-attention": _heads(0.45 + np.zeros((10, 4)), 0.35, 0.4, 1.0),
           "shuffle-keypoints": _heads(0.4 + np.zeros((10, 4)), 0.4, 0.4, 1.0),
           "random-init": _heads(0.5 + np.zeros((10, 4)), 0.3, 0.4, 1.0)}
    t = _hand_claims(real, ctl, monkeypatch)
    want = {"mean over layers of theta_KK - theta_NK": 0.3,
            "mean over layers of theta_KK - theta_chance": 0.2,
            "mean over layers of theta_KK(real) - theta_KK(mean attention)": 0.15,
            meas["mean-attention"]: 0.2, meas["shuffle-keypoints"]: 0.3, meas["random-init"]: 0.1}
    for m, v in want.items():
        assert t.loc[m, "value"] == pytest.approx(v, abs=1e-4), m
        assert t.loc[m, "holds"] == "yes", m
    row, _ = _dip_row(t)
    assert row["value"] == pytest.approx(2.0, abs=1e-4) and row["holds"] == "yes"

    # reversed: NK above KK, every control's gap larger than the real one, focus only falls
    mono = np.array([[3.0, 2.0, 1.5, 1.0]]) + jitter
    real = _heads(0.3 + jitter + np.zeros((10, 4)), 0.6 + jitter, 0.4 + jitter, mono)
    ctl = {"mean-attention": _heads(0.5 + np.zeros((10, 4)), 0.3, 0.4, 1.0),
           "shuffle-keypoints": _heads(0.6 + np.zeros((10, 4)), 0.3, 0.4, 1.0),
           "random-init": _heads(0.4 + np.zeros((10, 4)), 0.5, 0.4, 1.0)}
    t = _hand_claims(real, ctl, monkeypatch)
    want = {"mean over layers of theta_KK - theta_NK": -0.3,
            "mean over layers of theta_KK - theta_chance": -0.1,
            "mean over layers of theta_KK(real) - theta_KK(mean attention)": -0.2,
            meas["mean-attention"]: -0.5, meas["shuffle-keypoints"]: -0.6, meas["random-init"]: -0.2}
    for m, v in want.items():
        assert t.loc[m, "value"] == pytest.approx(v, abs=1e-4), m
        assert t.loc[m, "holds"] == "no", m
    row, _ = _dip_row(t)
    assert row["value"] == pytest.approx(0.0, abs=1e-12) and row["holds"] == "no"


def test_claims_hold_only_when_the_ci_excludes_zero(monkeypatch):
    """A positive mean whose CI spans 0 does not hold: gaps +1.0 and -0.9 in alternate images
    (mean +0.05); the same gap +0.05 in every image holds."""
    gap = np.where(np.arange(10) % 2 == 0, 1.0, -0.9)[:, None] + np.zeros((10, 4))
    flat = np.array([[3.0, 1.0, 1.0, 3.0]])
    t = _hand_claims(_heads(0.5 + gap / 2, 0.5 - gap / 2, 0.5, flat), {}, monkeypatch)
    row = t.loc["mean over layers of theta_KK - theta_NK"]
    assert row["value"] == pytest.approx(0.05, abs=1e-4) and row["holds"] == "no"
    t = _hand_claims(_heads(0.525 + np.zeros((10, 4)), 0.475, 0.5, flat), {}, monkeypatch)
    row = t.loc["mean over layers of theta_KK - theta_NK"]
    assert row["value"] == pytest.approx(0.05, abs=1e-4) and row["holds"] == "yes"


JIT = np.linspace(-0.05, 0.05, 10)[:, None]                   # per image, common to kk, nk and chance
U = np.array([[3.0, 1.0, 1.5, 3.5]])                          # focus: a clear interior minimum


def test_donor_rows_are_the_semantic_part(monkeypatch):
    """Real KK - NK is 0.3; donor keypoints on the same maps give KK 0.45, NK 0.35 (gap 0.1), so
    real minus donor is 0.15 (KK) and 0.2 (gap) per image; the donor of image 0 has no keypoint
    patch (NaN) and drops out of the donor rows only. Reversed (donor gap 0.5 > real 0.3): no."""
    gap_m, kk_m = RC.GAP_CONTROLS["donor-keypoints"][1], RC.KK_CONTROLS["donor-keypoints"][1]
    real = _heads(0.6 + JIT + np.zeros((10, 4)), 0.3 + JIT, 0.4 + JIT, U)
    donor = _heads(np.r_[[np.nan], np.full(9, 0.45)][:, None] + np.zeros((10, 4)),
                   np.r_[[np.nan], np.full(9, 0.35)][:, None], 0.4 + JIT, U)
    mean_att = _heads(0.5 + np.zeros((10, 4)), 0.3, 0.4, 1.0)
    t = _hand_claims(real, {"donor-keypoints": donor, "mean-attention": mean_att}, monkeypatch)
    assert t.loc[kk_m, "value"] == pytest.approx(np.mean(0.15 + JIT[1:]), abs=1e-4)
    assert t.loc[gap_m, "value"] == pytest.approx(0.2, abs=1e-4)
    assert t.loc[kk_m, "holds"] == t.loc[gap_m, "holds"] == "yes"
    assert t.loc[kk_m, "n_images"] == t.loc[gap_m, "n_images"] == 9
    assert t.loc["mean over layers of theta_KK - theta_NK", "n_images"] == 10
    assert "semantic" in t.loc[kk_m, "claim"] and "semantic" in t.loc[gap_m, "claim"]
    for m in (RC.KK_CONTROLS["mean-attention"][1], RC.GAP_CONTROLS["mean-attention"][1]):
        assert "position + smoothing" in t.loc[m, "claim"] and "semantic" not in t.loc[m, "claim"]
        assert t.loc[m, "n_images"] == 10
    donor = _heads(0.7 + np.zeros((10, 4)), 0.2, 0.4 + JIT, U)             # donor gap 0.5
    t = _hand_claims(real, {"donor-keypoints": donor}, monkeypatch)
    assert t.loc[kk_m, "value"] == pytest.approx(-0.1, abs=1e-4) and t.loc[kk_m, "holds"] == "no"
    assert t.loc[gap_m, "value"] == pytest.approx(-0.2, abs=1e-4) and t.loc[gap_m, "holds"] == "no"
    assert RC.KK_CONTROLS["mean-attention"][1] not in t.index                # only controls that ran


def test_kk_above_chance_with_exclude_self(monkeypatch):
    """The exclude_self run's KK - chance per image: 0.5 - 0.4 holds; 0.35 - 0.4 does not, while
    the default run's KK - chance (0.2) still holds. Image 3 has no KK in the j != i run."""
    m = "mean over layers of theta_KK - theta_chance, j != i"
    real = _heads(0.6 + JIT + np.zeros((10, 4)), 0.3 + JIT, 0.4 + JIT, U)
    for kx, want, verdict in ((0.5, 0.1, "yes"), (0.35, -0.05, "no")):
        k = np.full((10, 4), kx) + JIT
        k[3] = np.nan
        t = _hand_claims(real, {}, monkeypatch, xself=_heads(k, 0.3 + JIT, 0.4 + JIT, U))
        assert t.loc[m, "value"] == pytest.approx(want, abs=1e-4) and t.loc[m, "holds"] == verdict
        assert t.loc[m, "n_images"] == 9
        assert t.loc["mean over layers of theta_KK - theta_chance", "holds"] == "yes"
    assert m not in _hand_claims(real, {}, monkeypatch).index


def test_kk_rise_both_outcomes(monkeypatch):
    """theta_KK - chance rising 0.05 per layer holds; falling 0.05 per layer does not."""
    m = "trend slope of theta_KK - theta_chance per layer"
    layer = np.arange(1, 5)[None, :]
    for slope, verdict in ((0.05, "yes"), (-0.05, "no")):
        t = _hand_claims(_heads(0.5 + slope * layer + JIT, 0.2, 0.3, U), {}, monkeypatch)
        assert t.loc[m, "value"] == pytest.approx(slope, abs=1e-6) and t.loc[m, "holds"] == verdict


def test_focus_dip_rule_both_sides():
    """U-shaped focus (sides 2.0 and 2.5) holds with the smaller (first) side as the value; a
    monotone falling curve does not (last side 0, minimum at an end); a shallow noisy dip (last layer
    1 + d, d = +0.3 / -0.2 in alternate images, mean 0.05) has an interior minimum but the last side's
    CI reaches 0, so it does not hold although the first side's CI excludes 0."""
    c = RC.dip_claim(U + JIT + np.zeros((10, 4)), n_boot=300, seed=0)
    assert c.holds and c.value == pytest.approx(2.0) and c.low == pytest.approx(2.0) and c.low > 0
    assert "minimum at layer 2 of 4 (interior)" in c.measured and "value: first side" in c.measured
    c = RC.dip_claim(np.array([[3.0, 2.0, 1.5, 1.0]]) + JIT, n_boot=300, seed=0)
    assert not c.holds and c.value == 0.0 and "layer 4 of 4 (an end)" in c.measured
    d = np.where(np.arange(10) % 2 == 0, 0.3, -0.2)
    shallow = np.column_stack([np.full(10, 3.0), np.full(10, 2.0), np.ones(10), 1.0 + d])
    c = RC.dip_claim(shallow, n_boot=300, seed=0)
    first = S.bootstrap_ci(shallow, n_boot=300, seed=0, stat=RC.dip_first)
    assert first[1] > 1.5                                                  # the first side slopes
    assert "minimum at layer 3 of 4 (interior)" in c.measured and "value: last side" in c.measured
    assert c.value == pytest.approx(0.05) and c.low == 0.0 and not c.holds
    assert c.n_images == 10


def test_suite_reads_back_without_recomputing(tiny_runs, monkeypatch):
    base, runs, d = tiny_runs
    import vitsift_core.experiments.study as S
    monkeypatch.setattr(S, "run_suite", lambda *a, **k: pytest.fail("recomputed a finished run"))
    again = study.suite(base, root=d / "results", progress=False)
    assert {v: r.path for v, r in again.items()} == {v: r.path for v, r in runs.items()}


def test_layer_curves_and_sensitivity(tiny_runs):
    base, runs, d = tiny_runs
    cur = study.layer_curves(runs)
    assert list(cur.layer) == list(range(1, 7))
    # slow reference: per layer, the mean over (image, head) rows where both runs define the value
    real = study.heads(runs[("none", False)])
    for control, part in (("donor-keypoints", "semantic"), ("mean-attention", "beyond_content_free")):
        other = {(r.image, r.layer, r.head): r for r in study.heads(runs[(control, False)]).itertuples()}
        for suffix, f in (("", lambda r: r.theta_kk), ("_nk", lambda r: r.theta_nk),
                          ("_gap", lambda r: r.theta_kk - r.theta_nk)):
            for layer in range(1, 7):
                diff = [f(r) - f(other[(r.image, r.layer, r.head)]) for r in real.itertuples() if r.layer == layer]
                diff = [x for x in diff if not np.isnan(x)]
                assert cur[f"{part}{suffix}"].iloc[layer - 1] == pytest.approx(np.mean(diff), abs=1e-6), (part, suffix)
    assert not np.allclose(cur.semantic, cur.beyond_content_free)
    # chance paired with KK: theta_chance over the rows where theta_kk is defined
    for layer in range(1, 7):
        rl = real[real.layer == layer]
        assert cur.chance_kk.iloc[layer - 1] == pytest.approx(rl.theta_chance[rl.theta_kk.notna()].mean(), abs=1e-6)
        assert cur.kk_minus_chance.iloc[layer - 1] == pytest.approx(cur.kk.iloc[layer - 1] - cur.chance_kk.iloc[layer - 1],
                                                                     abs=1e-6)
    sens = study.sensitivity(base, gammas=(1.0, 2.0), weighted=(True,), limit=4, root=d / "results", progress=False)
    assert set(sens.gamma) == {1.0, 2.0} and len(sens) == 12


def test_choose_images_falls_back_and_says_so(monkeypatch, tmp_path):
    monkeypatch.setenv("VITSIFT_DATA", str(tmp_path))
    spec, note = study.choose_images("imagenette:val")
    assert spec == "samples" and "not found" in note
    spec, note = study.choose_images("samples")
    assert spec == "samples"
