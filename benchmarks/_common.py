"""Helpers shared by the benchmark scripts (not part of the package; not a test).

Memory on CPU is resident set size (RSS), read from ``/proc/self/status`` in a fresh process per
variant: the peak (``VmHWM``) is reset just before the measured pass by writing ``5`` to
``/proc/self/clear_refs`` (Linux >= 4.0), so it covers that pass only. glibc keeps freed heap
memory resident and raises its mmap threshold as large blocks are freed, which would hide a pass's
allocations behind memory freed earlier; the child therefore runs with ``MALLOC_MMAP_THRESHOLD_``
and ``MALLOC_TRIM_THRESHOLD_`` pinned at 128 KiB, so every tensor of 128 KiB or more is its own
mapping, counted while alive and returned when freed.
"""
from __future__ import annotations

import ctypes
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from vitsift_core.store import write_json  # noqa: E402 (after the sys.path line above)

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
# --malloc steady: glibc keeps what is freed (no mmap'd blocks, no trimming), so re-allocating a
# buffer of the same size faults no pages in. By default blocks above glibc's mmap threshold (at
# most 32 MiB) go back to the kernel when freed and come back page fault by page fault; on a VM that
# reports free pages to its host (this one) a fault costs microseconds, and the variants that hold
# big tensors in the main thread, (a) and (c), pay that while (b)'s small slices do not.
STEADY_MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2 ** 30),
                     "MALLOC_TOP_PAD_": str(64 << 20)}
_MALLOPT = {"MALLOC_TRIM_THRESHOLD_": -1, "MALLOC_TOP_PAD_": -2, "MALLOC_MMAP_MAX_": -4}   # <malloc.h> M_*


def steady_malloc() -> bool:
    """STEADY_MALLOC_ENV in this process (``mallopt``) and in every process it starts (environment);
    False where this is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    os.environ.update(STEADY_MALLOC_ENV)
    return all(libc.mallopt(_MALLOPT[k], int(v)) == 1 for k, v in STEADY_MALLOC_ENV.items())


def faults_and_system_time() -> tuple[int, float]:
    """(minor page faults, system CPU seconds) of this process so far."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_minflt, ru.ru_stime


# ------------------------------------------------------------------------------ images
def pick_images(spec: str, n: int):
    """(spec actually used, n ImageRecords). 'auto': Imagenette val when present, else the
    scikit-image samples. Fewer records than n are cycled (the same image several times)."""
    from vitsift_core.data.sources import resolve_images

    if spec == "auto":
        spec = "samples"
        try:
            from vitsift_core.data.sources import imagenette_root

            if (Path(imagenette_root()) / "val").is_dir():
                spec = "imagenette:val"
        except Exception:  # noqa: BLE001 - no local copy: fall back to the samples
            pass
    recs = resolve_images(spec, n)
    if not recs:
        raise SystemExit(f"no images for {spec!r}")
    out = [recs[i % len(recs)] for i in range(n)]
    return spec, out, len(recs)


# ------------------------------------------------------------------------------ memory
def _status(field: str) -> int:
    """A ``/proc/self/status`` field in bytes (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    return int(m.group(1)) * 1024 if m else -1


def rss() -> int:
    return _status("VmRSS")


def peak_rss() -> int:
    return _status("VmHWM")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def cpu_memory_supported() -> bool:
    return platform.system() == "Linux" and Path("/proc/self/clear_refs").exists()


# ------------------------------------------------------------------------------ reporting
def table(rows: list[list], headers: list[str]) -> str:
    from tabulate import tabulate

    return tabulate(rows, headers=headers, tablefmt="github", floatfmt=".3g")


def machine() -> dict:
    import torch

    d = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
         "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    try:
        d["load_avg_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    if torch.cuda.is_available():
        d["gpu"] = torch.cuda.get_device_name(0)
    return d


def report_path(out: str | None, name: str) -> Path:
    """``out``, or ``<reports_dir>/bench/<name>`` (VITSIFT_REPORTS, else reports/ in the checkout)."""
    if out:
        return Path(out)
    from vitsift_core.paths import reports_dir

    return reports_dir() / "bench" / name


def write_report(path: Path, obj: dict, compare: tuple[str, ...]) -> None:
    """Write ``obj`` as JSON to ``path``; print the ``compare`` keys of the previous file beside the new."""
    path = Path(path)
    prev = None
    if path.exists():
        try:
            prev = json.loads(path.read_text())
        except (OSError, ValueError):
            prev = None
    if prev is not None:
        parts = []
        for k in compare:
            if k in prev and k in obj and isinstance(prev[k], (int, float)) and isinstance(obj[k], (int, float)):
                parts.append(f"{k} {prev[k]:.3g} -> {obj[k]:.3g}")
        if parts:
            print(f"vs last run ({prev.get('timestamp', '?')}): " + "; ".join(parts))
    obj = {**obj, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, obj)
    print(f"wrote {path}")


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])
