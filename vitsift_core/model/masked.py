"""Masked forwards of a timm ViT (Sec 5.1): ``fill`` sets the masked patches' pixels to the
normalisation mean, ``drop`` removes their tokens. Masks are (B, M) row-major patch indices.
"""
from __future__ import annotations

import numpy as np
import torch

from vitsift_core.method.masking import MODES


def keep_indices(masked: np.ndarray, n_patches: int) -> np.ndarray:
    """Complement of ``masked`` (B, M) in range(N): (B, N - M), ascending."""
    b = masked.shape[0]
    keep = np.ones((b, n_patches), dtype=bool)
    if masked.size:
        np.put_along_axis(keep, masked, False, axis=1)
    return np.nonzero(keep)[1].reshape(b, n_patches - masked.shape[1])


def fill_patches(x: torch.Tensor, masked: np.ndarray | torch.Tensor, grid: tuple[int, int],
                 patch_size: int, value: float = 0.0) -> torch.Tensor:
    """``fill`` mode: a copy of ``x`` (B, 3, S, S) with the masked patches' pixels set to ``value``
    (0: the normalisation mean)."""
    gr, gc = int(grid[0]), int(grid[1])
    p = int(patch_size)
    if x.shape[-2] != gr * p or x.shape[-1] != gc * p:
        raise ValueError(f"input {tuple(x.shape[-2:])} is not a {gr}x{gc} grid of {p}px patches")
    idx = torch.as_tensor(np.asarray(masked), dtype=torch.long)
    pm = torch.zeros((idx.shape[0], gr * gc), dtype=torch.bool)
    if idx.numel():
        pm.scatter_(1, idx, True)
    pm = pm.to(x.device).reshape(-1, 1, gr, gc)
    pix = pm.repeat_interleave(p, dim=2).repeat_interleave(p, dim=3)
    return torch.where(pix, torch.as_tensor(value, dtype=x.dtype, device=x.device), x)


def forward_drop(model: torch.nn.Module, x: torch.Tensor,
                 keep: np.ndarray | torch.Tensor | None) -> torch.Tensor:
    """``drop`` mode: ``forward_features`` on the prefix and the kept patch tokens (each with its
    own position embedding). x: (B, 3, S, S); keep: (B, K) indices (None: all) -> (B, prefix + K, D).
    """
    t = model.patch_embed(x)
    t = model._pos_embed(t)
    p = int(getattr(model, "num_prefix_tokens", 1))
    if keep is not None:
        k = torch.as_tensor(np.asarray(keep), dtype=torch.long, device=t.device)
        n = t.shape[1] - p
        if k.ndim != 2 or k.shape[0] != t.shape[0] or (k.numel() and (k.min() < 0 or k.max() >= n)):
            raise ValueError(f"keep must be (B, K) patch indices in [0, {n}), got shape {tuple(k.shape)}")
        patches = torch.gather(t[:, p:], 1, k[..., None].expand(-1, -1, t.shape[-1]))
        t = torch.cat([t[:, :p], patches], dim=1)
    t = model.patch_drop(t)
    t = model.norm_pre(t)
    t = model.blocks(t)
    return model.norm(t)


def masked_features(model: torch.nn.Module, x: torch.Tensor, mode: str, masked: np.ndarray,
                    grid: tuple[int, int], patch_size: int) -> torch.Tensor:
    """forward_features with ``masked`` (B, M) patches hidden by ``mode`` ('fill' | 'drop')."""
    if mode == "fill":
        xm = fill_patches(x, masked, grid, patch_size) if masked.shape[1] else x
        return model.forward_features(xm)
    if mode == "drop":
        n = int(grid[0]) * int(grid[1])
        return forward_drop(model, x, keep_indices(masked, n) if masked.shape[1] else None)
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
