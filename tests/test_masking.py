"""Patch masking (Sec 5.1): rankings, fill, drop, score layers, statistics -- on tiny models."""
import math

import numpy as np
import pandas as pd
import pytest
import torch

from vitsift_core.method import masking as MK
from vitsift_core.method import metrics as M
from vitsift_core.model import masked as MD
from vitsift_core.report.maskplots import masked_crop
from vitsift_core.model.capture import attention_maps, capture_attention
from vitsift_core.model.collectors import PatchScoreCollector
from vitsift_core.experiments.maskeval import MaskEvalParams, summarize
from vitsift_core.method.stats import bootstrap_means, bootstrap_weights
from vitsift_core.report.maskstats import (CONTENT_SHAPE_PAIRS, content_vs_shape, mask_shape, order_contrasts,
                                           ordering_check, paired_ordering)
from vitsift_core.experiments.probe import fit_linear


pytestmark = pytest.mark.usefixtures("one_torch_thread")


from conftest import sharp_test_vit as tiny


GRID, P = (10, 10), 16   # test_vit: 160 px, 16 px patches
N = 100


# ------------------------------------------------------------------------------------------ counts
@pytest.mark.parametrize("pct,n,m", [(0, 256, 0), (5, 256, 13), (10, 256, 26), (20, 256, 52), (40, 256, 103),
                                     (5, 196, 10), (10, 196, 20), (30, 196, 59), (7, 100, 7), (100, 100, 100),
                                     (0.5, 256, 2), (12.5, 16, 2)])
def test_n_masked_is_ceil_exactly(pct, n, m):
    assert MK.n_masked_pct(pct, n) == m
    assert m == math.ceil(round(pct * n / 100, 9))


def test_n_masked_range():
    with pytest.raises(ValueError):
        MK.n_masked_pct(-1, 10)
    with pytest.raises(ValueError):
        MK.n_masked_pct(101, 10)


# ------------------------------------------------------------------------------------------ rankings
def test_top_bottom_pick_exactly_the_extremes():
    rng = np.random.default_rng(0)
    s = rng.random((5, N))                           # distinct scores
    ids = [f"im{i}" for i in range(5)]
    for pct in (5, 10, 20, 33, 40):
        m = MK.n_masked_pct(pct, N)
        top = MK.mask_indices(MK.rank_patches("top", scores=s, ids=ids), pct)
        bot = MK.mask_indices(MK.rank_patches("bottom", scores=s, ids=ids), pct)
        assert top.shape == bot.shape == (5, m)
        for b in range(5):
            assert set(top[b]) == set(np.argsort(-s[b])[:m])
            assert set(bot[b]) == set(np.argsort(s[b])[:m])
            assert len(set(top[b])) == m


def test_rankings_are_permutations_and_nested():
    s = np.random.default_rng(1).random((3, N))
    c = np.random.default_rng(2).integers(0, 4, (3, N))
    ids = ["a", "b", "c"]
    for order in MK.ORDERS:
        r = MK.rank_patches(order, scores=s, counts=c, ids=ids, other_scores=s[[1, 2, 0]])
        assert (np.sort(r, axis=1) == np.arange(N)).all()
        small, big = MK.mask_indices(r, 10), MK.mask_indices(r, 30)
        for b in range(3):
            assert set(small[b]) <= set(big[b])


def test_ties_broken_deterministically_by_index():
    s = np.zeros((1, N))
    s[0, [3, 50, 70]] = 1.0                          # 3 strict highest, the rest tie at 0
    r = MK.rank_patches("top", scores=s, ids=["x"], tiebreak="index")
    assert list(r[0, :3]) == [3, 50, 70]
    assert list(r[0, 3:8]) == [0, 1, 2, 4, 5]        # ties: lowest patch index first
    rb = MK.rank_patches("bottom", scores=s, ids=["x"], tiebreak="index")
    assert list(rb[0, :4]) == [0, 1, 2, 4] and list(rb[0, -3:]) == [3, 50, 70]


def test_ties_broken_by_seeded_permutation_per_image():
    s = np.zeros((2, N))
    s[:, :10] = 1.0
    r1 = MK.rank_patches("top", scores=s, ids=["x", "y"], seed=0)
    r2 = MK.rank_patches("top", scores=s, ids=["x", "y"], seed=0)
    assert (r1 == r2).all()                                          # deterministic
    assert set(r1[0, :10]) == set(range(10))                        # strict order respected
    assert not (r1[0, 10:] == np.arange(10, N)).all()               # ties not by index
    assert (r1[0] != r1[1]).any()                                   # depends on the image id
    alone = MK.rank_patches("top", scores=s[1:], ids=["y"], seed=0)
    assert (alone[0] == r1[1]).all()                                # not on the batch
    assert (MK.rank_patches("top", scores=s, ids=["x", "y"], seed=1)[0] != r1[0]).any()


def test_nan_scores_rank_last():
    s = np.arange(N, dtype=float)[None].copy()
    s[0, [0, 99]] = np.nan
    for order in ("top", "bottom"):
        r = MK.rank_patches(order, scores=s, ids=["x"])
        assert set(r[0, -2:]) == {0, 99}
    assert MK.rank_patches("top", scores=s, ids=["x"])[0, 0] == 98
    assert MK.rank_patches("bottom", scores=s, ids=["x"])[0, 0] == 1


def test_keypoint_order_and_random_order():
    c = np.zeros((1, N), int)
    c[0, [5, 6, 7]] = [1, 9, 4]
    r = MK.rank_patches("keypoints", counts=c, ids=["x"])
    assert list(r[0, :3]) == [6, 7, 5]
    r1 = MK.rank_patches("random", counts=c, ids=["x", "y"], seed=3)
    assert (np.sort(r1, 1) == np.arange(N)).all() and (r1[0] != r1[1]).any()
    assert (MK.rank_patches("random", counts=c[[0, 0]], ids=["y", "x"], seed=3)[1] == r1[0]).all()
    with pytest.raises(ValueError):
        MK.rank_patches("sideways", scores=c)
    with pytest.raises(ValueError):
        MK.rank_patches("top", counts=c)


def test_keep_indices_complement():
    masked = np.array([[0, 5, 9], [1, 2, 3]])
    keep = MD.keep_indices(masked, 10)
    assert keep.tolist() == [[1, 2, 3, 4, 6, 7, 8], [0, 4, 5, 6, 7, 8, 9]]
    assert MD.keep_indices(np.zeros((2, 0), int), 4).tolist() == [[0, 1, 2, 3]] * 2


# ------------------------------------------------------------------------------------------ fill
def test_fill_changes_only_masked_pixels():
    x = torch.randn(2, 3, 160, 160) + 5.0             # no pixel is 0 by chance
    masked = np.array([[0, 11, 99], [42, 43, 57]])
    y = MD.fill_patches(x, masked, GRID, P)
    changed = (y != x).any(dim=1)                      # (B, H, W)
    for b in range(2):
        expect = torch.zeros(160, 160, dtype=torch.bool)
        for j in masked[b]:
            r, c = divmod(int(j), 10)
            expect[r * P:(r + 1) * P, c * P:(c + 1) * P] = True
        assert torch.equal(changed[b], expect)
        assert (y[b][:, expect] == 0).all()
    assert torch.equal(x, x.clone())                   # input untouched (copy)
    assert torch.equal(MD.fill_patches(x, np.zeros((2, 0), int), GRID, P), x)


def test_masked_crop_paints_patches():
    crop = np.full((160, 160, 3), 7, np.uint8)
    out = masked_crop(crop, [0, 99], GRID, P, (124, 116, 104))
    assert (out[:16, :16] == [124, 116, 104]).all() and (out[-16:, -16:] == [124, 116, 104]).all()
    assert (out[16:-16] == 7).all()


# ------------------------------------------------------------------------------------------ drop
@pytest.mark.parametrize("reg", [0, 4])
def test_drop_with_nothing_dropped_equals_plain_forward(reg):
    m = tiny(reg)
    x = torch.randn(3, 3, 160, 160)
    with torch.inference_mode():
        ref = m(x)
        got = m.forward_head(MD.forward_drop(m, x, None))
        got_all = m.forward_head(MD.forward_drop(m, x, np.tile(np.arange(N), (3, 1))))
        got_fill = m.forward_head(MD.masked_features(m, x, "fill", np.zeros((3, 0), int), GRID, P))
        got_drop = m.forward_head(MD.masked_features(m, x, "drop", np.zeros((3, 0), int), GRID, P))
    for g in (got, got_all, got_fill, got_drop):
        torch.testing.assert_close(g, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("reg", [0, 4])
def test_drop_feeds_exactly_n_minus_m_patch_tokens(reg):
    m = tiny(reg)
    x = torch.randn(2, 3, 160, 160)
    seen = []
    h = m.blocks[0].register_forward_pre_hook(lambda mod, args: seen.append(tuple(args[0].shape)))
    try:
        for pct in (5, 10, 40):
            r = MK.rank_patches("random", counts=np.zeros((2, N)), ids=["a", "b"])
            idx = MK.mask_indices(r, pct)
            with torch.inference_mode():
                out = MD.masked_features(m, x, "drop", idx, GRID, P)
            k = N - MK.n_masked_pct(pct, N)
            assert seen[-1] == (2, m.num_prefix_tokens + k, m.embed_dim)
            assert out.shape == (2, m.num_prefix_tokens + k, m.embed_dim)
    finally:
        h.remove()


def _key_masked_forward(m, x, keep):
    """Reference for drop, built by hand: every token embedded in place (conv, cls, positions),
    the blocks run with attention written out, the dropped patches hidden as keys only; the kept
    tokens' outputs are then exactly what dropping gives. keep: (B, K) -> (B, 1 + K, D)."""
    pe, b = m.patch_embed, x.shape[0]
    t = torch.nn.functional.conv2d(x, pe.proj.weight, pe.proj.bias, stride=pe.patch_size)
    t = t.flatten(2).transpose(1, 2) + m.pos_embed[:, 1:]
    z = torch.cat([(m.cls_token + m.pos_embed[:, :1]).expand(b, -1, -1), t], 1)
    n_tok = z.shape[1]
    visible = torch.zeros(b, n_tok, dtype=torch.bool)
    visible[:, 0] = True
    for i in range(b):
        visible[i, 1 + torch.as_tensor(keep[i])] = True
    for blk in m.blocks:
        a = blk.attn
        h = blk.norm1(z)
        q, k, v = a.qkv(h).reshape(b, n_tok, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        s = (a.q_norm(q) @ a.k_norm(k).transpose(-2, -1)) * a.scale
        s = s.masked_fill(~visible[:, None, None, :], float("-inf"))
        o = (s.softmax(-1) @ v).transpose(1, 2).reshape(b, n_tok, -1)
        z = z + blk.ls1(a.proj(a.norm(o) if hasattr(a, "norm") else o))
        z = z + blk.ls2(blk.mlp(blk.norm2(z)))
    z = m.norm(z)
    return torch.stack([torch.cat([z[i, :1], z[i, 1 + torch.as_tensor(keep[i])]]) for i in range(b)])


def test_drop_equals_a_key_masked_full_forward_token_by_token():
    """Every output token of drop (CLS and each kept patch, in keep's order, per image) equals the
    full sequence's with the dropped patches masked out of attention: two images, different kept
    sets in scrambled order."""
    m = tiny()
    assert isinstance(m.norm_pre, torch.nn.Identity) and m.num_prefix_tokens == 1
    torch.manual_seed(3)
    x = torch.randn(2, 3, 160, 160)
    keep = np.stack([np.random.default_rng(i).permutation(N)[:37] for i in range(2)])
    with torch.inference_mode():
        got = MD.forward_drop(m, x, keep)
        ref = _key_masked_forward(m, x, keep)
        other = _key_masked_forward(m, x, keep[::-1].copy())
    assert got.shape == (2, 1 + 37, m.embed_dim)
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-5)
    assert (other - got).abs().max() > 1e-2          # the reference tells the kept sets apart


def test_drop_keeps_each_tokens_own_position():
    """Position travels with the token: the same kept set in any order gives the same CLS output."""
    m = tiny()
    x = torch.randn(1, 3, 160, 160)
    keep = np.array([[3, 17, 40, 41, 77, 90]])
    with torch.inference_mode():
        a = MD.forward_drop(m, x, keep)[:, 0]
        b = MD.forward_drop(m, x, keep[:, ::-1].copy())[:, 0]
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_drop_changes_logits_when_masking():
    m = tiny()
    x = torch.randn(1, 3, 160, 160)
    idx = MK.mask_indices(MK.rank_patches("random", counts=np.zeros((1, N)), ids=["a"]), 40)
    with torch.inference_mode():
        assert not torch.allclose(m.forward_head(MD.masked_features(m, x, "drop", idx, GRID, P)), m(x))
        assert not torch.allclose(m.forward_head(MD.masked_features(m, x, "fill", idx, GRID, P)), m(x))


# ------------------------------------------------------------------------------------------ scores
def test_score_collector_equals_patch_scores_of_captured_maps():
    m = tiny()
    x = torch.randn(2, 3, 160, 160)
    counts = torch.from_numpy(np.random.default_rng(0).integers(0, 3, (2, N)))
    maps = attention_maps(m, 1, x, layers=[1, 4])
    col = PatchScoreCollector([1, 4], 1.0, True, False)
    col.start_batch(counts)
    with torch.inference_mode(), capture_attention(m, 1, col, layers=[1, 4]):
        m.forward_features(x)
    sc, met = col.finish_batch()
    assert sc.shape == (2, 2, N) and met is None
    for k, l in enumerate([1, 4]):
        torch.testing.assert_close(sc[:, k], M.patch_scores(maps[l], counts), rtol=0, atol=1e-6)
    comb = MK.combine_layer_scores(sc.numpy(), [2, 5], [2, 5])
    np.testing.assert_allclose(comb, sc.numpy().mean(1), atol=1e-6)
    np.testing.assert_allclose(MK.combine_layer_scores(sc.numpy(), [5], [2, 5]), sc[:, 1].numpy())


def test_default_score_layer_rule():
    fit = {"fitted": True, "holds": True, "segments": [[1, 3], [4, 8], [9, 12]], "failed": []}
    assert MK.default_score_layer(fit, 12)[0] == [8]
    bad = {"fitted": True, "holds": False, "segments": [[1, 3], [4, 8], [9, 12]], "failed": ["capture_theta_rises"]}
    layers, why = MK.default_score_layer(bad, 12)
    assert layers == [6] and "capture_theta_rises" in why
    assert MK.default_score_layer(None, 12)[0] == [6]
    assert MK.default_score_layer({"fitted": False, "reason": "x"}, 7)[0] == [4]


def test_parse_layers():
    assert MK.parse_layers("auto", 12) == "auto"
    assert MK.parse_layers("7", 12) == [7]
    assert MK.parse_layers(3, 12) == [3]
    assert MK.parse_layers("7-9", 12) == [7, 8, 9]
    assert MK.parse_layers("5,7", 12) == [5, 7]
    for bad in ("0", "13", "", "3-14"):
        with pytest.raises(ValueError):
            MK.parse_layers(bad, 12)


def test_spurious_patches_and_attended_fraction():
    s = np.array([0.9, 0.1, np.nan, 0.3, 0.05, 0.2])
    c = np.array([1, 2, 1, 1, 0, 5])
    assert MK.spurious_patches(s, c, 2).tolist() == [1, 5]          # keypoint patches, lowest s first
    assert MK.spurious_patches(s, c, 10).tolist() == [1, 5, 3, 0]   # NaN and t=0 left out
    attn = torch.softmax(torch.randn(3, 6, 6) * 3, -1)
    frac = MK.attended_fraction(attn, 2)
    ref = M.attended_mask(attn).float().mean(0)[2].numpy()
    np.testing.assert_allclose(frac, ref)
    assert MK.attended_fraction(attn, 2, exclude_self=True)[2] == 0


# ------------------------------------------------------------------------------------------ stats
def _pred_frame(correct: dict, n: int) -> pd.DataFrame:
    rows = []
    for (o, m, r), c in correct.items():
        rows += [{"image": f"i{k}", "label": "a", "target": 0, "order": o, "mode": m, "ratio": r,
                  "n_masked": int(r), "pred": 0 if c[k] else 1, "correct": bool(c[k])} for k in range(n)]
    return pd.DataFrame(rows)


def test_summarize_accuracy_paired_and_mcnemar():
    n = 200
    rng = np.random.default_rng(0)
    clean = rng.random(n) < 0.8
    bottom = clean.copy()
    bottom[:10] = True                               # 10 images gained, at most
    gain = int((~clean[:10]).sum())
    top = rng.random(n) < 0.3
    df = _pred_frame({("bottom", "fill", 0.0): clean, ("top", "fill", 0.0): clean,
                      ("bottom", "fill", 5.0): bottom, ("top", "fill", 5.0): top}, n)
    acc, paired = summarize(df, n_boot=500, seed=0)
    a = acc.set_index(["order", "mode", "ratio"])
    assert a.loc[("bottom", "fill", 5.0), "top1"] == pytest.approx(100 * bottom.mean())
    assert a.loc[("top", "fill", 0.0), "top1"] == pytest.approx(100 * clean.mean())
    assert (acc.ci_low <= acc.top1).all() and (acc.top1 <= acc.ci_high).all() and (acc.n == n).all()
    p = paired.set_index(["order", "mode", "ratio"])
    row = p.loc[("bottom", "fill", 5.0)]
    assert row["diff"] == pytest.approx(100 * gain / n)
    assert row.n_gain == gain and row.n_loss == 0
    from scipy.stats import binomtest
    assert row.p_mcnemar == pytest.approx(binomtest(0, gain, 0.5).pvalue)
    assert row.ci_low >= 0                           # never below 0: no image lost
    z = p.loc[("top", "fill", 0.0)]
    assert z["diff"] == 0 and z.ci_low == 0 and z.ci_high == 0 and z.p_mcnemar == 1.0


def test_bootstrap_is_seeded_and_covers_the_mean():
    w1, w2 = bootstrap_weights(50, 300, 7), bootstrap_weights(50, 300, 7)
    assert np.array_equal(w1, w2) and (w1.sum(1) == 50).all()
    v = np.random.default_rng(0).random((50, 2))
    mean, lo, hi = bootstrap_means(v, w1)
    assert np.allclose(mean, v.mean(0)) and (lo < mean).all() and (mean < hi).all()


def test_ordering_check():
    acc = pd.DataFrame([
        {"order": "top", "mode": "fill", "ratio": 10.0, "top1": 50, "ci_low": 45, "ci_high": 55},
        {"order": "random", "mode": "fill", "ratio": 10.0, "top1": 70, "ci_low": 54, "ci_high": 80},
        {"order": "bottom", "mode": "fill", "ratio": 10.0, "top1": 90, "ci_low": 85, "ci_high": 95},
    ])
    r = ordering_check(acc).iloc[0]
    assert r.holds and not r.separated


# ------------------------------------------------------------------------------------------ probe
def test_fit_linear_separates_and_folds_standardisation():
    rng = np.random.default_rng(0)
    centers = rng.normal(0, 5, (3, 8))
    y = np.repeat(np.arange(3), 20)
    x = centers[y] + rng.normal(0, 0.5, (60, 8)) + 100.0       # far from 0: standardisation matters
    w, b, info = fit_linear(x, y, 3, weight_decay=1e-3, max_iter=200)
    assert w.shape == (3, 8) and b.shape == (3,)
    logits = torch.from_numpy(x).float() @ w.T + b
    assert (logits.argmax(1).numpy() == y).all() and info["train_top1"] == 1.0


def test_order_contrasts_hand_computed():
    """4 images; Top right on images 2, 3; Random on 0, 2, 3; Bottom on all."""
    df = _pred_frame({("top", "fill", 10.0): [0, 0, 1, 1], ("random", "fill", 10.0): [1, 0, 1, 1],
                      ("bottom", "fill", 10.0): [1, 1, 1, 1], ("top", "fill", 0.0): [1, 1, 1, 1]}, 4)
    c = order_contrasts(df, n_boot=300, seed=0).set_index(["a", "b"])
    assert list(c.columns[:2]) == ["mode", "ratio"] and len(c) == 2 and (c.ratio == 10.0).all()
    tr, rb = c.loc[("top", "random")], c.loc[("random", "bottom")]
    assert tr["diff"] == pytest.approx(-25.0) and tr.n_a_only == 0 and tr.n_b_only == 1 and tr.p_mcnemar == 1.0
    assert rb["diff"] == pytest.approx(-25.0) and rb.n_a_only == 0 and rb.n_b_only == 1
    assert tr.ci_high <= 0 and tr.ci_low >= -100
    o = paired_ordering(order_contrasts(df, n_boot=300, seed=0)).iloc[0]
    # a one-image difference: the bootstrap often draws none of it, so the CI reaches 0: not shown
    assert o.top_minus_random == pytest.approx(-25.0) and not o.holds


def test_order_contrasts_match_a_loop_reference():
    """Random predictions: diff, CI (the same resamples, looped) and McNemar counts by hand."""
    from scipy.stats import binomtest
    rng = np.random.default_rng(3)
    n, n_boot = 60, 400
    conds = {(o, m, r): rng.random(n) < p for o, p in (("top", 0.4), ("random", 0.6), ("bottom", 0.8))
             for m in ("fill", "drop") for r in (5.0, 20.0)}
    df = _pred_frame(conds, n)
    c = order_contrasts(df, n_boot=n_boot, seed=5)
    assert len(c) == 2 * 2 * 2
    w = bootstrap_weights(n, n_boot, 5)
    order = sorted(f"i{k}" for k in range(n))          # pivot_table sorts the image ids
    idx = [int(i[1:]) for i in order]
    for _, row in c.iterrows():
        a = conds[(row.a, row["mode"], row.ratio)].astype(float)[idx]
        b = conds[(row.b, row["mode"], row.ratio)].astype(float)[idx]
        d = a - b
        boot = [sum(w[k, j] * d[j] for j in range(n)) / n for k in range(n_boot)]
        assert row["diff"] == pytest.approx(100 * d.mean())
        assert row.ci_low == pytest.approx(100 * np.quantile(boot, 0.025))
        assert row.ci_high == pytest.approx(100 * np.quantile(boot, 0.975))
        assert row.n_a_only == int((d > 0).sum()) and row.n_b_only == int((d < 0).sum())
        assert row.p_mcnemar == pytest.approx(binomtest(min(row.n_a_only, row.n_b_only),
                                                        row.n_a_only + row.n_b_only, 0.5).pvalue)
    po = paired_ordering(c)
    assert len(po) == 4 and set(po["mode"]) == {"fill", "drop"}
    want = (c[(c.a == "top")].ci_high.to_numpy() < 0) & (c[(c.a == "random")].ci_high.to_numpy() < 0)
    assert po.holds.tolist() == want.tolist()


def test_content_vs_shape_hand_computed_and_adds_up():
    """4 images at fill 20 %: Top right on 1 image, top_other on 3, Random on 4.
    Top - Random = -75 = content (Top - top_other, -50) + shape (top_other - Random, -25)."""
    df = _pred_frame({("top", "fill", 20.0): [1, 0, 0, 0], ("top_other", "fill", 20.0): [1, 1, 1, 0],
                      ("random", "fill", 20.0): [1, 1, 1, 1], ("top", "fill", 0.0): [1, 1, 1, 1]}, 4)
    c = order_contrasts(df, pairs=CONTENT_SHAPE_PAIRS, n_boot=300, seed=0)
    r = content_vs_shape(c).iloc[0]
    assert (r["mode"], r.ratio) == ("fill", 20.0)
    assert r.top_minus_random == pytest.approx(-75.0)
    assert r.content == pytest.approx(-50.0) and r.shape_place == pytest.approx(-25.0)
    assert r.content_share == pytest.approx(50 / 75)
    assert r.content_ci.startswith("[") and r.shape_place_ci.endswith("]")
    # without top_other the split is not defined: no rows
    assert content_vs_shape(order_contrasts(df, n_boot=100, seed=0)).empty
    # on random predictions the two parts add up to Top - Random in every cell
    rng = np.random.default_rng(1)
    conds = {(o, m, r): rng.random(50) < q for o, q in (("top", 0.3), ("top_other", 0.6), ("random", 0.7))
             for m in ("fill", "drop") for r in (10.0, 40.0)}
    split = content_vs_shape(order_contrasts(_pred_frame(conds, 50), pairs=CONTENT_SHAPE_PAIRS, n_boot=100, seed=0))
    assert len(split) == 4
    np.testing.assert_allclose(split.content + split.shape_place, split.top_minus_random, atol=1e-9)


def test_mask_adjacency_hand_computed():
    # 4x4 grid. Corner 2x2 block: in-image neighbours 2 + 3 + 3 + 4 = 12, of them masked 2 each -> 8/12
    assert MK.mask_adjacency(np.array([[0, 1, 4, 5]]), (4, 4))[0] == pytest.approx(8 / 12)
    assert MK.mask_adjacency(np.arange(16)[None], (4, 4))[0] == 1.0     # everything masked
    # centre 2x2 block: each has 4 neighbours, 2 masked -> 8/16
    assert MK.mask_adjacency(np.array([[5, 6, 9, 10]]), (4, 4))[0] == pytest.approx(0.5)
    # a diagonal: no masked neighbour; last column and first column do not touch (no wrap-around)
    assert MK.mask_adjacency(np.array([[0, 5, 10, 15]]), (4, 4))[0] == 0.0
    assert MK.mask_adjacency(np.array([[3, 4]]), (4, 4))[0] == 0.0
    assert np.isnan(MK.mask_adjacency(np.zeros((1, 0), np.int64), (4, 4))[0])


def test_mask_adjacency_matches_loop_reference_and_random_level():
    rng = np.random.default_rng(0)
    gh, gw = 6, 9
    n = gh * gw
    masked = np.sort(np.stack([rng.permutation(n)[:20] for _ in range(300)]), axis=1)
    got = MK.mask_adjacency(masked, (gh, gw))
    for b in range(0, 300, 37):
        s = set(masked[b].tolist())
        hit = tot = 0
        for p in s:
            r, c = divmod(p, gw)
            for rr, cc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
                if 0 <= rr < gh and 0 <= cc < gw:
                    tot += 1
                    hit += (rr * gw + cc) in s
        assert got[b] == pytest.approx(hit / tot)
    assert got.mean() == pytest.approx(19 / 53, abs=0.02)      # random masks: about (M - 1) / (N - 1)


def test_mask_shape_rebuilds_the_masks_of_each_order():
    """Bottom of a score that is low on one 3x3 corner block masks that block (clumped); Random does not."""
    gh = gw = 6
    scores = np.ones((2, 36))
    block = [r * gw + c for r in range(3) for c in range(3)]
    scores[:, block] = 0.1
    sc = {"ids": np.array(["a", "b"]), "scores": scores, "counts": np.ones((2, 36), np.int32)}
    p = MaskEvalParams(classifier="x@y", model="x@y", ratios=[0, 25], orders=["bottom", "random"])
    t = mask_shape(sc, p, (gh, gw)).set_index("order")
    assert list(t.ratio) == [25.0, 25.0] and (t.n_masked == 9).all()
    # the 3x3 corner block: in-image neighbours 2+3+3+3+4+4+3+4+4 = 30, masked 2+3+2+3+4+3+2+3+2 = 24
    assert t.loc["bottom", "adjacency"] == pytest.approx(24 / 30)
    want = np.mean(MK.mask_adjacency(MK.mask_indices(MK.rank_patches("random", scores=scores, ids=["a", "b"]), 25),
                                     (gh, gw)))
    assert t.loc["random", "adjacency"] == pytest.approx(want) and want < 24 / 30
    assert (t.keypoint_share == 1.0).all()                      # every patch holds a keypoint here
    # keypoints only on the low block's first row (3 of its 9 patches) of image a, none in b
    counts = np.zeros((2, 36), np.int32)
    counts[0, [0, 1, 2]] = 2
    t2 = mask_shape({**sc, "counts": counts}, p, (gh, gw)).set_index("order")
    assert t2.loc["bottom", "keypoint_share"] == pytest.approx((3 / 9 + 0) / 2)
    has = np.take_along_axis(counts > 0, MK.mask_indices(MK.rank_patches("random", scores=scores, ids=["a", "b"]), 25), 1)
    assert t2.loc["random", "keypoint_share"] == pytest.approx(has.mean())


# ------------------------------------------------------------------------------- donor (*_other) orders
def test_donor_rows_is_a_seeded_derangement_independent_of_id_order():
    ids = [f"im{i:03d}" for i in range(50)]
    d = MK.donor_rows(ids, seed=0)
    assert sorted(d) == list(range(50))                      # every map is used exactly once
    assert (d != np.arange(50)).all()                        # nobody is their own donor
    # one cycle through all images: following donors from 0 visits everyone before returning
    seen, k = set(), 0
    while k not in seen:
        seen.add(k)
        k = d[k]
    assert len(seen) == 50
    assert (MK.donor_rows(ids, seed=0) == d).all() and (MK.donor_rows(ids, seed=1) != d).any()
    # the same id gets the same donor id whatever the row order (resume, ranks, batches)
    perm = np.random.default_rng(5).permutation(50)
    shuffled = [ids[i] for i in perm]
    d2 = MK.donor_rows(shuffled, seed=0)
    assert {shuffled[i]: shuffled[d2[i]] for i in range(50)} == {ids[i]: ids[d[i]] for i in range(50)}
    assert list(MK.donor_rows(["a", "b"])) == [1, 0]
    with pytest.raises(ValueError, match="at least 2"):
        MK.donor_rows(["a"])
    with pytest.raises(ValueError, match="unique"):
        MK.donor_rows(["a", "a"])


def test_top_other_ranks_the_donor_map_as_top_would():
    """Hand case: image a's own map peaks at patch 0, its donor's at patch 3 -> top_other masks 3."""
    own = np.array([[9.0, 1.0, 2.0, 3.0], [1.0, 9.0, 2.0, 3.0]])
    other = np.array([[0.0, 1.0, 2.0, 9.0], [5.0, 0.0, 1.0, 2.0]])
    r = MK.rank_patches("top_other", scores=own, ids=["a", "b"], other_scores=other)
    assert list(r[:, 0]) == [3, 0]
    assert (MK.rank_patches("bottom_other", scores=own, ids=["a", "b"], other_scores=other)[:, 0] == [0, 1]).all()
    # exactly Top of the donor's scores, with the image's own tie-break keys
    s = np.random.default_rng(2).random((6, N))
    ids = [f"im{i}" for i in range(6)]
    d = MK.donor_rows(ids)
    got = MK.rank_patches("top_other", scores=s, ids=ids, other_scores=s[d])
    assert (MK.donor_scores(s, ids, ["top", "top_other"]) == s[d]).all()
    assert MK.donor_scores(s[:1], ids[:1], ["top", "random"]) is None       # no *_other order: no donor needed
    assert (got == MK.rank_patches("top", scores=s[d], ids=ids)).all()
    # as a multiset over the run, the top_other masks are the Top masks (same shapes), reassigned
    top = MK.mask_indices(MK.rank_patches("top", scores=s, ids=ids), 20)
    oth = MK.mask_indices(got, 20)
    assert (oth == top[d]).all()
    with pytest.raises(ValueError, match="other_scores"):
        MK.rank_patches("top_other", scores=s, ids=ids)


def test_mask_shape_of_top_other_matches_top():
    """The donor masks are Top masks moved to other images: same mean clumping exactly."""
    rng = np.random.default_rng(3)
    gh = gw = 10
    # smooth maps (a blob each) so Top masks clump
    yy, xx = np.mgrid[0:gh, 0:gw]
    maps = np.stack([np.exp(-((yy - rng.integers(0, gh)) ** 2 + (xx - rng.integers(0, gw)) ** 2) / 8).ravel()
                     for _ in range(12)]) + 1e-3 * rng.random((12, gh * gw))
    sc = {"ids": np.array([f"i{k}" for k in range(12)]), "scores": maps, "counts": np.ones((12, 100), np.int32)}
    p = MaskEvalParams(classifier="x@y", model="x@y", ratios=[0, 10, 30], orders=["top", "top_other", "random"])
    t = mask_shape(sc, p, (gh, gw))
    w = t.pivot(index="order", columns="ratio", values="adjacency")
    assert np.allclose(w.loc["top"], w.loc["top_other"])
    assert (w.loc["top"] > w.loc["random"]).all()


def test_widget_orders_exclude_donor_orders():
    assert "top_other" in MK.ORDERS and "top_other" not in MK.SINGLE_IMAGE_ORDERS
    assert set(MK.DEFAULT_ORDERS) <= set(MK.ORDERS)


# ----------------------------------------------------------------------------------- notebook 06's verdicts
def test_change_verdict_and_paired_verdicts():
    from vitsift_core.report.maskstats import change_verdict, paired_verdicts

    assert change_verdict(0.1, 2.0) == "a gain whose CI excludes 0"
    assert change_verdict(-3.0, -0.5) == "a loss whose CI excludes 0"
    assert change_verdict(0.0, 1.0).startswith("indistinguishable")
    paired = pd.DataFrame({"order": ["bottom", "bottom", "bottom", "top"], "mode": ["fill", "drop", "fill", "fill"],
                           "ratio": [5.0, 10.0, 20.0, 5.0], "n": 40, "diff": [2.5, -1.0, 3.0, -9.0],
                           "ci_low": [0.5, -3.0, 1.0, -12.0], "ci_high": [4.5, 1.0, 5.0, -6.0],
                           "n_gain": [3, 1, 4, 0], "n_loss": [1, 2, 0, 5], "p_mcnemar": [0.625, 1.0, 0.125, 0.0625]})
    key, lines = paired_verdicts(paired, "bottom", (5, 10))
    assert list(key.index) == [0, 1] and len(lines) == 2
    assert lines[0] == ("- fill, r = 5 %: +2.50 points (95 % CI +0.50 to +4.50), 3 images gained / 1 lost, "
                        "McNemar p = 0.625: a gain whose CI excludes 0.")
    assert lines[1].endswith("indistinguishable from no change (CI includes 0).")


def test_ordering_and_shape_summaries():
    from vitsift_core.report.maskstats import content_summary, ordering_summary, top_vs_top_other

    chk = pd.DataFrame({"mode": ["fill", "fill"], "ratio": [5.0, 10.0], "holds": [True, False],
                        "separated": [True, False]})
    po = pd.DataFrame({"holds": [True, False], "top_below_random": [True, True], "random_below_bottom": [True, False]})
    s = ordering_summary(chk, po)
    assert "holds (point estimates) at 1 of 2 (mode, ratio) cells; with non-overlapping CIs at 1." in s
    assert "both below 0) at 1; Top < Random alone at 2, Random < Bottom alone at 1." in s
    assert "both below 0) at 0; Top < Random alone at 0" in ordering_summary(chk, pd.DataFrame())
    assert ordering_summary(chk.iloc[:0], po) == ""
    con = pd.DataFrame({"mode": "fill", "ratio": [5.0, 10.0, 5.0], "a": ["top", "top", "top"],
                        "b": ["top_other", "top_other", "random"], "diff": [-4.0, -1.0, -6.0],
                        "ci_low": [-6.0, -3.0, -8.0], "ci_high": [-2.0, 0.5, -4.0]})
    t, note = top_vs_top_other(con)
    assert len(t) == 2 and note == ("Top − top_other has a 95 % CI below 0 at 1 of 2 (mode, ratio) cells "
                                    "(largest gap -4.0 points).")
    split = pd.DataFrame({"mode": ["fill", "fill"], "ratio": [5.0, 40.0], "top_minus_random": [-2.0, -10.0],
                          "content": [-1.0, -4.0], "content_ci": ["[-2.0, 0.0]", "[-6.0, -2.0]"],
                          "shape_place": [-1.0, -6.0], "shape_place_ci": ["[-2.0, 0.0]", "[-8.0, -4.0]"],
                          "content_share": [0.5, 0.4]})
    assert content_summary(split) == ("At the largest ratio, content is 40% of Top − Random in fill (-4.0 of -10.0 "
                                      "points; shape and place -6.0 [-8.0, -4.0]).")
    assert content_summary(split.iloc[:0]) == "" and top_vs_top_other(con.iloc[2:])[1] == ""
