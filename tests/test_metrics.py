"""Metrics against hand-computed cases and a slow, obvious loop reference."""
import math

import numpy as np
import pytest
import torch

from vitsift_core.method import metrics as M

NAN = float("nan")


# ---------------------------------------------------------------- slow reference
def ref_theta_i(row, t, i, gamma, weighted, exclude_self):
    n = len(row)
    line = gamma * (sum(row) / n)
    s = [j for j in range(n) if row[j] >= line and not (exclude_self and j == i)]
    if not s:
        return NAN
    key = [j for j in s if t[j] > 0]
    non = [j for j in s if t[j] == 0]
    if weighted:
        num = sum(t[j] for j in key)
        return num / (len(non) + num)
    return len(key) / len(s)


def ref_mean(vals):
    vals = [v for v in vals if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else NAN


def ref_entropy(row, kind):
    lo = min(row)
    shifted = [a - lo for a in row] if kind == "minmax" else list(row)
    tot = sum(shifted)
    if tot <= 0:
        return NAN
    return -sum((a / tot) * math.log(a / tot) for a in shifted if a > 0)


def ref_head(attn, t, gamma=1.0, weighted=True, exclude_self=False, kind="minmax"):
    """attn: (N, N) float64 numpy, t: (N,) ints -> dict of python floats."""
    n = len(t)
    th = [ref_theta_i(attn[i], t, i, gamma, weighted, exclude_self) for i in range(n)]
    kk = ref_mean([th[i] for i in range(n) if t[i] > 0])
    nk = ref_mean([th[i] for i in range(n) if t[i] == 0])
    key_sum = sum(x for x in t if x > 0)
    n_non = sum(1 for x in t if x == 0)
    if weighted:
        chance = key_sum / (n_non + key_sum)
    else:
        chance = (n - n_non) / n
    foc = ref_mean([ref_entropy(attn[i], kind) for i in range(n)])
    return dict(theta_kk=kk, theta_kn=1 - kk, theta_nk=nk, theta_nn=1 - nk, theta_chance=chance,
                focus=foc, focus_norm=foc / math.log(n), theta=th)


def close(a, b, tol=1e-5):
    if math.isnan(b):
        return math.isnan(a)
    return abs(a - b) <= tol


# ---------------------------------------------------------------- hand-computed
ATTN4 = torch.tensor([
    [0.4, 0.1, 0.3, 0.2],
    [0.1, 0.5, 0.1, 0.3],
    [0.25, 0.25, 0.25, 0.25],   # every entry ties with the detection line
    [0.5, 0.0, 0.0, 0.5],
], dtype=torch.float64)
T4 = torch.tensor([2, 0, 1, 0])   # keypoint patches {0, 2}, non-keypoint {1, 3}


def test_hand_4x4_weighted():
    th = M.theta_rows(ATTN4, T4)
    # S_0={0,2}: 3/3; S_1={1,3}: 0/2; S_2=all: 3/(2+3); S_3={0,3}: 2/(1+2)
    assert th.tolist() == pytest.approx([1.0, 0.0, 0.6, 2 / 3])
    agg = M.aggregate_theta(th, T4)
    assert agg["theta_kk"].item() == pytest.approx((1.0 + 0.6) / 2)
    assert agg["theta_kn"].item() == pytest.approx(1 - 0.8)
    assert agg["theta_nk"].item() == pytest.approx((0 + 2 / 3) / 2)
    assert agg["theta_nn"].item() == pytest.approx(1 - 1 / 3)
    assert M.theta_chance(T4).item() == pytest.approx(3 / 5)


def test_hand_4x4_unweighted_exclude_self_gamma():
    th = M.theta_rows(ATTN4, T4, weighted=False)
    assert th.tolist() == pytest.approx([1.0, 0.0, 0.5, 0.5])
    assert M.theta_chance(T4, weighted=False).item() == pytest.approx(0.5)
    # exclude_self: S_0={2}: 1; S_1={3}: 0; S_2={0,1,3}: 2/(2+2); S_3={0}: 1
    th = M.theta_rows(ATTN4, T4, exclude_self=True)
    assert th.tolist() == pytest.approx([1.0, 0.0, 0.5, 1.0])
    # gamma=2: line 0.5 -> S_0 and S_2 empty (NaN), S_1={1}: 0, S_3={0,3}: 2/3
    th = M.theta_rows(ATTN4, T4, gamma=2.0)
    assert math.isnan(th[0]) and math.isnan(th[2])
    assert th[1].item() == 0.0 and th[3].item() == pytest.approx(2 / 3)
    agg = M.aggregate_theta(th, T4)
    assert math.isnan(agg["theta_kk"].item())          # both keypoint queries undefined
    assert agg["theta_nk"].item() == pytest.approx(1 / 3)


def test_hand_4x4_focus():
    def h(q):
        return -sum(p * math.log(p) for p in q if p > 0)
    rows = [h([0.5, 0, 1 / 3, 1 / 6]), h([0, 2 / 3, 0, 1 / 3]), h([0.5, 0, 0, 0.5])]  # row 2 constant: NaN
    ent = M.row_entropy(ATTN4)
    assert math.isnan(ent[2])
    assert [ent[0].item(), ent[1].item(), ent[3].item()] == pytest.approx(rows)
    foc, norm = M.focus_index(ATTN4)
    assert foc.item() == pytest.approx(sum(rows) / 3)
    assert norm.item() == pytest.approx(sum(rows) / 3 / math.log(4))
    sm, _ = M.focus_index(ATTN4, kind="softmax")
    assert sm.item() == pytest.approx((h([.4, .1, .3, .2]) + h([.1, .5, .1, .3]) + math.log(4) + math.log(2)) / 4)
    with pytest.raises(ValueError):
        M.focus_index(ATTN4, kind="nope")


def test_hand_3x3_no_keypoints_and_all_keypoints():
    attn = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6], [0.1, 0.8, 0.1]])
    none = torch.zeros(3, dtype=torch.long)
    agg = M.aggregate_theta(M.theta_rows(attn, none), none)
    assert math.isnan(agg["theta_kk"].item()) and math.isnan(agg["theta_kn"].item())
    assert agg["theta_nk"].item() == 0.0
    assert M.theta_chance(none).item() == 0.0
    allk = torch.tensor([1, 3, 2])
    agg = M.aggregate_theta(M.theta_rows(attn, allk), allk)
    assert agg["theta_kk"].item() == 1.0 and math.isnan(agg["theta_nk"].item())
    assert M.theta_chance(allk).item() == 1.0


def test_metrics_invariant_to_row_scale():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 16, 16, generator=g)
    t = torch.randint(0, 3, (2, 16), generator=g)
    scale = torch.rand(2, 3, 16, 1, generator=g) + 0.1
    m1, m2 = M.head_metrics(a, t), M.head_metrics(a * scale, t)
    for k in m1:
        assert torch.allclose(m1[k], m2[k], atol=1e-5, equal_nan=True), k


# ---------------------------------------------------------------- random vs reference
CASES = [dict(gamma=1.0), dict(gamma=0.5), dict(gamma=2.0), dict(gamma=1.5, weighted=False),
         dict(exclude_self=True), dict(gamma=2.0, exclude_self=True, weighted=False), dict(kind="softmax")]


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("opts", CASES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_random_against_reference(seed, opts):
    rng = np.random.default_rng(seed)
    n = int(rng.choice([4, 9, 16, 64]))
    b, h = 3, 2
    kind = opts.get("kind", "minmax")
    kw = {k: v for k, v in opts.items() if k != "kind"}
    if seed % 3 == 0:
        # small integers on a power-of-two N: many entries tie exactly with the line
        n = int(rng.choice([4, 16, 64]))
        attn = rng.integers(0, 4, size=(b, h, n, n)).astype(np.float64)
        attn[..., 0] += 1   # no all-zero rows
    else:
        logits = rng.normal(size=(b, h, n, n)) * rng.uniform(0.5, 4)
        attn = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    t = rng.poisson(rng.uniform(0.2, 2.0), size=(b, n))
    t[0] = 0                                     # image without keypoints
    t[1] = rng.integers(1, 5, size=n)            # image where every patch is a keypoint patch
    got = M.head_metrics(torch.tensor(attn, dtype=torch.float32), torch.tensor(t),
                         focus_kind=kind, **kw)
    for bi in range(b):
        for hi in range(h):
            ref = ref_head(attn[bi, hi], list(t[bi]), kind=kind, **kw)
            for k in got:
                assert close(got[k][bi, hi].item(), ref[k], tol=2e-4), (k, bi, hi, got[k][bi, hi], ref[k])
    # theta_i itself, in float64 so ties are decided exactly as in the reference
    th = M.theta_rows(torch.tensor(attn), torch.tensor(t)[:, None, :], **kw)
    for bi in range(b):
        for hi in range(h):
            ref = ref_head(attn[bi, hi], list(t[bi]), **kw)["theta"]
            for i in range(n):
                assert close(th[bi, hi, i].item(), ref[i], tol=1e-9)


def test_patch_scores_is_head_mean_of_theta():
    g = torch.Generator().manual_seed(3)
    a = torch.rand(2, 4, 9, 9, generator=g)
    t = torch.randint(0, 3, (2, 9), generator=g)
    s = M.patch_scores(a, t)
    assert s.shape == (2, 9)
    for b in range(2):
        for i in range(9):
            vals = [ref_theta_i(a[b, h, i].double().tolist(), t[b].tolist(), i, 1.0, True, False) for h in range(4)]
            assert close(s[b, i].item(), ref_mean(vals), tol=1e-5)
