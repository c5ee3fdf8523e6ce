"""The CPU core split: a batch (or an attention module's input) cut into slices run at once in a
thread pool, one torch thread per slice (benchmarks/README.md). Every split restores the caller's
torch thread count, which the pool threads also move for the whole process.
"""
from __future__ import annotations

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Callable

import torch

from vitsift_core.options import env_switch

_slice = threading.local()
_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()
_STOPPED = object()
# slices queued per pool thread: the pool balances itself when the decoding worker takes a core for a
# while, and a 4-image slice's attention block stays in cache (benchmarks/README.md, issue 17)
SLICES_PER_CORE = 4


class StopForward(Exception):
    """Raised after the deepest captured map (``capture_attention(stop_early=True)``); caught there."""


def current_slice_start() -> int | None:
    """Inside a sliced forward: the index in the batch of the slice's first image; None outside one."""
    return getattr(_slice, "start", None)


def _one_torch_thread() -> None:
    torch.set_num_threads(1)
    _slice.pooled = True       # work running here never waits on the pool (no nested submits)


def _pool(workers: int) -> ThreadPoolExecutor:
    with _pools_lock:
        if workers not in _pools:
            _pools[workers] = ThreadPoolExecutor(workers, thread_name_prefix="vitsift-slice",
                                                 initializer=_one_torch_thread)
        return _pools[workers]


def _can_thread(workers: int, x: torch.Tensor) -> bool:
    return workers > 1 and x.device.type == "cpu" and not getattr(_slice, "pooled", False)


def _caller_modes():
    """The caller's grad, inference and CPU autocast modes: per thread, so carried into the pool."""
    amp = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
    return torch.is_grad_enabled(), torch.is_inference_mode_enabled(), amp


def _run_slice(forward, start: int, x, args=(), kwargs=None, modes=None):
    """``forward(x, *args, **kwargs)`` with ``current_slice_start() == start``, in ``modes`` if given."""
    prev = getattr(_slice, "start", None)
    _slice.start = start
    try:
        if modes is None:
            return forward(x, *args, **(kwargs or {}))
        grad, inference, amp = modes
        with torch.inference_mode(inference), torch.set_grad_enabled(grad), \
                (torch.autocast("cpu", dtype=amp) if amp is not None else contextlib.nullcontext()):
            return forward(x, *args, **(kwargs or {}))
    finally:
        _slice.start = prev


def _pooled_job(threads: int, fn, *args):
    torch.set_num_threads(threads)      # per job: the count is shared by threads outside OpenMP regions
    return fn(*args)


def _run_pooled(workers: int, jobs: list, threads: int = 1) -> list:
    """Results of ``jobs`` [(fn, args)] run in the pool, ``threads`` torch threads each, in order; all
    finish before the first job's error is raised. Restores the caller's torch thread count."""
    mine = torch.get_num_threads()
    try:
        futs = [_pool(workers).submit(_pooled_job, threads, fn, *a) for fn, a in jobs]
        wait(futs)
    finally:
        torch.set_num_threads(mine)
    return [f.result() for f in futs]


def sliced_forward(forward, step: int, workers: int = 1):
    """``forward(x, ...)`` on ``x[i:i + step]`` slices (``workers`` threads on CPU), concatenated."""
    def sliced(x, *args, **kwargs):
        n = x.shape[0]
        base = current_slice_start() or 0       # inside a forward already run on a slice of the batch
        # a mask may carry a batch dimension: rare for ViTs; keep the whole batch then
        if n <= step or args or kwargs.get("attn_mask") is not None:
            return _run_slice(forward, base, x, args, kwargs)
        starts = range(0, n, step)
        if _can_thread(workers, x):
            modes = _caller_modes()
            outs = _run_pooled(workers, [(_run_slice, (forward, base + i, x[i:i + step], args, kwargs, modes))
                                         for i in starts])
        else:
            outs = [_run_slice(forward, base + i, x[i:i + step], args, kwargs) for i in starts]
        return torch.cat(outs)
    return sliced


def _stoppable(forward, start, x, args, modes):
    try:
        return _run_slice(forward, start, x, args, None, modes)
    except StopForward:
        return _STOPPED


def core_workers(device: torch.device | str) -> int:
    """Threads :func:`forward_on_cores` runs at once on ``device``: torch's thread count on CPU, else 1
    (``VITSIFT_CORE_SPLIT=0``: 1; how to run, never part of a run's identity)."""
    if torch.device(device).type != "cpu":
        return 1
    return 1 if env_switch("VITSIFT_CORE_SPLIT") == "off" else torch.get_num_threads()


def forward_on_cores(forward: Callable[..., torch.Tensor], x: torch.Tensor, workers: int,
                     *per_image) -> torch.Tensor | None:
    """``forward(x, *per_image)`` on up to ``workers * SLICES_PER_CORE`` contiguous slices of the
    batch, ``workers`` at once (CPU; else one call). x: (B, ...) -> outputs concatenated; ``per_image``
    (batch first) sliced like x. The caller's grad, inference and CPU autocast modes reach the threads."""
    n = x.shape[0]
    k = min(workers * SLICES_PER_CORE, n)
    if k <= 1 or not _can_thread(workers, x):
        return forward(x, *per_image)
    q, r = divmod(n, k)                              # k slices, sizes differing by at most 1
    bounds = [i * q + min(i, r) for i in range(k + 1)]
    base = current_slice_start() or 0
    modes = _caller_modes()
    jobs = [(_stoppable, (forward, base + s, x[s:e], tuple(a[s:e] for a in per_image), modes))
            for s, e in zip(bounds, bounds[1:])]
    outs = _run_pooled(workers, jobs, threads=max(1, workers // k))   # fewer slices than cores: spare cores help
    if any(o is _STOPPED for o in outs):
        raise StopForward
    return torch.cat(outs)
