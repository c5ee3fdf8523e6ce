"""The one inference entry (analysis, mask-eval, guided MAE scoring): inference mode, the precision
policy's autocast, attention capture and the CPU core split."""
from __future__ import annotations

import contextlib
import functools
import os
import warnings
from typing import Callable

import torch
from torch import nn

from vitsift_core.model.capture import capture_attention
from vitsift_core.model.cores import core_workers, forward_on_cores
from vitsift_core.options import PRECISION_HELP, PRECISIONS  # noqa: F401 (the CLI's choices, re-exported)

CPU_MICRO_BATCH = 4      # images per attention slice on CPU (benchmarks/README.md)


def capture_micro_batch(device: torch.device | str) -> int | None:
    """Images per attention slice on ``device`` (None: whole batch); VITSIFT_MICRO_BATCH overrides."""
    env = os.environ.get("VITSIFT_MICRO_BATCH")
    if env is not None and env.strip():
        return int(env) or None
    return CPU_MICRO_BATCH if torch.device(device).type == "cpu" else None


BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")    # /proc/cpuinfo flags of a native bf16 matmul


def cpu_flags(path: str = "/proc/cpuinfo") -> set[str] | None:
    """The CPU's feature flags (Linux), or None where they cannot be read."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


@functools.lru_cache(maxsize=None)
def native_cpu_bf16(path: str = "/proc/cpuinfo") -> bool | None:
    """True/False: this CPU has (not) a native bf16 matmul (AVX512-BF16 or AMX); None: unknown."""
    flags = cpu_flags(path)
    return None if flags is None else any(f in flags for f in BF16_CPU_FLAGS)


_warned_bf16: set[str] = set()


def warn_emulated_bf16(path: str = "/proc/cpuinfo") -> bool:
    """Warn once per process that a bf16 forward on this CPU is emulated (slow); True if it warned."""
    if native_cpu_bf16(path) is not False or path in _warned_bf16:
        return False
    _warned_bf16.add(path)
    warnings.warn(f"--precision bf16 on a CPU without {' or '.join(BF16_CPU_FLAGS)} (see lscpu): bf16 "
                  "is emulated here and several times slower than fp32; use --precision fp32",
                  RuntimeWarning, stacklevel=3)
    return True


def forward_precision(device: torch.device | str, precision: str = "auto") -> str:
    """How a forward runs on ``device``: "bf16-autocast" or "fp32" (auto = bf16 on CUDA only).
    An explicit bf16 on a CPU without native bf16 warns once (:func:`warn_emulated_bf16`)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        precision = "bf16" if torch.device(device).type == "cuda" else "fp32"
    elif precision == "bf16" and torch.device(device).type == "cpu":
        warn_emulated_bf16()
    return "bf16-autocast" if precision == "bf16" else "fp32"


def amp_precision(amp: bool) -> str:
    """The precision of a config's ``amp`` flag: 'auto' or 'fp32'."""
    return "auto" if amp else "fp32"


def forward_autocast(device: torch.device | str, precision: str = "auto"):
    """The context a forward runs in: bf16 autocast or none (:func:`forward_precision`)."""
    if forward_precision(device, precision) == "bf16-autocast":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def infer(net, x: torch.Tensor, *, forward: Callable | None = None, head: Callable | None = None,
          collector: Callable | None = None, layers: list[int] | None = None, precision: str = "auto",
          micro_batch: int | str | None = None, stop_early: bool = False, per_image: tuple = (),
          split: bool = True) -> torch.Tensor | None:
    """``head(forward(x, *per_image))`` under inference mode and the precision policy's autocast.

    net: a timm ViT or a LoadedModel; x (B, 3, H, W) moves to its device. ``forward``: default
    ``forward_features``. ``collector(layer, attn (b, H, N, N))`` for the 0-based ``layers``;
    ``micro_batch`` "auto": :func:`capture_micro_batch`; ``stop_early`` returns None; ``split``:
    the CPU core split, ``per_image`` sliced with the batch.
    """
    model, npt = (net, getattr(net, "num_prefix_tokens", 1)) if isinstance(net, nn.Module) else \
        (net.model, net.num_prefix_tokens)
    dev = next(model.parameters()).device
    x = x.to(dev, non_blocking=True)
    if micro_batch == "auto":
        micro_batch = capture_micro_batch(dev)
    capture = contextlib.nullcontext() if collector is None else \
        capture_attention(model, npt, collector, layers, micro_batch=micro_batch, stop_early=stop_early)
    out = None
    with torch.inference_mode(), forward_autocast(dev, precision), capture:
        out = forward_on_cores(forward or model.forward_features, x, core_workers(dev) if split else 1,
                               *per_image)
        if head is not None:
            out = head(out)
    return out
