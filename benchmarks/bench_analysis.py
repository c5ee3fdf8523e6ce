"""Analysis throughput: is the study's cost the model's forward pass and not much else?

Three ways (four on CPU) through the same images, batch size and device, timed in one process,
interleaved:

  (a) plain    the encoder's plain forward pass (``forward_features``), fused attention on
               (timm's default, PyTorch SDPA), torch's own threading: the reference.
  (b) analyze  what ``vitsift analyze`` does per batch (``runs.batch_metrics`` + ``runs.head_rows``):
               fused attention off, the batch split over the CPU cores (one thread each), every
               layer's map captured by the ``attn_drop`` hook and
               reduced at once to all per-head metrics (theta_KK/KN/NK/NN, chance, focus), every
               layer and head, then the per-(image, layer, head) rows.
  (p) split    (a) with the batch split over the CPU cores, one thread each, as (b) runs it
               (``cores.forward_on_cores``; CPU only): b/p is the analysis' own cost at
               equal threading, p/a what the split alone gains.
  (c) extract  a baseline one might write first: timm's ``timm.utils.AttentionExtract`` keeps
               every layer's full (B, H, T, T) map, then plain NumPy computes the same metrics from
               the stored maps, and the same rows.

Images/s: median over rounds (each round runs every variant over all batches, in rotating order);
b/a and b/c are medians of the per-round ratios. Before timing, (b) and (c) are checked to give
the same metrics. Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` around one batch; on
CPU a fresh subprocess per variant measures RSS (see ``_common``): "working" is the peak RSS
increase during one batch over the steady state (weights and input batch resident, one warm-up
batch done),
"peak" adds the bytes of the weights and the input batch, so it counts what CUDA's figure
counts. Writes ``reports/bench/analysis.json`` (``analysis_over_plain`` = b/a,
``analysis_over_attention_extract`` = b/c, the raw numbers) and prints the last run's beside it.

    python benchmarks/bench_analysis.py                     # embedded model, batch 32
    python benchmarks/bench_analysis.py --tiny              # seconds: test_vit, checks it runs
    python benchmarks/bench_analysis.py --malloc steady     # glibc keeps freed memory: no variant pays
                                                            # page faults for re-allocating its buffers
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import subprocess
import sys
import time

import _common as C  # noqa: E402 - also puts the checkout on sys.path
import end_to_end as E2E

import numpy as np
import torch

# b/c and b/p: issue 17's (CPU, fp32, on AVX2 and AVX-512 alike); b/a and memory: the first benchmark's
TARGETS = {"analysis_over_plain": (">=", 0.85), "analysis_over_attention_extract": (">=", 1.8),
           "analysis_over_plain_on_cores": (">=", 0.90), "memory_analysis_over_plain": ("<=", 1.2),
           "end_to_end_over_plain": E2E.TARGET}
VARIANTS = {"a": "plain forward (fused attention)", "p": "(a) split over cores like (b)",
            "b": "vitsift analyze path", "c": "AttentionExtract + NumPy"}
# (p) only where (b) splits the batch over cores (CPU); elsewhere it would be (a) again
CPU_ONLY = ("p",)
VARIANT = ("none", False)


# ------------------------------------------------------------------------------ the NumPy baseline
def numpy_head_metrics(a: np.ndarray, counts: np.ndarray, gamma: float = 1.0) -> dict[str, np.ndarray]:
    """DESIGN.md section 3 in plain NumPy, weighted theta, minmax focus, self included.

    a: (B, H, N, N) patch-block attention (rows = query patch i); counts: (B, N) keypoints per
    patch. Returns (B, H) float32 arrays.
    """
    b, h, n, _ = a.shape
    t = counts.astype(np.float32)[:, None, None, :]                   # t_j, (B, 1, 1, N)
    attended = a >= gamma * (a.sum(-1, keepdims=True) / n)             # S_i
    key_sum = (attended * t).sum(-1)                                   # sum_{j in S_i, t_j > 0} t_j
    n_non = (attended & (t == 0)).sum(-1)                              # |S_i^Non|
    den = n_non + key_sum
    with np.errstate(invalid="ignore", divide="ignore"):
        theta = np.where(den > 0, key_sum / den, np.nan)               # theta_i, (B, H, N)
        key_query = np.broadcast_to((counts > 0)[:, None, :], theta.shape)

        def mean_over(select):
            ok = select & ~np.isnan(theta)
            k = ok.sum(-1)
            return np.where(k > 0, np.where(ok, theta, 0.0).sum(-1) / np.maximum(k, 1), np.nan)

        kk, nk = mean_over(key_query), mean_over(~key_query)
        key_total = counts.sum(1).astype(np.float64)
        chance = key_total / ((counts == 0).sum(1) + key_total)
        shifted = a - a.min(-1, keepdims=True)                         # focus: minmax rows ...
        total = shifted.sum(-1, keepdims=True)
        q = shifted / total                                            # ... renormalised to sum 1
        ent = -(q * np.log(np.where(q > 0, q, 1.0))).sum(-1)            # Shannon entropy per row
        ent = np.where(total[..., 0] > 0, ent, np.nan)
        focus = np.nanmean(ent, -1)
    out = {"theta_kk": kk, "theta_kn": 1 - kk, "theta_nk": nk, "theta_nn": 1 - nk,
           "theta_chance": np.broadcast_to(chance[:, None], (b, h)), "focus": focus,
           "focus_norm": focus / math.log(n)}
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


# ------------------------------------------------------------------------------ the three variants
class Bench:
    """The three variants on one model; ``precision`` (infer.PRECISIONS) is the forward pass's, the
    same for all three (the metrics are float32 in each)."""

    def __init__(self, lm, gamma: float = 1.0, precision: str = "auto"):
        from timm.utils import AttentionExtract

        from vitsift_core.model.capture import fused_attention
        from vitsift_core.model.collectors import MetricCollector

        self.lm = lm
        self.model = lm.model
        self.dev = next(self.model.parameters()).device
        self.n_layers = len(self.model.blocks)
        self.gamma = gamma
        self.precision = precision
        self.collector = MetricCollector(self.n_layers, gamma=gamma)
        self._extract = None
        self._AttentionExtract = AttentionExtract
        self._fused = fused_attention

    def extractor(self):
        if self._extract is None:
            # timm's fx extraction traces the unfused branch: fused attention must be off while tracing
            with self._fused(self.model, False):
                self._extract = self._AttentionExtract(self.model)      # method='fx', '*attn.softmax'
        return self._extract

    def plain(self, x, counts, ids, split: bool = False):
        from vitsift_core.model.infer import infer

        with self._fused(self.model, True):
            return infer(self.model, x, precision=self.precision, split=split)     # split off: one call

    def plain_on_cores(self, x, counts, ids):
        return self.plain(x, counts, ids, split=True)

    def analyze(self, x, counts, ids):
        from vitsift_core.experiments.analysis import batch_metrics, head_rows

        out = batch_metrics(self.lm, self.collector, x, {VARIANT: (counts, False)}, self.precision)[VARIANT]
        head_rows(ids, out, counts.numpy())
        return out

    def extract(self, x, counts, ids):
        from vitsift_core.experiments.analysis import head_rows
        from vitsift_core.model.infer import forward_autocast

        ex = self.extractor()
        p = self.lm.num_prefix_tokens
        with torch.inference_mode(), forward_autocast(self.dev, self.precision), self._fused(self.model, False):
            maps = ex(x)                                                # name -> (B, H, T, T), all layers
        c = counts.numpy()
        per_layer = [numpy_head_metrics(m.float().cpu().numpy()[:, :, p:, p:], c, self.gamma)
                     for m in maps.values()]
        out = {k: torch.from_numpy(np.stack([d[k] for d in per_layer], axis=1)) for k in per_layer[0]}
        head_rows(ids, out, c)
        return out

    def run(self, name: str, batches) -> None:
        f = {"a": self.plain, "p": self.plain_on_cores, "b": self.analyze, "c": self.extract}[name]
        for x, counts, ids in batches:
            f(x, counts, ids)
        if self.dev.type == "cuda":
            torch.cuda.synchronize()


# ------------------------------------------------------------------------------ setup
def load(args):
    from vitsift_core.model.registry import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    control = "random-init" if args.random_init else "none"
    lm = load_model(args.model, control=control, device=args.device)
    return lm


def make_batches(args, lm, n_batches: int | None = None):
    """[(x (B, 3, S, S) on the device, counts (B, N) int64 on CPU, ids)] and the image spec used."""
    from vitsift_core.data.sources import read_record
    from vitsift_core.data.images import model_input
    from vitsift_core.data.keypoints import KeypointCache, keypoint_counts

    n_batches = n_batches or args.batches
    spec, recs, n_distinct = C.pick_images(args.images, args.batch * n_batches)
    cache = KeypointCache()
    xs, cs, ids = [], [], []
    for r in recs:
        crop, x = model_input(read_record(r), lm.data_config)
        t, _ = keypoint_counts(crop, lm.grid, lm.patch_size, cache=cache)
        xs.append(x)
        cs.append(torch.from_numpy(t))
        ids.append(r.id)
    dev = next(lm.model.parameters()).device
    out = []
    for i in range(0, len(recs), args.batch):
        out.append((torch.stack(xs[i:i + args.batch]).to(dev), torch.stack(cs[i:i + args.batch]),
                    ids[i:i + args.batch]))
    return out, spec, n_distinct


def check_agreement(bench: Bench, batch) -> dict:
    """(b) against (c) on one batch: max |difference| of the theta metrics and of focus.

    Raises if they disagree on which values are undefined (NaN). Small theta differences are
    ties at the detection line: NumPy and torch sum a row in different orders, so an entry
    within a rounding error of the line can fall on either side.
    """
    x, counts, ids = batch
    b = bench.analyze(x, counts, ids)
    c = bench.extract(x, counts, ids)
    worst = {"theta": 0.0, "focus": 0.0}
    for k in b:
        bb, cc = b[k].numpy(), c[k].numpy()
        if not np.array_equal(np.isnan(bb), np.isnan(cc)):
            raise AssertionError(f"{k}: (b) and (c) disagree on which values are undefined")
        ok = ~np.isnan(bb)
        fam = "focus" if k.startswith("focus") else "theta"
        if ok.any():
            worst[fam] = max(worst[fam], float(np.abs(bb[ok] - cc[ok]).max()))
    return worst


def precision_effect(bench: Bench, batches) -> dict:
    """What ``bench.precision`` changes in the numbers: (b) under it vs (b) with an fp32 forward,
    on every benchmark batch. Per metric: mean and max |difference| over (image, layer, head), and
    the max |difference| of the per-layer means (over images and heads; what the figures plot)."""
    fp32 = Bench(bench.lm, bench.gamma, "fp32")
    got = {"test": [bench.analyze(*b) for b in batches], "fp32": [fp32.analyze(*b) for b in batches]}
    out = {}
    for k in ("theta_kk", "theta_nk", "focus"):
        a, b = (torch.cat([o[k] for o in got[v]]).numpy() for v in ("test", "fp32"))   # (B, L, H)
        ok = ~np.isnan(a) & ~np.isnan(b)
        d = np.abs(a - b)[ok]
        lm_a, lm_b = np.nanmean(a, axis=(0, 2)), np.nanmean(b, axis=(0, 2))
        out[k] = {"mean_abs": float(d.mean()), "max_abs": float(d.max()),
                  "layer_mean_max_abs": float(np.abs(lm_a - lm_b).max()),
                  "nan_mismatch": int((np.isnan(a) != np.isnan(b)).sum())}
    return out


# ------------------------------------------------------------------------------ memory
def tensor_bytes(model, batches) -> int:
    n = sum(p.numel() * p.element_size() for p in model.parameters())
    n += sum(b.numel() * b.element_size() for b in model.buffers())
    x, counts, _ = batches[0]
    return n + x.numel() * x.element_size() + counts.numel() * counts.element_size()


def memory_child(args) -> None:
    """(in a fresh process) one batch of one variant; prints a JSON line with RSS figures."""
    lm = load(args)
    batches, _, _ = make_batches(args, lm, n_batches=1)
    bench = Bench(lm, args.gamma, args.precision)
    # a first pass allocates what stays for good (thread pools, BLAS/oneDNN buffers, the fx graph):
    # steady state, measured from after it
    bench.run(args.memory_child, batches)
    gc.collect()
    C.malloc_trim()
    base = C.rss()
    reset = C.reset_peak_rss()
    bench.run(args.memory_child, batches)
    peak = C.peak_rss()
    working = peak - base
    print("MEMORY " + json.dumps({"variant": args.memory_child, "working_bytes": working,
                                  "tensor_bytes": tensor_bytes(lm.model, batches),
                                  "peak_bytes": tensor_bytes(lm.model, batches) + working,
                                  "reset_ok": reset}))


def cpu_memory(args, argv: list[str]) -> dict:
    """A fresh process per variant, one after the other; with --tiny all at once (each figure is its own
    process's RSS, so only the wall time shares the cores: the tiny check's imports then overlap)."""
    def child(v: str) -> subprocess.Popen:
        cmd = [sys.executable, os.path.abspath(__file__), *argv, "--memory-child", v]
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**{k: v for k, v in os.environ.items() if k not in C.STEADY_MALLOC_ENV},
                                     **C.MALLOC_ENV})

    def result(v: str, p: subprocess.Popen) -> dict:
        out, err = p.communicate()
        line = [ln for ln in out.splitlines() if ln.startswith("MEMORY ")]
        if p.returncode != 0 or not line:
            raise RuntimeError(f"memory child for ({v}) failed:\n{out[-2000:]}\n{err[-4000:]}")
        return json.loads(line[-1][len("MEMORY "):])

    if args.tiny:
        procs = {v: child(v) for v in VARIANTS}
        return {v: result(v, p) for v, p in procs.items()}
    return {v: result(v, child(v)) for v in VARIANTS}


def cuda_memory(bench: Bench, batches) -> dict:
    res = {}
    for v in [v for v in VARIANTS if v not in CPU_ONLY]:
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        bench.run(v, batches[:1])
        peak = torch.cuda.max_memory_allocated()
        res[v] = {"variant": v, "peak_bytes": peak, "working_bytes": peak - base, "tensor_bytes": base}
    return res


# ------------------------------------------------------------------------------ main
def time_rounds(bench: Bench, batches, timed: list[str], rounds: int) -> dict[str, dict[str, list[float]]]:
    """After one warm-up batch of each (allocator, oneDNN primitives, fx graph), ``rounds`` rounds, each
    every variant over all batches in rotating order. Per variant and round: "wall" and "cpu" seconds
    (all threads), "faults" (minor page faults) and "system" (system CPU seconds) per image."""
    for v in timed:
        bench.run(v, batches[:1])
    n_img = sum(len(ids) for _, _, ids in batches)
    out: dict[str, dict[str, list[float]]] = {k: {v: [] for v in timed} for k in ("wall", "cpu", "faults", "system")}
    for r in range(rounds):
        for v in timed[r % len(timed):] + timed[:r % len(timed)]:
            (f0, s0), t0, c0 = C.faults_and_system_time(), time.perf_counter(), time.process_time()
            bench.run(v, batches)
            out["wall"][v].append(time.perf_counter() - t0)
            out["cpu"][v].append(time.process_time() - c0)
            f1, s1 = C.faults_and_system_time()
            out["faults"][v].append((f1 - f0) / n_img)
            out["system"][v].append((s1 - s0) / n_img)
    return out


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="embedded", help="model spec (vitsift_core.model.registry.load_model)")
    p.add_argument("--random-init", action="store_true", help="random weights (timing only; no weights file)")
    p.add_argument("--images", default="auto", help="'auto' (Imagenette val if present, else samples), "
                   "'samples', 'imagenette:val' or a folder")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--batches", type=int, default=2, help="batches per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--gamma", type=float, default=1.0)
    from vitsift_core.model.infer import PRECISIONS

    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="forward pass of all three variants (vitsift analyze --precision): auto = bf16 "
                        "autocast on CUDA, fp32 on CPU")
    p.add_argument("--skip", default="", help="variants not to time, e.g. 'c'")
    p.add_argument("--only-native-bf16", action="store_true",
                   help="with --precision bf16 on a CPU: run only if the CPU has a native bf16 matmul "
                        "(AVX512-BF16/AMX); elsewhere bf16 is emulated and one pass takes > 20 min")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--malloc", default="default", choices=("default", "steady"),
                   help="glibc's allocator as a user gets it, or 'steady': freed memory kept, so no variant "
                        "pays page faults for re-allocating its buffers (also in the end-to-end processes; "
                        "see _common.STEADY_MALLOC_ENV)")
    p.add_argument("--breakdown", action="store_true", help="also time (b) step by step, per layer: "
                   "forward with fused attention off, capture, theta, focus, bookkeeping (CPU time)")
    p.add_argument("--out", default=None, help="default: <reports>/bench/analysis.json, analysis-<precision>.json "
                   "with --precision fp32|bf16 (VITSIFT_REPORTS, else ./reports)")
    p.add_argument("--e2e-limit", type=int, default=0, help="also the end-to-end row (benchmarks/end_to_end.py): "
                   "`vitsift analyze` as a whole process on this many images vs a plain forward on them (0: off)")
    p.add_argument("--only-e2e", action="store_true", help="the end-to-end row alone (with --e2e-limit)")
    p.add_argument("--tiny", action="store_true",
                   help="test_vit (random init), batch 4, 1 batch, 1 round: checks that it runs")
    p.add_argument("--memory-child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.tiny:
        a.model, a.random_init, a.batch, a.batches, a.rounds, a.breakdown = "test_vit", True, 4, 1, 1, True
        if a.images == "auto":
            a.images = "samples"
    return a


def malloc_suffix(args) -> str:
    """Report file names' suffix: each allocator's runs are compared with the last of their kind."""
    return "-steady-malloc" if args.malloc == "steady" else ""


def target_line(key: str, value: float | None) -> str:
    op, thr = TARGETS[key]
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "not measured"
    ok = value >= thr if op == ">=" else value <= thr
    return f"{value:.3f} (target {op} {thr}: {'met' if ok else 'NOT met'})"


def skip_emulated_bf16(args, dev) -> bool:
    """True (and says so) when ``--only-native-bf16`` asks to skip a bf16 pass this CPU would emulate."""
    from vitsift_core.model import infer as I

    if not (args.only_native_bf16 and args.precision == "bf16" and dev.type == "cpu"):
        return False
    if I.native_cpu_bf16() is False:
        print(f"bf16 rows skipped: this CPU has none of {', '.join(I.BF16_CPU_FLAGS)} (lscpu), so a bf16 "
              "forward is emulated (> 20 min here against ~3 for fp32); run without --only-native-bf16 "
              "to time it anyway")
        return True
    return False


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    if args.memory_child:
        memory_child(args)
        return 0
    if args.malloc == "steady" and not C.steady_malloc():
        raise SystemExit("--malloc steady needs glibc (mallopt)")
    lm = load(args)
    if skip_emulated_bf16(args, next(lm.model.parameters()).device):
        return 0
    bench = Bench(lm, args.gamma, args.precision)
    if args.only_e2e:
        return only_end_to_end(args, bench)
    batches, spec, n_distinct = make_batches(args, lm)
    dev = bench.dev
    timed = [v for v in VARIANTS if v not in args.skip and (dev.type == "cpu" or v not in CPU_ONLY)]
    from vitsift_core.model.infer import capture_micro_batch

    n_heads = lm.model.blocks[0].attn.num_heads
    print(f"analysis throughput: model {args.model}{' (random init)' if args.random_init else ''} "
          f"[{lm.arch}, {bench.n_layers} layers x {n_heads} heads, {lm.num_patches} patches], "
          f"batch {args.batch}, {args.batches} batch(es) x {args.rounds} round(s), device {dev}"
          f"{f' ({torch.get_num_threads()} threads)' if dev.type == 'cpu' else ''}, "
          f"attention slices {capture_micro_batch(dev) or 'whole batch'}; images: {spec} "
          f"({args.batch * args.batches} images, {n_distinct} distinct)")
    diff = check_agreement(bench, batches[0]) if "c" in timed else None
    load0 = C.machine().get("load_avg_1m")
    rounds = time_rounds(bench, batches, timed, args.rounds)
    times, cpu = rounds["wall"], rounds["cpu"]
    faults = {v: C.median(f) for v, f in rounds["faults"].items()}        # per image, median over rounds
    system = {v: C.median(x) for v, x in rounds["system"].items()}
    n_img = args.batch * args.batches
    ips = {v: n_img / C.median(ts) for v, ts in times.items()}
    cpu_per_img = {v: C.median(ts) / n_img for v, ts in cpu.items()}

    def ratio(num: str, den: str, t=times) -> float | None:
        if num not in t or den not in t:
            return None
        return C.median([td / tn for tn, td in zip(t[num], t[den])])

    mem = {}
    if not args.no_memory:
        if dev.type == "cuda":
            mem = cuda_memory(bench, batches)
        elif C.cpu_memory_supported():
            mem = cpu_memory(args, [a for a in argv if a != "--no-memory"])
    mib = 2 ** 20
    rows = []
    for v in [v for v in VARIANTS if v in times or v in mem]:
        m = mem.get(v, {})
        rows.append([f"({v}) {VARIANTS[v]}", ips.get(v), cpu_per_img.get(v),
                     system.get(v), faults.get(v),
                     m.get("peak_bytes", float("nan")) / mib, m.get("working_bytes", float("nan")) / mib])
    print(f"allocator: {args.malloc}" + (" (glibc keeps freed memory: no page faults for re-allocated buffers)"
                                         if args.malloc == "steady" else " (glibc's own)"))
    print(C.table(rows, ["variant", "images/s", "CPU s/image", "system s/image", "page faults/image",
                         "peak MiB", "working MiB"]))
    mem_ratio = mem["b"]["peak_bytes"] / mem["a"]["peak_bytes"] if "a" in mem and "b" in mem else None
    work_ratio = mem["b"]["working_bytes"] / mem["a"]["working_bytes"] if "a" in mem and "b" in mem else None
    b_a, b_c = ratio("b", "a"), ratio("b", "c")
    print(f"b/a throughput: {target_line('analysis_over_plain', b_a)}")
    print(f"b/c throughput: {target_line('analysis_over_attention_extract', b_c)}")
    b_p, p_a = ratio("b", "p"), ratio("p", "a")
    if b_p is not None:
        print(f"b/p throughput: {target_line('analysis_over_plain_on_cores', b_p)} (the analysis at equal "
              f"threading); p/a: {p_a:.3f} (what splitting "
              f"the batch over {torch.get_num_threads()} cores gains a plain forward)")
    print(f"b/a peak memory: {target_line('memory_analysis_over_plain', mem_ratio)}"
          + (f"; working memory b/a {work_ratio:.2f}" if work_ratio else ""))
    if dev.type == "cpu" and "a" in cpu:
        print(f"CPU time (all threads) b/a {ratio('b', 'a', cpu):.3f}"
              + (f", b/c {ratio('b', 'c', cpu):.3f}" if "c" in cpu else "")
              + f" (throughput-equivalent; less sensitive to other load); "
              f"1-min load average {load0} before timing, {C.machine().get('load_avg_1m')} after, "
              f"on {os.cpu_count()} CPUs")
    if diff is not None:
        print(f"(b) and (c) give the same metrics: max |difference| theta {diff['theta']:.2g}, "
              f"focus {diff['focus']:.2g}")
    bd = None
    if args.breakdown:
        from breakdown import HEADER, breakdown, table_rows

        bd = breakdown(bench, batches, args.rounds)
        print(f"(b) step by step, CPU time (all threads), median of {args.rounds} round(s):")
        print(C.table(table_rows(bd), HEADER))
    e2e = end_to_end_row(args, bench, spec)
    from vitsift_core.model.infer import forward_precision
    forward = forward_precision(dev, args.precision)
    effect = None
    if forward != "fp32":
        effect = precision_effect(bench, batches)
        print(f"{forward} vs fp32 forward, (b) on the same "
              f"{n_img} images: " + "; ".join(
                  f"{k} |diff| mean {e['mean_abs']:.2g}, max {e['max_abs']:.2g}, layer means max "
                  f"{e['layer_mean_max_abs']:.2g}" + (f", {e['nan_mismatch']} NaN mismatches" if e['nan_mismatch'] else "")
                  for k, e in effect.items()))
    report = {
        "analysis_over_plain": b_a, "analysis_over_attention_extract": b_c,
        "memory_analysis_over_plain": mem_ratio, "working_memory_analysis_over_plain": work_ratio,
        "targets": {k: f"{op} {thr}" for k, (op, thr) in TARGETS.items()},
        "analysis_over_plain_on_cores": b_p, "plain_on_cores_over_plain": p_a,
        "cpu_analysis_over_plain": ratio("b", "a", cpu), "cpu_analysis_over_attention_extract": ratio("b", "c", cpu),
        "images_per_s": ips, "cpu_seconds_per_image": cpu_per_img, "seconds_per_round": times,
        "cpu_seconds_per_round": cpu, "malloc": args.malloc,
        "page_faults_per_image": faults, "system_seconds_per_image": system,
        "load_avg_1m": {"before": load0, "after": C.machine().get("load_avg_1m")},
        "memory": mem, "breakdown": bd, "end_to_end": e2e,
        "end_to_end_over_plain": e2e and e2e["end_to_end_over_plain"],
        "memory_method": ("torch.cuda.max_memory_allocated" if dev.type == "cuda" else
                          "RSS in a fresh process per variant: working = VmHWM - VmRSS around one batch; "
                          "peak = working + bytes of weights and input batch"),
        "max_abs_diff_b_vs_c": diff, "precision": args.precision,
        "forward": forward, "precision_effect_vs_fp32": effect, "model": args.model, "arch": lm.arch, "random_init": args.random_init,
        "batch": args.batch, "batches": args.batches, "rounds": args.rounds, "device": str(dev),
        "micro_batch": capture_micro_batch(dev), "images": spec, "n_images": n_img,
        "n_distinct_images": n_distinct, "machine": C.machine(),
    }
    # one file per forward precision and allocator, so each run is compared with the last of its kind
    name = ("analysis" + ("" if args.precision == "auto" else f"-{args.precision}")
            + malloc_suffix(args) + ".json")
    C.write_report(C.report_path(args.out, name), report, ("analysis_over_plain", "analysis_over_attention_extract",
                                            "memory_analysis_over_plain", "end_to_end_over_plain"))
    return 0


def end_to_end_row(args, bench: Bench, spec: str) -> dict | None:
    """With ``--e2e-limit N``: (e) vitsift analyze as a process vs (f) (a) on the same N images; printed."""
    if not args.e2e_limit:
        return None
    args.images_spec = spec
    load0 = C.machine().get("load_avg_1m")
    split = (lambda x: bench.plain_on_cores(x, None, None)) if bench.dev.type == "cpu" else None
    row = E2E.end_to_end(args, bench.lm, lambda x: bench.plain(x, None, None), args.e2e_limit, split)
    row["load_avg_1m"] = {"before": load0, "after": C.machine().get("load_avg_1m")}
    print("\n".join(E2E.report_lines(row)) + f" (1-min load average {load0} before, "
          f"{row['load_avg_1m']['after']} after, on {os.cpu_count()} CPUs; allocator: {args.malloc})")
    return row


def only_end_to_end(args, bench: Bench) -> int:
    """``--only-e2e``: the end-to-end row alone, written to <reports>/bench/end_to_end.json."""
    if not args.e2e_limit:
        raise SystemExit("--only-e2e needs --e2e-limit N")
    spec, _, _ = C.pick_images(args.images, 1)
    row = end_to_end_row(args, bench, spec)
    name = "end_to_end" + malloc_suffix(args) + ".json"
    C.write_report(C.report_path(args.out, name), {**row, "machine": C.machine(), "model": args.model,
                                                   "malloc": args.malloc},
                   ("end_to_end_over_plain", "analyze_images_per_s", "plain_images_per_s"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
