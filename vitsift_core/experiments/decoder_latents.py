"""Cached frozen-encoder latents for the recovery decoder (``DecoderConfig.masks_per_image`` > 0): K
fixed random masks per training image, each (image, mask) pair's visible tokens through the frozen
encoder once, kept in memory as bf16 and reused every epoch. A step then costs the decoder only (the
frozen forward was most of a fresh-mask step on CPU), so the decoder can train for many more steps in
the same time; it sees K masks per image instead of a new one every step (README, issue 18).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from vitsift_core.experiments.mae_data import ArraySet, to_input
from vitsift_core.method import guided as MM


@dataclass
class Latents:
    """P = K x n pairs, copy-major: pair p is training image ``image[p]`` under mask ``mask[p]``."""

    latent: torch.Tensor        # (P, npt + V, D') bfloat16: the decoder's input tokens of the visible patches
    ids_restore: torch.Tensor   # (P, N) int64
    mask: torch.Tensor          # (P, N) bool, True = hidden
    flip: np.ndarray            # (P,) bool: the image is mirrored left-right
    image: np.ndarray           # (P,) int: index into the training ArraySet

    def __len__(self) -> int:
        return len(self.image)


def draw(cfg, n_patches: int, key: int, i: int) -> tuple[np.ndarray, bool]:
    """Image i's mask (N,) bool and left-right flip under draw ``key`` (a fresh-mask step, or a cached
    copy): seeded by (seed, key, i) only, so a resumed run draws the same."""
    mask = MM.random_mask(n_patches, cfg.mask_ratio, MM.sample_rng(cfg.seed, key, int(i), MM.STREAM_MASK))
    return mask, bool(cfg.flip and MM.sample_rng(cfg.seed, key, int(i), MM.STREAM_FLIP).random() < 0.5)


def pair_draws(cfg, n_images: int, n_patches: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Masks (P, N) bool, flips (P,) and image indices (P,) of the K x n pairs: copy k of image i
    is :func:`draw` (k, i), as step s of the fresh-mask path is (s, i)."""
    k = cfg.masks_per_image
    image = np.tile(np.arange(n_images), k)
    copy = np.repeat(np.arange(k), n_images)
    draws = [draw(cfg, n_patches, int(c), int(i)) for c, i in zip(copy, image)]
    mask = np.stack([m for m, _ in draws]) if draws else np.zeros((0, n_patches), bool)
    return mask, np.array([f for _, f in draws], dtype=bool), image


def pair_images(train: ArraySet, image: np.ndarray, flip: np.ndarray) -> np.ndarray:
    """(B, S, S, 3) uint8 training images of some pairs, mirrored where the pair says."""
    imgs = np.array(train.images[np.asarray(image)])
    imgs[flip] = imgs[flip][:, :, ::-1]
    return imgs


@torch.no_grad()
def encode_pairs(model, train: ArraySet, cfg, device, progress: bool = True, batch_size: int = 64) -> Latents:
    """Every pair's latent through ``model.forward_encoder`` (frozen, in eval mode), in fixed batches
    (so a resumed run computes the same bytes)."""
    mask, flip, image = pair_draws(cfg, len(train), model.num_patches)
    lat, ids = [], []
    for s in tqdm(range(0, len(image), batch_size), desc="frozen encoder, cached pairs", unit="batch",
                  disable=not progress, dynamic_ncols=True):
        sl = slice(s, s + batch_size)
        x = to_input(pair_images(train, image[sl], flip[sl]), device)
        l, r = model.forward_encoder(x, torch.from_numpy(mask[sl]).to(device))
        lat.append(l.to(torch.bfloat16))
        ids.append(r)
    latent = torch.cat(lat) if lat else torch.zeros(0)
    return Latents(latent, torch.cat(ids) if ids else torch.zeros(0, dtype=torch.long),
                   torch.from_numpy(mask).to(device), flip, image)
