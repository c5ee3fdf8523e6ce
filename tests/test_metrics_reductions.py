"""The fused reductions (issue 17) against the formulas they replaced, kept here as a slow reference.

Stated tolerance: theta exact (the same comparison, integer sums), focus <= 1e-5 nats, NaN in the
same places. Maps: random softmax rows, integer-valued rows (entries exactly on the detection line),
constant rows (all zero after the min-max shift: entropy undefined), rows whose minimum repeats
(several zeros after the shift), counts with no keypoint and with every patch a keypoint.
"""
import numpy as np
import pytest
import torch

from vitsift_core.method import metrics as M
from vitsift_core.model import cores
from vitsift_core.model.collectors import MetricCollector

FOCUS_TOL = 1e-5


# ---------------------------------------------------------------- the replaced formulas
def old_row_entropy(attn, kind="minmax"):
    """Before issue 17: clamp to the smallest normal, log, product, sum (four passes for s log s)."""
    shifted = attn - attn.amin(dim=-1, keepdim=True) if kind == "minmax" else attn
    total = shifted.sum(dim=-1)
    slogs = shifted.clamp_min(torch.finfo(shifted.dtype).tiny).log() * shifted
    ent = torch.log(total) - slogs.sum(dim=-1) / total
    return torch.where(total > 0, ent, torch.full_like(ent, float("nan")))


def old_theta_rows(attn, counts, gamma=1.0, weighted=True, exclude_self=False):
    """Eq. 3 with a bool mask and two separate masked sums (what theta_rows computed at first)."""
    n = attn.shape[-1]
    s = attn >= gamma * (attn.sum(dim=-1, keepdim=True) / n)
    if exclude_self:
        s = s & ~torch.eye(n, dtype=torch.bool)
    t = counts.to(torch.float32).expand(s.shape[:-2] + (n,))[..., None, :]       # t_j
    key = (s & (t > 0)).to(torch.float32)
    num = (key * t).sum(-1) if weighted else key.sum(-1)
    den = num + (s & (t == 0)).sum(-1) if weighted else s.sum(-1).to(torch.float32)
    return torch.where(den > 0, num / den, torch.full_like(num, float("nan")))


# ---------------------------------------------------------------- maps with the awkward cases
def awkward_maps(seed=0, b=3, h=2, n=16):
    """(b, h, n, n) float32: head 0 random softmax rows; head 1 integer rows 0..3 (ties at the
    line), with row 0 constant and row 1 a repeated minimum."""
    g = torch.Generator().manual_seed(seed)
    a = torch.softmax(torch.randn(b, h, n, n, generator=g) * 2, dim=-1)
    ints = torch.randint(0, 4, (b, n, n), generator=g).float()
    ints[:, 0] = 2.0                                     # constant row: every entry on the line
    ints[:, 1, : n // 2] = 0.0                           # several zeros after the shift
    a[:, 1] = ints
    return a


def counts_cases(b=3, n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    c = torch.randint(0, 3, (b, n), generator=g)
    c[0] = 0                                             # no keypoint: theta_KK undefined
    c[1] = torch.randint(1, 4, (n,), generator=g)        # every patch a keypoint: theta_NK undefined
    return c


def test_row_entropy_matches_the_old_formula_with_nan_where_it_had_them():
    a = awkward_maps()
    for kind in M.FOCUS_KINDS:
        new, old = M.row_entropy(a, kind), old_row_entropy(a, kind)
        assert torch.equal(torch.isnan(new), torch.isnan(old)), kind
        ok = ~torch.isnan(old)
        assert (new[ok] - old[ok]).abs().max() <= FOCUS_TOL, kind
    assert torch.isnan(M.row_entropy(a)[:, 1, 0]).all()                # constant rows
    assert not torch.isnan(M.row_entropy(a)[:, 1, 1:]).any()           # repeated minimum: defined


def test_row_entropy_with_scratch_space_and_on_the_fused_kernel_path_agrees():
    a = awkward_maps(seed=3)
    ref = old_row_entropy(a)
    work = (torch.empty_like(a), torch.empty_like(a))
    got = M.row_entropy(a, work=work)
    # requires_grad takes the torch.special.xlogy path (the one CUDA runs) on this CPU
    fused = M.row_entropy(a.clone().requires_grad_()).detach()
    for x in (got, fused):
        assert torch.equal(torch.isnan(x), torch.isnan(ref))
        ok = ~torch.isnan(ref)
        assert (x[ok] - ref[ok]).abs().max() <= FOCUS_TOL
    # the same kernel writing into scratch space, as the collector calls it on CUDA
    with torch.no_grad():
        fused_work = M.row_entropy(a.clone().requires_grad_(), "softmax", work=work)
    sm = old_row_entropy(a, "softmax")
    assert (fused_work - sm).abs().max() <= FOCUS_TOL


def test_row_entropy_on_a_strided_view_like_the_captured_patch_block():
    full = awkward_maps(seed=4, n=17)
    view = full[:, :, 1:, 1:]                          # the hook's view: not contiguous
    assert not view.is_contiguous()
    for kind in M.FOCUS_KINDS:
        new, old = M.row_entropy(view, kind), old_row_entropy(view.contiguous(), kind)
        ok = ~torch.isnan(old)
        assert torch.equal(torch.isnan(new), ~ok) and (new[ok] - old[ok]).abs().max() <= FOCUS_TOL


@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("exclude_self", [False, True])
def test_theta_is_exactly_the_old_masked_sums(weighted, exclude_self):
    a, c = awkward_maps(seed=5), counts_cases()
    new = M.theta_rows(a, c[:, None], 1.0, weighted, exclude_self)
    old = old_theta_rows(a, c[:, None], 1.0, weighted, exclude_self)
    assert torch.equal(torch.isnan(new), torch.isnan(old))
    ok = ~torch.isnan(old)
    assert torch.equal(new[ok], old[ok])
    # the integer head decides entries exactly on the line: >= keeps them (> would not)
    line_hits = (a[:, 1] == a[:, 1].mean(-1, keepdim=True)).sum()
    assert line_hits > 0


def test_collector_gives_the_old_head_metrics_in_slices_for_several_variants():
    """The collector (mask shared across variants, entropy with shared scratch, slices out of
    order) against the old formulas, per (image, layer, head)."""
    b, n_layers = 3, 2
    maps = [awkward_maps(seed=10 + l) for l in range(n_layers)]
    c = counts_cases()
    c_other = torch.roll(c, 1, dims=0)
    variants = {"real": (c, False), "real_excl": (c, True), "other": (c_other, False)}
    col = MetricCollector(n_layers)
    col.start_batch(variants)
    for layer in range(n_layers):
        for start in (2, 0):                              # slices arrive out of order
            stop = b if start == 2 else 2
            cores._slice.start = start
            try:
                col(layer, maps[layer][start:stop])
            finally:
                cores._slice.start = None
    got = col.finish_batch()
    for name, (counts, excl) in variants.items():
        for layer in range(n_layers):
            a = maps[layer]
            theta = old_theta_rows(a, counts[:, None], exclude_self=excl)
            agg = M.aggregate_theta(theta, counts[:, None])
            ent = old_row_entropy(a)
            focus = torch.nanmean(ent, dim=-1)
            for k in ("theta_kk", "theta_nk"):
                x, y = got[name][k][:, layer], agg[k]
                assert torch.equal(torch.isnan(x), torch.isnan(y)), (name, k)
                assert torch.equal(x[~torch.isnan(y)], y[~torch.isnan(y)]), (name, k)
            assert (got[name]["focus"][:, layer] - focus).abs().max() <= FOCUS_TOL
    assert torch.isnan(got["real"]["theta_kk"][0]).all() and torch.isnan(got["real"]["theta_nk"][1]).all()


def test_tolerances_on_real_looking_maps_from_a_sharp_softmax():
    """Peaked rows (tiny entries near denormal after the shift) stay within the stated tolerance."""
    g = torch.Generator().manual_seed(7)
    a = torch.softmax(torch.randn(2, 3, 64, 64, generator=g) * 12, dim=-1)
    assert (a < 1e-30).any()
    new, old = M.row_entropy(a), old_row_entropy(a)
    assert not torch.isnan(new).any()
    assert (new - old).abs().max() <= FOCUS_TOL
    assert np.isfinite(M.focus_index(a)[0].numpy()).all()


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_either_cpu_log_gives_the_old_entropy_and_the_switch_is_checked(backend, monkeypatch):
    """The log is NumPy's or torch's, whichever this CPU runs faster (AVX-512: NumPy; AVX2 only:
    torch); both must give the replaced formula's numbers."""
    monkeypatch.setenv("VITSIFT_CPU_LOG", backend)
    assert M.cpu_log_backend() == backend
    a = awkward_maps(seed=11)
    for x in (a, a.double()):
        new, old = M.row_entropy(x), old_row_entropy(x)
        assert torch.equal(torch.isnan(new), torch.isnan(old))
        ok = ~torch.isnan(old)
        assert (new[ok] - old[ok]).abs().max() <= FOCUS_TOL
    monkeypatch.setenv("VITSIFT_CPU_LOG", "fast")
    with pytest.raises(ValueError, match="VITSIFT_CPU_LOG"):
        M.cpu_log_backend()
    monkeypatch.delenv("VITSIFT_CPU_LOG")
    assert M.cpu_log_backend(torch.float32) in M.CPU_LOGS          # timed once, then cached


def test_choosing_the_cpu_log_leaves_the_global_rng_alone(monkeypatch):
    monkeypatch.delenv("VITSIFT_CPU_LOG", raising=False)
    monkeypatch.setattr(M, "_CPU_LOG", {})                  # force the timing to run
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    assert M.cpu_log_backend(torch.float64) in M.CPU_LOGS
    assert torch.equal(torch.rand(4), expected)
