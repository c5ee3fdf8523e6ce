"""Where the analysis path's time goes, per layer (``bench_analysis.py --breakdown``, issue 17).

CPU seconds (all threads of the process: less sensitive to other programs than wall time) per
image, for the same batches as the benchmark:

  forward, fused attention on    (p): the plain forward split over the cores like (b)
  forward, fused attention off   the same without PyTorch SDPA: the (B, H, T, T) map is materialised
  capture                        (b)'s forward with a callback that does nothing, minus the row
                                 above: the attn_drop hooks, the attention slices, stopping early
  theta                          ``attended_mask`` + ``theta_from_mask`` inside the collector
  focus                          ``row_entropy`` inside the collector
  theta + focus, compiled        ``native.rows``: both in one C kernel (model/native.py), used
                                 instead of the two rows above where it is built
  bookkeeping                    ``finish_batch`` (means, chance, one host copy) + ``head_rows``
  rest of (b)                    (b) minus all of the above (collector glue, locks, noise)

theta and focus are timed inside the pool threads with ``time.thread_time`` by wrapping the
metric functions the collector calls (so the same code times any version of the collector).
"""
from __future__ import annotations

import functools
import threading
import time

import torch

from vitsift_core.method import metrics as M
from vitsift_core.model import native

STEPS = ("forward, fused attention on (p)", "forward, fused attention off", "capture (hooks, slices)",
         "theta", "focus", "theta + focus, compiled kernel", "bookkeeping (finish, rows)", "rest of (b)",
         "(b) analyze path, total")
_TIMED = [(M, "row_entropy", "focus"), (M, "attended_mask", "theta"), (M, "theta_from_mask", "theta"),
          (native, "rows", "native")]


class _ThreadTimes:
    """Wraps the metric functions the collector calls; sums each one's thread CPU time."""

    def __init__(self):
        self.seconds = {"theta": 0.0, "focus": 0.0, "native": 0.0}
        self._lock = threading.Lock()
        self._saved = {}

    def __enter__(self):
        for mod, name, step in _TIMED:
            fn = getattr(mod, name)
            self._saved[(mod, name)] = fn

            def timed(*a, _fn=fn, _step=step, **k):
                t0 = time.thread_time()
                try:
                    return _fn(*a, **k)
                finally:
                    dt = time.thread_time() - t0
                    with self._lock:
                        self.seconds[_step] += dt
            setattr(mod, name, functools.wraps(fn)(timed))
        return self

    def __exit__(self, *exc):
        for (mod, name), fn in self._saved.items():
            setattr(mod, name, fn)


def _cpu(fn) -> float:
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def breakdown(bench, batches, rounds: int) -> dict:
    """-> {"cpu_ms_per_image": step -> median over rounds, "per_layer_ms": step -> the same / L,
    "share_of_p": step -> fraction of the plain split forward}."""
    from vitsift_core.experiments.analysis import head_rows
    from vitsift_core.model.infer import infer

    lm, model, prec = bench.lm, bench.model, bench.precision
    variant = ("none", False)
    n_img = sum(x.shape[0] for x, _, _ in batches)

    def fused_off():
        with bench._fused(model, False):
            for x, _, _ in batches:
                infer(model, x, precision=prec, split=True)

    def capture_only():
        for x, _, _ in batches:
            infer(lm, x, collector=lambda layer, attn: None, precision=prec, micro_batch="auto",
                  stop_early=True)

    per_round = []
    for _ in range(rounds):
        r = {STEPS[0]: _cpu(lambda: bench.run("p", batches)), STEPS[1]: _cpu(fused_off)}
        r["capture_total"] = _cpu(capture_only)
        book = 0.0
        with _ThreadTimes() as tt:          # analysis.batch_metrics' body, split to time finish_batch
            t0 = time.process_time()
            for x, counts, ids in batches:
                bench.collector.start_batch({variant: (counts, False)})
                infer(lm, x, collector=bench.collector, precision=prec, micro_batch="auto", stop_early=True)
                t1 = time.process_time()
                out = bench.collector.finish_batch()[variant]
                head_rows(ids, out, counts.numpy())
                book += time.process_time() - t1
            total = time.process_time() - t0
        r[STEPS[2]] = r.pop("capture_total") - r[STEPS[1]]
        r[STEPS[3]], r[STEPS[4]], r[STEPS[5]] = tt.seconds["theta"], tt.seconds["focus"], tt.seconds["native"]
        r[STEPS[6]] = book
        r[STEPS[7]] = total - sum(r[s] for s in STEPS[1:7])
        r[STEPS[8]] = total
        per_round.append(r)
    med = {s: float(torch.tensor([r[s] for r in per_round]).median()) / n_img * 1e3 for s in STEPS}
    n_layers = bench.n_layers
    p = med[STEPS[0]]
    return {"cpu_ms_per_image": med, "per_layer_ms": {s: v / n_layers for s, v in med.items()},
            "share_of_p": {s: v / p if p > 0 else float("nan") for s, v in med.items()},
            "rounds": rounds, "n_images": n_img, "n_layers": n_layers}


def table_rows(bd: dict) -> list[list]:
    return [[s, bd["cpu_ms_per_image"][s], bd["per_layer_ms"][s], 100 * bd["share_of_p"][s]] for s in STEPS]


HEADER = ["step", "CPU ms/image", "CPU ms/image/layer", "% of (p)"]
