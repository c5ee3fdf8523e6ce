"""MAE pre-training runs: resume after SIGKILL, DDP (gloo, 2 processes) vs 1 process, schedule.

Tiny encoder (timm ``test_vit`` at 32 px, 8 px patches, 2 blocks) on a synthetic 3-class folder;
each run is a few seconds of CPU. Subprocesses (a script killing itself through run_pretrain's
``on_step`` callback; ``vitsift pretrain`` under ``torchrun``) test a real kill (SIGKILL, no clean-up)
and real DDP.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitsift_core.experiments import pretrain as P
from vitsift_core.experiments.mae_data import data_config, prepare_arrays, to_input
from vitsift_core.experiments import mae_runs as M
from vitsift_core.experiments.mae_runs import load_pretrained_mae

#: the DDP run's per-step loss may differ from the 1-process run only by float re-association
#: (gradient all-reduce sums two half-batch means instead of one mean): this much, absolute,
#: on losses of about 1.
DDP_LOSS_TOL = 1e-4


def write_synthetic_folder(d: Path, per_class: int = 12, size: int = 48) -> Path:
    """3 classes of textured images (stripes / blobs / checker), each with noise for SIFT."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for c, name in enumerate(("stripes", "blobs", "checker")):
        (d / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            ph = rng.uniform(0, 6.28)
            if c == 0:
                base = np.sin(20 * xx + ph)
            elif c == 1:
                base = np.sin(8 * np.hypot(xx - rng.uniform(.3, .7), yy - rng.uniform(.3, .7)) * 6 + ph)
            else:
                base = np.sign(np.sin(12 * xx + ph) * np.sin(12 * yy))
            img = (base[..., None] * rng.uniform(40, 90, 3) + 128 + rng.normal(0, 25, (size, size, 3)))
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(d / name / f"{i:03d}.png")
    return d


@pytest.fixture
def synth(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("VITSIFT_CACHE", str(tmp_path / "cache"))
    return write_synthetic_folder(tmp_path / "synth")


TINY = ["--encoder", "test_vit", "--img-size", "32", "--patch-size", "8", "--depth", "2",
        "--embed-dim", "32", "--num-heads", "2", "--decoder-dim", "32", "--decoder-depth", "1",
        "--decoder-heads", "2", "--train-limit", "0", "--val-limit", "0", "--num-workers", "0",
        "--threads", "1", "--warmup-epochs", "1", "--blr", "1e-3", "--quiet"]


def tiny_cfg(folder: Path, **kw) -> P.PretrainConfig:
    base = dict(encoder="test_vit", img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2,
                decoder_dim=32, decoder_depth=1, decoder_heads=2, train_images=str(folder),
                train_limit=None, val_images=str(folder), val_limit=None, num_workers=0, threads=1,
                warmup_epochs=1, blr=1e-3, batch_size=8, epochs=3)
    base.update(kw)
    return P.PretrainConfig(**base)


def cli_args(cfg: P.PretrainConfig, out: Path) -> list[str]:
    return TINY + ["--train-images", cfg.train_images, "--val-images", cfg.val_images,
                   "--batch-size", str(cfg.batch_size), "--epochs", str(cfg.epochs), "--mask", cfg.mask,
                   "--beta-every", str(cfg.beta_every), "--seed", str(cfg.seed), "--out", str(out)]


def run_cli(args, env_extra=None, launcher=None, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **(env_extra or {}))
    cmd = (launcher or [sys.executable]) + ["-m", "vitsift_core.cli", "pretrain"] + args
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


#: trains ``cfg`` (JSON, argv[1]) in folder argv[2] and SIGKILLs itself before global step argv[3]
#: (-1: never), through run_pretrain's ``on_step`` callback
KILL_SCRIPT = """
import json, os, signal, sys
from vitsift_core.experiments import pretrain as P
from vitsift_core.experiments.mae_data import data_config, prepare_arrays, to_input
from vitsift_core.experiments import mae_runs as M
from vitsift_core.experiments.mae_runs import load_pretrained_mae
kill_at = int(sys.argv[3])
def on_step(it):
    if it == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
P.run_pretrain(P.PretrainConfig(**json.loads(sys.argv[1])), sys.argv[2], progress=False, on_step=on_step)
"""


def run_killed(cfg: P.PretrainConfig, out: Path, kill_at: int, timeout=240):
    import dataclasses
    import json
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-c", KILL_SCRIPT, json.dumps(dataclasses.asdict(cfg)), str(out), str(kill_at)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def test_runtime_restores_threads_and_tf32_flags():
    import torch
    flags = lambda: (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    before, threads = flags(), torch.get_num_threads()
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        with pytest.raises(KeyError):
            with P.train_runtime(P.PretrainConfig(threads=threads + 1), torch.device("cuda")):
                assert flags() == (True, True) and torch.get_num_threads() == threads + 1
                raise KeyError("leaves the block early")
        assert flags() == (False, False) and torch.get_num_threads() == threads
        with P.train_runtime(P.PretrainConfig(), torch.device("cuda"), tf32=False):
            assert flags() == (False, False)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
        torch.set_num_threads(threads)


def test_lr_schedule_warmup_then_cosine():
    cfg = P.PretrainConfig(blr=2.56e-4, batch_size=256, min_lr=1e-6)
    lrs = [P.lr_at(cfg, it, 100, 10) for it in range(100)]
    assert lrs[0] == 0 and abs(lrs[10] - 2.56e-4) < 1e-12 and lrs[5] == pytest.approx(1.28e-4)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(1e-6, abs=2e-7)


def test_identity_ignores_curriculum_for_random_masks_and_runtime_keys():
    a = P.PretrainConfig(mask="random", beta_every=3, threads=1)
    b = P.PretrainConfig(mask="random", beta_every=7, threads=2, device="cpu")
    assert a.key() == b.key()
    assert P.PretrainConfig(mask="guided").key() != P.PretrainConfig(mask="guided", beta_every=3).key()
    assert a.recipe_key() == P.PretrainConfig(mask="guided", seed=4).recipe_key()


def test_guided_run_files_and_curriculum(synth, tmp_path):
    cfg = tiny_cfg(synth, mask="guided", beta_every=1, betas=(0.1, 0.5), epochs=2)
    out = P.run_pretrain(cfg, tmp_path / "g", progress=False)
    m = M.load_metrics(out)
    assert list(m.columns) == P.METRIC_COLS and list(m.epoch) == [0, 1, 2]   # 0: the untrained encoder
    assert np.isnan(m.beta.iloc[0]) and list(m.beta[1:]) == [0.1, 0.5]
    assert m.key_share.iloc[1] < m.key_share.iloc[2]    # more keypoint patches masked later
    assert m.knn_acc.between(0, 1).all() and np.isnan(m.probe_acc.iloc[1]) and 0 <= m.probe_acc.iloc[2] <= 1
    assert 0 <= m.probe_acc.iloc[0] <= 1 and np.isnan(m.train_loss.iloc[0])      # epoch 0: probed, untrained
    steps = M.load_steps(out)
    assert len(steps) == 2 * (36 // 8)
    assert P.is_complete(out)
    mae = load_pretrained_mae(out)
    assert mae.grid == (4, 4)
    # same config, same folder: nothing to do; another config in it: refused
    assert P.run_pretrain(cfg, out, progress=False) == out
    with pytest.raises(RuntimeError, match="other parameters"):
        P.run_pretrain(cfg.replace(seed=5), out, progress=False)


def test_resume_after_kill_gives_identical_metrics(synth, tmp_path):
    cfg = tiny_cfg(synth, mask="guided", beta_every=1, epochs=3)
    steps_per_epoch = 36 // cfg.batch_size                   # 4
    ref = P.run_pretrain(cfg, tmp_path / "ref", progress=False)

    out = tmp_path / "killed"
    kill_at = steps_per_epoch + 2                             # in the middle of epoch 2
    r = run_killed(cfg, out, kill_at)
    assert r.returncode == -9, r.stderr[-2000:]              # SIGKILL: no clean-up ran
    assert not P.is_complete(out)
    assert list(M.load_metrics(out).epoch) == [0, 1]          # epoch 1 was checkpointed (after epoch 0)
    r = run_killed(cfg, out, -1)                              # resume in a fresh process, no kill
    assert r.returncode == 0, r.stderr[-2000:]
    import json
    assert json.loads((out / "run.json").read_text())["resumed_from_epoch"] == 1
    for f in ("metrics.csv", "steps.csv"):
        assert (out / f).read_bytes() == (ref / f).read_bytes(), f


@pytest.mark.slow   # ~25 s: three interpreter start-ups under torchrun; `make test-slow`
def test_ddp_two_processes_match_one(synth, tmp_path):
    """gloo, 2 CPU processes x 4 images vs 1 process x 8 images: same global batch.

    Measured: max |loss difference| 1.2e-7 over 8 steps (tolerance DDP_LOSS_TOL = 1e-4)."""
    cfg = tiny_cfg(synth, mask="guided", beta_every=1, epochs=2, batch_size=8)
    one = P.run_pretrain(cfg, tmp_path / "one", progress=False)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(29500 + os.getpid() % 1000), "--max_restarts", "0"]
    r = run_cli(cli_args(cfg, tmp_path / "two"), launcher=launcher)
    assert r.returncode == 0, r.stderr[-3000:]
    import json
    assert json.loads((tmp_path / "two" / "run.json").read_text())["world"] == 2
    a, b = M.load_steps(one), M.load_steps(tmp_path / "two")
    assert len(a) == len(b) == 2 * 4
    diff = np.abs(a.loss.to_numpy() - b.loss.to_numpy())
    print(f"DDP vs 1 process: max |loss difference| over {len(a)} steps = {diff.max():.2e}")
    assert diff.max() < DDP_LOSS_TOL, diff
    ma, mb = M.load_metrics(one), M.load_metrics(tmp_path / "two")
    np.testing.assert_allclose(ma.key_share, mb.key_share)     # the very same masks
    np.testing.assert_allclose(ma.train_loss, mb.train_loss, atol=DDP_LOSS_TOL)


def _keypoint_patches(cfg: P.PretrainConfig) -> tuple[np.ndarray, int]:
    """Keypoint patches per train image (n,) and patches per image N, from the run's own arrays."""
    from vitsift_core.experiments.mae_data import load_train_data
    counts = load_train_data(cfg, cfg.patch_size, False).train.counts
    return (np.asarray(counts) > 0).sum(1), counts.shape[1]


def test_guided_mask_realises_the_quota_on_a_hand_case():
    """N = 16, r = 0.75: M = 12. The numbers are worked by hand from the fill-in rule
    k = min(max(round(beta M), M - n_non), n_key)."""
    from vitsift_core.method import guided as G
    five = np.zeros(16, int)
    five[[0, 3, 5, 6, 9]] = [1, 2, 1, 4, 1]                   # 5 keypoint patches, 11 others
    ten = np.zeros(16, int)
    ten[:10] = 1                                               # 10 keypoint patches, 6 others
    cases = [(five, 0.1, 1), (five, 0.25, 3), (five, 0.5, 5),  # 0.5: 6 wanted, only 5 exist
             (ten, 0.1, 6), (ten, 0.5, 6), (ten, 0.9, 10)]     # 0.1: 1 wanted, 12 - 6 = 6 forced
    for counts, beta, k in cases:
        n_key = int((counts > 0).sum())
        assert G.guided_quota(n_key, 16, 0.75, beta) == (12, k, 12 - k), (n_key, beta)
        for seed in range(5):
            for order in ("random", "score"):
                m = G.guided_mask(counts, 0.75, beta, np.random.default_rng(seed), order,
                                  np.random.default_rng(99).random(16) if order == "score" else None)
                assert m.sum() == 12 and (m & (counts > 0)).sum() == k, (n_key, beta, seed, order)


def test_key_share_is_the_realised_share_of_masked_keypoint_patches(synth, tmp_path):
    """The metrics' key_share over an epoch in which every image is masked once (36 images, batch
    12): guided (score order) equals sum_i k_i / (36 M) with the fill-in quota k_i of each image;
    random equals the images' mean keypoint-patch share in expectation (hypergeometric, 4 sd)."""
    beta = 0.1
    cfg = tiny_cfg(synth, mask="guided", order="score", score_layer=1, epochs=1, probe=False,
                   batch_size=12, betas=(beta,))
    n_key, n = _keypoint_patches(cfg)
    assert len(n_key) == 36 and n == 16
    assert 0.1 < n_key.mean() / n < 0.9, n_key          # the case is not trivial: both kinds exist
    big_m = 12                                           # round(0.75 * 16)
    k = np.minimum(np.maximum(round(beta * big_m), big_m - (n - n_key)), n_key)
    guided = M.load_metrics(P.run_pretrain(cfg, tmp_path / "s", progress=False)).key_share.iloc[1]
    assert guided == pytest.approx(k.sum() / (36 * big_m), abs=1e-8)   # metrics.csv: 9 digits

    rcfg = tiny_cfg(synth, mask="random", epochs=1, probe=False, batch_size=12)
    rand = M.load_metrics(P.run_pretrain(rcfg, tmp_path / "r", progress=False)).key_share.iloc[1]
    p = n_key / n
    sd = np.sqrt((big_m * p * (1 - p) * (n - big_m) / (n - 1)).sum()) / (36 * big_m)
    assert abs(rand - p.mean()) < 4 * sd, (rand, p.mean(), sd)
    assert abs(k.sum() / (36 * big_m) - p.mean()) > 6 * sd   # the two expectations are told apart


def test_config_from_params_maps_zero_to_none():
    cfg = M.config_from_params({"encoder": "test_vit", "depth": 0, "train_limit": 0, "epochs": 3, "batch_size": 16,
                                "unrelated": 1}, mask="guided")
    assert cfg.depth is None and cfg.train_limit is None and cfg.epochs == 3 and cfg.mask == "guided"
    assert cfg.batch_size == 16


def test_vitsift_pretrain_cli(synth, tmp_path, capsys):
    from vitsift_core.cli import main
    args = cli_args(tiny_cfg(synth, epochs=1), tmp_path / "cli")
    assert main(["pretrain"] + args) == 0
    assert "1 epochs" in capsys.readouterr().out
    assert P.is_complete(tmp_path / "cli")


def _slow_knn_accuracy(f_mem, y_mem, f_q, y_q, n_cls, k, t):
    """Obvious k-NN: cosine similarity, the k most similar (lower index first on ties),
    votes exp(sim / t) per class, the first class of most votes."""
    f_mem, f_q = np.asarray(f_mem, np.float64), np.asarray(f_q, np.float64)
    f_mem = f_mem / np.linalg.norm(f_mem, axis=1, keepdims=True)
    right = 0
    for q, y in zip(f_q, y_q):
        q = q / np.linalg.norm(q)
        sims = [float(q @ f) for f in f_mem]
        top = sorted(range(len(sims)), key=lambda j: (-sims[j], j))[:k]
        votes = [0.0] * n_cls
        for j in top:
            votes[int(y_mem[j])] += np.exp(sims[j] / t)
        right += int(max(range(n_cls), key=lambda c: (votes[c], -c)) == int(y))
    return right / len(y_q)


def test_initial_accuracy_is_the_untrained_start(synth, tmp_path, monkeypatch):
    from vitsift_core.experiments.mae_data import load_train_data
    cfg = tiny_cfg(synth, epochs=1, probe=False)
    a = P.initial_accuracy(cfg)
    assert a == P.initial_accuracy(cfg)
    # the k-NN number is the untrained (seeded) encoder's, by an obvious slow k-NN
    data = load_train_data(cfg, cfg.patch_size, False)
    import torch
    model = P.build_model(cfg)
    f_mem = P.encode(model, data.train.images, torch.device("cpu"))
    f_val = P.encode(model, data.val.images, torch.device("cpu"))
    ref = _slow_knn_accuracy(f_mem, data.y_train, f_val, data.y_val, 3, cfg.knn_k, cfg.knn_t)
    assert a["knn_acc"] == pytest.approx(ref, abs=1e-12)

    # hand cases through the same path: features = one-hot of a class per image
    label = {np.asarray(im).tobytes(): int(y) for im, y in zip(data.train.images, data.y_train)}
    calls = []

    def fake_encode(shift):
        def encode(model, images, device, batch_size=256, amp=False):
            calls.append(len(images))
            s = shift if len(calls) % 2 == 0 else 0              # memory first, then the queries
            y = np.array([label[np.asarray(im).tobytes()] for im in images])
            return torch.nn.functional.one_hot(torch.as_tensor((y + s) % 3), 3).float() + 0.01 * torch.randn(len(y), 3)
        return encode

    monkeypatch.setattr(P, "encode", fake_encode(0))             # separable: every query right
    assert P.initial_accuracy(cfg) == {"knn_acc": 1.0, "probe_acc": 1.0}
    monkeypatch.setattr(P, "encode", fake_encode(1))             # queries look like the next class
    assert P.initial_accuracy(cfg) == {"knn_acc": 0.0, "probe_acc": 0.0}
    assert calls == [36, 36] * 2


def test_epoch0_is_evaluated_before_any_training_step_on_the_initial_weights(synth, tmp_path, monkeypatch):
    """run_pretrain's first evaluation sees the encoder before any optimiser step (the seeded initial
    weights, no on_step call yet); metrics.csv's epoch 0 is that evaluation, = initial_accuracy."""
    import torch
    cfg = tiny_cfg(synth, epochs=2, probe=True)
    init = P.build_model(cfg).state_dict()
    steps_seen, evals = [], []
    real = P.evaluate

    def spy(model, data, cfg_, device, probe):
        sd = model.state_dict()
        evals.append((len(steps_seen), all(torch.equal(sd[k], init[k]) for k in init)))
        return real(model, data, cfg_, device, probe)

    monkeypatch.setattr(P, "evaluate", spy)
    out = P.run_pretrain(cfg, tmp_path / "r", progress=False, on_step=steps_seen.append)
    assert evals[0] == (0, True)                              # before step 0, initial weights
    assert [e[1] for e in evals] == [True, False, False]      # later evaluations: trained weights
    assert [e[0] for e in evals] == [0, 4, 8]                 # 4 steps per epoch (36 images, batch 8)
    m = M.load_metrics(out)
    assert m.epoch.iloc[0] == 0
    assert {"knn_acc": m.knn_acc.iloc[0], "probe_acc": m.probe_acc.iloc[0]} == pytest.approx(P.initial_accuracy(cfg))


def test_theta_scores_split_over_cores_match_a_whole_batch_reference():
    """Guided MAE's per-patch scores: the encoder's layer maps, each image's own keypoints,
    whether the batch runs as one call or split over cores (and over several batches)."""
    import torch

    from vitsift_core.model.capture import attention_maps
    from vitsift_core.method.metrics import patch_scores

    cfg = tiny_cfg(Path("."), depth=3)
    model = P.build_model(cfg).eval()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 32, 32, 3), dtype=np.uint8)
    counts = rng.integers(0, 3, (7, model.num_patches)).astype(np.int32)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)                        # 3 "cores": slices of 2-3 images
        got = P.theta_scores(model, images, counts, 1, "cpu", batch_size=5)
    finally:
        torch.set_num_threads(before)
    x = to_input(images)
    ref = patch_scores(attention_maps(model.encoder, model.num_prefix_tokens, x, [1])[1],
                       torch.from_numpy(counts)).numpy()
    assert got.shape == (7, model.num_patches)
    np.testing.assert_allclose(got, ref, atol=1e-6, equal_nan=True)


def test_arrays_are_the_study_loaders_crops_and_counts(synth, tmp_path):
    """Pre-training data goes through the study's decode + crop + SIFT path: the cached arrays are
    model_input's crops and keypoint_counts' counts, image by image, in record order."""
    from vitsift_core.data.images import model_input
    from vitsift_core.data.keypoints import SiftParams, keypoint_counts
    from vitsift_core.data.sources import read_record, resolve_images

    (synth / "stripes" / "broken.png").write_bytes(b"not a png")
    a = prepare_arrays(str(synth), None, 32, 8, num_workers=0, progress=False, root=tmp_path / "arr")
    recs = [r for r in resolve_images(str(synth), None) if not r.id.endswith("broken.png")]
    assert a.ids == [r.id for r in recs] and len(a.skipped) == 1 and a.skipped[0][0].endswith("broken.png")
    for j, r in enumerate(recs):
        crop, _ = model_input(read_record(r), data_config(32))
        np.testing.assert_array_equal(a.images[j], crop)
        np.testing.assert_array_equal(a.counts[j], keypoint_counts(crop, (4, 4), 8, SiftParams())[0])
    again = prepare_arrays(str(synth), None, 32, 8, num_workers=0, progress=False, root=tmp_path / "arr")
    assert again.path == a.path and again.ids == a.ids      # the second call reads the cache


def test_malicious_checkpoint_in_a_run_folder_is_refused_not_run(synth, tmp_path, capsys):
    """Issue 15, case 1: a handed-over folder's checkpoint.pt never runs code, through
    ``vitsift pretrain --out DIR`` (resume) nor :func:`load_pretrained_mae` (notebook 01)."""
    from conftest import write_malicious_checkpoint
    from vitsift_core.cli import main
    cfg = tiny_cfg(synth, epochs=1)
    out, marker = tmp_path / "handed-over", tmp_path / "ran"
    out.mkdir()
    write_malicious_checkpoint(out / "checkpoint.pt", marker, key=cfg.key(), epoch=0)
    assert main(["pretrain"] + cli_args(cfg, out)) == 2
    err = capsys.readouterr().err
    assert not marker.exists()
    assert "checkpoint.pt holds objects other than tensors" in err and "posix.system" in err, err
    assert len(err.strip().splitlines()) == 1, err                    # one line, no traceback
    with pytest.raises(ValueError, match="checkpoint.pt holds objects other than tensors"):
        load_pretrained_mae(out)
    assert not marker.exists()


def test_without_a_train_limit_the_knn_memory_still_spans_the_classes(synth):
    # the memory (and the probe's train set) is the first knn_memory train images; the folder sorted
    # by id would give 3 blobs here (and 2-3 of Imagenette's 10 classes for 2,000 of 9,469)
    from vitsift_core.experiments.mae_data import load_train_data
    data = load_train_data(tiny_cfg(synth, train_limit=None, knn_memory=6), 8, False)
    assert len(data.train) == 36 and data.mem == 6
    assert sorted(data.y_train[:6].tolist()) == [0, 0, 1, 1, 2, 2]
    assert sorted(data.y_train.tolist()) == [c for c in range(3) for _ in range(12)]   # still every image
