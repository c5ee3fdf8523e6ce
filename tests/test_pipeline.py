"""pipeline.iter_batches: bad files become Skipped, order kept, workers == in-process, counts right."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import vitsift_core.data.batches as pipeline
from conftest import DECODABLE, UNDECODABLE
from vitsift_core.data.sources import resolve_images
from vitsift_core.data.images import load_rgb, model_input
from vitsift_core.data.keypoints import KeypointCache, SiftParams, keypoint_counts
from vitsift_core.data.batches import Batch, Skipped, iter_batches

# test_vit-like: tiny input so SIFT and resizing cost nothing
SMALL = {"input_size": (3, 32, 32), "interpolation": "bicubic", "crop_pct": 0.9, "crop_mode": "center",
         "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
SMALL_GRID, SMALL_P = (4, 4), 8
EMBEDDED_LIKE = {"input_size": (3, 224, 224), "interpolation": "bicubic", "crop_pct": 1.0,
                 "crop_mode": "center", "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}


def _run(records, cfg=SMALL, grid=SMALL_GRID, p=SMALL_P, **kw):
    kw.setdefault("progress", False)
    out = list(iter_batches(records, cfg, grid, p, **kw))
    rows, skipped, order = {}, [], []
    for batch, sk in out:
        if batch is not None:
            assert isinstance(batch, Batch)
            b = len(batch.ids)
            assert batch.tensors.shape == (b, 3, cfg["input_size"][1], cfg["input_size"][2])
            assert batch.tensors.dtype == torch.float32
            assert batch.counts.shape == (b, grid[0] * grid[1]) and batch.counts.dtype == torch.int64
            assert len(batch.labels) == b
            for i, id_ in enumerate(batch.ids):
                rows[id_] = (batch.tensors[i], batch.counts[i])
            order += batch.ids
        skipped += sk
        order += [s.id for s in sk]
    return out, rows, skipped, order


@pytest.mark.parametrize("cfg, grid, p", [(SMALL, SMALL_GRID, SMALL_P), (EMBEDDED_LIKE, (16, 16), 14)])
def test_fixture_every_file_accounted_for(bad_images_dir, cfg, grid, p):
    records = resolve_images(str(bad_images_dir))
    out, rows, skipped, _ = _run(records, cfg, grid, p, batch_size=4, num_workers=0)
    assert sorted(rows) == sorted(DECODABLE)
    assert sorted(s.id for s in skipped) == sorted(UNDECODABLE)
    for s in skipped:
        assert isinstance(s, Skipped) and s.reason and s.path.endswith(s.id)
    reasons = {s.id: s.reason for s in skipped}
    assert "empty" in reasons["empty.jpg"] and "truncated" in reasons["truncated.jpg"]
    assert "not a recognised image" in reasons["not_an_image.jpg"]
    # counts are keypoint_counts on exactly model_input's crop; tensors are model_input's tensors
    for name in DECODABLE:
        crop, tensor = model_input(load_rgb(bad_images_dir / name), cfg)
        t, _ = keypoint_counts(crop, grid, p)
        assert np.array_equal(rows[name][1].numpy(), t), name
        assert torch.equal(rows[name][0], tensor), name
    assert rows["black.png"][1].sum() == 0
    if cfg is EMBEDDED_LIKE:
        assert rows["photo_astronaut.jpg"][1].sum() > 20


@pytest.mark.timeout(120)
def test_workers_match_in_process_and_keep_order(bad_images_dir):
    # Regression guard: OpenCV used in the parent *before* the workers fork (here via the
    # num_workers=0 run first) once made forked workers deadlock in cv2.setNumThreads.
    from vitsift_core.data.keypoints import detect_keypoints

    detect_keypoints(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    records = resolve_images(str(bad_images_dir))
    out0, rows0, sk0, order0 = _run(records, batch_size=5, num_workers=0)
    out1, rows1, sk1, order1 = _run(records, batch_size=5, num_workers=1)
    assert order0 == order1
    # within each batch good ids keep record order, and batches follow each other in record order
    ids = [r.id for r in records]
    flat = []
    for batch, sk in out0:
        chunk = sorted((batch.ids if batch else []) + [s.id for s in sk], key=ids.index)
        flat += chunk
    assert flat == ids
    assert [b.ids if b else None for b, _ in out0] == [b.ids if b else None for b, _ in out1]
    assert rows0.keys() == rows1.keys()
    for k in rows0:
        assert torch.equal(rows0[k][0], rows1[k][0]) and torch.equal(rows0[k][1], rows1[k][1])
    assert sk0 == sk1


def test_batch_of_only_bad_files_yields_none(bad_images_dir):
    records = [r for r in resolve_images(str(bad_images_dir)) if r.id in UNDECODABLE]
    out = list(iter_batches(records, SMALL, SMALL_GRID, SMALL_P, num_workers=0, progress=False))
    assert len(out) == 1 and out[0][0] is None and len(out[0][1]) == 3


def test_unexpected_error_becomes_skipped(bad_images_dir, monkeypatch):
    real = pipeline.model_input

    def flaky(rgb, cfg):
        if rgb.shape[:2] == (20, 20):
            raise RuntimeError("boom")
        return real(rgb, cfg)

    monkeypatch.setattr(pipeline, "model_input", flaky)
    records = resolve_images(str(bad_images_dir))
    _, rows, skipped, _ = _run(records, num_workers=0)
    bad = {s.id: s.reason for s in skipped}
    assert "tiny_20x20.png" in bad and "RuntimeError: boom" in bad["tiny_20x20.png"]
    assert len(rows) == len(DECODABLE) - 1


@pytest.mark.timeout(120)
def test_cache_is_used(bad_images_dir, tmp_path, monkeypatch):
    import vitsift_core.data.keypoints as kp

    records = resolve_images(str(bad_images_dir))
    cache = KeypointCache(tmp_path / "kp")
    _, rows1, _, _ = _run(records, num_workers=1, cache=cache)  # workers write the cache
    assert len(list((tmp_path / "kp").rglob("*.npy"))) == len(DECODABLE)
    calls = []
    monkeypatch.setattr(kp, "detect_keypoints", lambda *a, **k: calls.append(1))
    _, rows2, _, _ = _run(records, num_workers=0, cache=cache)
    assert calls == []  # everything came from disk
    for k in rows1:
        assert torch.equal(rows1[k][1], rows2[k][1])


def test_labels_and_sift_params_pass_through(tmp_path):
    from PIL import Image
    import skimage.data

    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        Image.fromarray(skimage.data.astronaut()[::4, ::4]).save(tmp_path / cls / "x.png")
    records = resolve_images(str(tmp_path))
    (batch, _), = list(iter_batches(records, EMBEDDED_LIKE, (16, 16), 14, num_workers=0, progress=False))
    assert batch.labels == ["a", "b"]
    (strict, _), = list(iter_batches(records, EMBEDDED_LIKE, (16, 16), 14, num_workers=0, progress=False,
                                     sift=SiftParams(contrast_threshold=0.1)))
    assert strict.counts.sum() < batch.counts.sum()


def test_grid_must_tile_input():
    with pytest.raises(ValueError, match="does not tile"):
        next(iter_batches([], SMALL, (3, 3), 8))
    assert list(iter_batches([], SMALL, SMALL_GRID, SMALL_P, progress=False)) == []


def test_progress_bar_counts_images(bad_images_dir, capsys):
    records = resolve_images(str(bad_images_dir))
    list(iter_batches(records, SMALL, SMALL_GRID, SMALL_P, num_workers=0, progress=True, desc="fixture"))
    err = capsys.readouterr().err
    assert "fixture" in err and "12/12" in err and "img/s" in err and "skipped=3" in err
