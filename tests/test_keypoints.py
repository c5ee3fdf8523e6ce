"""keypoints: patch assignment at borders and edges, SIFT behaviour, the on-disk cache."""
from __future__ import annotations

import multiprocessing as mp
import pickle

import cv2
import numpy as np
import pytest

import vitsift_core.data.keypoints as kp
from vitsift_core.data.keypoints import KeypointCache, SiftParams, detect_keypoints, keypoint_counts, patch_counts

P = 8
GRID = (4, 4)  # a 32 x 32 crop
S = GRID[0] * P


# --------------------------------------------------------------------------------------------------
# patch_counts
# --------------------------------------------------------------------------------------------------

def _single(x, y, grid=GRID, p=P):
    t = patch_counts(np.array([[x, y]], np.float32), grid, p)
    assert t.sum() == 1
    return int(np.flatnonzero(t)[0])


def test_patch_index_is_row_major():
    assert _single(3.0, 3.0) == 0
    assert _single(9.5, 1.0) == 1            # r=0, c=1
    assert _single(1.0, 9.5) == GRID[1]      # r=1, c=0
    assert _single(27.0, 17.0) == 2 * 4 + 3


@pytest.mark.parametrize("k", range(4))
def test_points_on_borders_go_right_and_down(k):
    assert _single(k * P, 0.0) == k                  # x = k*P -> column k
    assert _single(0.0, k * P) == k * GRID[1]        # y = k*P -> row k
    if k > 0:
        assert _single(k * P - 1e-3, 0.0) == k - 1   # just left of the border stays left


def test_edges_are_clamped():
    last = GRID[0] * GRID[1] - 1
    assert _single(S, S) == last                    # x = S exactly (outside) -> last column
    assert _single(S - 1e-3, S - 1e-3) == last
    assert _single(S + 5.0, 0.0) == GRID[1] - 1
    assert _single(-1e-3, -1e-4) == 0               # tiny negatives from sub-pixel refinement
    assert _single(-3.0, S) == (GRID[0] - 1) * GRID[1]


def test_non_square_grid_and_sum():
    rng = np.random.default_rng(0)
    xy = rng.uniform(-2, 50, size=(500, 2))
    t = patch_counts(xy, (3, 5), 10)
    assert t.shape == (15,) and t.dtype == np.int64 and t.sum() == 500
    r = np.clip(np.floor(xy[:, 1] / 10), 0, 2).astype(int)
    c = np.clip(np.floor(xy[:, 0] / 10), 0, 4).astype(int)
    assert np.array_equal(t, np.bincount(r * 5 + c, minlength=15))


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
