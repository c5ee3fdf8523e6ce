"""Which patches an MAE hides: random, keypoint-guided (beta curriculum) or a given set; (N,) bool
masks, True = masked, drawn from :func:`sample_rng` (seed, epoch, image index only).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

MASK_KINDS = ("random", "guided")
STREAM_MASK, STREAM_FLIP, STREAM_RECOVERY = 1, 2, 3


def mae_mask_count(n_patches: int, ratio: float) -> int:
    """MAE's mask size ``M = round(r N)``, r a fraction in [0, 1] (Python's round-half-even)."""
    if not 0.0 <= float(ratio) <= 1.0:
        raise ValueError(f"mask ratio must be in [0, 1], got {ratio}")
    return int(round(float(ratio) * int(n_patches)))


def sample_rng(seed: int, epoch: int, index: int, stream: int = STREAM_MASK) -> np.random.Generator:
    """The generator for one image in one epoch (PCG64 seeded by the four numbers)."""
    return np.random.default_rng([int(seed), int(epoch), int(index), int(stream)])


def random_mask(n_patches: int, ratio: float, rng: np.random.Generator) -> np.ndarray:
    """MAE's uniform random mask: exactly ``round(r N)`` patches, uniformly without replacement."""
    m = np.zeros(int(n_patches), dtype=bool)
    m[rng.permutation(int(n_patches))[:mae_mask_count(n_patches, ratio)]] = True
    return m


def guided_quota(n_key: int, n_patches: int, ratio: float, beta: float) -> tuple[int, int, int]:
    """``(M, keypoint patches masked, non-keypoint patches masked)`` after the fill-in rule."""
    if not 0.0 <= float(beta) <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    n_key, n_patches = int(n_key), int(n_patches)
    n_non = n_patches - n_key
    m = mae_mask_count(n_patches, ratio)
    m_k = int(round(float(beta) * m))
    k = min(max(m_k, m - n_non), n_key)
    return m, k, m - k


def realised_key_share(n_key, n_patches: int, ratio: float, betas) -> np.ndarray:
    """The keypoint share of the masked patches that :func:`guided_mask` realises, per image and beta:
    n_key (n,) keypoint-patch counts of the images -> (n, len(betas)) float, ``k / M`` of
    :func:`guided_quota` (NaN when M = 0). Exact, not an estimate: the fill-in rule fixes how many
    patches of each kind are masked; only which ones is random. It lies between beta (up to the
    rounding of ``beta M``) and the image's own share ``n_key / N``, the random mask's expectation:
    the fill-in rule pulls the share towards random's, never past it."""
    n_key = np.asarray(n_key, dtype=np.int64).reshape(-1)
    if n_key.size and (n_key.min() < 0 or n_key.max() > int(n_patches)):
        raise ValueError(f"keypoint-patch counts must be in [0, {n_patches}]")
    betas = [float(b) for b in np.atleast_1d(betas)]
    out = np.full((len(n_key), len(betas)), np.nan)
    for i, nk in enumerate(n_key):
        for j, b in enumerate(betas):
            m, k, _ = guided_quota(int(nk), int(n_patches), ratio, b)
            if m:
                out[i, j] = k / m
    return out


def _ordered(idx: np.ndarray, rng: np.random.Generator, scores: np.ndarray | None, descending: bool) -> np.ndarray:
    """``idx`` shuffled, then (with scores) stably sorted by score."""
    idx = idx[rng.permutation(len(idx))]
    if scores is None:
        return idx
    s = np.nan_to_num(np.asarray(scores, dtype=np.float64)[idx], nan=-np.inf if descending else np.inf)
    return idx[np.argsort(-s if descending else s, kind="stable")]


def guided_mask(counts: np.ndarray, ratio: float, beta: float, rng: np.random.Generator,
                order: str = "random", scores: np.ndarray | None = None) -> np.ndarray:
    """counts (N,) -> (N,) bool, :func:`guided_quota` patches of each kind, drawn at random or
    (``order='score'``, scores (N,)) keypoint patches by descending, the others by ascending score."""
    counts = np.asarray(counts)
    n = counts.shape[0]
    if order not in ("random", "score"):
        raise ValueError(f"order must be 'random' or 'score', got {order!r}")
    if order == "score" and (scores is None or np.shape(scores) != (n,)):
        raise ValueError("order='score' needs scores of shape (N,)")
    use = scores if order == "score" else None
    key = np.flatnonzero(counts > 0)
    non = np.flatnonzero(counts <= 0)
    _, k, j = guided_quota(len(key), n, ratio, beta)
    m = np.zeros(n, dtype=bool)
    m[_ordered(key, rng, use, descending=True)[:k]] = True
    m[_ordered(non, rng, use, descending=False)[:j]] = True
    return m


@dataclass(frozen=True)
class BetaSchedule:
    """beta for epoch ``e`` (0-based): ``betas[min(e // every, len(betas) - 1)]``."""
    betas: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5)
    every: int = 10

    def __post_init__(self):
        if not self.betas or any(not 0 <= b <= 1 for b in self.betas):
            raise ValueError(f"betas must be a non-empty list in [0, 1], got {self.betas}")
        if int(self.every) < 1:
            raise ValueError(f"every must be >= 1, got {self.every}")
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))

    def __call__(self, epoch: int) -> float:
        return self.betas[min(int(epoch) // int(self.every), len(self.betas) - 1)]

    def values(self, epochs: int) -> np.ndarray:
        """beta for epochs 0 .. epochs-1."""
        return np.array([self(e) for e in range(int(epochs))])


def patch_set_mask(indices: Sequence[int] | np.ndarray, n_patches: int) -> np.ndarray:
    """Mask exactly the given patch indices (duplicates allowed; out-of-range raises)."""
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= n_patches):
        raise ValueError(f"patch indices must be in [0, {n_patches}), got {idx.min()}..{idx.max()}")
    m = np.zeros(int(n_patches), dtype=bool)
    m[idx] = True
    return m


def top_keypoint_patches(counts: np.ndarray, k: int, rng: np.random.Generator | None = None) -> np.ndarray | None:
    """The ``k`` patches with most keypoints (ties by ``rng`` or index); None if fewer than k have any."""
    counts = np.asarray(counts)
    idx = np.arange(len(counts)) if rng is None else rng.permutation(len(counts))
    idx = idx[np.argsort(-counts[idx], kind="stable")]
    top = idx[:int(k)]
    if len(top) < k or (counts[top] <= 0).any():
        return None
    return np.sort(top)


def random_nonkeypoint_patches(counts: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray | None:
    """``k`` patches drawn uniformly from those with no keypoint; None if there are fewer than k."""
    non = np.flatnonzero(np.asarray(counts) <= 0)
    if len(non) < k:
        return None
    return np.sort(rng.choice(non, size=int(k), replace=False))


def square_region(grid: tuple[int, int], center: tuple[int, int], size: int) -> np.ndarray:
    """Patch indices of a ``size x size`` square around ``center`` (row, col), kept inside the grid."""
    g_r, g_c = int(grid[0]), int(grid[1])
    size = int(size)
    if not 1 <= size <= min(g_r, g_c):
        raise ValueError(f"region size must be in [1, {min(g_r, g_c)}], got {size}")
    r0 = int(np.clip(center[0] - (size - 1) // 2, 0, g_r - size))
    c0 = int(np.clip(center[1] - (size - 1) // 2, 0, g_c - size))
    rr, cc = np.meshgrid(np.arange(r0, r0 + size), np.arange(c0, c0 + size), indexing="ij")
    return (rr * g_c + cc).reshape(-1)


def densest_window(counts: np.ndarray, grid: tuple[int, int], size: int) -> tuple[int, int]:
    """(row, col) centre of the ``size x size`` window with the most keypoints (first on ties)."""
    g_r, g_c = int(grid[0]), int(grid[1])
    t = np.asarray(counts, dtype=np.float64).reshape(g_r, g_c)
    ii = np.pad(t.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    best, arg = -1.0, (0, 0)
    for r in range(g_r - size + 1):
        for c in range(g_c - size + 1):
            s = ii[r + size, c + size] - ii[r, c + size] - ii[r + size, c] + ii[r, c]
            if s > best:
                best, arg = s, (r + (size - 1) // 2, c + (size - 1) // 2)
    return arg
