"""The benchmarks run (tiny model, a few images) and print their tables; they are timed by `make bench`.

These check that each script works end to end, not how fast anything is.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import sharp_test_vit

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"


def run(script, *args, tmp_path, timeout=600):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VITSIFT_CACHE": str(tmp_path / "cache"),
           "VITSIFT_REPORTS": str(tmp_path / "reports")}
    p = subprocess.run([sys.executable, str(BENCH / script), *args], env=env, capture_output=True,
                       text=True, timeout=timeout, cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-8000:]
    return p.stdout


def test_bench_analysis_tiny(tmp_path):
    out = tmp_path / "analysis.json"
    out.write_text(json.dumps({"analysis_over_plain": 0.5, "timestamp": "earlier"}))   # "the last run"
    text = run("bench_analysis.py", "--tiny", "--out", str(out), tmp_path=tmp_path)
    assert "| variant" in text and "(a) plain forward" in text and "(c) AttentionExtract + NumPy" in text
    assert "b/a throughput" in text and "b/c throughput" in text and "b/a peak memory" in text
    rep = json.loads(out.read_text())
    assert rep["analysis_over_plain"] > 0 and rep["analysis_over_attention_extract"] > 0
    assert set(rep["images_per_s"]) == {"a", "p", "b", "c"} and rep["model"] == "test_vit"   # CPU: (p) too
    assert "(p) (a) split over cores" in text and "b/p throughput" in text
    assert rep["analysis_over_plain_on_cores"] > 0 and rep["plain_on_cores_over_plain"] > 0
    if sys.platform.startswith("linux"):
        assert rep["memory"]["b"]["peak_bytes"] > 0 and rep["memory_analysis_over_plain"] > 0
        # --tiny runs the four memory processes at once: each figure is still its own variant's
        assert {v: m["variant"] for v, m in rep["memory"].items()} == {v: v for v in "apbc"}
    # (b) and (c) compute the same metrics; focus has no ties, so it agrees to float32 rounding
    assert rep["max_abs_diff_b_vs_c"]["focus"] < 1e-4
    assert "vs last run (earlier): analysis_over_plain 0.5 ->" in text     # compared with the last run
    assert rep["forward"] == "fp32" and rep["precision_effect_vs_fp32"] is None
    # each variant's page faults and system time are printed beside its speed (the allocator's share)
    assert "page faults/image" in text and "allocator: default" in text and rep["malloc"] == "default"
    assert set(rep["page_faults_per_image"]) == set(rep["system_seconds_per_image"]) == {"a", "p", "b", "c"}
    # --tiny times (b) step by step too (--breakdown): every step, CPU ms per image and per layer
    assert "| step" in text and "theta" in text and "focus" in text and "capture (hooks, slices)" in text
    bd = rep["breakdown"]
    assert bd["n_layers"] > 0 and bd["cpu_ms_per_image"]["(b) analyze path, total"] > 0
    ms = bd["cpu_ms_per_image"]
    # theta and focus are timed whichever path computed them: eager (each > 0) or the compiled kernel
    assert (ms["theta"] > 0 and ms["focus"] > 0) or ms["theta + focus, compiled kernel"] > 0


def test_bench_analysis_tiny_bf16_reports_what_bf16_changes(tmp_path):
    text = run("bench_analysis.py", "--tiny", "--precision", "bf16", "--no-memory", "--malloc", "steady",
               tmp_path=tmp_path)
    out = tmp_path / "reports" / "bench"                 # VITSIFT_REPORTS: one file per precision and allocator
    assert sorted(f.name for f in out.iterdir()) == ["analysis-bf16-steady-malloc.json"]
    rep = json.loads((out / "analysis-bf16-steady-malloc.json").read_text())
    assert rep["malloc"] == "steady" and "allocator: steady" in text
    assert rep["forward"] == "bf16-autocast" and "bf16-autocast vs fp32 forward" in text
    eff = rep["precision_effect_vs_fp32"]
    assert set(eff) == {"theta_kk", "theta_nk", "focus"}
    assert 0 < eff["focus"]["mean_abs"] <= eff["focus"]["max_abs"] < 1


def test_bench_keypoints_tiny(tmp_path):
    out = tmp_path / "keypoints.json"
    text = run("bench_keypoints.py", "--tiny", "--out", str(out), tmp_path=tmp_path)
    assert "| path" in text and "SIFT only" in text and "cache" in text
    rep = json.loads(out.read_text())
    for k in ("sift_parallel_over_single", "sift_cached_over_cold", "analysis_fed_over_model_only_cold",
              "analysis_fed_over_model_only_warm"):
        assert rep[k] > 0, k


def test_gpu_check_script_cpu_tiny(tmp_path):
    assert subprocess.run(["bash", "-n", str(BENCH / "gpu_check.sh")]).returncode == 0
    out = tmp_path / "gpu.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VITSIFT_CACHE": str(tmp_path / "cache"), "PY": sys.executable}
    p = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), "--cpu-tiny", "--out", str(out)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-8000:]
    assert "| model (random init)" in p.stdout and "test_vit" in p.stdout and "MAE pre-training" in p.stdout
    rep = json.loads(out.read_text())
    assert rep["models"][0]["b_over_a"] > 0
    assert rep["models"][0]["metric_input_dtype"] == "float32"
    # the bf16-vs-fp32 comparison runs on CPU too: a real, small difference
    d = rep["models"][0]["bf16_vs_fp32_mean_abs_diff"]
    assert 0 < d["focus"] < 0.05 and 0 <= d["theta_kk"] < 0.05


def test_numpy_baseline_matches_core_metrics():
    """The benchmark's NumPy baseline (c) computes what metrics.head_metrics computes."""
    sys.path.insert(0, str(BENCH))
    try:
        from bench_analysis import numpy_head_metrics
    finally:
        sys.path.remove(str(BENCH))
    from vitsift_core.method import metrics as M

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 2, 16, 16, generator=g, dtype=torch.float64) * 3
    a = logits.softmax(-1)
    counts = torch.poisson(torch.full((3, 16), 0.7, dtype=torch.float64), generator=g).long()
    counts[0] = 0
    ref = M.head_metrics(a, counts)
    got = numpy_head_metrics(a.numpy(), counts.numpy())
    for k, v in ref.items():
        np.testing.assert_allclose(got[k], v.numpy(), atol=1e-5, equal_nan=True, err_msg=k)


@pytest.mark.parametrize("workers", [1, 2])
def test_sliced_capture_equals_whole_batch(workers):
    """The analysis path's attention slices (threads included) give the whole-batch metrics."""
    from vitsift_core.model.capture import capture_attention
    from vitsift_core.model.collectors import MetricCollector

    m = sharp_test_vit(seed=0)
    x = torch.randn(7, 3, 160, 160)
    n = m.patch_embed.num_patches
    counts = torch.randint(0, 3, (7, n))
    variants = {"real": (counts, False), "xself": (counts, True)}
    outs, feats = [], []
    for mb in (None, 3):
        col = MetricCollector(len(m.blocks), accumulate_mean=True)
        col.start_batch(variants)
        with torch.inference_mode(), capture_attention(m, m.num_prefix_tokens, col, micro_batch=mb,
                                                       micro_workers=workers):
            feats.append(m.forward_features(x))
        outs.append((col.finish_batch(), col.attn_sum.clone(), col.n_summed))
    torch.testing.assert_close(feats[0], feats[1], atol=1e-5, rtol=1e-5)
    (whole, s0, n0), (sliced, s1, n1) = outs
    assert n0 == n1 == 7
    torch.testing.assert_close(s0, s1, atol=1e-6, rtol=0)
    for v in variants:
        for k in whole[v]:
            torch.testing.assert_close(sliced[v][k], whole[v][k], atol=1e-5, rtol=0, equal_nan=True)
    # capture restored the module: its own forward, fused attention as before
    assert all("forward" not in blk.attn.__dict__ for blk in m.blocks)


def test_bench_skips_bf16_rows_only_on_an_emulating_cpu(monkeypatch, capsys):
    import argparse
    import vitsift_core.model.infer as I
    sys.path.insert(0, str(BENCH))
    try:
        import bench_analysis as B
    finally:
        sys.path.remove(str(BENCH))
    args = argparse.Namespace(only_native_bf16=True, precision="bf16")
    for native, skip in ((False, True), (True, False), (None, False)):
        monkeypatch.setattr(I, "native_cpu_bf16", lambda native=native: native)
        assert B.skip_emulated_bf16(args, torch.device("cpu")) is skip
    assert "bf16 rows skipped" in capsys.readouterr().out
    monkeypatch.setattr(I, "native_cpu_bf16", lambda: False)
    assert not B.skip_emulated_bf16(argparse.Namespace(only_native_bf16=False, precision="bf16"), torch.device("cpu"))
    assert not B.skip_emulated_bf16(argparse.Namespace(only_native_bf16=True, precision="fp32"), torch.device("cpu"))
    assert not B.skip_emulated_bf16(args, torch.device("cuda"))


STEADY_PROBE = """
import ctypes, sys
sys.path.insert(0, sys.argv[1])
import _common as C
if sys.argv[2] == "steady":
    assert C.steady_malloc()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 48 << 20                                 # above glibc's largest mmap threshold (32 MiB)
counts = []
for _ in range(4):
    f0, _s = C.faults_and_system_time()
    p = libc.malloc(size)
    ctypes.memset(p, 1, size)                   # touch every page
    libc.free(p)
    counts.append(C.faults_and_system_time()[0] - f0)
import os
print(counts[-1], os.environ.get("MALLOC_MMAP_MAX_"))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt (Linux)")
def test_steady_malloc_keeps_freed_memory_so_a_reallocation_faults_no_pages():
    """--malloc steady: the same 48 MiB block, freed and allocated again, faults its pages in only the
    first time; with glibc's default every allocation faults them in again (the block is mmap'd)."""
    def last_faults(mode):
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}   # glibc's default
        p = subprocess.run([sys.executable, "-c", STEADY_PROBE, str(BENCH), mode], capture_output=True,
                           text=True, timeout=60, env=env)
        assert p.returncode == 0, p.stderr[-4000:]
        n, env = p.stdout.split()
        return int(n), env

    default, env_default = last_faults("default")
    steady, env_steady = last_faults("steady")
    assert default > 1000, default                   # 12,288 pages, fewer with transparent huge pages
    assert steady < default / 20, (steady, default)
    assert env_default == "None" and env_steady == "0"   # the processes it starts inherit it
