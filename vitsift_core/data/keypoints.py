"""SIFT keypoints on the model's crop, their per-patch counts t_j (DESIGN.md sec. 3: half-pixel rule,
optional one count per location), and a disk cache of keypoints keyed by the crop's pixels and the
SIFT parameters (any grid and counting rule derives from it).
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

# Bump when the meaning of a cached keypoint array changes (columns, sorting, colour conversion).
_CACHE_FORMAT = "kp-v1"

# How keypoints become per-patch counts (not the cached keypoints: the cache key does not hold it).
# Every run store whose numbers depend on counts adds it to its identity (Params._identity), so a
# change of rule gives new result folders instead of silently reusing old ones. v1: floor(x / P);
# v2: the half-pixel rule below (issue 16).
KEYPOINT_RULE = "kp-rule-v2-half-pixel"
PIXEL_CENTRE_OFFSET = 0.5       # OpenCV: pixel c spans [c - 0.5, c + 0.5)


class CountsIdentity:
    """Mixin for a ``store.Params`` whose numbers depend on keypoint counts: its identity names
    :data:`KEYPOINT_RULE` (read when the identity is made), so a new rule gives new run folders."""

    def _identity(self, d: dict) -> dict:
        d = super()._identity(d)
        d["keypoint_rule"] = KEYPOINT_RULE
        return d


@dataclass(frozen=True)
class SiftParams:
    """OpenCV ``SIFT_create`` parameters; the defaults are OpenCV's (the paper uses the defaults)."""

    nfeatures: int = 0
    n_octave_layers: int = 3
    contrast_threshold: float = 0.04
    edge_threshold: float = 10.0
    sigma: float = 1.6

    def key(self) -> str:
        """12-hex hash of the parameters, the cache format and OpenCV's major.minor (SIFT's output
        may change between releases), for cache folder names."""
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
    """SIFT keypoints of an (H, W, 3) uint8 RGB crop -> (K, 4) float32 ``[x, y, size, angle]`` in
    crop pixels (OpenCV's: pixel centres at integers), sorted lexicographically (thread-order free).
    """
    crop = _check_crop(crop)
    # cv2's RGB2GRAY uses the same BT.601 weights as cv2.imread(..., GRAYSCALE) on the BGR file
    gray = cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY)
    sift = cv2.SIFT_create(nfeatures=int(params.nfeatures), nOctaveLayers=int(params.n_octave_layers),
                           contrastThreshold=float(params.contrast_threshold),
                           edgeThreshold=float(params.edge_threshold), sigma=float(params.sigma))
    kps = sift.detect(gray, None)
    if not kps:
        return np.zeros((0, 4), dtype=np.float32)
    out = np.array([(k.pt[0], k.pt[1], k.size, k.angle) for k in kps], dtype=np.float32)
    order = np.lexsort((out[:, 3], out[:, 2], out[:, 1], out[:, 0]))  # primary key: x, then y...
    return np.ascontiguousarray(out[order])


def unique_locations(xy: np.ndarray) -> np.ndarray:
    """Indices of the first keypoint at each distinct (x, y) of xy (K, 2+), in input order.
    OpenCV emits one keypoint per dominant orientation, so one location can appear several times
    with the same coordinates and another angle (DESIGN.md sec. 3)."""
    xy = np.asarray(xy)
    if xy.size == 0:
        return np.zeros(0, dtype=np.int64)
    _, first = np.unique(np.ascontiguousarray(xy[:, :2], dtype=np.float64), axis=0, return_index=True)
    return np.sort(first).astype(np.int64)


def patch_index(xy: np.ndarray, grid: tuple[int, int], patch_size: int,
                offset: float = PIXEL_CENTRE_OFFSET) -> np.ndarray:
    """Row-major patch of each keypoint: xy (K, 2+) crop pixels -> (K,) int64 ``r * G_c + c`` with
    ``r = floor((y + offset) / P)``, ``c = floor((x + offset) / P)``, clamped into the grid (sub-pixel
    refinement can put a point just outside). ``offset`` 0.5 is DESIGN.md's rule (OpenCV pixel centres
    at integers, so patch k spans [kP - 0.5, (k+1)P - 0.5)); 0.0 is the pre-issue-16 rule, kept only to
    measure the change (benchmarks/keypoint_geometry.py)."""
    g_r, g_c = (int(g) for g in grid)
    if g_r <= 0 or g_c <= 0 or int(patch_size) <= 0:
        raise ValueError(f"invalid grid {grid} / patch size {patch_size}")
    xy = np.asarray(xy, dtype=np.float64)
    if xy.size == 0:
        return np.zeros(0, dtype=np.int64)
    if xy.ndim != 2 or xy.shape[1] < 2:
        raise ValueError(f"xy must be (K, 2), got {xy.shape}")
    if not np.all(np.isfinite(xy[:, :2])):
        raise ValueError("keypoint coordinates must be finite")
    p, o = float(patch_size), float(offset)
    c = np.clip(np.floor((xy[:, 0] + o) / p), 0, g_c - 1).astype(np.int64)
    r = np.clip(np.floor((xy[:, 1] + o) / p), 0, g_r - 1).astype(np.int64)
    return r * g_c + c


def patch_counts(xy: np.ndarray, grid: tuple[int, int], patch_size: int, *, dedupe: bool = False,
                 offset: float = PIXEL_CENTRE_OFFSET) -> np.ndarray:
    """Keypoints per patch: xy (K, 2+) crop pixels -> t (G_r * G_c,) int64, ``t[r * G_c + c]``, the
    patch of each keypoint by :func:`patch_index`, so ``t.sum() == K``; ``dedupe`` counts each (x, y)
    location once (then ``t.sum()`` is the number of distinct locations)."""
    idx = patch_index(xy, grid, patch_size, offset)
    if dedupe and idx.size:
        idx = idx[unique_locations(xy)]
    return np.bincount(idx, minlength=int(grid[0]) * int(grid[1])).astype(np.int64)


def rule_effect(xy: np.ndarray, grid: tuple[int, int], patch_size: int) -> dict:
    """What issue 16's geometry changes for one image's keypoints xy (K, 2+), as counts: n_keypoints,
    n_locations (distinct (x, y)), n_moved (keypoints whose patch differs between the old floor(x / P)
    rule and the half-pixel rule), n_key_union (patches that are keypoint patches under either rule),
    n_key_changed (of those, the patches keypoint under one rule only), n_count_changed (of those, the
    patches whose count t_j differs). Pool them over images with :func:`rule_effect_shares`."""
    old = patch_index(xy, grid, patch_size, offset=0.0)
    new = patch_index(xy, grid, patch_size)
    n = int(grid[0]) * int(grid[1])
    t_old, t_new = np.bincount(old, minlength=n), np.bincount(new, minlength=n)
    union = (t_old > 0) | (t_new > 0)
    return {"n_keypoints": int(len(old)), "n_locations": int(len(unique_locations(xy))),
            "n_moved": int((old != new).sum()), "n_key_union": int(union.sum()),
            "n_key_changed": int(((t_old > 0) != (t_new > 0)).sum()),
            "n_count_changed": int((union & (t_old != t_new)).sum())}


def rule_effect_shares(rows) -> dict:
    """Pooled shares from :func:`rule_effect` rows (a DataFrame or a mapping of equal-length columns):
    duplicate_share = 1 - locations / keypoints, moved_share = moved / keypoints, key_changed_share and
    count_changed_share = changed / keypoint patches under either rule (NaN where nothing to divide)."""
    tot = {k: float(np.sum(np.asarray(rows[k], dtype=np.float64))) for k in
           ("n_keypoints", "n_locations", "n_moved", "n_key_union", "n_key_changed", "n_count_changed")}

    def share(a: float, b: float) -> float:
        return a / b if b > 0 else float("nan")
    return {"images": int(len(np.asarray(rows["n_keypoints"]))), "keypoints": int(tot["n_keypoints"]),
            "duplicate_share": share(tot["n_keypoints"] - tot["n_locations"], tot["n_keypoints"]),
            "moved_share": share(tot["n_moved"], tot["n_keypoints"]),
            "key_changed_share": share(tot["n_key_changed"], tot["n_key_union"]),
            "count_changed_share": share(tot["n_count_changed"], tot["n_key_union"])}


def keypoint_counts(crop: np.ndarray, grid: tuple[int, int], patch_size: int,
                    params: SiftParams = SiftParams(), cache: KeypointCache | None = None,
                    dedupe: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """SIFT on ``crop`` (through ``cache`` if given), then :func:`patch_counts` (``dedupe``: one count
    per location): (t, keypoints (K, 4), every keypoint, duplicates included)."""
    kps = cache.get_or_compute(crop, params) if cache is not None else detect_keypoints(crop, params)
    return patch_counts(kps[:, :2], grid, patch_size, dedupe=dedupe), kps


class KeypointCache:
    """Keypoint arrays at ``<root>/<params.key()>/<aa>/<sha1 of the crop's shape, dtype, bytes>.npy``
    (root default ``cache_dir()/keypoints``), written atomically; holds only a path, so it pickles
    into DataLoader workers."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else cache_dir() / "keypoints"
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

    def get_or_compute(self, crop: np.ndarray, params: SiftParams = SiftParams()) -> np.ndarray:
        """``(K, 4) float32`` keypoints of ``crop``, from disk when present, else computed and stored."""
        path = self.path_for(crop, params)
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError):   # missing, or corrupt (e.g. a disk-full write): recompute
            arr = None
        if arr is not None and arr.ndim == 2 and arr.shape[1] == 4 and arr.dtype == np.float32:
            self.hits += 1
            return arr
        self.misses += 1
        arr = detect_keypoints(crop, params)  # looked up at call time (tests count calls)
        path.parent.mkdir(parents=True, exist_ok=True)

        # no fsync: a torn entry after a power cut loads as corrupt and is recomputed
        def write(p: Path) -> None:
            with open(p, "wb") as f:
                np.save(f, np.ascontiguousarray(arr, dtype=np.float32), allow_pickle=False)
        atomic_write(path, write)
        return arr
