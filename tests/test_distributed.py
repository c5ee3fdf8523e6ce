"""torchrun: `vitsift analyze` / `suite` / `mask-eval` in 2 CPU processes (gloo) write exactly what 1 process writes.

Each rank analyses the chunks k with k % world == rank (--chunk 2: several chunks per rank)
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

from vitsift_core.experiments.analysis import CONTROLS
from vitsift_core.method import masking as MK


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
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "VITSIFT_CACHE": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}


def _args(cmd, ckpt, imgs, out, *extra):
    return [cmd, "--quiet", "--num-workers", "1", "--batch-size", "2", "--device", "cpu",
            "--model", ckpt, "--images", str(imgs), "--out", str(out), "--chunk", "2", *extra]


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
    """All controls, mean-attention included: each rank keeps its own running sum of attention; donor
    keypoints are deranged within each chunk, so every rank draws the same donors."""
    env = _env(tmp_path)
    one, two = tmp_path / "one", tmp_path / "two"
    _single(_args("suite", tiny_ckpt, images, one), env)
    _torchrun(_args("suite", tiny_ckpt, images, two), env)
    dirs = sorted(x.name for x in one.iterdir())
    assert dirs == sorted(x.name for x in two.iterdir()) and len(dirs) == 2 * len(CONTROLS) == 10
    assert {"donor-keypoints", "donor-keypoints-xself"} <= {d.rsplit("-", 1)[0] for d in dirs}
    for d in dirs:
        if d.startswith("mean-attention"):
            # the data-set mean is summed in another order (per rank, then across): float64
            # rounding may differ in the last bit, so compare to 1e-6 rather than exactly
            ha, hb = pd.read_parquet(one / d / "heads.parquet"), pd.read_parquet(two / d / "heads.parquet")
            pd.testing.assert_frame_equal(ha, hb, check_exact=False, rtol=0, atol=1e-6)
            assert len(list((two / d).glob("mean_attention_sum*.npz"))) == 2
        else:
            _same_run(one / d, two / d)


@pytest.fixture(scope="module")
def labelled_images(tmp_path_factory):
    """Two classes (folders) with different textures, a broken file; val and probe-train sets."""
    root = tmp_path_factory.mktemp("labelled")
    rng = np.random.default_rng(1)
    for split, n in (("train", 4), ("val", 5)):           # val: 10 images + 1 broken -> chunks of 2
        for ci, c in enumerate(("cat", "dog")):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                img = (rng.random((64, 64, 3)) * 60).astype(np.uint8)
                if ci == 0:
                    img[::8] = 255
                else:
                    img[:, ::8] = 255
                Image.fromarray(img).save(root / split / c / f"{c}_{i:02d}.png")
    (root / "val" / "dog" / "dog_broken.jpg").write_bytes(b"not a jpeg")
    return root


def test_torchrun_mask_eval_equals_one_process(tmp_path, tiny_ckpt, labelled_images):
    """Probe tier, both modes, layer 'auto': the 2-process run trains the probe on rank 0 (its own
    empty cache) and writes the same tables, scores and layer choice as 1 process."""
    # separate parents: a run beside another with the same scores would copy its parts, not compute
    one, two = tmp_path / "one" / "run", tmp_path / "two" / "run"
    extra = ["--classifier", "embedded-probe", "--probe-train", str(labelled_images / "train"),
             "--probe-per-class", "4", "--ratios", "0,10,40", "--mode", "fill,drop", "--n-boot", "100"]
    _single(_args("mask-eval", tiny_ckpt, labelled_images / "val", one, *extra),
            {**_env(tmp_path), "VITSIFT_CACHE": str(tmp_path / "cache1")})
    p = _torchrun(_args("mask-eval", tiny_ckpt, labelled_images / "val", two, *extra),
                  {**_env(tmp_path), "VITSIFT_CACHE": str(tmp_path / "cache2")})
    assert p.stdout.count("wrote ") == 1                   # rank 0 alone reports
    for f in ("predictions.parquet", "accuracy.parquet", "paired.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(one / f), pd.read_parquet(two / f), check_exact=True)
    pred = pd.read_parquet(two / "predictions.parquet")
    assert pred.image.nunique() == 10 and len(pred) == 10 * len(MK.DEFAULT_ORDERS) * 2 * 3
    sa, sb = np.load(one / "scores.npz"), np.load(two / "scores.npz")
    assert sorted(sa.files) == sorted(sb.files)
    for k in sa.files:
        assert np.array_equal(sa[k], sb[k]), k
    assert json.loads((one / "layer.json").read_text()) == json.loads((two / "layer.json").read_text())
    assert pd.read_csv(one / "skipped.csv").equals(pd.read_csv(two / "skipped.csv"))
    assert len(pd.read_csv(two / "skipped.csv")) == 1
    ia, ib = (json.loads((d / "params.json").read_text()) for d in (one, two))
    assert ia["identity"] == ib["identity"]
    pa, pb = ia["classifier"]["info"], ib["classifier"]["info"]    # the same probe, trained on rank 0
    drop = lambda d: {k: v for k, v in d.items() if not k.endswith("seconds")}
    assert drop(pa) == drop(pb) and pa["n_train"] == 8
    ra, rb = (json.loads((d / "run.json").read_text()) for d in (one, two))
    assert ra["complete"] and rb["complete"] and ra["clean_top1"] == rb["clean_top1"] and rb["world"] == 2
    assert ra["score_chunks_reused"] == rb["score_chunks_reused"] == 0 and rb["mask_conditions_reused"] == 0
    # rank 0 did its share only: chunks 0, 2, 4 (6 of 11 records) in both passes
    assert ra["score_images"] == 11 and rb["score_images"] == 6 and rb["mask_forwards"] == 6 * len(MK.DEFAULT_ORDERS) * 2 * 2
    # each rank wrote its own chunks (11 records / 2 per chunk = 6 chunks per pass)
    assert sorted(x.name for x in (two / "parts").iterdir()) == \
        [f"mask-{k:05d}.parquet" for k in range(6)] + [f"score-{k:05d}.npz" for k in range(6)]
