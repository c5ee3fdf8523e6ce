"""The end-to-end row of the analysis benchmark (benchmarks/end_to_end.py): it runs `vitsift analyze`
as a process on a fresh cache and output folder, and its ratio is what it says."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"


@pytest.fixture()
def E2E():
    sys.path.insert(0, str(BENCH))
    try:
        import end_to_end
    finally:
        sys.path.remove(str(BENCH))
    return end_to_end


def test_fresh_cache_keeps_the_weights_only(E2E, tmp_path, monkeypatch):
    old = tmp_path / "old"
    (old / "embedded").mkdir(parents=True)
    (old / "keypoints").mkdir()
    (old / "native").mkdir()
    (old / "embedded" / "w.safetensors").write_text("w")
    monkeypatch.setenv("VITSIFT_CACHE", str(old))
    env = E2E.fresh_cache(tmp_path / "work")
    new = Path(env["VITSIFT_CACHE"])
    # no keypoints; the converted weights and the compiled row kernel are built once per machine
    assert new != old and sorted(p.name for p in new.iterdir()) == ["embedded", "native"]
    assert (new / "embedded" / "w.safetensors").read_text() == "w"
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(ROOT)     # the child runs this checkout


def test_end_to_end_row_tiny(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VITSIFT_CACHE": str(tmp_path / "cache"),
           "VITSIFT_REPORTS": str(tmp_path / "reports")}
    out = tmp_path / "e2e.json"
    p = subprocess.run([sys.executable, str(BENCH / "bench_analysis.py"), "--tiny", "--only-e2e", "--e2e-limit", "5",
                        "--out", str(out)], env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-8000:]
    assert "(e) vitsift analyze, whole process" in p.stdout and "e/f end to end:" in p.stdout
    r = json.loads(out.read_text())
    assert r["n_analyzed"] == r["n_plain"] == 5 and r["limit"] == 5
    # the ratio is images/s of the process over images/s of the plain forward, both timed here
    want = (r["n_analyzed"] / r["analyze_wall_s"]) / (r["n_plain"] / r["plain_wall_s"])
    assert r["end_to_end_over_plain"] == pytest.approx(want, rel=1e-9)
    # (f) timed before and after (e): its wall is their mean, both printed
    f_runs = (r["plain_wall_s_before"], r["plain_wall_s_after"])
    assert min(f_runs) > 0 and r["plain_wall_s"] == pytest.approx(sum(f_runs) / 2, rel=1e-12)
    assert f"(f) wall before / after (e): {f_runs[0]:.1f} / {f_runs[1]:.1f} s" in p.stdout
    # on CPU also against (p), the plain forward split over the cores as the analysis runs it
    split = (r["n_analyzed"] / r["analyze_wall_s"]) / (r["n_plain"] / r["plain_split_wall_s"])
    assert r["end_to_end_over_plain_split"] == pytest.approx(split, rel=1e-9) and "e/(f split)" in p.stdout
    # a whole process: at least the interpreter with torch (RSS) and its imports (wall, CPU)
    assert r["analyze_peak_rss_bytes"] > 100 * 2 ** 20 and r["analyze_wall_s"] > r["plain_wall_s"]
    assert r["analyze_cpu_s"] > 0.5 and "analyze --model test_vit" in r["command"]
    assert "--control random-init" in r["command"]
    # nothing of the run is left behind: output folder and keypoint cache were temporary
    assert not (tmp_path / "cache" / "keypoints").exists()


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="VmHWM needs Linux /proc")
def test_peak_rss_is_the_childs_own_not_its_large_parents(E2E, tmp_path):
    """wait4's ru_maxrss of a child includes the parent's size at fork (Linux keeps it across exec);
    the row reads the child's own VmHWM instead. Here the parent holds ~400 MB, the child ~10-60 MB."""
    import numpy as np
    big = np.ones(50_000_000)                          # 400 MB, touched: resident in this process
    logs = tmp_path / "logs"
    logs.mkdir()
    r = E2E.run_analyze([sys.executable, "-m", "json.tool", "--help"], dict(os.environ), logs)
    p = subprocess.Popen([sys.executable, "-m", "json.tool", "--help"], stdout=subprocess.DEVNULL)
    _, _, ru = os.wait4(p.pid, 0)
    assert big[-1] == 1.0
    assert ru.ru_maxrss * 1024 > 350 * 2 ** 20                # the inherited figure
    assert 0 < r["peak_rss_bytes"] < 150 * 2 ** 20             # the child's own
