"""Fingerprint the study's real outputs: one hash per output table, to prove a refactor changed
no number (floats compared to the bit).

Runs a fixed set in a fresh work folder (its own results, reports and cache, so no cached
keypoints or probe hide a change): the suite with every control on 200 Imagenette val images;
mask-eval on 40 images (top/random x fill/drop x 10/30 %, which trains the probe); 2-epoch random
and guided MAE on 300 train images; the smoke profile's notebooks and their tables. Then it
prints ``<hash>  <file>`` per output, and writes them to ``<work>/fingerprint.txt``.

    python benchmarks/fingerprint.py --work /tmp/fp-before
    python benchmarks/fingerprint.py --work /tmp/fp-after
    diff /tmp/fp-before/fingerprint.txt /tmp/fp-after/fingerprint.txt

Needs Imagenette (VITSIFT_DATA). Everything runs in one fixed folder (``RUN_AT``, then moved to
``--work``): notebook 06's smoke run keys its folder by an absolute path. Volatile fields (times,
dates, versions) are left out of the JSON hashes; everything numeric is hashed by its bytes, except
``mean_attention_sum.npz``: float64 sums added in the order the core-split threads arrive
(last-bit noise, ~1e-16 relative), hashed at float32; the tables computed from it are exact.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

RUN_AT = Path(tempfile.gettempdir()) / "vitsift-fingerprint"
VOLATILE = ("time", "date", "second", "elapsed", "version", "path", "created", "host", "wall",
            "per_s", "images_s", "python", "torch", "timm", "platform", "cpu", "threads", "out",
            "executed", "kernel", "duration", "start", "end")

STEPS = {
    "suite": ["suite", "--images", "imagenette:val", "--limit", "200", "--batch-size", "32",
              "--quiet", "--out", "{w}/out/suite"],
    "maskeval": ["mask-eval", "--images", "imagenette:val", "--limit", "40", "--orders", "top,random",
                 "--mode", "fill,drop", "--ratios", "10,30", "--probe-per-class", "10",
                 "--n-boot", "200", "--batch-size", "20", "--quiet", "--out", "{w}/out/maskeval"],
    "mae-random": ["pretrain", "--mask", "random", "--epochs", "2", "--train-limit", "300",
                   "--val-limit", "100", "--knn-memory", "300", "--batch-size", "64",
                   "--beta-every", "1", "--quiet", "--out", "{w}/out/mae-random"],
    "mae-guided": ["pretrain", "--mask", "guided", "--epochs", "2", "--train-limit", "300",
                   "--val-limit", "100", "--knn-memory", "300", "--batch-size", "64",
                   "--beta-every", "1", "--quiet", "--out", "{w}/out/mae-guided"],
}


def _volatile(key: str) -> bool:
    k = key.lower()
    return any(v in k for v in VOLATILE) or k.endswith("_s") or "_s_" in k


def _clean(obj):
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items() if not _volatile(str(k))}
    if isinstance(obj, list):
        return [_clean(v) for v in obj]
    return obj


def file_hash(p: Path) -> str | None:
    """A content hash of one output file, or None for files that are not outputs."""
    import numpy as np
    import pandas as pd
    h = hashlib.sha256()
    if p.suffix == ".parquet":
        df = pd.read_parquet(p)
        h.update(repr(list(df.columns)).encode())
        for c in df.columns:
            col = df[c]
            if col.dtype.kind in "biufc":
                h.update(str(col.dtype).encode() + np.ascontiguousarray(col.to_numpy()).tobytes())
            else:
                h.update("\x1f".join(map(str, col.tolist())).encode())
    elif p.suffix == ".npz":
        with np.load(p, allow_pickle=False) as z:
            for k in sorted(z.files):
                a = z[k]
                if p.name == "mean_attention_sum.npz" and a.dtype == np.float64:
                    a = a.astype(np.float32)
                h.update(k.encode() + str(a.dtype).encode() + repr(a.shape).encode() + a.tobytes())
    elif p.suffix == ".json":
        h.update(json.dumps(_clean(json.loads(p.read_text())), sort_keys=True, default=str).encode())
    elif p.suffix in (".csv", ".md") and "index" not in p.name:
        h.update(p.read_bytes())
    elif p.suffix == ".safetensors":
        from safetensors.numpy import load_file
        for k, a in sorted(load_file(str(p)).items()):
            h.update(k.encode() + a.tobytes())
    elif p.name == "checkpoint.pt":
        from vitsift_core.model.registry import load_weights_only   # nothing in it may run code
        state = load_weights_only(p)
        # the weights: "model" (pre-training runs) or "decoder" (notebook 01's frozen-encoder decoder)
        for k, t in sorted(state["model" if "model" in state else "decoder"].items()):
            h.update(k.encode() + t.numpy().tobytes())
    else:
        return None
    return h.hexdigest()[:16]


def run(cmd: list[str], env: dict, log: Path) -> None:
    with open(log, "w") as f:
        r = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode:
        sys.exit(f"fingerprint: {' '.join(cmd)} failed (exit {r.returncode}); see {log}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, help="work folder (emptied first)")
    ap.add_argument("--only", default="", help="comma list of steps: " + ",".join([*STEPS, "smoke"]))
    ap.add_argument("--hash-only", action="store_true", help="hash what --work holds, run nothing")
    a = ap.parse_args(argv)
    work = Path(a.work).resolve()
    w = work if a.hash_only else RUN_AT
    steps = [s for s in a.only.split(",") if s] or [*STEPS, "smoke"]
    env = dict(os.environ, VITSIFT_RESULTS=str(w / "results"), VITSIFT_REPORTS=str(w / "reports"),
               VITSIFT_CACHE=str(w / "cache"), HF_HUB_OFFLINE="1", PYTHONHASHSEED="0")
    if not a.hash_only:
        if w.exists():
            shutil.rmtree(w)
        (w / "logs").mkdir(parents=True)
        for s in steps:
            print(f"fingerprint: {s} ...", flush=True)
            if s == "smoke":
                cmd = [sys.executable, "-m", "vitsift_core.reproduce", "--profile", "smoke"]
            else:
                cmd = [sys.executable, "-m", "vitsift_core.cli", *[x.format(w=w) for x in STEPS[s]]]
            run(cmd, env, w / "logs" / f"{s}.log")
        if work.exists():
            shutil.rmtree(work)
        shutil.move(str(w), str(work))
        w = work
    lines = []
    for root in ("out", "reports/tables", "results", "cache"):
        for p in sorted((w / root).rglob("*")):
            if p.is_file() and "parts" not in p.parts and (h := file_hash(p)) is not None:
                lines.append(f"{h}  {p.relative_to(w)}")
    text = "\n".join(lines) + "\n"
    (w / "fingerprint.txt").write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
