"""keypoints: patch assignment at the half-pixel borders and edges, one count per location, SIFT
behaviour, the on-disk cache."""
from __future__ import annotations

import math
import multiprocessing as mp
import pickle

import cv2
import numpy as np
import pytest

import vitsift_core.data.keypoints as kp
from vitsift_core.data.keypoints import (KeypointCache, SiftParams, detect_keypoints,
                                         keypoint_counts, patch_counts, patch_index, unique_locations)

P = 8
GRID = (4, 4)  # a 32 x 32 crop
S = GRID[0] * P


# --------------------------------------------------------------------------------------------------
# patch_counts
# --------------------------------------------------------------------------------------------------

def _single(x, y, grid=GRID, p=P, offset=None):
    """The patch of one keypoint; ``offset`` None: patch_counts' default (the half-pixel rule)."""
    xy = np.array([[x, y]], np.float64)
    t = patch_counts(xy, grid, p) if offset is None else patch_counts(xy, grid, p, offset=offset)
    assert t.sum() == 1
    return int(np.flatnonzero(t)[0])


def test_patch_index_is_row_major():
    assert _single(3.0, 3.0) == 0
    assert _single(9.5, 1.0) == 1            # r=0, c=1
    assert _single(1.0, 9.5) == GRID[1]      # r=1, c=0
    assert _single(27.0, 17.0) == 2 * 4 + 3


EPS = 1e-6


@pytest.mark.parametrize("k", range(1, 4))
def test_half_pixel_borders(k):
    # DESIGN.md sec. 3: OpenCV pixel centres at integers, so patch k spans [kP - 0.5, (k+1)P - 0.5)
    border = k * P - 0.5
    assert _single(border - EPS, 0.0) == k - 1               # x axis: just before the border
    assert _single(border, 0.0) == k                         # on it
    assert _single(border + EPS, 0.0) == k
    assert _single(k * P - 1.0, 0.0) == k - 1                # the last pixel centre of patch k-1
    assert _single(k * P, 0.0) == k                          # the first pixel centre of patch k
    assert _single(0.0, border - EPS) == (k - 1) * GRID[1]   # y axis
    assert _single(0.0, border) == k * GRID[1]
    assert _single(0.0, border + EPS) == k * GRID[1]
    assert _single(border - EPS, border) == k * GRID[1] + k - 1      # both at once
    assert _single(border, border - EPS) == (k - 1) * GRID[1] + k


def test_edges_are_clamped():
    last = GRID[0] * GRID[1] - 1
    assert _single(-0.5, -0.5) == 0                 # the left/top edge of pixel 0
    assert _single(-0.5 - EPS, -0.5 - EPS) == 0     # beyond it (sub-pixel refinement): clamped
    assert _single(-3.0, S) == (GRID[0] - 1) * GRID[1]
    assert _single(S - 0.5 - EPS, S - 0.5 - EPS) == last   # the right/bottom edge of the last pixel
    assert _single(S - 0.5, S - 0.5) == last        # one past it: would be patch G, clamped
    assert _single(S, S) == last
    assert _single(S + 5.0, 0.0) == GRID[1] - 1


@pytest.mark.parametrize("k", range(1, 4))
def test_offset_zero_is_the_old_rule(k):
    # kept only to measure the change (benchmarks/keypoint_geometry.py): borders at kP
    assert _single(k * P, 0.0, offset=0.0) == k
    assert _single(k * P - EPS, 0.0, offset=0.0) == k - 1
    assert _single(k * P - 0.5, 0.0, offset=0.0) == k - 1    # the new rule puts it in patch k
    assert _single(k * P - 0.5, 0.0) == k


def _slow_counts(xy, grid, p, offset=0.5, dedupe=False):
    """One keypoint at a time: patch by the DESIGN.md formula, clamped; dedupe by a set of locations."""
    t, seen = [0] * (grid[0] * grid[1]), set()
    for x, y in xy[:, :2].tolist():
        if dedupe and (x, y) in seen:
            continue
        seen.add((x, y))
        r = min(max(math.floor((y + offset) / p), 0), grid[0] - 1)
        c = min(max(math.floor((x + offset) / p), 0), grid[1] - 1)
        t[r * grid[1] + c] += 1
    return np.array(t, np.int64)


@pytest.mark.parametrize("seed", range(4))
def test_patch_counts_match_slow_reference(seed):
    rng = np.random.default_rng(seed)
    grid, p = (3, 5), 10
    xy = rng.uniform(-2, 52, size=(400, 2)).astype(np.float32)        # float32 like detect_keypoints
    xy[:60] = rng.integers(0, 6, size=(60, 2)) * p - 0.5               # exactly on half-pixel borders
    xy[60:120] = xy[rng.integers(0, 60, 60)]                           # repeated locations
    xy[120:140, 0] = xy[0, 0]                                          # same x, other y: not duplicates
    for offset in (0.5, 0.0):
        for dedupe in (False, True):
            t = patch_counts(xy, grid, p, offset=offset, dedupe=dedupe)
            assert t.shape == (15,) and t.dtype == np.int64
            assert np.array_equal(t, _slow_counts(xy, grid, p, offset, dedupe)), (offset, dedupe)
    assert patch_counts(xy, grid, p).sum() == 400
    assert patch_counts(xy, grid, p, dedupe=True).sum() == len({tuple(v) for v in xy.tolist()}) < 400
    idx = patch_index(xy, grid, p)
    assert np.array_equal(np.bincount(idx, minlength=15), patch_counts(xy, grid, p))


def test_dedupe_counts_a_location_once():
    # [x, y, size, angle]: OpenCV's two orientations of one blob, then another blob in the same patch
    kps = np.array([[9.0, 1.0, 3.0, 45.0],
                    [9.0, 1.0, 3.0, 200.0],
                    [12.0, 2.0, 3.0, 45.0],
                    [20.0, 20.0, 5.0, 10.0]], np.float32)
    t = patch_counts(kps, GRID, P)
    assert t[1] == 3 and t[2 * 4 + 2] == 1 and t.sum() == 4
    td = patch_counts(kps, GRID, P, dedupe=True)
    assert td[1] == 2 and td[2 * 4 + 2] == 1 and td.sum() == 3
    assert list(unique_locations(kps)) == [0, 2, 3]
    assert list(unique_locations(kps[[3, 1, 0, 2]])) == [0, 1, 3]     # first of each, input order
    assert len(unique_locations(np.zeros((0, 4), np.float32))) == 0


def test_keypoint_counts_dedupe_keeps_every_keypoint(tmp_path):
    import skimage.data

    img = np.ascontiguousarray(skimage.data.astronaut()[::2, ::2][:224, :224])
    cache = KeypointCache(tmp_path)
    t, k = keypoint_counts(img, (16, 16), 14, cache=cache)
    td, kd = keypoint_counts(img, (16, 16), 14, cache=cache, dedupe=True)
    assert np.array_equal(k, kd) and cache.hits == 1          # one cache entry serves both counts
    assert len(unique_locations(k)) < 0.95 * len(k)           # OpenCV's multi-orientation keypoints
    assert t.sum() == len(k) and td.sum() == len(unique_locations(k)) < len(k)
    assert np.array_equal(td, patch_counts(k, (16, 16), 14, dedupe=True))


def test_empty_and_four_column_input():
    assert np.array_equal(patch_counts(np.zeros((0, 2)), GRID, P), np.zeros(16, np.int64))
    assert np.array_equal(patch_counts(np.zeros((0, 4), np.float32), GRID, P), np.zeros(16, np.int64))
    kps = np.array([[9.0, 1.0, 3.0, 45.0]], np.float32)  # [x, y, size, angle]
    assert patch_counts(kps, GRID, P)[1] == 1


def test_invalid_input():
    with pytest.raises(ValueError):
        patch_counts(np.array([[np.nan, 1.0]]), GRID, P)
    with pytest.raises(ValueError):
        patch_counts(np.zeros((3, 2)), (0, 4), P)
    with pytest.raises(ValueError):
        patch_counts(np.zeros((3,)), GRID, P)


# --------------------------------------------------------------------------------------------------
# SIFT
# --------------------------------------------------------------------------------------------------

def _blobs_image(size=128):
    """Grey background, a dark disc top-left and a bright square bottom-right; nothing else."""
    img = np.full((size, size, 3), 128, np.uint8)
    cv2.circle(img, (32, 32), 10, (20, 20, 20), -1)
    img[80:104, 80:104] = 240
    return img


def test_sift_keypoints_lie_on_the_structures():
    img = _blobs_image()
    k = detect_keypoints(img)
    assert k.dtype == np.float32 and k.ndim == 2 and k.shape[1] == 4
    assert len(k) >= 2
    near_disc = np.hypot(k[:, 0] - 32, k[:, 1] - 32) < 22
    near_square = (k[:, 0] > 66) & (k[:, 0] < 118) & (k[:, 1] > 66) & (k[:, 1] < 118)
    assert near_disc.any() and near_square.any()
    assert (near_disc | near_square).all()  # no keypoint in the flat background
    assert (k[:, 2] > 0).all()  # sizes


def test_sift_black_image_has_no_keypoints():
    k = detect_keypoints(np.zeros((64, 64, 3), np.uint8))
    assert k.shape == (0, 4) and k.dtype == np.float32
    t, k2 = keypoint_counts(np.zeros((32, 32, 3), np.uint8), GRID, P)
    assert t.sum() == 0 and len(k2) == 0


def test_higher_contrast_threshold_gives_fewer_keypoints():
    import skimage.data

    img = np.ascontiguousarray(skimage.data.astronaut()[::4, ::4])  # 128 x 128
    n_lo = len(detect_keypoints(img, SiftParams(contrast_threshold=0.02)))
    n_def = len(detect_keypoints(img))
    n_hi = len(detect_keypoints(img, SiftParams(contrast_threshold=0.12)))
    assert n_lo > n_def > n_hi


def test_sift_is_deterministic_and_uses_rgb_grayscale():
    import skimage.data

    img = np.ascontiguousarray(skimage.data.chelsea()[::3, ::3])
    a, b = detect_keypoints(img), detect_keypoints(img)
    assert np.array_equal(a, b)
    # same as OpenCV SIFT on cv2's grayscale of the image (RGB order), modulo our sort
    ref = cv2.SIFT_create().detect(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY), None)
    assert len(ref) == len(a)
    ref_xy = np.array(sorted((p.pt[0], p.pt[1]) for p in ref), np.float32)
    assert np.allclose(ref_xy, a[:, :2])


def test_keypoint_counts_consistent():
    img = _blobs_image(S * 4)
    t, k = keypoint_counts(img, (16, 16), P)
    assert t.shape == (256,) and t.sum() == len(k)
    assert np.array_equal(t, patch_counts(k[:, :2], (16, 16), P))


def test_sift_rejects_bad_crop():
    with pytest.raises(ValueError):
        detect_keypoints(np.zeros((8, 8), np.uint8))


def test_params_key_stable_and_distinct():
    assert SiftParams().key() == SiftParams().key()
    assert len(SiftParams().key()) == 12
    assert SiftParams(contrast_threshold=0.05).key() != SiftParams().key()
    assert SiftParams(edge_threshold=10).key() == SiftParams().key()  # int vs float: same params


# --------------------------------------------------------------------------------------------------
# cache
# --------------------------------------------------------------------------------------------------

def test_cache_hit_does_not_recompute(tmp_path, monkeypatch):
    calls = []
    real = kp.detect_keypoints

    def counting(crop, params=SiftParams()):
        calls.append(1)
        return real(crop, params)

    monkeypatch.setattr(kp, "detect_keypoints", counting)
    cache = KeypointCache(tmp_path / "kp")
    img = _blobs_image(64)
    first = cache.get_or_compute(img)
    second = cache.get_or_compute(img)
    assert len(calls) == 1 and (cache.misses, cache.hits) == (1, 1)
    assert np.array_equal(first, second) and second.dtype == np.float32
    # layout: <root>/<params.key()>/<aa>/<sha>.npy, no temp files left
    path = cache.path_for(img)
    assert path.parent.parent.name == SiftParams().key() and path.parent.name == path.stem[:2]
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    # other params / other pixels are other entries
    cache.get_or_compute(img, SiftParams(contrast_threshold=0.1))
    img2 = img.copy()
    img2[0, 0, 0] ^= 1
    cache.get_or_compute(img2)
    assert len(calls) == 3
    # counts through the cache equal counts without it
    t1, _ = keypoint_counts(img, (8, 8), 8, cache=cache)
    t2, _ = keypoint_counts(img, (8, 8), 8)
    assert np.array_equal(t1, t2)


def test_cache_key_includes_shape():
    a = np.zeros((4, 8, 3), np.uint8)
    b = np.zeros((8, 4, 3), np.uint8)
    assert KeypointCache.crop_hash(a) != KeypointCache.crop_hash(b)


def test_cache_recovers_from_corrupt_entry(tmp_path):
    cache = KeypointCache(tmp_path)
    img = _blobs_image(64)
    path = cache.path_for(img)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"garbage")
    assert np.array_equal(cache.get_or_compute(img), detect_keypoints(img))
    assert np.array_equal(np.load(path), detect_keypoints(img))


def test_cache_default_root_and_pickle(kp_cache_dir):
    cache = KeypointCache()
    assert cache.root == kp_cache_dir / "keypoints"
    assert pickle.loads(pickle.dumps(cache)).root == cache.root


def _worker(args):
    root, seed = args
    img = _blobs_image(64)
    out = KeypointCache(root).get_or_compute(img)
    return out.tobytes()


@pytest.mark.timeout(120)
def test_cache_concurrent_writers(tmp_path):
    # Several processes racing on the same entry all get the same answer, and one clean file remains.
    ctx = mp.get_context("fork")
    with ctx.Pool(2) as pool:
        outs = pool.map(_worker, [(tmp_path, i) for i in range(6)])
    assert len(set(outs)) == 1
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) == 1 and files[0].suffix == ".npy"
