"""Keypoints: SIFT images/s in one process vs the pipeline's worker processes, cold vs cached,
and whether keypoint extraction stalls the model.

Rows (same images; the pipeline is ``vitsift_core.data.batches.iter_batches``, as ``vitsift analyze``
uses it: decode, model input, SIFT, per-patch counts, in DataLoader worker processes):

  SIFT only          ``detect_keypoints`` on crops decoded beforehand, one process
  pipeline           decode + crop + SIFT + counts, in-process (0 workers) / W workers,
                     no cache / cache cold (fresh folder: compute and write) / cache warm (read)
  analysis ...       the model's analysis (``runs.batch_metrics``): on tensors prepared beforehand
                     (model only), and fed by the pipeline with W workers, cold and warm cache
                     (a warm cache skips SIFT only: decoding and resizing remain)

Ratios: ``sift_parallel_over_single`` (pipeline, W workers / 0 workers, no cache),
``sift_cached_over_cold`` (W workers, warm / cold cache), ``analysis_fed_over_model_only`` (cold
and warm; medians of per-round ratios): 1.0 means feeding the model costs it nothing. On a
machine with few cores the workers share them with the model, so this shows what SIFT and
decoding take away from it. Each pass starts its worker processes
afresh, as every chunk of ``vitsift analyze`` does, so start-up is included. Writes
``reports/bench/keypoints.json``.

    python benchmarks/bench_keypoints.py            # embedded model's input, batch 32
    python benchmarks/bench_keypoints.py --tiny     # seconds: checks that it runs
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import _common as C  # noqa: E402 - also puts the checkout on sys.path

import torch


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="embedded", help="model whose input and grid are used")
    p.add_argument("--random-init", action="store_true")
    p.add_argument("--images", default="auto", help="'auto' (Imagenette val if present, else samples), "
                   "'samples', 'imagenette:val' or a folder")
    p.add_argument("--n", type=int, default=64, help="images")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="pipeline worker processes")
    p.add_argument("--rounds", type=int, default=3, help="repeats of each row (median)")
    p.add_argument("--no-analysis", action="store_true", help="skip the rows that run the model")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None, help="default: <reports>/bench/keypoints.json (VITSIFT_REPORTS, else ./reports)")
    p.add_argument("--tiny", action="store_true", help="test_vit (random init), 8 images, batch 4, 1 round")
    a = p.parse_args(argv)
    if a.tiny:
        a.model, a.random_init, a.n, a.batch, a.rounds = "test_vit", True, 8, 4, 1
        a.workers = min(a.workers, 2)
        if a.images == "auto":
            a.images = "samples"
    return a


def timed(f, rounds: int = 1) -> float:
    ts = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return C.median(ts)


def main(argv: list[str] | None = None) -> int:
    from vitsift_core.data.sources import read_record
    from vitsift_core.data.images import model_input
    from vitsift_core.data.keypoints import KeypointCache, SiftParams, detect_keypoints
    from vitsift_core.model.registry import load_model
    from vitsift_core.data.batches import iter_batches

    args = parse(sys.argv[1:] if argv is None else argv)
    lm = load_model(args.model, control="random-init" if args.random_init else "none", device=args.device)
    spec, recs, n_distinct = C.pick_images(args.images, args.n)
    n = len(recs)
    sift = SiftParams()
    crops = [model_input(read_record(r), lm.data_config)[0] for r in recs]
    tmp = tempfile.TemporaryDirectory(prefix="vitsift-bench-kp-")

    def pipeline(workers: int, cache):
        def go():
            for _ in iter_batches(recs, lm.data_config, lm.grid, lm.patch_size, batch_size=args.batch,
                                  sift=sift, num_workers=workers, cache=cache, progress=False):
                pass
        return go

    caches = iter(range(10 ** 6))

    def fresh_cache() -> KeypointCache:
        return KeypointCache(Path(tmp.name) / f"cold{next(caches)}")

    print(f"keypoints: {n} images ({n_distinct} distinct) from {spec}, model input of {args.model} "
          f"({lm.data_config['input_size'][1]} px, grid {lm.grid[0]}x{lm.grid[1]}), batch {args.batch}, "
          f"{args.workers} worker process(es), {os.cpu_count()} CPUs; OpenCV SIFT defaults")
    t = {}
    detect_keypoints(crops[0], sift)         # warm-up (OpenCV's first call)
    t["sift_only"] = timed(lambda: [detect_keypoints(c, sift) for c in crops], args.rounds)
    t["pipe_0_none"] = timed(pipeline(0, None), args.rounds)
    t["pipe_w_none"] = timed(pipeline(args.workers, None), args.rounds)
    cold = []
    for _ in range(args.rounds):            # a fresh cache folder each time: really cold
        c = fresh_cache()
        cold.append(timed(pipeline(args.workers, c)))
    t["pipe_w_cold"] = C.median(cold)
    warm_cache = KeypointCache(Path(tmp.name) / "warm")
    pipeline(0, warm_cache)()                # fill it
    t["pipe_w_warm"] = timed(pipeline(args.workers, warm_cache), args.rounds)
    t["pipe_0_warm"] = timed(pipeline(0, warm_cache), args.rounds)

    if not args.no_analysis:
        from vitsift_core.model.collectors import MetricCollector
        from vitsift_core.experiments.analysis import batch_metrics, head_rows

        collector = MetricCollector(len(lm.model.blocks))
        v = ("none", False)
        pre = [b for b, _ in iter_batches(recs, lm.data_config, lm.grid, lm.patch_size, batch_size=args.batch,
                                         sift=sift, num_workers=0, cache=warm_cache, progress=False)]

        def analyse(batches):
            for b in batches:
                out = batch_metrics(lm, collector, b.tensors, {v: (b.counts, False)})[v]
                head_rows(b.ids, out, b.counts.numpy())

        def fed(cache):
            def go():
                analyse(b for b, _ in iter_batches(recs, lm.data_config, lm.grid, lm.patch_size,
                                                   batch_size=args.batch, sift=sift, num_workers=args.workers,
                                                   cache=cache, progress=False))
            return go

        analyse(pre[:1])                     # warm-up
        rounds = {"model_only": [], "fed_cold": [], "fed_warm": []}
        for _ in range(args.rounds):         # interleaved, so a change of load hits all three
            rounds["model_only"].append(timed(lambda: analyse(pre)))
            rounds["fed_cold"].append(timed(fed(fresh_cache())))
            rounds["fed_warm"].append(timed(fed(warm_cache)))
        t.update({k: C.median(v) for k, v in rounds.items()})
        paired = {k: C.median([m / f for m, f in zip(rounds["model_only"], rounds[k])]) for k in ("fed_cold", "fed_warm")}
    tmp.cleanup()

    ips = {k: n / v for k, v in t.items()}
    w = args.workers
    labels = [("sift_only", "SIFT only (crops decoded beforehand)", "1 process", "none"),
              ("pipe_0_none", "pipeline: decode + crop + SIFT", "in-process", "none"),
              ("pipe_w_none", "pipeline: decode + crop + SIFT", f"{w} workers", "none"),
              ("pipe_w_cold", "pipeline: decode + crop + SIFT", f"{w} workers", "cold"),
              ("pipe_w_warm", "pipeline: decode + crop + SIFT", f"{w} workers", "warm"),
              ("pipe_0_warm", "pipeline: decode + crop + SIFT", "in-process", "warm"),
              ("model_only", "analysis, tensors prepared beforehand", "-", "-"),
              ("fed_cold", "analysis fed by the pipeline", f"{w} workers", "cold"),
              ("fed_warm", "analysis fed by the pipeline", f"{w} workers", "warm")]
    rows = [[what, how, cache, ips[k]] for k, what, how, cache in labels if k in ips]
    print(C.table(rows, ["path", "processes", "keypoint cache", "images/s"]))
    rep = {
        "sift_parallel_over_single": ips["pipe_w_none"] / ips["pipe_0_none"],
        "sift_cached_over_cold": ips["pipe_w_warm"] / ips["pipe_w_cold"],
    }
    if "model_only" in ips:                  # medians of the per-round ratios
        rep["analysis_fed_over_model_only_cold"] = paired["fed_cold"]
        rep["analysis_fed_over_model_only_warm"] = paired["fed_warm"]
    for k, val in rep.items():
        print(f"{k}: {val:.2f}")
    rep.update({"images_per_s": ips, "seconds": t, "n_images": n, "n_distinct_images": n_distinct,
                "images": spec, "model": args.model, "batch": args.batch, "workers": w,
                "device": str(next(lm.model.parameters()).device), "machine": C.machine()})
    C.write_report(C.report_path(args.out, 'keypoints.json'), rep, ("sift_parallel_over_single", "sift_cached_over_cold",
                                         "analysis_fed_over_model_only_cold", "analysis_fed_over_model_only_warm"))
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
