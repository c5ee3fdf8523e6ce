"""Command line: ``vitsift analyze|suite|mask-eval ...`` (see ``vitsift <command> --help``)."""
from __future__ import annotations

import argparse
import dataclasses
import sys

from vitsift_core.data.keypoints import SiftParams
from vitsift_core.store import RunBusy, RunMismatch, distributed, end_distributed, rank_device, read_json
from vitsift_core.experiments.analysis import CONTROLS, AnalysisParams, analyze, run_suite, variant_dir
from vitsift_core.experiments.cli_options import add_run_options
from vitsift_core.experiments.maskeval_cli import add_cli as _add_mask_eval, cli_main as cmd_mask_eval
from vitsift_core.experiments.mae_runs import add_cli as _add_pretrain, cmd_pretrain
from vitsift_core.model.registry import DeviceUnavailable, ModelWeightsUnavailable


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
    p.add_argument("--dedupe-keypoints", action="store_true",
                   help="count each keypoint location once (OpenCV emits one keypoint per orientation; "
                        "default: the paper's count)")
    p.add_argument("--seed", type=int, default=0, help="seed for shuffled keypoints / donor keypoints / random init")
    p.add_argument("--img-size", type=int, default=None, help="input resolution (default: the model's)")
    add_run_options(p)


def _add_suite(sub) -> None:
    p = sub.add_parser("suite", help="the real run and all controls, with and without exclude_self, "
                       "sharing forward passes; writes OUT/<control>[-xself]-<key>/ per variant",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for act in sub.choices["analyze"]._actions:
        if act.dest in ("help", "control", "exclude_self"):
            continue
        p._add_action(act)


def _params(a, **kw) -> AnalysisParams:
    sift = dataclasses.asdict(SiftParams(contrast_threshold=a.contrast_threshold))
    return AnalysisParams(model=a.model, images=a.images, limit=a.limit, gamma=a.gamma,
                          weighted=not a.unweighted, focus_kind=a.focus, seed=a.seed,
                          img_size=a.img_size, sift=sift, dedupe_keypoints=a.dedupe_keypoints,
                          batch_size=a.batch_size, device=a.device,
                          num_workers=a.num_workers, precision=a.precision, chunk=a.chunk, **kw)


def _rank_params(params: AnalysisParams) -> tuple[AnalysisParams, int, int, object]:
    """(params on this process's device, rank, world, barrier), joining torchrun when launched by it."""
    rank, world, barrier = distributed()
    return params.replace(device=rank_device(params.device, world)), rank, world, barrier


def cmd_suite(a) -> int:
    base = _params(a)
    variants = {(c, x): variant_dir(a.out, base.replace(control=c, exclude_self=x))
                for c in CONTROLS for x in (False, True)}
    base, rank, world, barrier = _rank_params(base)
    res = run_suite(base, variants, progress=not a.quiet and rank == 0, rank=rank, world=world, barrier=barrier)
    if rank == 0:
        for (c, x), r in res.items():
            print(f"{c:18s} exclude_self={x!s:5s} -> {r.path}")
    return 0


def cmd_analyze(a) -> int:
    params, rank, world, barrier = _rank_params(_params(a, exclude_self=a.exclude_self, control=a.control))
    run = analyze(params, a.out, progress=not a.quiet and rank == 0, rank=rank, world=world, barrier=barrier)
    if rank == 0:
        info = read_json(run.path / "run.json")
        stages = read_json(run.path / "stages.json")
        print(f"wrote {run.path}: {info['n_images']} images, {info['n_skipped']} skipped; "
              f"stages: {stages.get('summary', stages.get('reason'))}")
    return 0


COMMANDS = {"analyze": (_add_analyze, cmd_analyze), "suite": (_add_suite, cmd_suite),
            "mask-eval": (_add_mask_eval, cmd_mask_eval), "pretrain": (_add_pretrain, cmd_pretrain)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vitsift", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    for add, _ in COMMANDS.values():
        add(sub)
    a = parser.parse_args(argv)
    try:
        return COMMANDS[a.cmd][1](a)
    except (RunMismatch, RunBusy, ValueError, FileNotFoundError, ModelWeightsUnavailable, DeviceUnavailable) as e:
        print(f"vitsift {a.cmd}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:        # an unwritable --out, a missing file: the path and the reason
        print(f"vitsift {a.cmd}: error: {e.filename + ': ' if e.filename else ''}{e.strerror or e}", file=sys.stderr)
        return 2
    finally:
        end_distributed()


if __name__ == "__main__":
    sys.exit(main())
