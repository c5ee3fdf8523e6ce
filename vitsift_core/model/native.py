"""The collector's reductions as one compiled C kernel on CPU (``rows.c``, issue 17): each attention
row is read once for its sum and min, then once more, in cache, for the focus entropy (vectorised
log) and every variant's theta sums, where the eager path (``method/metrics.py``, the reference)
makes about nine passes over the (B, H, N, N) block. Built on first use with the C compiler for this
machine's ISA and cached under ``cache_dir()/native``; where it cannot be built the collector uses
the eager path and says so once. Same numbers: theta exact, row entropy within 1e-5
(``tests/test_native_rows.py``). ``VITSIFT_NATIVE=0`` turns it off, ``=1`` makes a failed build an error.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import threading
import warnings
from pathlib import Path

import torch

from vitsift_core.options import env_switch
from vitsift_core.paths import atomic_write, cache_dir

SOURCE = Path(__file__).with_name("rows.c")
FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-fno-trapping-math", "-fPIC", "-shared")
ENV = "VITSIFT_NATIVE"

_lock = threading.Lock()
_state: dict[str, object] = {}          # "fn": the ctypes function or None, "why": reason it is None


def mode() -> str:
    """'auto' (default), 'off' or 'on' from VITSIFT_NATIVE (unset/auto, 0, 1)."""
    return env_switch(ENV, "auto")


def _machine_id(cc: str) -> str:
    """What a built library depends on: the source, flags, compiler and this CPU's feature flags
    (-march=native; a cache shared between machines gets one library per CPU kind)."""
    h = hashlib.sha256(SOURCE.read_bytes())
    h.update(" ".join(FLAGS).encode())
    h.update(subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout.encode())
    try:
        flags = [ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith(("flags", "Features"))]
        h.update((flags[0] if flags else "").encode())
    except OSError:
        import platform
        h.update(platform.processor().encode())
    return h.hexdigest()[:16]


def _build() -> Path:
    """The shared library for this machine, compiled now if not cached (about a second)."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise RuntimeError("no C compiler (cc, gcc or clang; or set CC)")
    out = cache_dir() / "native" / f"rows-{_machine_id(cc)}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)

        def compile_to(tmp: Path) -> None:
            r = subprocess.run([cc, *FLAGS, "-o", str(tmp), str(SOURCE), "-lm"], capture_output=True, text=True,
                               timeout=120)
            if r.returncode != 0:
                raise RuntimeError(f"{cc} failed: {r.stderr.strip()[-500:]}")
        atomic_write(out, compile_to)
    return out


def _load():
    fn = ctypes.CDLL(str(_build())).vs_rows          # ctypes drops the GIL during the call
    fn.restype = None
    fn.argtypes = ([ctypes.c_void_p] + [ctypes.c_int64] * 3 + [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 4
                   + [ctypes.c_float, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p])
    return fn


def kernel():
    """The compiled ``vs_rows`` or None (turned off, or it could not be built: warned once)."""
    if "fn" not in _state:
        with _lock:
            if "fn" not in _state:
                m = mode()
                if m == "off":
                    _state.update(fn=None, why=f"{ENV}=0")
                else:
                    try:
                        _state.update(fn=_load(), why="")
                    except Exception as e:                # no compiler, a failed build, a foreign platform
                        if m == "on":
                            raise RuntimeError(f"{ENV}=1 but the row kernel could not be built: {e}") from e
                        _state.update(fn=None, why=str(e))
                        warnings.warn(f"the compiled row kernel is unavailable ({e}); the analysis uses the "
                                      f"slower eager reductions (same numbers)", RuntimeWarning, stacklevel=2)
    return _state["fn"]


def usable(attn: torch.Tensor) -> bool:
    """Whether :func:`rows` takes ``attn`` here: float32 on CPU, unit stride along rows, one torch
    thread (the core split's slices; with more threads the eager ops use them all), kernel built."""
    return (attn.device.type == "cpu" and attn.dtype == torch.float32 and attn.ndim == 4
            and attn.stride(-1) == 1 and not attn.requires_grad and torch.get_num_threads() == 1
            and kernel() is not None)


def rows(attn: torch.Tensor, weights: torch.Tensor, exclude_self: list[bool], gamma: float,
         minmax: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """attn (B, H, N, N) float32 CPU (any batch/head/row strides), weights (B, 2V, N) float32 (each
    variant's numerator and denominator weights, :func:`~vitsift_core.method.metrics.theta_weights`),
    ``exclude_self`` per variant -> (row entropies (B, H, N), theta_i (V, B, H, N))."""
    b, h, n, n2 = attn.shape
    v = len(exclude_self)
    if n != n2 or tuple(weights.shape) != (b, 2 * v, n):
        raise ValueError(f"attn {tuple(attn.shape)} and weights {tuple(weights.shape)} do not match {v} variants")
    w = weights.to(torch.float32).contiguous()
    # Eq. 2's line from torch's own row sums: the float sum's rounding decides entries within an ulp of
    # the line, and the eager path (metrics.attended_mask) sums the same way
    rowsum = attn.sum(dim=-1).contiguous()
    excl = torch.tensor([int(bool(e)) for e in exclude_self], dtype=torch.int32)
    ent = torch.empty((b, h, n), dtype=torch.float32)
    theta = torch.empty((v, b, h, n), dtype=torch.float32)
    sb, sh, si, _ = attn.stride()
    kernel()(attn.data_ptr(), sb, sh, si, rowsum.data_ptr(), w.data_ptr(), excl.data_ptr(), b, h, n, v, float(gamma),
             int(minmax),
             ent.data_ptr(), theta.data_ptr())
    return ent, theta
