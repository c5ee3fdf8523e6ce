"""Capture post-softmax attention from timm ViTs without copying model code.

With ``fused_attn`` off, timm's ``Attention`` passes ``softmax(q k^T * scale)`` (B, H, T, T) through
``attn_drop`` (identity in eval mode); a forward hook there hands the patch block to a callback.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn

from vitsift_core.model.cores import StopForward, sliced_forward

Callback = Callable[[int, torch.Tensor], None]
_MISSING = object()


def attention_blocks(model: nn.Module) -> list[nn.Module]:
    """The ``attn`` modules of a timm ViT-family model, in depth order (ValueError for others)."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError(f"{type(model).__name__} has no .blocks: not a timm ViT-family model")
    out = []
    for i, blk in enumerate(blocks):
        attn = getattr(blk, "attn", None)
        if not hasattr(attn, "fused_attn") or not isinstance(getattr(attn, "attn_drop", None), nn.Dropout):
            raise ValueError(
                f"block {i} of {type(model).__name__} has no timm Attention with fused_attn/attn_drop; "
                "attention capture supports timm VisionTransformer-family models (vit_*, deit_*, DINOv2)")
        out.append(attn)
    return out


@contextlib.contextmanager
def fused_attention(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Temporarily set ``fused_attn`` on every block; restores the previous values."""
    mods = attention_blocks(model)
    before = [m.fused_attn for m in mods]
    try:
        for m in mods:
            m.fused_attn = enabled
        yield
    finally:
        for m, b in zip(mods, before):
            m.fused_attn = b


def _stop(_mod, _inp, _out):
    # on the attention module, not on attn_drop: it fires once all slices of the layer are done
    raise StopForward


@contextlib.contextmanager
def capture_attention(model: nn.Module, num_prefix_tokens: int, callback: Callback,
                      layers: list[int] | None = None, micro_batch: int | None = None,
                      micro_workers: int = 1, stop_early: bool = False) -> Iterator[None]:
    """Call ``callback(layer, attn)`` for every captured block during forwards inside the context.

    attn: (B, H, N, N) patch block of the post-softmax map (a view). ``layers``: 0-based blocks
    (all when None). ``micro_batch``: run each captured attention module on slices of that many
    images (callback sees (b, H, N, N); ``cores.current_slice_start`` says where), in
    ``micro_workers`` threads on CPU. ``stop_early``: end the forward after the deepest layer.
    """
    mods = attention_blocks(model)
    wanted = set(range(len(mods))) if layers is None else set(layers)
    if not wanted <= set(range(len(mods))):
        raise ValueError(f"layers {sorted(wanted - set(range(len(mods))))} out of range: "
                         f"the model has blocks 0..{len(mods) - 1}")
    if micro_batch is not None and micro_batch < 1:
        raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
    p = num_prefix_tokens

    def make_hook(idx: int):
        def hook(_mod, _inp, out):
            callback(idx, out[:, :, p:, p:])
        return hook

    before = [m.fused_attn for m in mods]
    handles, patched = [], []
    try:
        for i, m in enumerate(mods):
            if i in wanted:
                m.fused_attn = False
                handles.append(m.attn_drop.register_forward_hook(make_hook(i)))
                if micro_batch is not None:
                    patched.append((m, m.__dict__.get("forward", _MISSING)))
                    m.forward = sliced_forward(m.forward, micro_batch, micro_workers)
        if stop_early and wanted:
            handles.append(mods[max(wanted)].register_forward_hook(_stop))
        with contextlib.suppress(StopForward):
            yield
    finally:
        for h in handles:
            h.remove()
        for m, old in patched:
            if old is _MISSING:
                del m.forward
            else:
                m.forward = old
        for m, b in zip(mods, before):
            m.fused_attn = b


def attention_maps(model: nn.Module, num_prefix_tokens: int, x: torch.Tensor,
                   layers: list[int] | None = None) -> dict[int, torch.Tensor]:
    """Full patch-block maps for a few images: x (B, 3, S, S) -> {layer: (B, H, N, N) float32 CPU}."""
    maps: dict[int, torch.Tensor] = {}

    def keep(layer: int, attn: torch.Tensor) -> None:
        maps[layer] = attn.float().cpu().clone()

    with torch.inference_mode(), capture_attention(model, num_prefix_tokens, keep, layers):
        model.forward_features(x)
    return maps
