"""Capture post-softmax attention from timm ViTs without copying model code.

timm's ``Attention`` only materialises the softmax when ``fused_attn`` is False; the map then
passes through ``attn_drop`` (an ``nn.Dropout``, identity in eval mode), so a forward hook on
``blk.attn.attn_drop`` sees exactly ``softmax(q k^T * scale)``: (B, H, T, T) over all T tokens.
The hook slices the patch block (prefix tokens dropped from rows and columns) and hands it to
a callback that reduces it at once, so nothing of size depth x batch x N^2 is ever kept.
"""
from __future__ import annotations

import contextlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Callable, Iterator

import torch
from torch import nn

from vitsift_core.method import metrics as M

Callback = Callable[[int, torch.Tensor], None]


def attention_blocks(model: nn.Module) -> list[nn.Module]:
    """The ``attn`` modules of a timm ViT-family model, in depth order.

    Raises ValueError for models whose attention cannot be captured this way.
    """
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError(f"{type(model).__name__} has no .blocks: not a timm ViT-family model")
    out = []
    for i, blk in enumerate(blocks):
        attn = getattr(blk, "attn", None)
        if attn is None or not hasattr(attn, "fused_attn") or not isinstance(getattr(attn, "attn_drop", None), nn.Dropout):
            raise ValueError(
                f"block {i} of {type(model).__name__} has no timm Attention with fused_attn/attn_drop; "
                "attention capture supports timm VisionTransformer-family models (vit_*, deit_*, DINOv2)")
        out.append(attn)
    return out


@contextlib.contextmanager
def fused_attention(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Temporarily set ``fused_attn`` on every block; restores the previous values."""
    mods = attention_blocks(model)
    before = [m.fused_attn for m in mods]
    try:
        for m in mods:
            m.fused_attn = enabled
        yield
    finally:
        for m, b in zip(mods, before):
            m.fused_attn = b


@contextlib.contextmanager
def capture_attention(model: nn.Module, num_prefix_tokens: int, callback: Callback,
                      layers: list[int] | None = None, micro_batch: int | None = None,
                      micro_workers: int = 1, stop_early: bool = False) -> Iterator[None]:
    """Call ``callback(layer, attn)`` for every block during forwards inside the context.

    attn: (B, H, N, N), the patch block of the post-softmax map (a view; copy it if kept).
    ``layers`` restricts capture to those 0-based block indices; other blocks keep fused
    attention, so capturing one layer costs little more than a plain forward.

    ``micro_batch``: run each captured attention module on slices of that many images (timm's
    own forward on each slice, outputs concatenated), so the callback sees ``(b, H, N, N)``
    slices, ``b <= micro_batch``, several calls per layer; :func:`current_slice_start` tells
    the callback where its slice starts in the batch. Only the N x N maps shrink: the rest of
    the model still runs on the whole batch. On CPU this keeps each map in cache and bounds its
    memory (a whole batch's map is B x H x N^2 floats per layer).

    ``micro_workers`` > 1 (CPU only; the caller's CPU autocast is carried into the threads): the
    slices of a layer run concurrently in that many threads, one torch thread each, instead of
    one slice at a time with torch's intra-op threads. Small ops split over cores wait at a
    barrier for the slowest core, which costs a scheduler time slice per op on a shared machine;
    whole slices per core do not. :func:`forward_on_cores` goes further and splits the whole
    forward pass; inside it, a layer's slices run one after another in each core's thread.
    The callback must then be thread-safe (:class:`MetricCollector` is).

    ``stop_early``: end the forward pass after the deepest captured layer's attention module
    (every slice of it). Nothing after it can change a captured map, so that block's MLP, the
    later blocks and the final norm and head are skipped (timm's ``AttentionExtract`` graph is
    likewise cut after its last softmax). The statement running the forward inside the ``with``
    block is abandoned there (it returns nothing) and the block exits normally: only for callers
    that want the maps and not the model's output.
    """
    mods = attention_blocks(model)
    wanted = set(range(len(mods))) if layers is None else set(layers)
    if not wanted <= set(range(len(mods))):
        raise ValueError(f"layers {sorted(wanted - set(range(len(mods))))} out of range: "
                         f"the model has blocks 0..{len(mods) - 1}")
    last = max(wanted) if wanted else None
    p = num_prefix_tokens
    handles = []
    if micro_batch is not None and micro_batch < 1:
        raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")

    def make_hook(idx: int):
        def hook(_mod, _inp, out):
            callback(idx, out[:, :, p:, p:])
        return hook

    def stop(_mod, _inp, _out):
        # on the attention module, not on attn_drop: it fires once all slices of the layer are done
        raise _StopForward

    before = [m.fused_attn for m in mods]
    patched: list[tuple[nn.Module, object]] = []
    try:
        for i, m in enumerate(mods):
            if i in wanted:
                m.fused_attn = False
                handles.append(m.attn_drop.register_forward_hook(make_hook(i)))
                if micro_batch is not None:
                    patched.append((m, m.__dict__.get("forward", _MISSING)))
                    m.forward = _sliced_forward(m.forward, micro_batch, micro_workers)
        if stop_early and last is not None:
            handles.append(mods[last].register_forward_hook(stop))
        try:
            yield
        except _StopForward:
            pass
    finally:
        for h in handles:
            h.remove()
        for m, old in patched:
            if old is _MISSING:
                del m.forward
            else:
                m.forward = old
        for m, b in zip(mods, before):
            m.fused_attn = b


_MISSING = object()


class _StopForward(Exception):
    """Raised after the deepest captured map (``capture_attention(stop_early=True)``); caught there."""


_slice = threading.local()
_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def current_slice_start() -> int | None:
    """Inside a sliced attention forward (``capture_attention(micro_batch=...)``): the index in
    the batch of the slice's first image; None outside one."""
    return getattr(_slice, "start", None)


def _one_torch_thread() -> None:
    torch.set_num_threads(1)   # per thread: the caller's own thread count is not touched
    _slice.pooled = True       # work running here never waits on the pool (no nested submits)


def _pool(workers: int) -> ThreadPoolExecutor:
    with _pools_lock:
        if workers not in _pools:
            _pools[workers] = ThreadPoolExecutor(workers, thread_name_prefix="vitsift-slice",
                                                 initializer=_one_torch_thread)
        return _pools[workers]


def _cpu_autocast_dtype() -> torch.dtype | None:
    """The dtype of the CPU autocast region the caller is in, None outside one."""
    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None


def _can_thread(workers: int, x: torch.Tensor) -> bool:
    return workers > 1 and x.device.type == "cpu" and not getattr(_slice, "pooled", False)


def _run_slice(forward, start: int, x, args=(), kwargs=None, modes=None):
    """``forward(x, *args, **kwargs)`` with ``current_slice_start() == start``; ``modes`` (from
    :func:`_caller_modes`) re-enters the caller's grad, inference and CPU autocast modes, which are
    per thread and so must be carried into a pool thread."""
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


def _caller_modes():
    return torch.is_grad_enabled(), torch.is_inference_mode_enabled(), _cpu_autocast_dtype()


def _run_pooled(workers: int, jobs: list) -> list:
    """Run ``jobs`` [(fn, args)] in the pool; every job finishes (its callbacks included) before
    any exception leaves: a stop_early stop, or an error, must not leave slices writing behind
    the caller. Returns the results in order, or raises the first job's error."""
    futs = [_pool(workers).submit(fn, *a) for fn, a in jobs]
    wait(futs)
    return [f.result() for f in futs]


def _sliced_forward(forward, step: int, workers: int = 1):
    """``forward(x, ...)`` run on ``x[i:i + step]`` slices, outputs concatenated along the batch."""
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


_STOPPED = object()


def _stoppable(forward, start, x, args, modes, threads: int = 1):
    if threads > 1:                         # fewer slices than cores: the spare cores help each slice
        torch.set_num_threads(threads)
    try:
        return _run_slice(forward, start, x, args, None, modes)
    except _StopForward:
        return _STOPPED
    finally:
        if threads > 1:
            torch.set_num_threads(1)


def core_workers(device: torch.device | str) -> int:
    """How many slices :func:`forward_on_cores` makes on ``device``: torch's CPU thread count on a
    CPU, 1 (one call) elsewhere. ``VITSIFT_CORE_SPLIT=0`` turns the split off on CPU too (torch's
    intra-op threads then split every op, as in a plain forward): how to run, never part of a
    run's identity."""
    if torch.device(device).type != "cpu":
        return 1
    env = os.environ.get("VITSIFT_CORE_SPLIT", "").strip().lower()
    if env in ("0", "false", "no", "off"):
        return 1
    if env not in ("", "1", "true", "yes", "on"):
        raise ValueError(f"VITSIFT_CORE_SPLIT must be 0 or 1, got {env!r}")
    return torch.get_num_threads()


def forward_on_cores(forward: Callable[..., torch.Tensor], x: torch.Tensor, workers: int,
                     *per_image) -> torch.Tensor | None:
    """``forward(x, *per_image)`` with the batch split into up to ``workers`` contiguous slices
    that run at once, one thread and one torch thread each (CPU; elsewhere, or with ``workers``
    <= 1, one call).

    x: (B, ...) -> ``forward``'s outputs concatenated along the batch. ``per_image``: further
    arguments with the batch as their first dimension (tensors or arrays, e.g. a (B, M) array of
    patches to mask), sliced like ``x``. With fewer images than ``workers``, each image gets
    ``workers // B`` torch threads. On a CPU, one slice per
    core is faster than torch's intra-op threads splitting every op over the cores (the small
    ops between the matrix products wait at a barrier for the slowest core; see
    benchmarks/README.md). Inside :func:`capture_attention` the callback sees each slice's maps,
    :func:`current_slice_start` saying where they start in the batch; attention slices
    (``micro_batch``) then run one after another within each core's slice. With
    ``stop_early`` every slice stops after the deepest captured layer and the forward
    statement is abandoned as in a single call. The caller's grad, inference and CPU autocast
    modes are carried into the threads.
    """
    n = x.shape[0]
    k = min(workers, n)
    if k <= 1 or not _can_thread(workers, x):
        return forward(x, *per_image)
    q, r = divmod(n, k)                              # k slices, sizes differing by at most 1
    bounds = [i * q + min(i, r) for i in range(k + 1)]
    base = current_slice_start() or 0
    modes = _caller_modes()
    outs = _run_pooled(workers, [(_stoppable, (forward, base + s, x[s:e], tuple(a[s:e] for a in per_image),
                                               modes, workers // k))
                                 for s, e in zip(bounds, bounds[1:])])
    if any(o is _STOPPED for o in outs):
        raise _StopForward
    return torch.cat(outs)


class MetricCollector:
    """Reduces each layer's attention to per-head metrics as the forward pass goes.

    For every *variant* (a name -> (counts (B, N), exclude_self)) it keeps (B, L, H) arrays
    of theta_kk/kn/nk/nn and theta_chance; focus (which does not depend on keypoints) once.
    Optionally accumulates the sum of attention over images, (L, H, N, N) float64, for
    the content-free control.

    A layer may arrive in slices (``capture_attention(..., micro_batch=)``), from several
    threads: each call covers ``attn.shape[0]`` images from :func:`current_slice_start` (or,
    outside a sliced forward, the images after the previous call's). Results stay on the maps'
    device until :meth:`finish_batch`, so a GPU forward is not stalled by copies per layer.
    """

    THETA_KEYS = ("theta_kk", "theta_kn", "theta_nk", "theta_nn", "theta_chance")

    def __init__(self, n_layers: int, gamma: float = 1.0, weighted: bool = True,
                 focus_kind: str = "minmax", accumulate_mean: bool = False):
        self.n_layers = n_layers
        self.gamma, self.weighted, self.focus_kind = gamma, weighted, focus_kind
        self.accumulate_mean = accumulate_mean
        self.attn_sum: torch.Tensor | None = None
        self.n_summed = 0
        self._variants: dict[str, tuple[torch.Tensor, bool]] = {}
        self._batch = 0
        self._offset: list[int] = []
        self._parts: list[list[tuple[int, int, dict]]] = []   # per layer: (start, size, metrics)
        self._on_device: dict[tuple[str, torch.device], torch.Tensor] = {}
        self._lock = threading.Lock()
        self._local = threading.local()

    def start_batch(self, variants: dict[str, tuple[torch.Tensor, bool]]) -> None:
        """variants: name -> (counts (B, N) int, exclude_self)."""
        self._variants = variants
        sizes = {int(c.shape[0]) for c, _ in variants.values()}
        if len(sizes) > 1:
            raise ValueError(f"variants disagree on the batch size: {sorted(sizes)}")
        self._batch = sizes.pop() if sizes else -1
        self._offset = [0] * self.n_layers
        self._parts = [[] for _ in range(self.n_layers)]
        self._on_device = {}

    def _workspace(self, a: torch.Tensor) -> list[torch.Tensor]:
        """Two scratch tensors shaped like ``a``, per thread, kept between calls: a fresh
        map-sized tensor per operation costs page faults on CPU."""
        ws = getattr(self._local, "work", None)
        if ws is None or ws[0].shape != a.shape or ws[0].dtype != a.dtype or ws[0].device != a.device:
            ws = [torch.empty(a.shape, dtype=a.dtype, device=a.device) for _ in range(2)]
            self._local.work = ws
        return ws

    def _counts(self, name: str, device: torch.device) -> torch.Tensor:
        key = (name, device)
        if key not in self._on_device:
            self._on_device[key] = self._variants[name][0].to(device)
        return self._on_device[key]

    def __call__(self, layer: int, attn: torch.Tensor) -> None:
        a = attn.float()
        b, h = a.shape[:2]
        off = current_slice_start()
        with self._lock:
            if off is None:                 # whole-batch calls, or slices in order
                off = self._offset[layer]
            self._offset[layer] = max(self._offset[layer], off + b)
            if self._batch >= 0 and off + b > self._batch:
                raise RuntimeError(f"layer {layer}: attention for images {off}..{off + b - 1}, "
                                   f"batch has {self._batch}")
        if self.accumulate_mean:
            s = a.sum(dim=0, dtype=torch.float64)
            with self._lock:
                if self.attn_sum is None:
                    self.attn_sum = torch.zeros((self.n_layers,) + tuple(s.shape), dtype=torch.float64,
                                                device=s.device)
                self.attn_sum[layer] += s
                if layer == 0:
                    self.n_summed += b
        # per slice only the (b, H, N) row values; means over rows, layers and images are taken
        # once per batch in finish_batch (fewer small ops per slice)
        work = self._workspace(a)
        part = {"entropy": M.row_entropy(a, self.focus_kind, work=(work[0], work[1]))}
        masks: dict[bool, torch.Tensor] = {}
        for name, (_, excl) in self._variants.items():
            c = self._counts(name, a.device)[off:off + b].reshape(b, 1, -1)
            if excl not in masks:
                # 0/1 floats straight from the comparison: the same sets as the bool mask
                masks[excl] = M.attended_mask(a, self.gamma, excl, dtype=a.dtype,
                                              out=work[0] if not masks else None)
            part[("theta", name)] = M.theta_from_mask(masks[excl], c, self.weighted)
        with self._lock:
            self._parts[layer].append((off, b, part))

    def finish_batch(self) -> dict[str, dict[str, torch.Tensor]]:
        """-> variant -> metric -> (B, L, H) float32 on CPU (focus/focus_norm included in each)."""
        missing = [i for i, parts in enumerate(self._parts) if not parts]
        if missing:
            raise RuntimeError(f"no attention captured for layers {missing}: capture not active?")
        for layer, parts in enumerate(self._parts):
            parts.sort(key=lambda t: t[0])
            pos = 0
            for off, b, _ in parts:
                if off != pos:
                    raise RuntimeError(f"layer {layer}: attention for images from {off}, expected {pos}")
                pos += b
            if self._batch >= 0 and pos != self._batch:
                raise RuntimeError(f"layer {layer}: attention for {pos} of {self._batch} images")

        def layer_cat(layer: int, k) -> torch.Tensor:
            parts = self._parts[layer]
            return parts[0][2][k] if len(parts) == 1 else torch.cat([p[2][k] for p in parts])

        def rows(k) -> torch.Tensor:                       # (B, L, H, N)
            return torch.stack([layer_cat(l, k) for l in range(self.n_layers)], dim=1)

        focus, focus_norm = M.focus_from_rows(rows("entropy"))
        out = {"focus": focus, "focus_norm": focus_norm}
        for name, (_, _excl) in self._variants.items():
            theta = rows(("theta", name))
            b, n_l, h = theta.shape[:3]
            c = self._counts(name, theta.device).reshape(b, 1, 1, -1)
            agg = M.aggregate_theta(theta, c)
            agg["theta_chance"] = M.theta_chance(c.reshape(b, -1), self.weighted)[:, None, None].expand(b, n_l, h)
            for k in self.THETA_KEYS:
                out[(name, k)] = agg[k].float()
        # one (K, B, L, H) tensor, one device -> host copy
        keys = list(out)
        got = dict(zip(keys, torch.stack([out[k] for k in keys]).cpu().unbind(0)))
        foc = {k: got[k] for k in ("focus", "focus_norm")}
        res = {}
        for name in self._variants:
            res[name] = {k: got[(name, k)] for k in self.THETA_KEYS}
            res[name].update(foc)
        return res


class PatchScoreCollector:
    """Attention callback: the per-patch score s_i (``metrics.patch_scores``: theta_i averaged
    over heads) per captured layer, for masking (mask-eval) and guided MAE; optionally feeds the
    same maps to a :class:`MetricCollector` (the stage-fit metrics).

    Thread-safe, and a layer may arrive in slices of the batch (:func:`forward_on_cores`,
    :func:`current_slice_start`), as for :class:`MetricCollector`. ``captured0``: the 0-based
    layers, in the order :meth:`finish_batch` stacks them."""

    def __init__(self, captured0: list[int], gamma: float, weighted: bool, exclude_self: bool, metrics=None):
        self.captured0, self.gamma, self.weighted, self.exclude_self = captured0, gamma, weighted, exclude_self
        self.metrics = metrics
        self._lock = threading.Lock()

    def start_batch(self, counts: torch.Tensor) -> None:
        self.counts, self.scores = counts, {}          # scores: layer -> {slice start: (b, N)}
        if self.metrics is not None:
            self.metrics.start_batch({"real": (counts, self.exclude_self)})

    def __call__(self, layer: int, attn: torch.Tensor) -> None:
        if self.metrics is not None:
            self.metrics(layer, attn)
        s, b = current_slice_start() or 0, attn.shape[0]
        sc = M.patch_scores(attn, self.counts[s:s + b].to(attn.device), self.gamma, self.weighted,
                            self.exclude_self).float().cpu()
        with self._lock:
            self.scores.setdefault(layer, {})[s] = sc

    def finish_batch(self):
        """-> (scores (B, Lc, N) float32 on CPU, the MetricCollector's "real" metrics or None)."""
        def layer(l):
            parts = self.scores[l]
            out = torch.cat([parts[s] for s in sorted(parts)])
            if out.shape[0] != self.counts.shape[0]:
                raise RuntimeError(f"layer {l}: scores for {out.shape[0]} of {self.counts.shape[0]} images")
            return out
        sc = torch.stack([layer(l) for l in self.captured0], dim=1)    # (B, Lc, N)
        met = self.metrics.finish_batch()["real"] if self.metrics is not None else None
        return sc, met


def attention_maps(model: nn.Module, num_prefix_tokens: int, x: torch.Tensor,
                   layers: list[int] | None = None) -> dict[int, torch.Tensor]:
    """Full patch-block maps for a few images (figures, explorers, tests).

    x: (B, 3, S, S) -> {layer: (B, H, N, N) float32 on CPU}. Memory grows with layers x B x N^2:
    meant for single images, not data sets.
    """
    maps: dict[int, torch.Tensor] = {}

    def keep(layer: int, attn: torch.Tensor) -> None:
        maps[layer] = attn.float().cpu().clone()

    with torch.inference_mode(), capture_attention(model, num_prefix_tokens, keep, layers):
        model.forward_features(x)
    return maps
