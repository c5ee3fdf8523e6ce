"""The end-to-end row of ``bench_analysis.py --e2e-limit N``: ``vitsift analyze`` as a user runs it
against a plain forward over the same decoded images, in one run.

  (e) end to end  ``python -m vitsift_core.cli analyze --model M --images SPEC --limit N`` as a
                  whole process: interpreter start, imports, model load, decoding, SIFT, forward
                  with capture, metrics, every file it writes. Fresh output folder and fresh keypoint
                  cache (VITSIFT_CACHE is a new folder; only the model's converted weights are linked
                  in, a one-time conversion that no repeat run pays). Images/s = the images it
                  analysed / wall time; also its CPU time (``os.wait4``) and peak RSS (the
                  process alone, its own VmHWM through ``peak_rss.py``; its decoding workers are
                  not in the RSS).
  (f) plain       the same N records decoded to model input beforehand (not timed), then the plain
                  forward of (a) (fused attention, torch's threading) over them in batches, timed
                  once before (e) and once after; (f) is the mean of the two, and both are kept, so
                  a run shows how far the machine drifted while (e) ran.

e/f is the issue's end-to-end target (>= 0.80): what a user waits for against the model alone.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as C

TARGET = (">=", 0.80)


def analyze_command(args, limit: int, out: Path) -> list[str]:
    """The ``vitsift analyze`` command line of (e): the benchmark's model, images, batch, device, precision."""
    return [sys.executable, "-m", "vitsift_core.cli", "analyze", "--model", args.model, "--images", args.images_spec,
            "--limit", str(limit), "--out", str(out), "--quiet", "--batch-size", str(args.batch),
            "--device", args.device, "--precision", args.precision] + (
                ["--control", "random-init"] if args.random_init else [])


def fresh_cache(root: Path) -> dict:
    """Environment for a child with an empty keypoint cache that still finds the converted weights."""
    from vitsift_core.paths import cache_dir

    cache = root / "cache"
    cache.mkdir(parents=True)
    for once in ("embedded", "native"):       # converted weights, the compiled row kernel: built once per machine
        if (cache_dir() / once).is_dir():
            (cache / once).symlink_to(cache_dir() / once, target_is_directory=True)
    return {**os.environ, "VITSIFT_CACHE": str(cache), "PYTHONPATH": os.pathsep.join(
        [str(C.ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}


def run_analyze(cmd: list[str], env: dict, logs: Path) -> dict:
    """Run ``cmd`` (``python -m ...``); its wall seconds, CPU seconds (it and the workers it waited for),
    peak RSS bytes (its own VmHWM where Linux gives it, else ``ru_maxrss``, which counts the parent's size)."""
    peak_file = logs / "peak_rss"
    peak_file.unlink(missing_ok=True)
    cmd = [cmd[0], str(Path(__file__).with_name("peak_rss.py")), str(peak_file), *cmd[1:]]
    with open(logs / "stdout", "w+") as out, open(logs / "stderr", "w+") as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, env=env, stdout=out, stderr=err, cwd=C.ROOT)
        _, status, ru = os.wait4(p.pid, 0)      # this child's own rusage (Popen.wait would discard it)
        wall = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        text, error = out.read(), err.read()
    if p.returncode != 0:
        raise RuntimeError(f"vitsift analyze failed ({p.returncode}):\n{text[-2000:]}\n{error[-4000:]}")
    peak = int(peak_file.read_text()) if peak_file.exists() else ru.ru_maxrss * 1024
    return {"wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime, "peak_rss_bytes": peak,
            "stdout": text.strip().splitlines()[-1] if text.strip() else ""}


def decoded_batches(lm, spec: str, limit: int, batch: int):
    """The N records of ``spec`` (as analyze picks them) as model input, (B, 3, S, S) batches."""
    import torch

    from vitsift_core.data.images import model_input
    from vitsift_core.data.sources import read_record, resolve_images

    xs = []
    for r in resolve_images(spec, limit):
        try:
            xs.append(model_input(read_record(r), lm.data_config)[1])
        except Exception:  # noqa: BLE001 - analyze skips what does not decode; so does the reference
            continue
    dev = next(lm.model.parameters()).device
    return [torch.stack(xs[i:i + batch]).to(dev) for i in range(0, len(xs), batch)], len(xs)


def time_forward(forward, batches) -> tuple[float, float]:
    """(wall s, CPU s) of ``forward`` over ``batches`` after one warm-up batch."""
    import torch

    forward(batches[0])                            # warm-up (oneDNN primitives, allocator)
    t0, c0 = time.perf_counter(), time.process_time()
    for x in batches:
        forward(x)
    if batches[0].is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0, time.process_time() - c0


def end_to_end(args, lm, plain, limit: int, plain_split=None) -> dict:
    """Time (e) and (f) on ``limit`` images; ``plain(x)`` is (a)'s forward, ``plain_split(x)`` (p)'s
    (optional, CPU: the reference at (e)'s threading, less moved by other load). The row's figures."""
    from vitsift_core.store import read_json

    batches, n_f = decoded_batches(lm, args.images_spec, limit, args.batch)
    f_before = time_forward(plain, batches)
    work = Path(tempfile.mkdtemp(prefix="vitsift-e2e-"))
    try:
        env = fresh_cache(work)
        e = run_analyze(analyze_command(args, limit, work / "out"), env, work)
        n_e = read_json(work / "out" / "run.json")["n_images"]     # what it analysed (skips excluded)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    f_after = time_forward(plain, batches)
    f_wall, f_cpu = ((b + a) / 2 for b, a in zip(f_before, f_after))
    split = {}
    if plain_split is not None:
        p_wall, p_cpu = time_forward(plain_split, batches)
        split = {"plain_split_wall_s": p_wall, "plain_split_cpu_s": p_cpu,
                 "plain_split_images_per_s": n_f / p_wall, "end_to_end_over_plain_split": (n_e / e["wall_s"]) / (n_f / p_wall)}
    e_ips, f_ips = n_e / e["wall_s"], n_f / f_wall
    return {"images": args.images_spec, "limit": limit, "n_analyzed": n_e, "n_plain": n_f,
            "analyze_wall_s": e["wall_s"], "analyze_cpu_s": e["cpu_s"],
            "analyze_peak_rss_bytes": e["peak_rss_bytes"], "analyze_images_per_s": e_ips,
            "plain_wall_s": f_wall, "plain_cpu_s": f_cpu, "plain_images_per_s": f_ips,
            "plain_wall_s_before": f_before[0], "plain_wall_s_after": f_after[0],
            "end_to_end_over_plain": e_ips / f_ips, "command": " ".join(analyze_command(args, limit, Path("OUT"))[1:]),
            "target": f"{TARGET[0]} {TARGET[1]}", **split}


def report_lines(r: dict) -> list[str]:
    """The row as printed: images/s of (e) and (f), the ratio against its target, where the time went."""
    ok = r["end_to_end_over_plain"] >= TARGET[1]
    return [C.table([["(e) vitsift analyze, whole process", r["analyze_images_per_s"], r["analyze_wall_s"],
                      r["analyze_cpu_s"], r["analyze_peak_rss_bytes"] / 2 ** 20],
                     ["(f) plain forward, decoded images (mean of 2)", r["plain_images_per_s"], r["plain_wall_s"],
                      r["plain_cpu_s"], float("nan")]] + ([
                     ["(f) split over cores like (b)", r["plain_split_images_per_s"], r["plain_split_wall_s"],
                      r["plain_split_cpu_s"], float("nan")]] if "plain_split_wall_s" in r else []),
                    [f"end to end, {r['n_analyzed']} images ({r['images']})", "images/s", "wall s", "CPU s",
                     "peak RSS MiB"]),
            f"e/f end to end: {r['end_to_end_over_plain']:.3f} (target {TARGET[0]} {TARGET[1]}: "
            f"{'met' if ok else 'NOT met'})" + (f"; e/(f split) {r['end_to_end_over_plain_split']:.3f} (the same "
                                                  "at (e)'s threading)" if "plain_split_wall_s" in r else ""),
            f"(f) wall before / after (e): {r['plain_wall_s_before']:.1f} / {r['plain_wall_s_after']:.1f} s "
            "(how far the machine drifted during the row)"]
