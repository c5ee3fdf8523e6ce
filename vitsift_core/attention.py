"""Capture post-softmax attention from timm ViTs without copying model code.

timm's ``Attention`` only materialises the softmax when ``fused_attn`` is False; the map then
passes through ``attn_drop`` (an ``nn.Dropout``, identity in eval mode), so a forward hook on
``blk.attn.attn_drop`` sees exactly ``softmax(q k^T * scale)``: (B, H, T, T) over all T tokens.
The hook slices the patch block (prefix tokens dropped from rows and columns) and hands it to
a callback that reduces it at once, so nothing of size depth x batch x N^2 is ever kept.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn

from . import metrics as M

Callback = Callable[[int, torch.Tensor], None]


def attention_blocks(model: nn.Module) -> list[nn.Module]:
    """The ``attn`` modules of a timm ViT-family model, in depth order.

    Raises ValueError for models whose attention cannot be captured this way.
    """
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError(f"{type(model).__name__} has no .blocks: not a timm ViT-family model")
    out = []
    for i, blk in enumerate(blocks):
        attn = getattr(blk, "attn", None)
        if attn is None or not hasattr(attn, "fused_attn") or not isinstance(getattr(attn, "attn_drop", None), nn.Dropout):
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


@contextlib.contextmanager
def capture_attention(model: nn.Module, num_prefix_tokens: int, callback: Callback,
                      layers: list[int] | None = None) -> Iterator[None]:
    """Call ``callback(layer, attn)`` for every block during forwards inside the context.

    attn: (B, H, N, N), the patch block of the post-softmax map (a view; copy it if kept).
    ``layers`` restricts capture to those 0-based block indices; other blocks keep fused
    attention, so capturing one layer costs little more than a plain forward.
    """
    mods = attention_blocks(model)
    wanted = set(range(len(mods))) if layers is None else set(layers)
    p = num_prefix_tokens
    handles = []

    def make_hook(idx: int):
        def hook(_mod, _inp, out):
            callback(idx, out[:, :, p:, p:])
        return hook

    before = [m.fused_attn for m in mods]
    try:
        for i, m in enumerate(mods):
            if i in wanted:
                m.fused_attn = False
                handles.append(m.attn_drop.register_forward_hook(make_hook(i)))
        yield
    finally:
        for h in handles:
            h.remove()
        for m, b in zip(mods, before):
            m.fused_attn = b


class MetricCollector:
    """Reduces each layer's attention to per-head metrics as the forward pass goes.

    For every *variant* (a name -> (counts (B, N), exclude_self)) it keeps (B, L, H) arrays
    of theta_kk/kn/nk/nn and theta_chance; focus (which does not depend on keypoints) once.
    Optionally accumulates the sum of attention over images, (L, H, N, N) float64, for
    the content-free control.
    """

    THETA_KEYS = ("theta_kk", "theta_kn", "theta_nk", "theta_nn", "theta_chance")

    def __init__(self, n_layers: int, gamma: float = 1.0, weighted: bool = True,
                 focus_kind: str = "minmax", accumulate_mean: bool = False):
        self.n_layers = n_layers
        self.gamma, self.weighted, self.focus_kind = gamma, weighted, focus_kind
        self.accumulate_mean = accumulate_mean
        self.attn_sum: torch.Tensor | None = None
        self.n_summed = 0
        self._variants: dict[str, tuple[torch.Tensor, bool]] = {}
        self._out: dict[str, dict[str, list]] = {}

    def start_batch(self, variants: dict[str, tuple[torch.Tensor, bool]]) -> None:
        """variants: name -> (counts (B, N) int, exclude_self)."""
        self._variants = variants
        self._out = {v: {k: [None] * self.n_layers for k in self.THETA_KEYS} for v in variants}
        self._focus = {k: [None] * self.n_layers for k in ("focus", "focus_norm")}
        self._batch = None

    def __call__(self, layer: int, attn: torch.Tensor) -> None:
        a = attn.float()
        b, h = a.shape[:2]
        if self.accumulate_mean:
            s = a.sum(dim=0, dtype=torch.float64)
            if self.attn_sum is None:
                self.attn_sum = torch.zeros((self.n_layers,) + tuple(s.shape), dtype=torch.float64, device=s.device)
            self.attn_sum[layer] += s
            if layer == 0:
                self.n_summed += b
        f, fn = M.focus_index(a, self.focus_kind)
        self._focus["focus"][layer] = f.cpu()
        self._focus["focus_norm"][layer] = fn.cpu()
        mask_cache: dict[bool, torch.Tensor] = {}
        for name, (counts, excl) in self._variants.items():
            c = counts.to(a.device).reshape(b, 1, -1)
            if excl not in mask_cache:
                mask_cache[excl] = M.attended_mask(a, self.gamma, excl).float()
            theta = M.theta_from_mask(mask_cache[excl], c, self.weighted)
            agg = M.aggregate_theta(theta, c)
            agg["theta_chance"] = M.theta_chance(counts.reshape(b, -1), self.weighted)[:, None].expand(b, h)
            for k in self.THETA_KEYS:
                self._out[name][k][layer] = agg[k].float().cpu()

    def finish_batch(self) -> dict[str, dict[str, torch.Tensor]]:
        """-> variant -> metric -> (B, L, H) float32 (focus/focus_norm included in each)."""
        missing = [i for i, v in enumerate(self._focus["focus"]) if v is None]
        if missing:
            raise RuntimeError(f"no attention captured for layers {missing}: capture not active?")
        foc = {k: torch.stack(v, dim=1) for k, v in self._focus.items()}
        res = {}
        for name, d in self._out.items():
            res[name] = {k: torch.stack(v, dim=1) for k, v in d.items()}
            res[name].update(foc)
        return res


def attention_maps(model: nn.Module, num_prefix_tokens: int, x: torch.Tensor,
                   layers: list[int] | None = None) -> dict[int, torch.Tensor]:
    """Full patch-block maps for a few images (figures, explorers, tests).

    x: (B, 3, S, S) -> {layer: (B, H, N, N) float32 on CPU}. Memory grows with layers x B x N^2:
    meant for single images, not data sets.
    """
    maps: dict[int, torch.Tensor] = {}

    def keep(layer: int, attn: torch.Tensor) -> None:
        maps[layer] = attn.float().cpu().clone()

    with torch.inference_mode(), capture_attention(model, num_prefix_tokens, keep, layers):
        model.forward_features(x)
    return maps
