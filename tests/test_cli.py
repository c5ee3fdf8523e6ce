"""`vitsift analyze` end to end on a tiny model: files, values, bad inputs, controls, resume."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from vitsift_core.experiments import analysis as runs
from vitsift_core.store import RunMismatch
from vitsift_core.model.capture import attention_maps
from vitsift_core.model.infer import forward_precision
from vitsift_core.cli import main
from vitsift_core.data.sources import read_record, resolve_images
from vitsift_core.data.images import model_input
from vitsift_core.data.keypoints import keypoint_counts
from vitsift_core.method import metrics as M
from vitsift_core.model.registry import load_model

from conftest import DECODABLE, HOSTILE_SKIPPED, UNDECODABLE, write_hostile_images


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VITSIFT_CACHE", str(tmp_path / "cache"))


def run_cli(*args):
    return main(["analyze", "--quiet", "--num-workers", "0", "--batch-size", "4", "--device", "cpu", *args])


def photos(d, n, seed=0):
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        img = (rng.random((48, 64, 3)) * 255).astype(np.uint8)
        img[8:30, 10:40] = rng.integers(0, 255, 3)            # a flat block among texture: uneven keypoints
        Image.fromarray(img).save(d / f"img_{i:03d}.png")
    return d


def test_end_to_end_bad_inputs(tmp_path, tiny_ckpt, bad_images_dir):
    out = tmp_path / "out"
    assert run_cli("--model", tiny_ckpt, "--images", str(bad_images_dir), "--out", str(out)) == 0
    heads = pd.read_parquet(out / "heads.parquet")
    assert list(heads.columns) == runs.HEAD_COLS
    assert heads.image.nunique() == len(DECODABLE)
    assert len(heads) == len(DECODABLE) * 6 * 2              # test_vit: 6 layers x 2 heads
    skipped = pd.read_csv(out / "skipped.csv")
    assert sorted(os.path.basename(p) for p in skipped.path) == sorted(UNDECODABLE)
    assert skipped.reason.str.len().min() > 0
    layers = pd.read_parquet(out / "layers.parquet")
    assert list(layers.layer) == [1, 2, 3, 4, 5, 6]
    assert (layers.n_images == len(DECODABLE)).all()
    # images without a keypoint patch (black.png at least) have NaN theta_kk and do not count
    no_kp = set(heads.loc[heads.n_key == 0, "image"])
    assert "black.png" in no_kp and len(no_kp) < len(DECODABLE)
    assert heads[heads.image.isin(no_kp)].theta_kk.isna().all()
    assert (layers.n_images_kk == len(DECODABLE) - len(no_kp)).all()
    stages = json.loads((out / "stages.json").read_text())
    assert stages["fitted"] and len(stages["segments"]) == 3
    params = json.loads((out / "params.json").read_text())
    from vitsift_core.model.registry import checkpoint_identity
    assert params["identity"]["model"] == checkpoint_identity(tiny_ckpt) and "torch" in params["versions"]
    assert params["model"]["source"].startswith("checkpoint:")

    # values equal a direct computation for one image
    lm = load_model(tiny_ckpt)
    rec = [r for r in resolve_images(str(bad_images_dir)) if r.id == "photo_astronaut.jpg"][0]
    crop, x = model_input(read_record(rec), lm.data_config)
    t, _ = keypoint_counts(crop, lm.grid, lm.patch_size)
    maps = attention_maps(lm.model, lm.num_prefix_tokens, x[None])
    got = heads[heads.image == rec.id].set_index(["layer", "head"])
    for l in range(6):
        ref = M.head_metrics(maps[l], torch.from_numpy(t)[None])
        for k, v in ref.items():
            np.testing.assert_allclose(got.loc[(l + 1,), k].to_numpy(), v[0].numpy(), atol=1e-5)


def test_hostile_folder_finishes_and_lists_what_it_skipped(tmp_path, tiny_ckpt):
    """Issue 15 cases 2, 4, 8 (.heic): a FIFO, a socket, links (loop, broken, self, duplicate), a folder
    named x.jpg and a .heic file: the run ends, each real image is analysed once, the rest is listed."""
    imgs = write_hostile_images(tmp_path / "imgs")
    out = tmp_path / "o"
    args = [sys.executable, "-m", "vitsift_core.cli", "analyze", "--quiet", "--num-workers", "0",
            "--device", "cpu", "--model", tiny_ckpt, "--images", str(imgs), "--out", str(out)]
    proc = subprocess.run(args, env=dict(os.environ), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    heads = pd.read_parquet(out / "heads.parquet")
    assert sorted(heads.image.unique()) == ["a.png", "b.jpg"] and len(heads) == 2 * 6 * 2
    skipped = pd.read_csv(out / "skipped.csv")
    got = dict(zip((os.path.basename(p) for p in skipped.path), skipped.reason))
    assert sorted(got) == sorted(HOSTILE_SKIPPED)
    for name, why in HOSTILE_SKIPPED.items():
        assert why in got[name], (name, got[name])
    assert json.loads((out / "run.json").read_text())["n_skipped"] == len(HOSTILE_SKIPPED)


def test_all_controls(tmp_path, tiny_ckpt):
    imgs = photos(tmp_path / "imgs", 10)
    base = runs.AnalysisParams(model=tiny_ckpt, images=str(imgs), device="cpu", num_workers=0, batch_size=4)
    variants = {(c, x): tmp_path / f"{c}-{x}" for c in runs.CONTROLS for x in (False, True)}
    res = runs.run_suite(base, variants, progress=False)
    h = {v: pd.read_parquet(r.path / "heads.parquet") for v, r in res.items()}
    real = h[("none", False)]
    for v, df in h.items():
        assert len(df) == 10 * 12 and list(df.columns) == runs.HEAD_COLS
        if v[0] != "donor-keypoints":                             # (its chance is the donor's: test_donor.py)
            assert np.allclose(df.theta_chance, real.theta_chance)   # chance depends on counts only
    # shuffled counts are a permutation: same n_key, different theta
    shuf = h[("shuffle-keypoints", False)]
    assert (shuf.n_key.to_numpy() == real.n_key.to_numpy()).all()
    assert not np.allclose(shuf.theta_kk, real.theta_kk, equal_nan=True)
    # random-init differs from the checkpoint; exclude_self changes theta
    assert not np.allclose(h[("random-init", False)].focus, real.focus)
    assert not np.allclose(h[("none", True)].theta_kk, real.theta_kk, equal_nan=True)
    # mean-attention == metrics of the data-set-mean map on each image's counts
    lm = load_model(tiny_ckpt)
    kp = np.load(res[("none", False)].path / "keypoints.npz")
    recs = {r.id: r for r in resolve_images(str(imgs))}
    xs = torch.stack([model_input(read_record(recs[i]), lm.data_config)[1] for i in kp["ids"]])
    maps = attention_maps(lm.model, lm.num_prefix_tokens, xs)
    mean_df = h[("mean-attention", True)].set_index(["image", "layer", "head"])
    for l in (0, 3, 5):
        mean_map = maps[l].double().mean(0).float()                     # (H, N, N)
        for b in (0, 7):
            ref = M.head_metrics(mean_map[None], torch.from_numpy(kp["counts"][b])[None], exclude_self=True)
            for k in ("theta_kk", "theta_nk", "focus"):
                np.testing.assert_allclose(mean_df.loc[(kp["ids"][b], l + 1), k].to_numpy(), ref[k][0].numpy(),
                                           atol=1e-5)


def test_chunk_size_is_a_parameter_and_on_chunk_sees_each_chunk(tmp_path, tiny_ckpt):
    imgs = photos(tmp_path / "imgs", 5)
    seen = []
    p = runs.AnalysisParams(model=tiny_ckpt, images=str(imgs), device="cpu", num_workers=0, batch_size=2, chunk=2)
    run = runs.analyze(p, tmp_path / "o", progress=False, on_chunk=seen.append)
    assert seen == [0, 1, 2]                                             # 5 images in chunks of 2
    assert sorted(f.name for f in (run.path / "parts").glob("*.npz")) == ["00000.npz", "00001.npz", "00002.npz"]
    assert json.loads((run.path / "params.json").read_text())["identity"]["chunk"] == 2
    runs.analyze(p, tmp_path / "o", progress=False, on_chunk=seen.append)   # resumed: nothing left to do
    assert seen == [0, 1, 2]


# the run to kill: analyze with a pause after each chunk (run_suite's on_chunk), so it dies between chunks
SLOW_ANALYZE = """
import sys, time
from vitsift_core.experiments.analysis import AnalysisParams, analyze
model, images, out = sys.argv[1:4]
params = AnalysisParams(model=model, images=images, device="cpu", num_workers=0, batch_size=2, chunk=4)
analyze(params, out, progress=False, on_chunk=lambda k: time.sleep(0.4))
"""


def test_resume_after_kill(tmp_path, tiny_ckpt):
    imgs = photos(tmp_path / "imgs", 24)
    env = dict(os.environ)
    args = [sys.executable, "-m", "vitsift_core.cli", "analyze", "--quiet", "--num-workers", "0",
            "--batch-size", "2", "--device", "cpu", "--chunk", "4", "--model", tiny_ckpt, "--images", str(imgs)]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_ANALYZE, tiny_ckpt, str(imgs), str(killed)], env=env)
    deadline = time.time() + 120
    while not (killed / "parts" / "00001.npz").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = sorted(p.name for p in (killed / "parts").glob("*.npz"))
    assert 2 <= len(done_before) < 6, done_before       # really killed mid-run
    assert not (killed / "heads.parquet").exists()
    mtimes = {n: (killed / "parts" / n).stat().st_mtime_ns for n in done_before}
    assert subprocess.run(args + ["--out", str(killed)], env=env).returncode == 0
    assert subprocess.run(args + ["--out", str(tmp_path / "clean")], env=env).returncode == 0
    for n, t in mtimes.items():                          # finished chunks not recomputed
        assert (killed / "parts" / n).stat().st_mtime_ns == t
    a = pd.read_parquet(killed / "heads.parquet")
    b = pd.read_parquet(tmp_path / "clean" / "heads.parquet")
    pd.testing.assert_frame_equal(a, b)
    assert json.loads((killed / "stages.json").read_text()) == json.loads((tmp_path / "clean" / "stages.json").read_text())


def test_param_mismatch_is_an_error(tmp_path, tiny_ckpt, capsys):
    imgs = photos(tmp_path / "imgs", 3)
    out = tmp_path / "o"
    assert run_cli("--model", tiny_ckpt, "--images", str(imgs), "--out", str(out)) == 0
    assert run_cli("--model", tiny_ckpt, "--images", str(imgs), "--gamma", "2", "--out", str(out)) == 2
    assert "gamma" in capsys.readouterr().err


def test_missing_weights_is_a_clear_error(tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants as hfc
    # huggingface_hub reads these at import: patch both, so the hub is not retried for ~50 s
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hfc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hfc, "HF_HUB_CACHE", str(tmp_path / "hf"))
    imgs = photos(tmp_path / "imgs", 2)
    rc = run_cli("--model", "vit_base_patch16_224.augreg2_in21k_ft_in1k", "--images", str(imgs),
                 "--out", str(tmp_path / "o"))
    assert rc == 2
    assert "vit_base_patch16_224" in capsys.readouterr().err


def test_precision_choice_is_applied_recorded_and_never_mixed(tmp_path, tiny_ckpt):
    assert [forward_precision(d, p) for d, p in
            [("cpu", "auto"), ("cuda", "auto"), ("cpu", "bf16"), ("cuda:1", "fp32")]] == \
        ["fp32", "bf16-autocast", "bf16-autocast", "fp32"]
    with pytest.raises(ValueError, match="precision"):
        runs.AnalysisParams(precision="fp16")
    imgs = photos(tmp_path / "imgs", 4)
    out = {}
    for prec in ("fp32", "bf16"):
        assert run_cli("--model", tiny_ckpt, "--images", str(imgs), "--out", str(tmp_path / prec),
                       "--precision", prec) == 0
        out[prec] = pd.read_parquet(tmp_path / prec / "heads.parquet")
        params = json.loads((tmp_path / prec / "params.json").read_text())
        assert params["model"]["forward"] == forward_precision("cpu", prec)
        assert params["runtime"]["precision"] == prec and "precision" not in params["identity"]
    # bf16 moved the numbers a little, not much (focus is an entropy in nats, up to log 100)
    diff = (out["bf16"].focus - out["fp32"].focus).abs()
    assert 0 < diff.max() < 0.05
    # finishing the bf16 folder in fp32 is refused before anything runs
    (tmp_path / "bf16" / "run.json").unlink()
    with pytest.raises(RunMismatch, match="bf16-autocast forward pass.*fp32"):
        runs.run_suite(runs.AnalysisParams(model=tiny_ckpt, images=str(imgs), device="cpu", num_workers=0,
                                           batch_size=4, precision="fp32"),
                       {("none", False): tmp_path / "bf16"}, progress=False)


BAD_PARAMETERS = [   # issue 15 case 8: (command and flags, what the one-line message must say)
    (["analyze", "--gamma", "inf"], "gamma must be a finite number > 0, got inf"),
    (["analyze", "--gamma", "nan"], "gamma must be a finite number > 0, got nan"),
    (["analyze", "--contrast-threshold", "-1"], "contrast_threshold must be a finite number >= 0, got -1.0"),
    (["analyze", "--num-workers", "-1"], "num_workers must be an integer >= 0, got -1"),
    (["analyze", "--device", "cuda:99"], "device 'cuda:99'"),
    (["analyze", "--device", "gpu0"], "device 'gpu0': not a device (auto | cpu | cuda | cuda:N)"),
    (["analyze", "--out", "{file}/sub"], "/file/sub/parts: Not a directory"),
    (["mask-eval", "--ratios", ""], "ratios must list at least one mask ratio in [0, 100) percent"),
    (["mask-eval", "--ratios", "nan"], "ratios must be a finite number in [0, 100), got nan"),
    (["mask-eval", "--ratios", "0,100"], "ratios must be a finite number in [0, 100), got 100.0"),
    (["mask-eval", "--ratios", "ten"], "--ratios must be comma-separated percentages in [0, 100), got 'ten'"),
    (["mask-eval", "--layer", "abc"], "layer spec 'abc': need 'auto' or 1-based layers as 7, 7-9 or 5,7"),
    (["mask-eval", "--gamma", "inf"], "gamma must be a finite number > 0, got inf"),
    (["mask-eval", "--num-workers", "-1"], "num_workers must be an integer >= 0, got -1"),
    (["pretrain", "--device", "cuda:99"], "device 'cuda:99'"),
    (["pretrain", "--blr", "nan"], "blr must be a finite number > 0, got nan"),
    (["pretrain", "--contrast-threshold", "-1"], "contrast_threshold must be a finite number >= 0, got -1.0"),
]


@pytest.mark.parametrize("args,message", BAD_PARAMETERS, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_bad_parameters_refused_in_one_line(tmp_path, tiny_ckpt, capsys, args, message):
    """Non-finite / out-of-range values, a missing device, an unwritable --out: exit 2 with one line
    naming the value and what is allowed, before anything is computed; no traceback."""
    (tmp_path / "file").write_text("")
    args = [a.replace("{file}", str(tmp_path / "file")) for a in args]
    common = {"analyze": ["--model", tiny_ckpt, "--images", "samples", "--limit", "1", "--num-workers", "0"],
              "mask-eval": ["--model", tiny_ckpt, "--images", "samples", "--limit", "1"],
              "pretrain": ["--encoder", "test_vit", "--train-images", "samples", "--val-images", "samples"]}
    out = [] if "--out" in args else ["--out", str(tmp_path / "o")]
    t0 = time.perf_counter()
    assert main([args[0], "--quiet", *common[args[0]], *args[1:], *out]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"vitsift {args[0]}: error: ") and err.count("\n") == 1, err
    assert message in err and "Traceback" not in err
    assert not list((tmp_path / "o").glob("parts/*"))      # refused before any chunk was begun
    assert time.perf_counter() - t0 < 30
