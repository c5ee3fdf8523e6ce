"""Explorer latency: how long one slider move or click takes to redraw, after the model ran once.

Drives the explorers' widgets the way the front-end does (setting a widget's value runs its
observer, which recomputes from the cached attention, renders the PNGs and sets the output
widgets), 20 interactions of each kind, and reports the median, 90th percentile and maximum in ms
against the 300 ms budget of issue 7. Every interaction uses a new value (a layer, a patch, a gamma
or SIFT threshold not seen before where the kind allows), so caches of earlier results do not help.

    python benchmarks/bench_explorers.py                 # embedded model, Imagenette val (else samples)
    python benchmarks/bench_explorers.py --images samples --stage-images 6

Masking interactions run the classifier on the masked input (a forward pass by design, not
cached attention); they are reported separately. Without a cached probe the classifier is the
embedded backbone with a random 10-class linear head, which costs the same time as the probe.
Writes reports/bench/explorers.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BUDGET_MS = 300.0


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return 1000 * (time.perf_counter() - t0)


def summary(ms: list[float]) -> dict:
    s = sorted(ms)
    return {"n": len(s), "median_ms": round(statistics.median(s), 1),
            "p90_ms": round(s[min(len(s) - 1, int(0.9 * len(s)))], 1), "max_ms": round(s[-1], 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--images", default="auto", help="'auto' (Imagenette val if present, else samples) or a spec")
    ap.add_argument("--stage-images", type=int, default=6, help="image set of the stage explorer")
    ap.add_argument("-n", type=int, default=20, help="interactions per kind")
    ap.add_argument("--out", default=str(ROOT / "reports" / "bench" / "explorers.json"))
    a = ap.parse_args(argv)

    import numpy as np
    import torch

    from vitsift_core.model.registry import load_model
    from vitsift_core.experiments.study import choose_images
    from vitsift_core.widgets import core as C
    from vitsift_core.widgets.ui import AttentionExplorer, MaskingExplorer, StageExplorer, probe_classifier

    spec = a.images
    if spec == "auto":
        spec, _ = choose_images("imagenette:val")
    lm = load_model(a.model)
    lib = C.ImageLibrary.from_spec(lm, spec, max(a.stage_images, 2), keep=a.stage_images + 4)
    ids = lib.ids()
    print(f"model {a.model}, images {spec} ({len(ids)}), torch threads {torch.get_num_threads()}, "
          f"load {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
    rng = np.random.default_rng(0)
    res: dict[str, dict] = {}

    t_model = timed(lambda: lib.get(ids[0]))
    e = AttentionExplorer(lib, image=ids[0])
    img = lib.get(ids[0])
    size = img.crop.shape[0] * e.scale
    n = a.n

    def run(name, setter, values):
        ms = [timed(lambda v=v: setter(v)) for v in values]
        res[name] = summary(ms)
        print(f"  {name:34s} median {res[name]['median_ms']:7.1f} ms   p90 {res[name]['p90_ms']:7.1f}   "
              f"max {res[name]['max_ms']:7.1f}", flush=True)

    print(f"attention explorer (model ran once: {t_model / 1000:.1f} s for {ids[0]})")
    # each step moves to another value than the current one (a widget set to its own value does nothing)
    start = e.w_layer.value
    run("attention: layer slider", lambda l: setattr(e.w_layer, "value", l),
        [(start + i) % img.n_layers + 1 for i in range(n)])
    pts = rng.uniform(0, size, (n, 2))
    run("attention: click a patch", lambda p: e._on_click({"dataX": float(p[0]), "dataY": float(p[1])}), pts)
    heads = [0] + list(range(1, img.n_heads + 1))          # 0: mean over heads
    first = heads.index(e.w_head.value)
    run("attention: head dropdown", lambda h: setattr(e.w_head, "value", h),
        [heads[(first + 1 + i) % len(heads)] for i in range(n)])
    # gammas and thresholds never used before (1.0 and 0.04, the starting values, are avoided)
    run("attention: gamma slider (new gamma)", lambda g: setattr(e.w_gamma, "value", g),
        [round(0.55 + 0.1 * i, 2) for i in range(n)])
    run("attention: SIFT threshold (new value)", lambda t: setattr(e.w_threshold, "value", t),
        [round(0.0125 + 0.005 * i, 4) for i in range(n)])
    e.w_image.value = ids[1]          # analyse a second image once
    run("attention: switch to a cached image", lambda i: setattr(e.w_image, "value", ids[i % 2]), range(n))
    n_fwd_attention = lib.n_forward

    print(f"stage explorer ({a.stage_images} images)")
    t0 = time.perf_counter()
    s = StageExplorer(lib, n_images=a.stage_images)
    t_stage_build = time.perf_counter() - t0
    run("stages: gamma slider (new gamma)", lambda g: setattr(s.w_gamma, "value", g),
        [round(0.65 + 0.1 * i, 2) for i in range(n)])
    run("stages: SIFT threshold (new value)", lambda t: setattr(s.w_threshold, "value", t),
        [round(0.0135 + 0.005 * i, 4) for i in range(n)])

    clf = probe_classifier(lm)
    clf_note = "embedded-probe (cached)"
    if clf is None:
        class _Head:
            def __init__(self):
                g = torch.Generator().manual_seed(0)
                self.lm, self.classes = lm, [f"class {i}" for i in range(10)]
                self.w = torch.randn(lm.model.embed_dim, 10, generator=g)

            def logits(self, tok):
                return tok[:, 0] @ self.w
        clf = _Head()
        clf_note = "backbone + random 10-class linear head (no probe cached; same cost as the probe)"
    print(f"masking explorer (classifier: {clf_note})")
    m = MaskingExplorer(lib, image=ids[0], classifier=clf)
    # alternate the ratio slider and the order buttons: every step is one widget change and a
    # masked set not seen before (the ratio rises every second step)
    orders = ["top", "bottom", "random", "keypoints"]
    steps, o, r = [], 0, 10
    for i in range(n):
        if i % 2 == 0:
            r += 5
            steps.append(("ratio", r))
        else:
            o = (o + 1) % 4
            steps.append(("order", orders[o]))

    shown: list[float] = []
    m.picture.observe(lambda ch: shown.append(time.perf_counter()), names="value")

    def step(sv):
        (m.w_ratio if sv[0] == "ratio" else m.w_order).value = sv[1]

    def step_image(sv):         # time until the masked image is set (before the classifier runs)
        t0 = time.perf_counter()
        shown.clear()
        step(sv)
        return 1000 * (shown[0] - t0)
    ms_image: list[float] = []
    run("masking: order / ratio (new mask: 1 forward)", lambda sv: ms_image.append(step_image(sv)), steps)
    res["masking: masked image shown (same steps)"] = summary(ms_image)
    print(f"  {'masking: masked image shown':34s} median {res['masking: masked image shown (same steps)']['median_ms']:7.1f} ms"
          "   (the top-5 table follows after the forward pass)")
    m.update(order="top", ratio=10.0)
    run("masking: the same steps again (cached)", step, steps)

    interactive = [k for k in res if "forward" not in k]
    worst = max(res[k]["median_ms"] for k in interactive)
    out = {"model": a.model, "images": spec, "stage_images": a.stage_images, "n_per_kind": n,
           "budget_ms": BUDGET_MS, "model_forward_s": round(t_model / 1000, 2),
           "stage_explorer_build_s": round(t_stage_build, 1), "model_runs": lib.n_forward,
           "model_runs_after_attention": n_fwd_attention, "classifier": clf_note, "results": res,
           "worst_median_from_cache_ms": worst, "within_budget": worst <= BUDGET_MS,
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                       "load_avg_1m": round(os.getloadavg()[0], 2)},
           "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    p = Path(a.out)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(out, indent=2))
    print(f"worst median from cached attention: {worst:.0f} ms (budget {BUDGET_MS:.0f} ms); "
          f"model runs: {lib.n_forward} (one per image); wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
