"""Command line: ``vitsift analyze|suite|mask-eval|pretrain ...`` (see ``vitsift <command> --help``).

Only what builds the parser is imported at module level: ``vitsift --help``, ``vitsift analyze
--help`` and a bad argument of analyze/suite answer without torch, timm or cv2 (seconds to import).
A command's module is imported when that command is named (``_analysis``, ``_mask_eval``,
``_pretrain``, ``_dispatch``: the module's only function-level imports; tests/test_cli_startup.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import sys

from vitsift_core.experiments.cli_options import add_run_options
from vitsift_core.options import CONTROLS


def _analysis():
    """(experiments.analysis, store): what analyze/suite run on."""
    # torch, timm, cv2 come with these: imported when analyze or suite is named
    from vitsift_core import store
    from vitsift_core.experiments import analysis
    return analysis, store


def _mask_eval():
    # its options name method.masking's constants (torch): imported when mask-eval is named
    from vitsift_core.experiments import maskeval_cli
    return maskeval_cli


def _pretrain():
    # its options are PretrainConfig's fields (torch, timm): imported when pretrain is named
    from vitsift_core.experiments import mae_runs
    return mae_runs


def _add_analyze(sub) -> None:
    p = sub.add_parser("analyze", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
    """analyze's options less --control and --exclude-self (the suite runs every variant)."""
    if "analyze" not in sub.choices:
        _add_analyze(sub)
    p = sub.add_parser("suite", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for act in sub.choices["analyze"]._actions:
        if act.dest in ("help", "control", "exclude_self"):
            continue
        p._add_action(act)


def _params(a, **kw):
    """The command line's AnalysisParams."""
    A, _ = _analysis()
    sift = dataclasses.asdict(A.SiftParams(contrast_threshold=a.contrast_threshold))
    return A.AnalysisParams(model=a.model, images=a.images, limit=a.limit, gamma=a.gamma,
                            weighted=not a.unweighted, focus_kind=a.focus, seed=a.seed,
                            img_size=a.img_size, sift=sift, dedupe_keypoints=a.dedupe_keypoints,
                            batch_size=a.batch_size, device=a.device,
                            num_workers=a.num_workers, precision=a.precision, chunk=a.chunk, **kw)


def _rank_params(params):
    """(params on this process's device, rank, world, barrier), joining torchrun when launched by it."""
    _, S = _analysis()
    rank, world, barrier = S.distributed()
    return params.replace(device=S.rank_device(params.device, world)), rank, world, barrier


def cmd_suite(a) -> int:
    (A, _), base = _analysis(), _params(a)
    variants = {(c, x): A.variant_dir(a.out, base.replace(control=c, exclude_self=x))
                for c in CONTROLS for x in (False, True)}
    base, rank, world, barrier = _rank_params(base)
    res = A.run_suite(base, variants, progress=not a.quiet and rank == 0, rank=rank, world=world, barrier=barrier)
    if rank == 0:
        for (c, x), r in res.items():
            print(f"{c:18s} exclude_self={x!s:5s} -> {r.path}")
    return 0


def cmd_analyze(a) -> int:
    A, S = _analysis()
    params, rank, world, barrier = _rank_params(_params(a, exclude_self=a.exclude_self, control=a.control))
    run = A.analyze(params, a.out, progress=not a.quiet and rank == 0, rank=rank, world=world, barrier=barrier)
    if rank == 0:
        info = S.read_json(run.path / "run.json")
        stages = S.read_json(run.path / "stages.json")
        print(f"wrote {run.path}: {info['n_images']} images, {info['n_skipped']} skipped; "
              f"stages: {stages.get('summary', stages.get('reason'))}")
    return 0


COMMANDS = {  # name -> (its line in `vitsift --help`, add its options to the subparsers, run it)
    "analyze": ("SIFT x attention metrics for every image, layer and head", _add_analyze, cmd_analyze),
    "suite": ("the real run and all controls, with and without exclude_self, sharing forward passes; "
              "writes OUT/<control>[-xself]-<key>/ per variant", _add_suite, cmd_suite),
    "mask-eval": ("classification accuracy with patches masked by theta score (Top/Bottom) and controls "
                  "(Random, keypoint counts), Sec 5.1",
                  lambda sub: _mask_eval().add_cli(sub), lambda a: _mask_eval().cli_main(a)),
    "pretrain": ("MAE pre-training with random or keypoint-guided masks, or supervised (--objective supervised); resumable, torchrun for DDP",
                 lambda sub: _pretrain().add_cli(sub), lambda a: _pretrain().cmd_pretrain(a)),
}


def parser(argv: list[str]) -> argparse.ArgumentParser:
    """The parser for ``argv``: the named command's options only (so that naming one imports no
    other command's module); with no known command named, every command with its help line."""
    p = argparse.ArgumentParser(prog="vitsift", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    named = next((t for t in argv if not t.startswith("-")), None)
    for name, (line, add, _) in COMMANDS.items():
        if named in COMMANDS:
            if name == named:
                add(sub)
                sub.choices[name].description = sub.choices[name].description or line
        else:
            sub.add_parser(name, help=line, add_help=False)
    return p


def _dispatch(cmd: str, a) -> int:
    """Run ``cmd``; a user's error (bad input, busy or mismatched folder, no weights or device) is one
    line on stderr and exit status 2."""
    try:
        return COMMANDS[cmd][2](a)
    except Exception as e:
        # the command has imported these modules already (store, registry): no cost here
        from vitsift_core.model.registry import DeviceUnavailable, ModelWeightsUnavailable
        from vitsift_core.store import RunBusy, RunMismatch
        if isinstance(e, (RunMismatch, RunBusy, ValueError, FileNotFoundError, ModelWeightsUnavailable,
                          DeviceUnavailable)):
            print(f"vitsift {cmd}: error: {e}", file=sys.stderr)
            return 2
        if isinstance(e, OSError):   # an unwritable --out, a missing file: the path and the reason
            print(f"vitsift {cmd}: error: {e.filename + ': ' if e.filename else ''}{e.strerror or e}",
                  file=sys.stderr)
            return 2
        raise
    finally:
        from vitsift_core.store import end_distributed   # loaded by every command (see above)
        end_distributed()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    a = parser(argv).parse_args(argv)
    return _dispatch(a.cmd, a)


def entry() -> None:
    """The ``vitsift`` command: :func:`main`, then exit. ``gc.freeze()`` first: the interpreter's
    last cycle collections over everything torch and timm imported take about 1.2 s otherwise, and
    by now every file is written and closed (objects still go away by reference count)."""
    rc = main()
    gc.freeze()
    sys.exit(rc)


if __name__ == "__main__":
    entry()
