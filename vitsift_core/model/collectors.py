"""Attention callbacks that reduce each captured map as the forward pass goes: per-head metrics
(Eq. 2-5) and the per-patch score s_i. Thread-safe; a layer may arrive in slices of the batch.
"""
from __future__ import annotations

import threading

import torch

from vitsift_core.method import metrics as M
from vitsift_core.model import native
from vitsift_core.model.cores import current_slice_start


class MetricCollector:
    """Per-head metrics of each layer's attention: for every variant (name -> (counts (B, N),
    exclude_self)) theta_kk/kn/nk/nn and theta_chance, and focus once, each (B, L, H).
    ``accumulate_mean``: also sums the maps over images, (L, H, N, N) float64 (content-free control).
    A slice covers ``attn.shape[0]`` images from :func:`current_slice_start` (or after the previous
    call's); results stay on the maps' device until :meth:`finish_batch`.
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
        self._on_device: dict[tuple[str, torch.device], torch.Tensor] = {}   # counts, theta weights
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
        """Two scratch tensors shaped like ``a``, per thread, kept between calls (no page faults)."""
        ws = getattr(self._local, "work", None)
        if ws is None or ws[0].shape != a.shape or ws[0].dtype != a.dtype or ws[0].device != a.device:
            ws = [torch.empty(a.shape, dtype=a.dtype, device=a.device) for _ in range(2)]
            self._local.work = ws
        return ws

    def _counts(self, name: str, device: torch.device) -> torch.Tensor:
        key = (name, device)
        if key not in self._on_device:
            # once per batch and variant, at the first layer; non_blocking: the host does not wait for
            # the device inside the capture (the source stays alive in self._variants)
            self._on_device[key] = self._variants[name][0].to(device, non_blocking=True)
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
        # per slice only the (b, H, N) row values; the means are taken once in finish_batch
        if native.usable(a):
            part = self._native_rows(a, off)
        else:
            work = self._workspace(a)
            part = {"entropy": self._entropy(a, work)}
            part.update(self._thetas(a, off, work))
        with self._lock:
            self._parts[layer].append((off, b, part))

    def _native_rows(self, a: torch.Tensor, off: int) -> dict:
        """Row entropies and every variant's theta_i of the slice a (b, H, N, N) in one compiled pass
        (:mod:`vitsift_core.model.native`): the same keys as the eager path."""
        b, names = a.shape[0], list(self._variants)
        key = ("theta weights", a.device)
        if names and key not in self._on_device:   # once per batch for every layer and slice (a race computes the same)
            w = [wt for name in names for wt in M.theta_weights(self._counts(name, a.device), self.weighted)]
            self._on_device[key] = torch.stack(w, dim=1)                          # (B, 2V, N)
        w = self._on_device[key][off:off + b] if names else a.new_zeros((b, 0, a.shape[-1]))   # no variant: focus only
        ent, theta = native.rows(a, w, [self._variants[n][1] for n in names], self.gamma, self.focus_kind == "minmax")
        return {"entropy": ent, **{("theta", n): theta[i] for i, n in enumerate(names)}}

    def _entropy(self, a: torch.Tensor, work: list[torch.Tensor]) -> torch.Tensor:
        """Row entropies of one slice a (b, H, N, N) -> (b, H, N); uses both scratch tensors."""
        return M.row_entropy(a, self.focus_kind, work=(work[0], work[1]))

    def _thetas(self, a: torch.Tensor, off: int, work: list[torch.Tensor]) -> dict:
        """theta_i of every variant for the slice a (b, H, N, N) of images off.. -> ("theta", name) ->
        (b, H, N); one comparison mask per exclude_self setting (in work[0]), one matmul per variant.
        Everything stays on a's device (no host copy until finish_batch)."""
        b = a.shape[0]
        masks: dict[bool, torch.Tensor] = {}
        out = {}
        for name, (_, excl) in self._variants.items():
            c = self._counts(name, a.device)[off:off + b].reshape(b, 1, -1)
            if excl not in masks:
                # 0/1 floats straight from the comparison: the same sets as the bool mask
                masks[excl] = M.attended_mask(a, self.gamma, excl, dtype=a.dtype,
                                              out=work[0] if not masks else None)
            out[("theta", name)] = M.theta_from_mask(masks[excl], c, self.weighted)
        return out

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
        for name in self._variants:
            theta = rows(("theta", name))
            b, n_l, h = theta.shape[:3]
            c = self._counts(name, theta.device).reshape(b, 1, 1, -1)
            agg = M.aggregate_theta(theta, c)
            chance = M.theta_chance(c.reshape(b, -1), self.weighted)
            agg["theta_chance"] = chance[:, None, None].expand(b, n_l, h)
            for k in self.THETA_KEYS:
                out[(name, k)] = agg[k].float()
        # one (K, B, L, H) tensor, one device -> host copy
        keys = list(out)
        got = dict(zip(keys, torch.stack([out[k] for k in keys]).cpu().unbind(0)))
        foc = {k: got[k] for k in ("focus", "focus_norm")}
        return {name: {**{k: got[(name, k)] for k in self.THETA_KEYS}, **foc} for name in self._variants}


class PatchScoreCollector:
    """The per-patch score s_i (``metrics.patch_scores``) per captured layer, for mask-eval and
    guided MAE; optionally feeds the maps to a :class:`MetricCollector` too. ``captured0``: the
    0-based layers, in the order :meth:`finish_batch` stacks them."""

    def __init__(self, captured0: list[int], gamma: float, weighted: bool, exclude_self: bool,
                 metrics=None):
        self.captured0, self.gamma, self.weighted = captured0, gamma, weighted
        self.exclude_self, self.metrics = exclude_self, metrics
        self._lock = threading.Lock()

    def start_batch(self, counts: torch.Tensor) -> None:
        self.counts, self.scores = counts, {}          # scores: layer -> {slice start: (b, N)}
        self._on_device: dict[torch.device, torch.Tensor] = {}
        if self.metrics is not None:
            self.metrics.start_batch({"real": (counts, self.exclude_self)})

    def __call__(self, layer: int, attn: torch.Tensor) -> None:
        if self.metrics is not None:
            self.metrics(layer, attn)
        s, b = current_slice_start() or 0, attn.shape[0]
        with self._lock:                               # counts copied to the device once per batch
            if attn.device not in self._on_device:
                self._on_device[attn.device] = self.counts.to(attn.device)
            counts = self._on_device[attn.device]
        # stays on the device: one host copy in finish_batch, none per layer
        sc = M.patch_scores(attn, counts[s:s + b], self.gamma, self.weighted, self.exclude_self).float()
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
        sc = torch.stack([layer(l) for l in self.captured0], dim=1).cpu()    # (B, Lc, N)
        met = self.metrics.finish_batch()["real"] if self.metrics is not None else None
        return sc, met
