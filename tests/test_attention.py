"""Attention capture on tiny timm ViTs (test tier): exact maps, fused == unfused, reduction."""
import threading
import time

import pytest
import torch

from vitsift_core.method import metrics as M
from vitsift_core.model.capture import attention_blocks, attention_maps, capture_attention, fused_attention
from vitsift_core.model.collectors import MetricCollector
from vitsift_core.model.cores import current_slice_start, forward_on_cores


from conftest import sharp_test_vit as tiny


@pytest.fixture(params=[0, 4], ids=["cls", "cls+4reg"])
def model(request):
    return tiny(request.param)


def recompute(attn_mod, x):
    """softmax(q k^T * scale) from the block's own qkv weights. x: (B, T, C) -> (B, H, T, T)."""
    b, t, c = x.shape
    qkv = attn_mod.qkv(x).reshape(b, t, 3, attn_mod.num_heads, attn_mod.head_dim).permute(2, 0, 3, 1, 4)
    q, k, _ = qkv.unbind(0)
    q, k = attn_mod.q_norm(q), attn_mod.k_norm(k)
    return ((q @ k.transpose(-2, -1)) * attn_mod.scale).softmax(-1)


def test_captured_equals_recomputed_softmax(model):
    x = torch.randn(2, 3, *model.default_cfg["input_size"][1:])
    p = model.num_prefix_tokens
    inputs = {}
    hooks = [blk.attn.register_forward_pre_hook(lambda mod, args, i=i: inputs.__setitem__(i, args[0].detach()))
             for i, blk in enumerate(model.blocks)]
    maps = attention_maps(model, p, x)
    for h in hooks:
        h.remove()
    assert sorted(maps) == list(range(len(model.blocks)))
    n = model.patch_embed.num_patches
    for i, blk in enumerate(model.blocks):
        with torch.no_grad():
            full = recompute(blk.attn, inputs[i].clone())
        assert maps[i].shape == (2, blk.attn.num_heads, n, n)
        torch.testing.assert_close(maps[i], full[:, :, p:, p:], atol=1e-6, rtol=0)
        # prefix really removed: patch rows sum to 1 minus the prefix columns' mass
        torch.testing.assert_close(maps[i].sum(-1), 1 - full[:, :, p:, :p].sum(-1), atol=1e-5, rtol=0)


def test_fused_and_unfused_logits_agree_and_flags_restored(model):
    x = torch.randn(3, 3, *model.default_cfg["input_size"][1:])
    with torch.inference_mode():
        with fused_attention(model, True):
            fused = model(x)
        with fused_attention(model, False):
            plain = model(x)
        seen = []
        with capture_attention(model, model.num_prefix_tokens, lambda l, a: seen.append(l)):
            captured = model(x)
    # tolerance: fp32 SDPA vs explicit softmax differ by rounding only
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(captured, plain, atol=1e-6, rtol=0)
    assert seen == list(range(len(model.blocks)))
    before = [m.fused_attn for m in attention_blocks(model)]
    with capture_attention(model, model.num_prefix_tokens, lambda l, a: None, layers=[1]):
        assert [m.fused_attn for m in attention_blocks(model)] == [b if i != 1 else False for i, b in enumerate(before)]
    assert [m.fused_attn for m in attention_blocks(model)] == before


def test_collector_matches_metrics_on_stored_maps(model):
    torch.manual_seed(1)
    x = torch.randn(3, 3, *model.default_cfg["input_size"][1:])
    n = model.patch_embed.num_patches
    counts = torch.randint(0, 3, (3, n))
    counts[0] = 0
    shuffled = counts[:, torch.randperm(n)]
    L = len(model.blocks)
    col = MetricCollector(L, gamma=1.0, accumulate_mean=True)
    col.start_batch({"real": (counts, False), "real_excl": (counts, True), "shuf": (shuffled, False)})
    with torch.inference_mode(), capture_attention(model, model.num_prefix_tokens, col):
        model.forward_features(x)
    out = col.finish_batch()
    maps = attention_maps(model, model.num_prefix_tokens, x)
    for name, (c, excl) in {"real": (counts, False), "real_excl": (counts, True), "shuf": (shuffled, False)}.items():
        for l in range(L):
            ref = M.head_metrics(maps[l], c, exclude_self=excl)
            for k, v in ref.items():
                torch.testing.assert_close(out[name][k][:, l], v, equal_nan=True, atol=1e-6, rtol=0)
    assert col.n_summed == 3
    torch.testing.assert_close(col.attn_sum[2], maps[2].double().sum(0), atol=1e-9, rtol=0)


def test_rejects_non_vit():
    with pytest.raises(ValueError, match="ViT-family"):
        attention_blocks(torch.nn.Linear(2, 2))



def _run_log(model):
    """Forward hooks recording which blocks' attention and MLP ran, and whether the final norm did."""
    ran = []
    hooks = [blk.attn.register_forward_hook(lambda *_, i=i: ran.append(("attn", i)))
             for i, blk in enumerate(model.blocks)]
    hooks += [blk.mlp.register_forward_hook(lambda *_, i=i: ran.append(("mlp", i)))
              for i, blk in enumerate(model.blocks)]
    hooks.append(model.norm.register_forward_hook(lambda *_: ran.append(("norm", -1))))
    return ran, hooks


@pytest.mark.parametrize("micro_batch,workers", [(None, 1), (2, 1), (2, 2)], ids=["whole", "slices", "threads"])
def test_stop_early_skips_what_follows_the_deepest_layer_and_keeps_its_maps(micro_batch, workers):
    model = tiny(0)
    torch.manual_seed(3)
    x = torch.randn(5, 3, *model.default_cfg["input_size"][1:])
    counts = torch.randint(0, 3, (5, model.patch_embed.num_patches))
    layers = [0, 2]                                     # of 6: blocks 3-5 and the norm can be skipped
    outs = {}
    for stop in (False, True):
        col = MetricCollector(len(layers))             # collector layer k <- model block layers[k]
        col.start_batch({"real": (counts, False)})
        ran, hooks = _run_log(model)
        after_forward = False
        with torch.inference_mode(), capture_attention(
                model, model.num_prefix_tokens, lambda l, a: col(layers.index(l), a),
                layers=layers, micro_batch=micro_batch, micro_workers=workers, stop_early=stop):
            model.forward_features(x)
            after_forward = True
        for h in hooks:
            h.remove()
        outs[stop] = col.finish_batch()["real"]        # raises unless every slice of both layers came
        if stop:
            assert not after_forward                    # the forward statement was abandoned ...
            assert ran[-1] == ("attn", 2)               # ... right after block 2's attention
            assert ("mlp", 2) not in ran and not any(i > 2 or i < 0 for _, i in ran)
        else:
            assert after_forward and ran[-1] == ("norm", -1)
    for k in outs[False]:
        torch.testing.assert_close(outs[True][k], outs[False][k], atol=0, rtol=0, equal_nan=True)
    # the context put the model back as it was: no patched forward, no hooks left
    assert all("forward" not in blk.attn.__dict__ for blk in model.blocks)
    assert all(not blk.attn._forward_hooks and not blk.attn.attn_drop._forward_hooks for blk in model.blocks)


def _failing_on_image_0():
    """A callback whose image-0 slice fails at once while image 1's, in the other thread, is still
    working; ``done`` lists the layers image 1 finished."""
    done = []

    def fail(layer, attn):
        if current_slice_start() == 0:
            raise RuntimeError(f"callback failed at layer {layer}")
        time.sleep(0.3)
        done.append(layer)
    return fail, done


def test_capture_errors_are_not_swallowed_and_bad_layers_are_refused():
    model = tiny(0)
    x = torch.randn(2, 3, *model.default_cfg["input_size"][1:])
    fail, done = _failing_on_image_0()
    with pytest.raises(RuntimeError, match="callback failed at layer 1"):
        with torch.inference_mode(), capture_attention(model, model.num_prefix_tokens, fail, layers=[1, 3],
                                                       micro_batch=1, micro_workers=2, stop_early=True):
            model.forward_features(x)
    assert done == [1]            # the error left only once the other slice had finished
    assert all(not blk.attn.attn_drop._forward_hooks and "forward" not in blk.attn.__dict__
               for blk in model.blocks)
    with pytest.raises(ValueError, match=r"layers \[6\] out of range.*0\.\.5"):
        with capture_attention(model, model.num_prefix_tokens, lambda l, a: None, layers=[2, 6]):
            pass


def test_threaded_slices_keep_the_callers_cpu_autocast():
    """Slices run in pool threads, where autocast is off unless carried over: the threaded bf16
    maps must be the sequential bf16 maps, not the fp32 ones."""
    model = tiny(0)
    torch.manual_seed(5)
    x = torch.randn(6, 3, *model.default_cfg["input_size"][1:])
    p = model.num_prefix_tokens

    def maps(workers, bf16):
        got = {}

        def keep(layer, attn):
            got[(layer, current_slice_start())] = attn.float().clone()

        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), \
                capture_attention(model, p, keep, micro_batch=2, micro_workers=workers):
            model.forward_features(x)
        return torch.cat([got[k] for k in sorted(got)])

    threaded, sequential, fp32 = maps(2, True), maps(1, True), maps(2, False)
    torch.testing.assert_close(threaded, sequential, atol=2e-3, rtol=0)
    assert (threaded - fp32).abs().max() > 10 * (threaded - sequential).abs().max() + 1e-4


def _collected(model, x, counts, cores, micro_batch=None, micro_workers=1, stop=True, layers=None, amp=False):
    """Metrics of every captured layer: the whole batch in one forward call (cores=1) or split
    over ``cores`` threads by forward_on_cores. Returns (metrics, the forward's output or 'stopped')."""
    layers = list(range(len(model.blocks))) if layers is None else layers
    col = MetricCollector(len(layers))
    col.start_batch({"real": (counts, False)})
    result = "stopped"
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp), \
            capture_attention(model, model.num_prefix_tokens, lambda l, a: col(layers.index(l), a),
                              layers=layers, micro_batch=micro_batch, micro_workers=micro_workers,
                              stop_early=stop):
        result = forward_on_cores(model.forward_features, x, cores)
    return col.finish_batch()["real"], result


@pytest.mark.parametrize("cores,micro_batch", [(2, None), (3, 1), (2, 2), (8, None)],
                         ids=["2cores", "3cores-slices", "2cores-slices", "more-cores-than-images"])
def test_forward_on_cores_gives_the_whole_batch_metrics(cores, micro_batch):
    model = tiny(4)
    torch.manual_seed(7)
    x = torch.randn(5, 3, *model.default_cfg["input_size"][1:])
    counts = torch.randint(0, 3, (5, model.patch_embed.num_patches))
    whole, _ = _collected(model, x, counts, 1)
    split, result = _collected(model, x, counts, cores, micro_batch=micro_batch)
    assert result == "stopped"                  # stop_early abandoned the forward in every thread
    for k in whole:                             # finish_batch raises unless every image came once
        torch.testing.assert_close(split[k], whole[k], atol=1e-6, rtol=0, equal_nan=True)
    # without the stop: the outputs come back whole and in order
    _, out = _collected(model, x, counts, cores, micro_batch=micro_batch, stop=False)
    with torch.inference_mode():
        ref = model.forward_features(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_forward_on_cores_stops_every_thread_after_the_deepest_layer():
    model = tiny(0)
    x = torch.randn(4, 3, *model.default_cfg["input_size"][1:])
    counts = torch.randint(0, 3, (4, model.patch_embed.num_patches))
    ran, hooks = _run_log(model)
    _collected(model, x, counts, 2, layers=[0, 2])
    for h in hooks:
        h.remove()
    assert ran.count(("attn", 2)) == 4           # every slice (one image each) reached block 2's attention ...
    assert not any(i > 2 or i < 0 or (kind, i) == ("mlp", 2) for kind, i in ran)   # ... and no further


def test_forward_on_cores_keeps_the_callers_autocast_and_nests_without_deadlock():
    """The core threads are pool threads: attention slices inside them must not wait on the pool
    (two busy workers, nested submits: a deadlock), and autocast must reach them."""
    model = tiny(0)
    torch.manual_seed(5)
    x = torch.randn(6, 3, *model.default_cfg["input_size"][1:])
    n = model.patch_embed.num_patches
    # each image its own number of keypoint patches (5, 20, ..., 80), so a slice scored with
    # another slice's counts gets other theta values
    counts = torch.zeros(6, n, dtype=torch.long)
    for i in range(6):
        counts[i, torch.randperm(n, generator=torch.Generator().manual_seed(i))[:5 + 15 * i]] = 1 + i % 3
    got = {}

    def run():
        got["cores"] = _collected(model, x, counts, 2, micro_batch=1, micro_workers=2, amp=True)[0]

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(120)
    assert not t.is_alive(), "forward_on_cores with threaded attention slices inside did not finish"
    one_bf16 = _collected(model, x, counts, 1, amp=True)[0]
    fp32 = _collected(model, x, counts, 1)[0]
    swapped = _collected(model, x, counts.roll(3, 0), 1, amp=True)[0]   # each half given the other's
    for k in ("focus",) + MetricCollector.THETA_KEYS:
        d_bf16 = (got["cores"][k] - one_bf16[k]).abs().nan_to_num().max()
        d_fp32 = (got["cores"][k] - fp32[k]).abs().nan_to_num().max()
        assert d_bf16 < 0.02, k                                         # the split: the batch's numbers
        assert torch.equal(got["cores"][k].isnan(), one_bf16[k].isnan()), k
        if k == "focus":
            assert d_fp32 > 10 * d_bf16 + 1e-4                          # autocast reached the threads
        else:
            d_swap = (swapped[k] - one_bf16[k]).abs().nan_to_num().max()
            assert d_swap > 10 * d_bf16 + 0.02, k                       # counts matter at this tolerance


def test_forward_on_cores_errors_leave_after_every_thread():
    model = tiny(0)
    x = torch.randn(2, 3, *model.default_cfg["input_size"][1:])
    fail, done = _failing_on_image_0()
    with pytest.raises(RuntimeError, match="callback failed at layer 1"):
        with torch.inference_mode(), capture_attention(model, model.num_prefix_tokens, fail, layers=[1],
                                                       stop_early=True):
            forward_on_cores(model.forward_features, x, 2)
    assert done == [1]


@pytest.mark.parametrize("mode", ["fill", "drop"])
def test_forward_on_cores_slices_per_image_arguments_like_the_batch(mode):
    """mask-eval's masked forward: each image's own masked patches travel with its slice."""
    import numpy as np

    from vitsift_core.model.masked import masked_features

    model = tiny(0)
    torch.manual_seed(9)
    x = torch.randn(5, 3, *model.default_cfg["input_size"][1:])
    n, grid, ps = model.patch_embed.num_patches, model.patch_embed.grid_size, model.patch_embed.patch_size[0]
    idx = np.stack([np.random.default_rng(i).choice(n, 30, replace=False) for i in range(5)])   # (B, M)

    def f(xs, idx_s):
        return masked_features(model, xs, mode, idx_s, grid, ps)

    with torch.inference_mode():
        one = f(x, idx)
        split = forward_on_cores(f, x, 3, idx)
        shifted = f(x, np.roll(idx, 1, axis=0))       # the wrong image's mask changes the output
    torch.testing.assert_close(split, one, atol=1e-5, rtol=0)
    assert (shifted - one).abs().max() > 1e-3


def test_forward_on_cores_gives_spare_cores_to_the_slices_and_takes_them_back():
    seen = []

    def f(xs):
        seen.append((current_slice_start(), torch.get_num_threads(), xs.shape[0]))
        return xs * 2

    x = torch.arange(6.0).reshape(6, 1)
    mine = torch.get_num_threads()
    torch.testing.assert_close(forward_on_cores(f, x[:2], 6), x[:2] * 2)    # 2 images, 6 cores
    assert torch.get_num_threads() == mine                                  # the caller's count untouched
    assert sorted(seen) == [(0, 3, 1), (1, 3, 1)]
    seen.clear()
    torch.testing.assert_close(forward_on_cores(f, x, 6), x * 2)            # 6 images: one thread each
    assert sorted(seen) == [(i, 1, 1) for i in range(6)]
    seen.clear()
    torch.testing.assert_close(forward_on_cores(f, x, 4), x * 2)            # 4 cores, 6 images: still one each
    assert sorted(seen) == [(i, 1, 1) for i in range(6)]


def test_forward_on_cores_queues_several_slices_per_core_and_runs_as_many_at_once_as_cores():
    """SLICES_PER_CORE slices per core (sizes differing by at most one), pulled from one queue by
    ``workers`` threads: the pool balances itself when another process takes a core for a while."""
    from vitsift_core.model.cores import SLICES_PER_CORE

    seen, running, most = [], [0], [0]
    lock = threading.Lock()

    def f(xs):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.02)
        with lock:
            running[0] -= 1
            seen.append((current_slice_start(), xs.shape[0], threading.current_thread().name))
        return xs * 2

    x = torch.arange(20.0).reshape(20, 1)
    torch.testing.assert_close(forward_on_cores(f, x, 2), x * 2)
    assert SLICES_PER_CORE == 4
    assert sorted((s, n) for s, n, _ in seen) == [(0, 3), (3, 3), (6, 3), (9, 3), (12, 2), (14, 2), (16, 2), (18, 2)]
    assert most[0] == 2 and len({t for _, _, t in seen}) <= 2


def test_core_workers_and_the_switch_that_turns_the_split_off(monkeypatch):
    from types import SimpleNamespace

    from vitsift_core.model.cores import core_workers
    from vitsift_core.experiments.analysis import batch_metrics

    monkeypatch.delenv("VITSIFT_CORE_SPLIT", raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert core_workers("cpu") == 2 and core_workers(torch.device("cuda")) == 1
        model = tiny(0)
        lm = SimpleNamespace(model=model, num_prefix_tokens=model.num_prefix_tokens)
        x = torch.randn(4, 3, *model.default_cfg["input_size"][1:])
        counts = torch.randint(0, 3, (4, model.patch_embed.num_patches))

        class Where(MetricCollector):
            def __call__(self, layer, attn):
                self.threads.add(threading.current_thread().name)
                super().__call__(layer, attn)

        out = {}
        for split in ("1", "0"):
            monkeypatch.setenv("VITSIFT_CORE_SPLIT", split)
            col = Where(len(model.blocks))
            col.threads = set()
            out[split] = batch_metrics(lm, col, x, {"real": (counts, False)})["real"]
            if split == "1":
                assert core_workers("cpu") == 2 and all(t.startswith("vitsift-slice") for t in col.threads)
            else:
                assert core_workers("cpu") == 1 and col.threads == {threading.current_thread().name}
        for k in out["1"]:
            torch.testing.assert_close(out["1"][k], out["0"][k], atol=1e-6, rtol=0, equal_nan=True)
        monkeypatch.setenv("VITSIFT_CORE_SPLIT", "maybe")
        with pytest.raises(ValueError, match="VITSIFT_CORE_SPLIT"):
            core_workers("cpu")
    finally:
        torch.set_num_threads(before)


def test_the_core_split_restores_torchs_thread_settings():
    """Pool threads set one torch thread each, which also moves torch's default for threads started
    later: after a split forward the caller's count and a fresh thread's are what they were."""
    def fresh_thread_count():
        got = []
        t = threading.Thread(target=lambda: got.append(torch.get_num_threads()))
        t.start()
        t.join()
        return got[0]

    mine = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        before = (torch.get_num_threads(), fresh_thread_count())
        model = tiny(0)
        x = torch.randn(3, 3, *model.default_cfg["input_size"][1:])
        with torch.inference_mode():
            forward_on_cores(model.forward_features, x, 2)
            forward_on_cores(model.forward_features, x[:2], 4)       # spare cores: 2 threads per slice
            with capture_attention(model, model.num_prefix_tokens, lambda l, a: None, micro_batch=1,
                                   micro_workers=2):
                model.forward_features(x)
        assert (torch.get_num_threads(), fresh_thread_count()) == before == (2, 2)
    finally:
        torch.set_num_threads(mine)
