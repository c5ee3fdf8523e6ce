"""Issue 16's keypoint geometry beyond patch_counts: the old-vs-new rule effect counts, one count per
location through iter_batches and ``vitsift analyze --dedupe-keypoints``, threshold_effect's columns."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from vitsift_core.data.batches import iter_batches
from vitsift_core.data.images import model_input
from vitsift_core.data.keypoints import (keypoint_counts, patch_counts, rule_effect, rule_effect_shares,
                                         unique_locations)
from vitsift_core.data.sources import read_record, resolve_images

EMBEDDED_LIKE = {"input_size": (3, 224, 224), "interpolation": "bicubic", "crop_pct": 1.0,
                 "crop_mode": "center", "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VITSIFT_CACHE", str(tmp_path / "cache"))


def test_rule_effect_hand_case():
    # 4 x 4 grid of 8 px. Old rule floor(x / 8), new floor((x + 0.5) / 8).
    xy = np.array([[7.6, 1.0],      # old patch 0, new patch 1: moves; patch 1 becomes a keypoint patch
                   [7.6, 1.0],      # its second orientation: moves too, a duplicate location
                   [3.0, 3.0],      # patch 0 under both
                   [15.7, 3.0],     # old 1, new 2: moves
                   [20.0, 20.0]])   # patch 10 under both
    e = rule_effect(xy, (4, 4), 8)
    # old counts: p0 = 3, p1 = 1, p10 = 1; new: p0 = 1, p1 = 2, p2 = 1, p10 = 1
    assert e == {"n_keypoints": 5, "n_locations": 4, "n_moved": 3, "n_key_union": 4,
                 "n_key_changed": 1, "n_count_changed": 3}
    s = rule_effect_shares(pd.DataFrame([e, rule_effect(np.zeros((0, 2)), (4, 4), 8)]))
    assert s["images"] == 2 and s["keypoints"] == 5
    assert s["duplicate_share"] == pytest.approx(1 / 5) and s["moved_share"] == pytest.approx(3 / 5)
    assert s["key_changed_share"] == pytest.approx(1 / 4) and s["count_changed_share"] == pytest.approx(3 / 4)
    empty = rule_effect_shares({k: [0] for k in e})
    assert all(math.isnan(empty[k]) for k in ("duplicate_share", "moved_share", "key_changed_share"))


def test_rule_effect_matches_patch_counts_on_random_points():
    rng = np.random.default_rng(3)
    xy = rng.uniform(-1, 33, (300, 2))
    xy[:50] = xy[50:100]
    e = rule_effect(xy, (4, 4), 8)
    old, new = patch_counts(xy, (4, 4), 8, offset=0.0), patch_counts(xy, (4, 4), 8)
    union = (old > 0) | (new > 0)
    assert e["n_locations"] == len({tuple(v) for v in xy.tolist()}) == len(unique_locations(xy))
    assert e["n_count_changed"] == int((union & (old != new)).sum()) and e["n_key_union"] == int(union.sum())
    # each moved keypoint leaves one patch and enters another: |old - new| sums to twice the moves at most
    assert np.abs(old - new).sum() <= 2 * e["n_moved"] and e["n_moved"] > 0


def test_iter_batches_dedupe_keypoints():
    records = resolve_images("samples", 4)
    def counts(dedupe):
        out = {}
        for batch, _ in iter_batches(records, EMBEDDED_LIKE, (16, 16), 14, num_workers=0, progress=False,
                                     batch_size=3, dedupe_keypoints=dedupe):
            out.update(zip(batch.ids, batch.counts.numpy()))
        return out
    plain, dedup = counts(False), counts(True)
    changed = 0
    for rec in records:
        crop, _ = model_input(read_record(rec), EMBEDDED_LIKE)
        t, k = keypoint_counts(crop, (16, 16), 14)
        assert np.array_equal(plain[rec.id], t)
        assert np.array_equal(dedup[rec.id], patch_counts(k, (16, 16), 14, dedupe=True))
        assert dedup[rec.id].sum() == len(unique_locations(k))
        changed += int(dedup[rec.id].sum() < t.sum())
    assert changed >= 1          # the bundled photos have multi-orientation keypoints


def test_analyze_dedupe_keypoints_option(tmp_path, tiny_ckpt):
    from vitsift_core.cli import main

    imgs = resolve_images("samples", 2)
    base = ["analyze", "--quiet", "--num-workers", "0", "--device", "cpu", "--model", tiny_ckpt,
            "--images", "samples", "--limit", "2"]
    assert main([*base, "--out", str(tmp_path / "a")]) == 0
    assert main([*base, "--dedupe-keypoints", "--out", str(tmp_path / "b")]) == 0
    ident = {d: json.loads((tmp_path / d / "params.json").read_text())["identity"] for d in "ab"}
    assert ident["a"]["dedupe_keypoints"] is False and ident["b"]["dedupe_keypoints"] is True
    with np.load(tmp_path / "a" / "keypoints.npz") as za, np.load(tmp_path / "b" / "keypoints.npz") as zb:
        ca, cb = za["counts"], zb["counts"]
        assert list(za["ids"]) == [r.id for r in imgs]
    assert (cb <= ca).all() and cb.sum() < ca.sum()


def test_threshold_effect_reports_the_geometry():
    from vitsift_core.experiments.study import threshold_effect

    class LM:                     # threshold_effect needs the crop geometry only
        data_config, grid, patch_size = EMBEDDED_LIKE, (16, 16), 14
    records = resolve_images("samples", 2)
    te = threshold_effect(LM, records, [0.04, 0.08], progress=False)
    assert len(te) == 4 and {"n_locations", "n_moved", "key_share"} <= set(te.columns)
    assert (te.n_locations <= te.n_keypoints).all()
    a = te[te.threshold == 0.04].set_index("image")
    b = te[te.threshold == 0.08].set_index("image")
    assert (b.n_keypoints <= a.n_keypoints).all()
    crop, _ = model_input(read_record(records[0]), EMBEDDED_LIKE)
    _, k = keypoint_counts(crop, (16, 16), 14)
    assert a.loc[records[0].id].to_dict() | {"threshold": 0.04} == \
        {"threshold": 0.04, "key_share": float((patch_counts(k, (16, 16), 14) > 0).mean()), **rule_effect(k, (16, 16), 14)}


def test_mae_arrays_cache_is_keyed_by_the_keypoint_rule(tmp_path, monkeypatch):
    # counts.npy of the MAE arrays holds counts: another rule must not read old arrays back
    from vitsift_core.experiments import mae_data

    a = mae_data.prepare_arrays("samples", 2, 32, 8, root=tmp_path, progress=False, num_workers=0)
    assert mae_data.prepare_arrays("samples", 2, 32, 8, root=tmp_path, progress=False, num_workers=0).path == a.path
    monkeypatch.setattr(mae_data, "KEYPOINT_RULE", "some-other-rule")
    b = mae_data.prepare_arrays("samples", 2, 32, 8, root=tmp_path, progress=False, num_workers=0)
    assert b.path != a.path and np.array_equal(a.counts, b.counts)


def _bench():
    import importlib.util
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "benchmarks"
    sys.path.insert(0, str(root))
    spec = importlib.util.spec_from_file_location("keypoint_geometry", root / "keypoint_geometry.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_benchmark_image_summary_hand_case():
    kg = _bench()
    nan = float("nan")
    # 2 images x 2 layers x 2 heads; image 1 has no keypoint patch (theta_kk NaN everywhere)
    kk = np.array([[[0.8, 0.6], [1.0, 0.6]], [[nan, nan], [nan, nan]]])
    nk = np.array([[[0.5, 0.5], [0.3, 0.3]], [[0.2, 0.4], [0.2, 0.4]]])
    ch = np.array([[[0.5] * 2] * 2, [[0.0] * 2] * 2])
    s = kg.image_summary({"r": {"theta_kk": kk, "theta_nk": nk, "theta_chance": ch}})["r"]
    assert s["kk"][0] == pytest.approx(0.75) and np.isnan(s["kk"][1])
    assert s["nk"] == pytest.approx([0.4, 0.3])
    assert s["kk_minus_nk"][0] == pytest.approx(0.35) and np.isnan(s["kk_minus_nk"][1])
    assert s["kk_minus_chance"][0] == pytest.approx(0.25) and np.isnan(s["kk_minus_chance"][1])
    rows = kg.metric_rows({r: {q: np.array([0.1, 0.3]) + i for q in kg.QUANTITIES}
                           for i, r in enumerate(kg.RULES)}, n_boot=50, seed=0)
    got = {(r["rule"], r["quantity"]): r for r in rows}
    assert got[("dedupe", "kk")]["value"] == pytest.approx(2.2)
    d = got[("dedupe - half-pixel", "kk")]            # paired: the same shift for every image
    assert (d["value"], d["ci_low"], d["ci_high"]) == pytest.approx((1.0, 1.0, 1.0))


def test_benchmark_runs(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "keypoint_geometry.py"
    out = tmp_path / "kg.csv"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VITSIFT_CACHE": str(tmp_path / "cache")}
    p = subprocess.run([sys.executable, str(script), "--model", "test_vit", "--random-init", "--images", "samples",
                        "--n", "4", "--batch", "3", "--num-workers", "0", "--n-boot", "50", "--out", str(out)],
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    df = pd.read_csv(out)
    assert "moved_share" in p.stdout and "4 images of samples" in p.stdout
    geo = df[df.section == "geometry"].set_index("quantity").value
    assert 0 < geo.moved_share < 0.2 and 0 < geo.duplicate_share < 0.5
    m = df[df.section == "metric"].set_index(["rule", "quantity"]).value
    for q in ("kk", "nk", "kk_minus_nk", "kk_minus_chance"):
        assert m[("half-pixel - old", q)] == pytest.approx(m[("half-pixel", q)] - m[("old", q)], abs=1e-9)
