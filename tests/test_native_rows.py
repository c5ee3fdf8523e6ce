"""The compiled row kernel (model/native.py, issue 17) against a hand case and the slow reference
formulas, its switch, and its use on the analysis path. Tolerance as for the eager reductions:
theta exact, row entropy <= 1e-5 nats, NaN in the same places."""
import math
import warnings

import pytest
import torch

from test_metrics_reductions import FOCUS_TOL, awkward_maps, counts_cases, old_row_entropy, old_theta_rows
from vitsift_core.method import metrics as M
from vitsift_core.model import cores, native
from vitsift_core.model.collectors import MetricCollector


@pytest.fixture
def fresh_kernel(monkeypatch):
    """Forget the process's kernel, so VITSIFT_NATIVE / CC set by the test decide it again."""
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.delenv(native.ENV, raising=False)
    return monkeypatch


@pytest.fixture
def kernel():
    if native.kernel() is None:
        pytest.skip(f"the row kernel could not be built here: {native._state.get('why')}")
    return native.kernel()


def weights(counts_list, weighted=True):
    return torch.stack([w for c in counts_list for w in M.theta_weights(c, weighted)], dim=1)


def same_nan_and_values(x, y, tol=0.0):
    assert torch.equal(torch.isnan(x), torch.isnan(y))
    ok = ~torch.isnan(y)
    assert (x[ok] - y[ok]).abs().max() <= tol if ok.any() else True


def test_hand_case(kernel):
    # rows: line = sum / 3; counts t = [2, 0, 1]
    a = torch.tensor([[[[0.2, 0.3, 0.5],        # S = {2}: theta 1/1; s = [0, .1, .3] -> q = [0, 1/4, 3/4]
                        [0.25, 0.5, 0.25],      # S = {1}: 0/1 = 0; excluding itself: S empty -> NaN
                        [1.0, 1.0, 1.0]]]])     # S = all: (2+0+1)/(2+1+1) = 0.75; excl: (2+0)/(2+1); s = 0 -> NaN
    t = torch.tensor([[2, 0, 1]])
    ent, theta = native.rows(a, weights([t, t]), [False, True], 1.0, True)
    h0 = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert abs(ent[0, 0, 0].item() - h0) < 1e-6
    assert abs(ent[0, 0, 1].item()) < 1e-6                         # s = [0, .25, 0]: one key, entropy 0
    assert math.isnan(ent[0, 0, 2].item())
    assert theta[0, 0, 0].tolist() == [1.0, 0.0, 0.75]
    got = theta[1, 0, 0].tolist()
    assert got[0] == 1.0 and math.isnan(got[1]) and abs(got[2] - 2 / 3) < 1e-7
    _, unweighted = native.rows(a, weights([t], weighted=False), [False], 1.0, True)
    got = unweighted[0, 0, 0].tolist()                             # keys with a keypoint / keys in S_i
    assert got[:2] == [1.0, 0.0] and abs(got[2] - 2 / 3) < 1e-7


@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("gamma", [0.5, 1.0, 2.0])
def test_matches_the_reference_on_awkward_strided_maps(kernel, weighted, gamma):
    """A prefix token in front (the captured patch block is a strided view), ties at the line,
    constant rows, repeated minima, images with no / only keypoints, several variants at once."""
    for seed in range(3):
        full = torch.softmax(torch.randn(3, 2, 17, 17, generator=torch.Generator().manual_seed(seed)), -1)
        full[:, :, 1:, 1:] = awkward_maps(seed=seed)
        a = full[:, :, 1:, 1:]
        assert not a.is_contiguous()
        c = counts_cases(seed=seed)
        variants = [(c, False), (c, True), (torch.roll(c, 1, dims=0), False)]
        ent, theta = native.rows(a, weights([v[0] for v in variants], weighted), [v[1] for v in variants],
                                 gamma, True)
        same_nan_and_values(ent, old_row_entropy(a), FOCUS_TOL)
        for v, (counts, excl) in enumerate(variants):
            same_nan_and_values(theta[v], old_theta_rows(a, counts[:, None], gamma, weighted, excl))
        soft, _ = native.rows(a, weights([c], weighted), [False], gamma, False)
        same_nan_and_values(soft, old_row_entropy(a, "softmax"), FOCUS_TOL)


def test_sharp_rows_and_nan_rows(kernel):
    g = torch.Generator().manual_seed(7)
    a = torch.softmax(torch.randn(2, 3, 64, 64, generator=g) * 12, dim=-1)
    assert (a < 1e-30).any()                      # entries near denormal after the shift
    a[1, 2, 5, 7] = float("nan")
    c = torch.randint(0, 3, (2, 64), generator=g)
    ent, theta = native.rows(a, weights([c]), [False], 1.0, True)
    same_nan_and_values(ent, old_row_entropy(a), FOCUS_TOL)
    same_nan_and_values(theta[0], old_theta_rows(a, c[:, None]))
    assert torch.isnan(ent[1, 2, 5]) and torch.isnan(theta[0, 1, 2, 5]) and not torch.isnan(ent[0]).any()


def run_collector(maps, variants, threads=1):
    col = MetricCollector(len(maps))
    col.start_batch(variants)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for layer, a in enumerate(maps):
            for start, stop in ((2, 3), (0, 2)):          # slices out of order, as from the core split
                cores._slice.start = start
                try:
                    col(layer, a[start:stop])
                finally:
                    cores._slice.start = None
    finally:
        torch.set_num_threads(saved)
    return col.finish_batch()


def test_collector_takes_the_kernel_on_one_thread_and_agrees_with_the_eager_path(kernel, fresh_kernel):
    maps = [awkward_maps(seed=20 + l) for l in range(2)]
    c = counts_cases()
    variants = {"real": (c, False), "real_excl": (c, True), "other": (torch.roll(c, 1, dims=0), False)}
    calls = []
    real_rows = native.rows
    fresh_kernel.setattr(native, "rows", lambda *a, **k: calls.append(1) or real_rows(*a, **k))
    fast = run_collector(maps, variants)
    assert len(calls) == 4                                # 2 layers x 2 slices
    calls.clear()
    eager_two_threads = run_collector(maps, variants, threads=2)
    assert not calls                                      # more than one torch thread: the eager ops
    fresh_kernel.setattr(native, "_state", {})
    fresh_kernel.setenv(native.ENV, "0")
    eager = run_collector(maps, variants)
    assert not calls
    for name in variants:
        for k in ("theta_kk", "theta_kn", "theta_nk", "theta_nn", "theta_chance"):
            same_nan_and_values(fast[name][k], eager[name][k])
            same_nan_and_values(eager_two_threads[name][k], eager[name][k])
        same_nan_and_values(fast[name]["focus"], eager[name]["focus"], FOCUS_TOL)


def test_the_switch_and_a_failed_build(fresh_kernel, tmp_path):
    fresh_kernel.setenv(native.ENV, "0")
    assert native.kernel() is None and native._state["why"] == "VITSIFT_NATIVE=0"
    assert not (tmp_path / "native").exists()
    fresh_kernel.setattr(native, "_state", {})
    fresh_kernel.setenv(native.ENV, "sometimes")
    with pytest.raises(ValueError, match="VITSIFT_NATIVE"):
        native.kernel()
    fresh_kernel.setenv("VITSIFT_CACHE", str(tmp_path))
    fresh_kernel.setenv("CC", "false")                    # a compiler that always fails
    fresh_kernel.setenv(native.ENV, "1")
    fresh_kernel.setattr(native, "_state", {})
    with pytest.raises(RuntimeError, match="could not be built"):
        native.kernel()
    fresh_kernel.delenv(native.ENV)
    fresh_kernel.setattr(native, "_state", {})
    with pytest.warns(RuntimeWarning, match="eager reductions"):
        assert native.kernel() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native.kernel() is None                    # warned once per process
        assert not native.usable(torch.zeros(1, 1, 2, 2))
    assert not list((tmp_path / "native").glob("*.so"))


def test_one_library_per_machine_kind_in_the_cache(kernel, fresh_kernel, tmp_path):
    fresh_kernel.setenv("VITSIFT_CACHE", str(tmp_path))
    assert native.kernel() is not None
    built = list((tmp_path / "native").glob("rows-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    fresh_kernel.setattr(native, "_state", {})
    assert native.kernel() is not None                   # a second process loads it, no rebuild
    assert built[0].stat().st_mtime_ns == stamp and len(list((tmp_path / "native").glob("*"))) == 1


def rows_with_entries_on_the_line(b=3, n=257, seed=3):
    """(b, 1, n, n) softmax-like rows where key 0 equals torch's float32 line (row sum / n) exactly:
    which side of the line it falls on depends on how the row sum was rounded."""
    g = torch.Generator().manual_seed(seed)
    a = torch.softmax(torch.randn(b, 1, n, n, generator=g) * 2, dim=-1)
    for _ in range(20):                       # fixed point: key 0 = the row's own line
        a[..., 0] = a.sum(dim=-1) / n
    return a


def test_the_line_uses_torchs_row_sum_so_the_sets_are_the_eager_ones(kernel):
    """Real maps have entries within an ulp of the line (0.0015 in theta_NK on 1,000 images when the
    kernel summed rows its own way); the kernel takes torch's row sums, as metrics.attended_mask does."""
    a = rows_with_entries_on_the_line()
    on_line = (a[..., 0] == a.sum(-1) / a.shape[-1]).sum()
    assert on_line > 100
    c = torch.randint(0, 3, (a.shape[0], a.shape[-1]), generator=torch.Generator().manual_seed(1))
    _, theta = native.rows(a, weights([c]), [False], 1.0, True)
    ref = M.theta_from_mask(M.attended_mask(a, 1.0), c[:, None])
    same_nan_and_values(theta[0], ref)


def test_collector_with_no_variant_runs_on_the_kernel(kernel, fresh_kernel):
    """The content-free control's pass has no keypoint variant (it sums the maps): the kernel path takes
    it with zero weight rows (an empty weight stack crashed it)."""
    calls = []
    real_rows = native.rows
    fresh_kernel.setattr(native, "rows", lambda *a, **k: calls.append(tuple(a[1].shape)) or real_rows(*a, **k))
    assert run_collector([awkward_maps(seed=30)], {}) == {}
    assert calls and all(s[1] == 0 for s in calls)
