"""Attention capture on tiny timm ViTs (test tier): exact maps, fused == unfused, reduction."""
import time

import pytest
import torch

from vitsift_core import metrics as M
from vitsift_core.attention import (MetricCollector, attention_blocks, attention_maps,
                                    capture_attention, current_slice_start, fused_attention)


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


def test_capture_errors_are_not_swallowed_and_bad_layers_are_refused():
    model = tiny(0)
    x = torch.randn(2, 3, *model.default_cfg["input_size"][1:])

    done = []

    def fail(layer, attn):
        # image 0's slice fails at once; image 1's, in the other thread, is still working then
        if current_slice_start() == 0:
            raise RuntimeError(f"callback failed at layer {layer}")
        time.sleep(0.3)
        done.append(layer)

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
