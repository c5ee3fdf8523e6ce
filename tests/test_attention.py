"""Attention capture on tiny timm ViTs (test tier): exact maps, fused == unfused, reduction."""
import pytest
import torch

from vitsift_core import metrics as M
from vitsift_core.attention import (MetricCollector, attention_blocks, attention_maps,
                                    capture_attention, fused_attention)


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
