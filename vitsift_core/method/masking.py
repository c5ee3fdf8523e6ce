"""Masking orders at inference (Sec 5.1): mask sizes, the orders over row-major patch indices (ties by
a seeded per-image permutation), donors, the score layer, views for figures.
"""
from __future__ import annotations

import math
import warnings
import zlib
from fractions import Fraction
from typing import Sequence

import numpy as np
import torch

from vitsift_core.method.metrics import attended_mask

ORDERS = ("top", "bottom", "random", "keypoints", "top_other", "bottom_other")
DONOR_ORDERS = {"top_other": "top", "bottom_other": "bottom"}
SINGLE_IMAGE_ORDERS = tuple(o for o in ORDERS if o not in DONOR_ORDERS)
DEFAULT_ORDERS = ("top", "bottom", "random", "keypoints", "top_other")
MODES = ("fill", "drop")
TIEBREAKS = ("random", "index")


def n_masked_pct(ratio_pct: float, n_patches: int) -> int:
    """Mask-eval's mask size ``ceil(r N)``, r = ``ratio_pct`` / 100, in exact fractions.

    >>> n_masked_pct(5, 256), n_masked_pct(10, 196), n_masked_pct(0, 256), n_masked_pct(100, 256)
    (13, 20, 0, 256)
    """
    r = Fraction(str(ratio_pct))
    if not 0 <= r <= 100:
        raise ValueError(f"mask ratio must be in [0, 100] percent, got {ratio_pct}")
    return math.ceil(r * n_patches / 100)


def _image_rng(seed: int, image_id: str, stream: int) -> np.random.Generator:
    """A generator that depends only on (seed, image id, stream)."""
    return np.random.default_rng([int(seed), zlib.crc32(str(image_id).encode()), int(stream)])


def _tiebreak_keys(ids: Sequence[str] | None, b: int, n: int, tiebreak: str, seed: int) -> np.ndarray:
    """(B, N) secondary sort keys: a seeded permutation per image, else the patch index."""
    if tiebreak not in TIEBREAKS:
        raise ValueError(f"tiebreak must be one of {TIEBREAKS}, got {tiebreak!r}")
    if ids is None or tiebreak == "index":
        return np.broadcast_to(np.arange(n), (b, n))
    return np.stack([_image_rng(seed, i, 2).permutation(n) for i in ids])


def donor_rows(ids: Sequence[str], seed: int = 0) -> np.ndarray:
    """(n,) int64: each image's donor row, one seeded cycle through the sorted ids (no image its own)."""
    ids = [str(i) for i in ids]
    n = len(ids)
    if n < 2:
        raise ValueError(f"the '*_other' orders need at least 2 images (another image's score map), got {n}")
    if len(set(ids)) != n:
        raise ValueError("donor_rows: image ids must be unique")
    by_id = np.argsort(np.asarray(ids), kind="stable")
    cycle = by_id[np.random.default_rng([int(seed), 3]).permutation(n)]
    donor = np.empty(n, dtype=np.int64)
    donor[cycle] = np.roll(cycle, -1)
    return donor


def donor_scores(scores: np.ndarray, ids: Sequence[str], orders: Sequence[str], seed: int = 0) -> np.ndarray | None:
    """scores (n, N) -> the donors' maps (n, N); None without ``*_other`` orders."""
    if not any(o in DONOR_ORDERS for o in orders):
        return None
    return np.asarray(scores)[donor_rows(ids, seed)]


def rank_patches(order: str, *, scores: torch.Tensor | np.ndarray | None = None,
                 counts: torch.Tensor | np.ndarray | None = None, ids: Sequence[str] | None = None,
                 seed: int = 0, tiebreak: str = "random",
                 other_scores: torch.Tensor | np.ndarray | None = None) -> np.ndarray:
    """Masking order of every patch of every image: (B, N) int64, first = masked first.

    top / bottom: ``scores`` (B, N), NaN last; keypoints: ``counts``; random: ``ids``; *_other:
    ``other_scores`` (:func:`donor_scores`). ``ids`` key the random order and tie-break (else index)."""
    if order in DONOR_ORDERS:
        if other_scores is None:
            raise ValueError(f"order {order!r} needs other_scores: the score maps of each image's donor "
                             "(see donor_rows)")
        return rank_patches(DONOR_ORDERS[order], scores=other_scores, ids=ids, seed=seed, tiebreak=tiebreak)
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    if order == "random":
        ref = scores if scores is not None else counts
        if ids is None or ref is None:
            raise ValueError("order 'random' needs image ids, and scores or counts for the number of patches")
        n = np.asarray(ref).shape[-1]
        return np.stack([_image_rng(seed, i, 1).permutation(n) for i in ids]).astype(np.int64)
    src = counts if order == "keypoints" else scores
    if src is None:
        raise ValueError(f"order {order!r} needs {'counts' if order == 'keypoints' else 'scores'}")
    s = np.asarray(src.detach().cpu() if isinstance(src, torch.Tensor) else src, dtype=np.float64)
    if s.ndim != 2:
        raise ValueError(f"expected (B, N) scores/counts, got shape {s.shape}")
    b, n = s.shape
    if ids is not None and len(ids) != b:
        raise ValueError(f"{len(ids)} ids for {b} images")
    tie = _tiebreak_keys(ids, b, n, tiebreak, seed)
    nan = np.isnan(s)
    primary = -s if order in ("top", "keypoints") else s
    primary = np.where(nan, 0.0, primary)
    out = np.empty((b, n), dtype=np.int64)
    for k in range(b):
        # lexsort: last key is the primary one; NaN flag first, then the score, then the tie-break
        out[k] = np.lexsort((tie[k], primary[k], nan[k]))
    return out


def mask_indices(ranking: np.ndarray, ratio_pct: float) -> np.ndarray:
    """The first ``ceil(r N)`` patches of a ranking: (B, N) -> (B, M), sorted by patch index."""
    m = n_masked_pct(ratio_pct, ranking.shape[1])
    return np.sort(ranking[:, :m], axis=1)


def mask_adjacency(masked: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """masked (B, M) on ``grid`` -> (B,): share of masked patches' in-image 4-neighbours also masked."""
    gh, gw = grid
    b, m = masked.shape
    if m == 0:
        return np.full(b, np.nan)
    on = np.zeros((b, gh + 2, gw + 2), dtype=bool)          # a False border: no wrap-around
    inside = np.zeros((gh + 2, gw + 2), dtype=bool)
    inside[1:-1, 1:-1] = True
    rows, cols = np.divmod(np.asarray(masked, dtype=np.int64), gw)
    on[np.arange(b)[:, None], rows + 1, cols + 1] = True
    hit = np.zeros(b)
    tot = np.zeros(b)
    for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        r, c = rows + 1 + dr, cols + 1 + dc
        tot += inside[r, c].sum(1)
        hit += on[np.arange(b)[:, None], r, c].sum(1)
    return hit / np.maximum(tot, 1)


def parse_layers(spec: str | int | Sequence[int], n_layers: int | None = None) -> list[int] | str:
    """'auto' -> 'auto'; 7 or '7' -> [7]; '7-9' -> [7, 8, 9]; '5,7' -> [5, 7]. Layers are 1-based
    (checked against ``n_layers`` when given)."""
    if isinstance(spec, str) and spec.strip().lower() == "auto":
        return "auto"
    need = f"need 'auto' or 1-based layers{f' in 1..{n_layers}' if n_layers else ''} as 7, 7-9 or 5,7"
    try:
        if isinstance(spec, (int, np.integer)):
            out = [int(spec)]
        elif isinstance(spec, str):
            out = []
            for part in spec.replace(" ", "").split(","):
                if "-" in part:
                    a, b = part.split("-", 1)
                    out += list(range(int(a), int(b) + 1))
                elif part:
                    out.append(int(part))
        else:
            out = [int(v) for v in spec]
    except (TypeError, ValueError):
        raise ValueError(f"layer spec {spec!r}: {need}") from None
    if not out or any(not 1 <= v <= (n_layers or v) for v in out):
        raise ValueError(f"layer spec {spec!r}: {need}")
    return sorted(set(out))


def default_score_layer(stage_fit: dict | None, n_layers: int) -> tuple[list[int], str]:
    """([layer], why): Capture's last layer when the stage fit (a ``stages.json`` dict) holds, else
    the middle layer ``ceil(L / 2)``."""
    if stage_fit and stage_fit.get("fitted", True) and stage_fit.get("holds"):
        a, b = stage_fit["segments"][1]
        return [int(b)], f"last layer of the Capture stage (layers {a}-{b}; stage fit holds)"
    mid = (n_layers + 1) // 2
    if not stage_fit:
        why = "no stage fit"
    elif not stage_fit.get("fitted", True):
        why = f"no stage fit ({stage_fit.get('reason', 'not fitted')})"
    else:
        why = "stage fit does not hold (failed: " + ", ".join(stage_fit.get("failed", [])) + ")"
    return [mid], f"middle layer {mid} of {n_layers}: {why}"


def combine_layer_scores(layer_scores: torch.Tensor | np.ndarray, pick: Sequence[int],
                         captured: Sequence[int]) -> np.ndarray:
    """NaN-skipping mean over the ``pick`` layers: layer_scores (B, len(captured), N) -> (B, N)."""
    arr = np.asarray(layer_scores, dtype=np.float32)
    pos = [list(captured).index(l) for l in pick]
    sel = arr[:, pos, :]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # all-NaN rows stay NaN
        return np.nanmean(sel, axis=1).astype(np.float32)


def spurious_patches(scores: np.ndarray, counts: np.ndarray, k: int) -> np.ndarray:
    """scores, counts (N,) -> the <= k keypoint patches with the lowest defined s_i, lowest first."""
    s = np.asarray(scores, dtype=np.float64)
    key = (np.asarray(counts) > 0) & ~np.isnan(s)
    idx = np.nonzero(key)[0]
    order = np.lexsort((idx, s[idx]))
    return idx[order][:k]


def attended_fraction(attn: torch.Tensor, i: int, gamma: float = 1.0, exclude_self: bool = False) -> np.ndarray:
    """For query patch ``i``: the share of heads whose S_i holds each key patch. attn (H, N, N) -> (N,)."""
    m = attended_mask(attn[:, i:i + 1, :].float(), gamma, exclude_self=False)[:, 0, :]
    if exclude_self:
        m[:, i] = False
    return m.float().mean(0).numpy()
