"""The CUDA check behind ``benchmarks/gpu_check.sh`` (run that; this is its Python part).

For random-init ViT-B/16 and ViT-L/16 (no weights needed), at batch 64 on one GPU:
  * (a) plain forward vs (b) the analysis path, as in ``bench_analysis.py``: images/s, peak
    memory (``torch.cuda.max_memory_allocated``), b/a; (b) also with attention slices of 16 images
    (``VITSIFT_MICRO_BATCH=16``), to choose the CUDA default;
  * that the forward runs under bf16 autocast while the metrics see float32 maps, and how far
    the metrics of a bf16 forward are from those of an fp32 forward;
  * MAE pre-training steps/s (``vitsift_core.model.mae``, ViT-B/16 encoder, mask ratio 0.75, AdamW,
    bf16 autocast), skipped with a message when that module is not there.
Inputs are random tensors and random keypoint counts: this times the machine, not the study.

``--cpu-tiny`` runs the same code on CPU with timm's ``test_vit`` in seconds (for the tests).
Writes ``reports/bench/gpu_check.json``.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import traceback

import _common as C  # noqa: E402 - also puts the checkout on sys.path

import torch

import bench_analysis as BA

MODELS = ("vit_base_patch16_224", "vit_large_patch16_224")


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--iters", type=int, default=10, help="batches per variant per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--mae-steps", type=int, default=20)
    p.add_argument("--mae-encoder", default="vit_base_patch16_224")
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default=None, help="default: <reports>/bench/gpu_check.json (VITSIFT_REPORTS, else ./reports)")
    p.add_argument("--cpu-tiny", action="store_true", help="CPU, test_vit, batch 4: checks that it runs")
    a = p.parse_args(argv)
    if a.cpu_tiny:
        a.models, a.batch, a.iters, a.rounds, a.mae_steps, a.device = "test_vit", 4, 1, 1, 2, "cpu"
        a.mae_encoder = "test_vit"
    return a


@contextlib.contextmanager
def micro_batch_env(mb: str | None):
    """VITSIFT_MICRO_BATCH=mb inside (None: leave it as it is)."""
    old = os.environ.get("VITSIFT_MICRO_BATCH")
    if mb is not None:
        os.environ["VITSIFT_MICRO_BATCH"] = mb
    try:
        yield
    finally:
        if mb is not None:
            if old is None:
                os.environ.pop("VITSIFT_MICRO_BATCH", None)
            else:
                os.environ["VITSIFT_MICRO_BATCH"] = old


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def peak_memory(bench, v, batches, dev) -> float:
    if dev.type != "cuda":
        return float("nan")
    sync(dev)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    bench.run(v, batches[:1])
    return torch.cuda.max_memory_allocated() / 2 ** 20


def check_model(name: str, args, dev) -> dict:
    from vitsift_core.model.infer import infer
    from vitsift_core.model.registry import load_model

    t0 = time.perf_counter()
    lm = load_model(name, control="random-init", device=str(dev))
    g = torch.Generator().manual_seed(0)
    size = lm.data_config["input_size"][1:]
    batches = []
    for i in range(args.iters):
        x = torch.randn(args.batch, 3, *size, generator=g).to(dev)
        counts = torch.poisson(torch.full((args.batch, lm.num_patches), 0.8), generator=g).long()
        batches.append((x, counts, [f"{i}/{j}" for j in range(args.batch)]))
    bench = BA.Bench(lm)

    # forward dtype vs metric dtype
    seen = {}
    out_dtype = infer(lm, batches[0][0][:2], collector=lambda l, a: seen.setdefault(l, a.dtype), split=False).dtype
    # metrics of a bf16 forward vs an fp32 forward, same batch (run on CPU too, in make test's tiny
    # check, so this path is exercised without a GPU)
    effect = BA.precision_effect(BA.Bench(lm, precision="bf16"), batches[:1])
    dfocus, dtheta = effect["focus"]["mean_abs"], effect["theta_kk"]["mean_abs"]

    variants = {"a": ("a", None), "b": ("b", None), "b16": ("b", "16")}
    if dev.type != "cuda":
        variants.pop("b16")

    def run(v):
        key, mb = variants[v]
        with micro_batch_env(mb):
            bench.run(key, batches)
        sync(dev)

    for v in variants:
        run(v)                                   # warm-up
    times = {v: [] for v in variants}
    for _ in range(args.rounds):
        for v in variants:
            t = time.perf_counter()
            run(v)
            times[v].append(time.perf_counter() - t)
    n = args.batch * args.iters
    mem = {}
    for v, (key, mb) in variants.items():
        with micro_batch_env(mb):
            mem[v] = peak_memory(bench, key, batches, dev)
    res = {
        "model": name, "layers": len(lm.model.blocks), "heads": lm.model.blocks[0].attn.num_heads,
        "patches": lm.num_patches, "batch": args.batch,
        "images_per_s": {v: n / C.median(ts) for v, ts in times.items()},
        "b_over_a": C.median([ta / tb for ta, tb in zip(times["a"], times["b"])]),
        "peak_mib": mem, "forward_output_dtype": str(out_dtype).replace("torch.", ""),
        "metric_input_dtype": str(next(iter(seen.values()))).replace("torch.", ""),
        "bf16_vs_fp32_mean_abs_diff": {"focus": dfocus, "theta_kk": dtheta},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if "b16" in times:
        res["b16_over_a"] = C.median([ta / tb for ta, tb in zip(times["a"], times["b16"])])
    del bench, lm, batches
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return res


def mae_steps(args, dev) -> dict:
    try:
        from vitsift_core.model.mae import build_mae
    except ImportError as e:
        return {"skipped": f"vitsift_core.model.mae not available ({e}): MAE pre-training steps/s not measured"}
    from vitsift_core.model.infer import forward_autocast

    kw = {"decoder_embed_dim": 32, "decoder_depth": 1, "decoder_num_heads": 2} if args.cpu_tiny else {}
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = build_mae(args.mae_encoder, seed=0, **kw).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05)
    size = model.encoder.patch_embed.img_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, *size, generator=g).to(dev)
    n = model.num_patches
    n_mask = int(round(0.75 * n))

    def step():
        noise = torch.rand(args.batch, n, device=dev)
        mask = torch.zeros(args.batch, n, dtype=torch.bool, device=dev)
        mask.scatter_(1, noise.argsort(1)[:, :n_mask], True)
        with forward_autocast(dev):
            loss = model(x, mask)[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    for _ in range(min(3, args.mae_steps)):
        step()
    sync(dev)
    t = time.perf_counter()
    for _ in range(args.mae_steps):
        loss = step()
    sync(dev)
    dt = time.perf_counter() - t
    return {"encoder": args.mae_encoder, "batch": args.batch, "mask_ratio": n_mask / n, "steps": args.mae_steps,
            "steps_per_s": args.mae_steps / dt, "images_per_s": args.mae_steps * args.batch / dt,
            "last_loss": float(loss.detach()), "peak_mib": (torch.cuda.max_memory_allocated() / 2 ** 20
                                                   if dev.type == "cuda" else float("nan"))}


def main(argv=None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: CUDA is not available here (use --cpu-tiny to try the code on CPU)")
        return 2
    dev = torch.device(args.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    from vitsift_core.model.infer import capture_micro_batch

    print(f"gpu_check on {name}: torch {torch.__version__}, batch {args.batch}, {args.iters} batches x "
          f"{args.rounds} rounds per variant; attention slices by default: "
          f"{capture_micro_batch(dev) or 'whole batch'}")
    results, rc = [], 0
    for m in args.models.split(","):
        try:
            results.append(check_model(m.strip(), args, dev))
        except Exception:  # noqa: BLE001 - report and go on with the next model
            traceback.print_exc()
            rc = 1
    rows = []
    for r in results:
        ips = r["images_per_s"]
        rows.append([r["model"], f"{r['layers']}x{r['heads']}", ips["a"], ips["b"], r["b_over_a"],
                     r.get("b16_over_a", float("nan")), r["peak_mib"]["a"], r["peak_mib"]["b"],
                     r["peak_mib"].get("b16", float("nan"))])
    print(C.table(rows, ["model (random init)", "layers x heads", "(a) img/s", "(b) img/s", "b/a",
                         "b/a slices of 16", "(a) peak MiB", "(b) peak MiB", "(b) slices 16 MiB"]))
    for r in results:
        d = r["bf16_vs_fp32_mean_abs_diff"]
        print(f"{r['model']}: forward output {r['forward_output_dtype']}, maps reach the metrics as "
              f"{r['metric_input_dtype']}; bf16 vs fp32 forward, mean |diff| focus {d['focus']:.2g}, "
              f"theta_kk {d['theta_kk']:.2g}")
    try:
        mae = mae_steps(args, dev)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        mae = {"error": f"{type(e).__name__}: {e}"}
    if "steps_per_s" in mae:
        print(f"MAE pre-training ({mae['encoder']}, batch {mae['batch']}, mask {mae['mask_ratio']:.2f}): "
              f"{mae['steps_per_s']:.2f} steps/s = {mae['images_per_s']:.1f} images/s "
              f"(loss {mae['last_loss']:.3f}; peak {mae['peak_mib']:.0f} MiB)")
    else:
        print(f"MAE pre-training: {mae.get('skipped') or mae.get('error')}")
    C.write_report(C.report_path(args.out, 'gpu_check.json'), {"device": name, "models": results, "mae": mae, "machine": C.machine(),
                                    "cpu_tiny": args.cpu_tiny},
                   ())
    return rc


if __name__ == "__main__":
    sys.exit(main())
