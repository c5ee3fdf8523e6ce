"""Patch masking at inference (Sec 5.1, DESIGN.md section 3 "Patch score for masking").

Everything here works on batches and on patch indices ``r * G_c + c`` (row-major over the grid,
as the keypoint counts and the attention rows):

- :func:`n_masked`: how many patches a ratio masks, ``M = ceil(r N)`` (ratio in percent).
- :func:`rank_patches`: the full masking order of every image for ``top`` (highest score s_i
  first), ``bottom`` (lowest first), ``random`` (a seeded permutation per image id) and
  ``keypoints`` (most SIFT keypoints t_j first). Masking ``r`` takes the first ``M`` entries, so
  the masks of one order are nested across ratios. Ties are broken deterministically: by a seeded
  permutation keyed by the image id (``tiebreak="random"``, the default, so a run of equal scores
  -- e.g. all the keypoint-free patches in the ``keypoints`` order -- is not masked from the top-left
  corner down), or by patch index (``tiebreak="index"``). Undefined (NaN) scores rank after every
  defined one in both ``top`` and ``bottom``.
- :func:`fill_patches`: ``fill`` mode, the masked patches' pixels set to 0 in the normalised
  input, i.e. to the normalisation mean.
- :func:`forward_drop`: ``drop`` mode, the masked patch tokens removed before the first block;
  the remaining tokens keep their own position embeddings.
- :func:`score_layers` / :func:`default_score_layer`: which layer(s) the score s_i comes from.
- :func:`spurious_patches`: keypoint patches with the lowest s_i (attention going mostly to
  keypoint-free patches), for the "spurious correlation" view.
- :func:`donor_rows` / :func:`donor_scores` and the orders ``top_other`` / ``bottom_other``: the Top (Bottom) mask of
  *another* image's score map (a seeded derangement of the run's images). Such a mask has the
  clumping and the (centre-biased) placement of real Top (Bottom) masks but nothing to do with
  this image's content: the control that Random, whose masks scatter, is not.
"""
from __future__ import annotations

import math
import warnings
import zlib
from fractions import Fraction
from typing import Sequence

import numpy as np
import torch

ORDERS = ("top", "bottom", "random", "keypoints", "top_other", "bottom_other")
# orders that rank a donor image's score map as the named order would rank the image's own
DONOR_ORDERS = {"top_other": "top", "bottom_other": "bottom"}
SINGLE_IMAGE_ORDERS = tuple(o for o in ORDERS if o not in DONOR_ORDERS)
# mask-eval's default: the paper's two orders, the two plain controls and the shape-matched Top control
# (bottom_other costs another 25 % of masked forwards and is there on request)
DEFAULT_ORDERS = ("top", "bottom", "random", "keypoints", "top_other")
MODES = ("fill", "drop")
TIEBREAKS = ("random", "index")


# ----------------------------------------------------------------------------------- counting
def n_masked_pct(ratio_pct: float, n_patches: int) -> int:
    """Mask-eval's mask size ``ceil(r N)``, r = ``ratio_pct`` / 100, exact (no 7.000001 -> 8).

    >>> n_masked_pct(5, 256), n_masked_pct(10, 196), n_masked_pct(0, 256), n_masked_pct(100, 256)
    (13, 20, 0, 256)
    """
    r = Fraction(str(ratio_pct))
    if not 0 <= r <= 100:
        raise ValueError(f"mask ratio must be in [0, 100] percent, got {ratio_pct}")
    return math.ceil(r * n_patches / 100)


def _image_rng(seed: int, image_id: str, stream: int) -> np.random.Generator:
    """A generator that depends only on (seed, image id, stream): resume- and batch-independent."""
    return np.random.default_rng([int(seed), zlib.crc32(str(image_id).encode()), int(stream)])


def _tiebreak_keys(ids: Sequence[str], n: int, tiebreak: str, seed: int) -> np.ndarray:
    """(B, N) secondary sort keys: a seeded permutation per image, or the patch index."""
    if tiebreak == "index":
        return np.broadcast_to(np.arange(n), (len(ids), n))
    if tiebreak == "random":
        return np.stack([_image_rng(seed, i, 2).permutation(n) for i in ids])
    raise ValueError(f"tiebreak must be one of {TIEBREAKS}, got {tiebreak!r}")


def donor_rows(ids: Sequence[str], seed: int = 0) -> np.ndarray:
    """(n,) int64: for each image, the row of the image whose score map its ``*_other`` mask uses.

    A seeded random derangement -- one cycle through all images, so no image is its own donor --
    that depends only on the set of ids and the seed (not on their order, batches or ranks).
    """
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
    """scores (n, N) of a run's images -> (n, N): row b the score map of image b's donor
    (:func:`donor_rows`), the ``other_scores`` of :func:`rank_patches`; None when ``orders`` hold
    no ``*_other`` order (so a single image needs no donor)."""
    if not any(o in DONOR_ORDERS for o in orders):
        return None
    return np.asarray(scores)[donor_rows(ids, seed)]


def rank_patches(order: str, *, scores: torch.Tensor | np.ndarray | None = None,
                 counts: torch.Tensor | np.ndarray | None = None, ids: Sequence[str] | None = None,
                 seed: int = 0, tiebreak: str = "random",
                 other_scores: torch.Tensor | np.ndarray | None = None) -> np.ndarray:
    """Masking order of every patch of every image: (B, N) int64, first = masked first.

    order ``top`` / ``bottom`` need ``scores`` (B, N) (NaN allowed: ranked last); ``keypoints`` needs
    ``counts`` (B, N); ``random`` needs only ``ids`` and ``seed``; ``top_other`` / ``bottom_other``
    need ``other_scores`` (B, N), row b the score map of image b's donor (:func:`donor_rows`), ranked
    as ``top`` / ``bottom`` would rank it. ``ids`` (B image ids) key the random order and the random
    tie-break, so an image gets the same masks in any batch or run; without ids the tie-break falls
    back to the patch index. Deterministic for given inputs.
    """
    if order in DONOR_ORDERS:
        if other_scores is None:
            raise ValueError(f"order {order!r} needs other_scores: the score maps of each image's donor "
                             "(see donor_rows)")
        return rank_patches(DONOR_ORDERS[order], scores=other_scores, ids=ids, seed=seed, tiebreak=tiebreak)
    ref = scores if scores is not None else counts
    if order in ("top", "bottom"):
        if scores is None:
            raise ValueError(f"order {order!r} needs scores")
        s = np.asarray(scores.detach().cpu() if isinstance(scores, torch.Tensor) else scores, dtype=np.float64)
    elif order == "keypoints":
        if counts is None:
            raise ValueError("order 'keypoints' needs counts")
        s = np.asarray(counts.detach().cpu() if isinstance(counts, torch.Tensor) else counts, dtype=np.float64)
    elif order == "random":
        if ids is None:
            raise ValueError("order 'random' needs image ids")
        n = np.asarray(ref).shape[-1] if ref is not None else None
        if n is None:
            raise ValueError("order 'random' needs scores or counts for the number of patches")
        return np.stack([_image_rng(seed, i, 1).permutation(n) for i in ids]).astype(np.int64)
    else:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    if s.ndim != 2:
        raise ValueError(f"expected (B, N) scores/counts, got shape {s.shape}")
    b, n = s.shape
    if ids is None:
        if tiebreak not in TIEBREAKS:
            raise ValueError(f"tiebreak must be one of {TIEBREAKS}, got {tiebreak!r}")
        tie = np.broadcast_to(np.arange(n), (b, n))
    else:
        if len(ids) != b:
            raise ValueError(f"{len(ids)} ids for {b} images")
        tie = _tiebreak_keys(ids, n, tiebreak, seed)
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
    """How clumped a mask is: masked (B, M) patch indices (row-major on ``grid`` = (gh, gw)) ->
    (B,) share of the masked patches' in-image 4-neighbours that are masked too (NaN when M = 0).

    A uniformly random mask gives about (M - 1) / (N - 1); one compact blob approaches 1. ViTs
    tolerate scattered masks far better than blobs, so a Top/Bottom vs Random comparison must be
    read with this number beside it.
    """
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


def keep_indices(masked: np.ndarray, n_patches: int) -> np.ndarray:
    """Complement of ``masked`` (B, M) in range(N): (B, N - M), ascending."""
    b = masked.shape[0]
    keep = np.ones((b, n_patches), dtype=bool)
    if masked.size:
        np.put_along_axis(keep, masked, False, axis=1)
    return np.nonzero(keep)[1].reshape(b, n_patches - masked.shape[1])


def patch_mask(masked: np.ndarray | torch.Tensor, n_patches: int) -> torch.Tensor:
    """(B, M) indices -> (B, N) bool, True = masked."""
    idx = torch.as_tensor(np.asarray(masked), dtype=torch.long)
    out = torch.zeros((idx.shape[0], n_patches), dtype=torch.bool)
    if idx.numel():
        out.scatter_(1, idx, True)
    return out


# ----------------------------------------------------------------------------------- the two modes
def fill_patches(x: torch.Tensor, masked: np.ndarray | torch.Tensor, grid: tuple[int, int],
                 patch_size: int, value: float = 0.0) -> torch.Tensor:
    """``fill`` mode: a copy of ``x`` (B, 3, S, S) with the masked patches' pixels set to ``value``.

    On the normalised input 0 is the normalisation mean (the default, DESIGN.md section 3).
    Pixels outside the masked patches are untouched.
    """
    gr, gc = int(grid[0]), int(grid[1])
    p = int(patch_size)
    if x.shape[-2] != gr * p or x.shape[-1] != gc * p:
        raise ValueError(f"input {tuple(x.shape[-2:])} is not a {gr}x{gc} grid of {p}px patches")
    pm = patch_mask(masked, gr * gc).to(x.device).reshape(-1, 1, gr, gc)
    pix = pm.repeat_interleave(p, dim=2).repeat_interleave(p, dim=3)
    return torch.where(pix, torch.as_tensor(value, dtype=x.dtype, device=x.device), x)


def forward_drop(model: torch.nn.Module, x: torch.Tensor, keep: np.ndarray | torch.Tensor | None) -> torch.Tensor:
    """``drop`` mode: ``forward_features`` of a timm ViT on only the kept patch tokens.

    x: (B, 3, S, S); keep: (B, K) patch indices to keep (same K for every image; None keeps all).
    Patch embedding and position embedding are computed for the full grid (both are per token),
    then the prefix tokens (CLS, registers) and the kept patch tokens are gathered, so each kept
    token carries its own position; the blocks and the final norm see T = prefix + K tokens.
    Returns (B, prefix + K, D), the same layout as ``forward_features`` (classifier heads that pool
    the CLS token or average the patch tokens work unchanged on it).
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


# ----------------------------------------------------------------------------------- score layer
def parse_layers(spec: str | int | Sequence[int], n_layers: int) -> list[int] | str:
    """'auto' -> 'auto'; 7 or '7' -> [7]; '7-9' -> [7, 8, 9]; '5,7' -> [5, 7]. Layers are 1-based."""
    if isinstance(spec, str) and spec.strip().lower() == "auto":
        return "auto"
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
    if not out or any(not 1 <= v <= n_layers for v in out):
        raise ValueError(f"layer spec {spec!r}: need 'auto' or 1-based layers in 1..{n_layers}")
    return sorted(set(out))


def default_score_layer(stage_fit: dict | None, n_layers: int) -> tuple[list[int], str]:
    """DESIGN.md section 3: the last layer of the Capture stage when the stage fit holds, else the
    middle layer ``ceil(L / 2)``. ``stage_fit`` is a ``stages.json`` dict (``runs.stage_fit_json``)
    or ``StageFit.to_dict()``. Returns ([layer], why) with 1-based layers."""
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
    """Mean over the picked layers of head-mean theta_i (NaN-skipping).

    layer_scores: (B, len(captured), N) scores of the ``captured`` 1-based layers -> (B, N)."""
    arr = np.asarray(layer_scores, dtype=np.float32)
    pos = [list(captured).index(l) for l in pick]
    sel = arr[:, pos, :]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # all-NaN rows stay NaN
        return np.nanmean(sel, axis=1).astype(np.float32)


# ----------------------------------------------------------------------------------- spurious view
def spurious_patches(scores: np.ndarray, counts: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` keypoint patches (t > 0) with the lowest s_i, lowest first; ties by patch index.

    scores, counts: (N,) for one image -> (<= k,) patch indices (fewer when the image has fewer
    keypoint patches with a defined score). Their attention goes mostly to keypoint-free patches.
    """
    s = np.asarray(scores, dtype=np.float64)
    key = (np.asarray(counts) > 0) & ~np.isnan(s)
    idx = np.nonzero(key)[0]
    order = np.lexsort((idx, s[idx]))
    return idx[order][:k]


def attended_fraction(attn: torch.Tensor, i: int, gamma: float = 1.0, exclude_self: bool = False) -> np.ndarray:
    """For query patch ``i``: the fraction of heads whose attended set S_i contains each key patch.

    attn: (H, N, N) patch-block attention of one image and layer -> (N,) in [0, 1]."""
    from vitsift_core.method.metrics import attended_mask

    m = attended_mask(attn[:, i:i + 1, :].float(), gamma, exclude_self=False)[:, 0, :]
    if exclude_self:
        m[:, i] = False
    return m.float().mean(0).numpy()


def masked_crop(crop: np.ndarray, masked: Sequence[int], grid: tuple[int, int], patch_size: int,
                color: Sequence[float]) -> np.ndarray:
    """For figures: the (S, S, 3) uint8 crop with the masked patches painted ``color`` (0-255 RGB,
    e.g. the normalisation mean x 255, which is what ``fill`` feeds the model)."""
    out = np.array(crop, copy=True)
    gc, p = int(grid[1]), int(patch_size)
    for j in masked:
        r, c = divmod(int(j), gc)
        out[r * p:(r + 1) * p, c * p:(c + 1) * p] = np.asarray(color, dtype=np.float64).round().astype(np.uint8)
    return out
