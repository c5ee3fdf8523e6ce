"""SIFT keypoints on the model's crop and their per-patch counts t_j (DESIGN.md sec. 3).

- :func:`detect_keypoints`: OpenCV SIFT on the grayscale of the exact RGB crop the model sees.
- :func:`patch_counts`: keypoint (x, y) -> counts per ViT patch, patch index ``r * G_c + c`` with
  ``r = floor(y / P)``, ``c = floor(x / P)``, clamped to the grid.
- :class:`KeypointCache`: keypoints on disk, keyed by the crop's pixels and the SIFT parameters, so
  any grid can be derived later without running SIFT again.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from vitsift_core.paths import atomic_write, cache_dir

__all__ = ["SiftParams", "detect_keypoints", "patch_counts", "keypoint_counts", "KeypointCache"]

# Bump when the meaning of a cached keypoint array changes (columns, sorting, colour conversion).
_CACHE_FORMAT = "kp-v1"


@dataclass(frozen=True)
class SiftParams:
    """OpenCV ``SIFT_create`` parameters; the defaults are OpenCV's (the paper uses the defaults)."""

    nfeatures: int = 0
    n_octave_layers: int = 3
    contrast_threshold: float = 0.04
    edge_threshold: float = 10.0
    sigma: float = 1.6

    def key(self) -> str:
        """Stable short hash (12 hex chars) of the parameters, the cache format and the OpenCV
        major.minor version, for cache folder names. The OpenCV version is part of it because
        SIFT's output may change between releases and a stale cache would go unnoticed."""
        payload = {
            "format": _CACHE_FORMAT,
            "opencv": ".".join(cv2.__version__.split(".")[:2]),
            # cast by declared type, so SiftParams(edge_threshold=10) == SiftParams(edge_threshold=10.0)
            "params": {f.name: (float if f.type in ("float", float) else int)(getattr(self, f.name))
                       for f in sorted(dataclasses.fields(self), key=lambda f: f.name)},
        }
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha1(blob).hexdigest()[:12]


def _check_crop(crop: np.ndarray) -> np.ndarray:
    crop = np.asarray(crop)
    if crop.ndim != 3 or crop.shape[2] != 3 or crop.dtype != np.uint8:
        raise ValueError(f"expected an (S, S, 3) uint8 RGB crop, got {crop.shape} {crop.dtype}")
    return np.ascontiguousarray(crop)


def detect_keypoints(crop: np.ndarray, params: SiftParams = SiftParams()) -> np.ndarray:
    """SIFT keypoints of an RGB crop.

    Args:
        crop: ``(H, W, 3) uint8`` RGB -- the model's crop from ``images.model_input``.
        params: SIFT parameters.

    Returns:
        ``(K, 4) float32`` rows ``[x, y, size, angle]`` in crop pixel coordinates (OpenCV's: pixel
        centres at integers), sorted lexicographically so the result does not depend on the order
        in which OpenCV's threads emit them. ``K`` may be 0 (e.g. a flat image).
    """
    crop = _check_crop(crop)
    # cv2's RGB2GRAY uses the same BT.601 weights as cv2.imread(..., GRAYSCALE) on the BGR file,
    # i.e. what "SIFT on the grayscale image" means in OpenCV tutorials.
    gray = cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY)
    sift = cv2.SIFT_create(
        nfeatures=int(params.nfeatures),
        nOctaveLayers=int(params.n_octave_layers),
        contrastThreshold=float(params.contrast_threshold),
        edgeThreshold=float(params.edge_threshold),
        sigma=float(params.sigma),
    )
    kps = sift.detect(gray, None)
    if not kps:
        return np.zeros((0, 4), dtype=np.float32)
    out = np.array([(k.pt[0], k.pt[1], k.size, k.angle) for k in kps], dtype=np.float32)
    order = np.lexsort((out[:, 3], out[:, 2], out[:, 1], out[:, 0]))  # primary key: x, then y...
    return np.ascontiguousarray(out[order])


def patch_counts(xy: np.ndarray, grid: tuple[int, int], patch_size: int) -> np.ndarray:
    """Keypoints per patch.

    Args:
        xy: ``(K, 2)`` keypoint positions ``(x, y)`` in crop pixels (extra columns are ignored, so a
            ``(K, 4)`` keypoint array works too).
        grid: ``(G_r, G_c)`` patch grid.
        patch_size: P, patch side in pixels.

    Returns:
        ``t``: ``(G_r * G_c,) int64``; ``t[r * G_c + c]`` counts keypoints with ``r = floor(y / P)``,
        ``c = floor(x / P)``. Points on a border go to the patch on their right / below
        (``x = k * P`` -> column k); points outside the grid (``x = S``, tiny negatives from
        sub-pixel refinement) are clamped into the edge patches, so ``t.sum() == K``.
    """
    g_r, g_c = (int(g) for g in grid)
    if g_r <= 0 or g_c <= 0 or int(patch_size) <= 0:
        raise ValueError(f"invalid grid {grid} / patch size {patch_size}")
    xy = np.asarray(xy, dtype=np.float64)
    if xy.size == 0:
        return np.zeros(g_r * g_c, dtype=np.int64)
    if xy.ndim != 2 or xy.shape[1] < 2:
        raise ValueError(f"xy must be (K, 2), got {xy.shape}")
    if not np.all(np.isfinite(xy[:, :2])):
        raise ValueError("keypoint coordinates must be finite")
    p = float(patch_size)
    c = np.clip(np.floor(xy[:, 0] / p), 0, g_c - 1).astype(np.int64)
    r = np.clip(np.floor(xy[:, 1] / p), 0, g_r - 1).astype(np.int64)
    return np.bincount(r * g_c + c, minlength=g_r * g_c).astype(np.int64)


def keypoint_counts(
    crop: np.ndarray,
    grid: tuple[int, int],
    patch_size: int,
    params: SiftParams = SiftParams(),
    cache: "KeypointCache | None" = None,
) -> tuple[np.ndarray, np.ndarray]:
    """SIFT on ``crop`` then :func:`patch_counts`.

    Returns ``(t, keypoints)``: ``t`` ``(G_r * G_c,) int64``, ``keypoints`` ``(K, 4) float32``.
    With ``cache``, keypoints are read from / written to it.
    """
    kps = cache.get_or_compute(crop, params) if cache is not None else detect_keypoints(crop, params)
    return patch_counts(kps[:, :2], grid, patch_size), kps


class KeypointCache:
    """Keypoint arrays on disk: ``<root>/<params.key()>/<aa>/<sha1>.npy``.

    ``sha1`` hashes the crop's shape, dtype and bytes, so the entry is valid for exactly those pixels
    whatever file or transform produced them; the grid is not part of the key (counts for any grid
    are derived from the stored keypoints). ``root`` defaults to ``cache_dir()/keypoints``.

    Writes are atomic (temporary file in the same folder, then ``os.replace``), so concurrent
    DataLoader workers computing the same entry at worst both write identical bytes, and a reader
    never sees a half-written file. The object holds only a path, so it pickles into workers.
    """

    def __init__(self, root: str | Path | None = None):
        if root is None:
            root = cache_dir() / "keypoints"
        self.root = Path(root)
        self.hits = 0    # per process; workers keep their own counters
        self.misses = 0

    def __repr__(self) -> str:
        return f"KeypointCache({str(self.root)!r})"

    @staticmethod
    def crop_hash(crop: np.ndarray) -> str:
        crop = _check_crop(crop)
        h = hashlib.sha1()
        h.update(f"{crop.shape}|{crop.dtype.str}|".encode())
        h.update(crop.tobytes())
        return h.hexdigest()

    def path_for(self, crop: np.ndarray, params: SiftParams = SiftParams()) -> Path:
        sha = self.crop_hash(crop)
        return self.root / params.key() / sha[:2] / f"{sha}.npy"

    def get(self, crop: np.ndarray, params: SiftParams = SiftParams()) -> np.ndarray | None:
        """Cached keypoints or None (also None for an unreadable / corrupt entry)."""
        path = self.path_for(crop, params)
        return self._load(path)

    @staticmethod
    def _load(path: Path) -> np.ndarray | None:
        try:
            arr = np.load(path, allow_pickle=False)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except (OSError, ValueError, EOFError):
            return None  # corrupt (e.g. a disk-full write from an older run): recompute
        if arr.ndim != 2 or arr.shape[1] != 4 or arr.dtype != np.float32:
            return None
        return arr

    def get_or_compute(self, crop: np.ndarray, params: SiftParams = SiftParams()) -> np.ndarray:
        """``(K, 4) float32`` keypoints of ``crop``, from disk when present, else computed and stored."""
        path = self.path_for(crop, params)
        arr = self._load(path)
        if arr is not None:
            self.hits += 1
            return arr
        self.misses += 1
        arr = detect_keypoints(crop, params)  # looked up at call time (tests count calls)
        self._atomic_save(path, arr)
        return arr

    @staticmethod
    def _atomic_save(path: Path, arr: np.ndarray) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)

        # No fsync: a torn entry after a power cut loads as corrupt and is recomputed,
        # and fsync per image would dominate the run time on slow disks.
        def write(p: Path) -> None:
            with open(p, "wb") as f:
                np.save(f, np.ascontiguousarray(arr, dtype=np.float32), allow_pickle=False)
        atomic_write(path, write)
