"""torchrun: `vitsift analyze` / `vitsift suite` in 2 CPU processes (gloo) write exactly what 1 process writes.

Each rank analyses the chunks k with k % world == rank (VITSIFT_CHUNK=2: several chunks per rank)
and writes its own parts; rank 0 merges after a barrier. Both runs use one torch thread per process
(torchrun's default with several processes), so the comparison can be exact.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for i in range(7):                                  # 7 images, chunks of 2: 4 chunks, the last short
        img = (rng.random((48, 64, 3)) * 255).astype(np.uint8)
        img[8:30, 10:40] = rng.integers(0, 255, 3)
        Image.fromarray(img).save(d / f"img_{i:03d}.png")
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(d / "img_black.png")   # no keypoints: NaN rows
    (d / "img_broken.jpg").write_bytes(b"not a jpeg")                            # skipped
    return d


def _env(tmp_path):
    return {**os.environ, "VITSIFT_CHUNK": "2", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "VITSIFT_CACHE": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}


def _args(cmd, ckpt, imgs, out, *extra):
    return [cmd, "--quiet", "--num-workers", "1", "--batch-size", "2", "--device", "cpu",
            "--model", ckpt, "--images", str(imgs), "--out", str(out), *extra]


def _single(args, env):
    p = subprocess.run([sys.executable, "-m", "vitsift_core.cli", *args], env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    return p


def _torchrun(args, env, nproc=2):
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
                        "--nproc_per_node", str(nproc), "-m", "vitsift_core.cli", *args],
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-8000:]
    return p


def _same_run(a, b):
    ha, hb = pd.read_parquet(a / "heads.parquet"), pd.read_parquet(b / "heads.parquet")
    pd.testing.assert_frame_equal(ha, hb, check_exact=True)
    pd.testing.assert_frame_equal(pd.read_parquet(a / "layers.parquet"), pd.read_parquet(b / "layers.parquet"),
                                  check_exact=True)
    for f in ("stages.json",):
        assert json.loads((a / f).read_text()) == json.loads((b / f).read_text())
    ka, kb = np.load(a / "keypoints.npz"), np.load(b / "keypoints.npz")
    assert list(ka["ids"]) == list(kb["ids"]) and np.array_equal(ka["counts"], kb["counts"])
    assert pd.read_csv(a / "skipped.csv").equals(pd.read_csv(b / "skipped.csv"))
    ra, rb = json.loads((a / "run.json").read_text()), json.loads((b / "run.json").read_text())
    assert ra["complete"] and rb["complete"] and ra["n_images"] == rb["n_images"]
    return ha


def test_torchrun_analyze_equals_one_process(tmp_path, tiny_ckpt, images):
    env = _env(tmp_path)
    one, two = tmp_path / "one", tmp_path / "two"
    _single(_args("analyze", tiny_ckpt, images, one), env)
    p = _torchrun(_args("analyze", tiny_ckpt, images, two), env)
    assert p.stdout.count("wrote ") == 1                  # rank 0 alone reports
    heads = _same_run(one, two)
    assert heads.image.nunique() == 8 and len(heads) == 8 * 6 * 2
    assert heads.theta_kk.isna().any() and heads.theta_kk.notna().any()
    parts = sorted(x.name for x in (two / "parts").glob("*.npz"))
    assert parts == [f"{k:05d}.npz" for k in range(5)]   # 9 records / 2 per chunk


def test_torchrun_suite_equals_one_process(tmp_path, tiny_ckpt, images):
    """All controls, mean-attention included: each rank keeps its own running sum of attention."""
    env = _env(tmp_path)
    one, two = tmp_path / "one", tmp_path / "two"
    _single(_args("suite", tiny_ckpt, images, one), env)
    _torchrun(_args("suite", tiny_ckpt, images, two), env)
    dirs = sorted(x.name for x in one.iterdir())
    assert dirs == sorted(x.name for x in two.iterdir()) and len(dirs) == 8
    for d in dirs:
        if d.startswith("mean-attention"):
            # the data-set mean is summed in another order (per rank, then across): float64
            # rounding may differ in the last bit, so compare to 1e-6 rather than exactly
            ha, hb = pd.read_parquet(one / d / "heads.parquet"), pd.read_parquet(two / d / "heads.parquet")
            pd.testing.assert_frame_equal(ha, hb, check_exact=False, rtol=0, atol=1e-6)
            assert len(list((two / d).glob("mean_attention_sum*.npz"))) == 2
        else:
            _same_run(one / d, two / d)
