"""Run folders that verify themselves (issue 15): damaged chunks recomputed, finished folders only read,
a failed start leaves nothing that refuses the corrected command, one process per folder."""
import builtins
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from vitsift_core.cli import main
from vitsift_core.experiments import analysis as runs
from vitsift_core.store import RunBusy, RunFolder


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VITSIFT_CACHE", str(tmp_path / "cache"))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def photos(d, n, seed=0):
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        img = (rng.random((48, 64, 3)) * 255).astype(np.uint8)
        img[8:30, 10:40] = rng.integers(0, 255, 3)
        Image.fromarray(img).save(d / f"img_{i:03d}.png")
    return d


def params(model, imgs, **kw):
    return runs.AnalysisParams(model=model, images=str(imgs), device="cpu", num_workers=0, batch_size=2, chunk=2,
                               **kw)


class Interrupt(Exception):
    pass


def interrupted_after_last_chunk(p, out, n):
    """A run killed once every chunk is written, before it finished."""
    def stop(k):
        if k == n - 1:
            raise Interrupt
    with pytest.raises(Interrupt):
        runs.analyze(p, out, progress=False, on_chunk=stop)


def truncate(f):
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


TAMPER = {     # name -> (tampering of parts/, the chunks then named as damaged)
    "parquet deleted": (lambda parts: (parts / "00001.parquet").unlink(), "chunks 1 ("),
    "chunk 0's parquet over chunk 1's": (lambda parts: shutil.copyfile(parts / "00000.parquet",
                                                                       parts / "00001.parquet"), "chunks 1 ("),
    "npz truncated": (lambda parts: truncate(parts / "00001.npz"), "chunks 1 ("),
    "parquet truncated": (lambda parts: truncate(parts / "00001.parquet"), "chunks 1 ("),
    "chunk 0's npz over chunk 1's": (lambda parts: shutil.copyfile(parts / "00000.npz", parts / "00001.npz"),
                                     "chunks 1 ("),
    "mean sum truncated": (lambda parts: truncate(parts.parent / "mean_attention_sum.npz"), "chunks 0 ("),
}


@pytest.mark.parametrize("control", ["none", "mean-attention"])
def test_damaged_chunks_are_recomputed_never_merged(tmp_path, tiny_ckpt, capsys, control):
    imgs = photos(tmp_path / "imgs", 6)
    p = params(tiny_ckpt, imgs, control=control)
    clean = runs.analyze(p, tmp_path / "clean", progress=False)
    interrupted_after_last_chunk(p, tmp_path / "cut", 3)
    capsys.readouterr()
    tried = []
    for name, (tamper, said) in TAMPER.items():
        mean = control == "mean-attention"
        if (mean and "parquet" in name) or (not mean and "mean" in name):
            continue                                  # mean-attention: no head rows per chunk, one summed map
        tried.append(name)
        out = tmp_path / name.replace(" ", "_").replace("'", "")
        shutil.copytree(tmp_path / "cut", out)
        tamper(out / "parts")
        run = runs.analyze(p, out, progress=False)
        pd.testing.assert_frame_equal(pd.read_parquet(run.path / "heads.parquet"),
                                      pd.read_parquet(clean.path / "heads.parquet"), obj=name)
        assert (run.path / "heads.parquet").read_bytes() == (clean.path / "heads.parquet").read_bytes(), name
        err = [l for l in capsys.readouterr().err.splitlines() if "damaged" in l]
        assert len(err) == 1 and said in err[0], (name, err)                  # said once, naming the chunks
    assert len(tried) == (3 if control == "mean-attention" else 5)


def test_finished_folder_is_read_not_rewritten_even_read_only(tmp_path, tiny_ckpt, monkeypatch):
    imgs = photos(tmp_path / "imgs", 3)
    out = tmp_path / "o"
    args = ["analyze", "--quiet", "--num-workers", "0", "--device", "cpu", "--model", tiny_ckpt,
            "--images", str(imgs), "--out", str(out)]
    assert main(args) == 0
    files = sorted(f for f in out.rglob("*") if f.is_file())
    before = {f: (f.stat().st_mtime_ns, f.read_bytes()) for f in files}
    assert json.loads((out / "run.json").read_text())["throughput"]["images"] == 3
    for f in files + [out, out / "parts"]:
        f.chmod(0o555 if f.is_dir() else 0o444)
    # root ignores modes: any write under the folder fails as on a read-only one
    real_open, real_os_open = builtins.open, os.open

    def inside(path):
        return str(out) in os.path.abspath(os.fspath(path))

    def no_write_open(f, mode="r", *a, **kw):
        if inside(f) and any(c in mode for c in "wax+"):
            raise PermissionError(f"read-only: {f}")
        return real_open(f, mode, *a, **kw)

    def no_write_os_open(f, flags, *a, **kw):
        if inside(f) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise PermissionError(f"read-only: {f}")
        return real_os_open(f, flags, *a, **kw)

    def refuse(*paths, **_):
        if any(inside(p) for p in paths if isinstance(p, (str, os.PathLike))):
            raise PermissionError(f"read-only: {paths}")
    monkeypatch.setattr(builtins, "open", no_write_open)
    monkeypatch.setattr(os, "open", no_write_os_open)
    for name in ("replace", "rename", "unlink", "mkdir"):
        real = getattr(os, name)
        monkeypatch.setattr(os, name, lambda *a, _real=real, **kw: (refuse(*a), _real(*a, **kw))[1])
    try:
        assert main(args) == 0
    finally:
        monkeypatch.undo()
        for f in [out, out / "parts"] + files:
            f.chmod(0o755 if f.is_dir() else 0o644)
    assert sorted(f for f in out.rglob("*") if f.is_file()) == files
    assert {f: (f.stat().st_mtime_ns, f.read_bytes()) for f in files} == before
    assert json.loads((out / "run.json").read_text())["throughput"]["images"] == 3


def test_failed_start_leaves_nothing_that_refuses_the_corrected_command(tmp_path, tiny_ckpt, capsys):
    imgs = photos(tmp_path / "imgs", 3)
    out = tmp_path / "o"
    base = ["analyze", "--quiet", "--num-workers", "0", "--device", "cpu", "--images", str(imgs), "--out", str(out)]
    assert main(base + ["--model", f"test_vit@{tmp_path / 'no-such.safetensors'}"]) == 2
    assert "no-such" in capsys.readouterr().err
    assert not (out / "params.json").exists()
    (out / "parts" / ".00000.npz.tmp99999-1").write_bytes(b"half")    # left by a killed writer
    assert main(base + ["--model", tiny_ckpt]) == 0
    from vitsift_core.model.registry import checkpoint_identity
    params = json.loads((out / "params.json").read_text())
    assert params["identity"]["model"] == checkpoint_identity(tiny_ckpt)      # the weights' content
    assert tiny_ckpt.split("@", 1)[1] in json.dumps(params)                   # the path, as provenance
    assert not list(out.rglob(".*.tmp*"))


SLOW = """
import sys, time
from vitsift_core.experiments.analysis import AnalysisParams, analyze
model, images, out = sys.argv[1:4]
p = AnalysisParams(model=model, images=images, device="cpu", num_workers=0, batch_size=2, chunk=2)
analyze(p, out, progress=False, on_chunk=lambda k: time.sleep(1.0))
"""


def test_second_process_on_one_folder_is_refused_naming_the_holder(tmp_path, tiny_ckpt, capsys):
    imgs = photos(tmp_path / "imgs", 6)
    out = tmp_path / "o"
    proc = subprocess.Popen([sys.executable, "-c", SLOW, tiny_ckpt, str(imgs), str(out)], env=dict(os.environ))
    try:
        deadline = time.time() + 120
        while not (out / "parts" / "00000.npz").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, "the first run ended before the second started"
        t0 = time.time()
        assert main(["analyze", "--quiet", "--num-workers", "0", "--batch-size", "2", "--chunk", "2",
                     "--device", "cpu", "--model", tiny_ckpt, "--images", str(imgs), "--out", str(out)]) == 2
        assert time.time() - t0 < 30                                        # refused at once, not after a run
        err = capsys.readouterr().err
        assert f"in use by pid {proc.pid} on " in err and "Traceback" not in err, err
        assert proc.wait(timeout=300) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    single = runs.analyze(params(tiny_ckpt, imgs), tmp_path / "single", progress=False)
    assert (out / "heads.parquet").read_bytes() == (single.path / "heads.parquet").read_bytes()
    with RunFolder(out, single.params).lock():            # released when the holder ended
        with pytest.raises(RunBusy, match=f"pid {os.getpid()}"):
            with RunFolder(out, single.params).lock():
                pass
