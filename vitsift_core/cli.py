"""Command line: ``vitsift analyze|suite|mask-eval ...`` (see ``vitsift <command> --help``)."""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from vitsift_core.experiments.analysis import CONTROLS, PRECISIONS, AnalysisParams, RunMismatch, analyze


def _add_analyze(sub) -> None:
    p = sub.add_parser("analyze", help="SIFT x attention metrics for every image, layer and head",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="embedded",
                   help="'embedded', a timm model name (pretrained), or ARCH@CHECKPOINT")
    p.add_argument("--images", default="samples",
                   help="'samples', 'imagenette:val', 'imagenette:train', or a folder (recursive)")
    p.add_argument("--limit", type=int, default=None, help="at most this many images (spanning classes)")
    p.add_argument("--gamma", type=float, default=1.0, help="detection line height (Eq. 2)")
    p.add_argument("--unweighted", action="store_true", help="unweighted theta_i (Eq. 3, left)")
    p.add_argument("--control", choices=CONTROLS, default="none")
    p.add_argument("--exclude-self", action="store_true", help="drop j = i from the attended set S_i")
    p.add_argument("--focus", choices=("minmax", "softmax"), default="minmax", help="focus index row entropy")
    p.add_argument("--contrast-threshold", type=float, default=0.04, help="SIFT contrast threshold")
    p.add_argument("--seed", type=int, default=0, help="seed for shuffled keypoints / random init")
    p.add_argument("--img-size", type=int, default=None, help="input resolution (default: the model's)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-workers", type=int, default=1, help="SIFT/decoding worker processes")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="forward pass: auto = bf16 autocast on CUDA, fp32 on CPU; bf16 on a CPU with "
                        "AVX512-BF16/AMX is about 2x faster (metrics stay float32; a folder keeps one)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--out", required=True, help="output folder (re-running resumes)")


def _add_suite(sub) -> None:
    p = sub.add_parser("suite", help="the real run and all controls, with and without exclude_self, "
                       "sharing forward passes; writes OUT/<control>[-xself]-<key>/ per variant",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for act in sub.choices["analyze"]._actions:
        if act.dest in ("help", "control", "exclude_self"):
            continue
        p._add_action(act)


def _params(a, **kw) -> AnalysisParams:
    from vitsift_core.data.keypoints import SiftParams
    sift = dataclasses.asdict(SiftParams(contrast_threshold=a.contrast_threshold))
    return AnalysisParams(model=a.model, images=a.images, limit=a.limit, gamma=a.gamma,
                          weighted=not a.unweighted, focus_kind=a.focus, seed=a.seed,
                          img_size=a.img_size, sift=sift, batch_size=a.batch_size, device=a.device,
                          num_workers=a.num_workers, precision=a.precision, **kw)


def cmd_suite(a) -> int:
    from vitsift_core.experiments.analysis import run_suite, variant_dir
    base = _params(a)
    variants = {(c, x): variant_dir(a.out, base.replace(control=c, exclude_self=x))
                for c in CONTROLS for x in (False, True)}
    rank, world, barrier = _distributed()
    base = _rank_device(base, world)
    res = run_suite(base, variants, progress=not a.quiet and rank == 0, rank=rank, world=world, barrier=barrier)
    if rank == 0:
        for (c, x), r in res.items():
            print(f"{c:18s} exclude_self={x!s:5s} -> {r.path}")
    return 0


def _distributed():
    """(rank, world, barrier) under torchrun, else (0, 1, None).

    gloo on CPU, nccl on CUDA with process LOCAL_RANK on GPU LOCAL_RANK. The timeout
    (VITSIFT_DIST_TIMEOUT seconds, default 12 h) bounds how long rank 0 waits at the barrier for
    the others' chunks: torch's default (30 min) is too short for a large or resumed run.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, None
    import datetime

    import torch
    import torch.distributed as dist
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=float(os.environ.get("VITSIFT_DIST_TIMEOUT", 12 * 3600)))
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
            dist.init_process_group("nccl", timeout=timeout)
        else:
            dist.init_process_group("gloo", timeout=timeout)
    return dist.get_rank(), dist.get_world_size(), dist.barrier


def _rank_device(params: AnalysisParams, world: int) -> AnalysisParams:
    """Under torchrun with CUDA, 'auto'/'cuda' means this process's GPU (LOCAL_RANK)."""
    if world > 1 and params.device in ("auto", "cuda"):
        import torch
        if torch.cuda.is_available():
            return params.replace(device=f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % torch.cuda.device_count()}")
    return params


def _end_distributed() -> None:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def cmd_analyze(a) -> int:
    params = _params(a, exclude_self=a.exclude_self, control=a.control)
    rank, world, barrier = _distributed()
    params = _rank_device(params, world)
    run = analyze(params, a.out, progress=not a.quiet and rank == 0, rank=rank, world=world, barrier=barrier)
    if rank == 0:
        import json
        info = json.loads((run.path / "run.json").read_text())
        stages = json.loads((run.path / "stages.json").read_text())
        print(f"wrote {run.path}: {info['n_images']} images, {info['n_skipped']} skipped; "
              f"stages: {stages.get('summary', stages.get('reason'))}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vitsift", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    _add_analyze(sub)
    _add_suite(sub)
    from vitsift_core.experiments.maskeval import add_cli as _add_mask_eval, cli_main as cmd_mask_eval
    _add_mask_eval(sub)
    from vitsift_core.experiments.pretrain import add_cli as _add_pretrain, cmd_pretrain
    _add_pretrain(sub)
    a = parser.parse_args(argv)
    try:
        if a.cmd == "analyze":
            return cmd_analyze(a)
        if a.cmd == "suite":
            return cmd_suite(a)
        if a.cmd == "mask-eval":
            return cmd_mask_eval(a)
        if a.cmd == "pretrain":
            return cmd_pretrain(a)
    except (RunMismatch, ValueError, FileNotFoundError) as e:
        print(f"vitsift {a.cmd}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - named errors from the model registry
        from vitsift_core.model.registry import ModelWeightsUnavailable
        if isinstance(e, ModelWeightsUnavailable):
            print(f"vitsift {a.cmd}: error: {e}", file=sys.stderr)
            return 2
        raise
    finally:
        _end_distributed()
    return 1


if __name__ == "__main__":
    sys.exit(main())
