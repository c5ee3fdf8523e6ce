"""The ``vitsift mask-eval`` subcommand: its options and what it prints."""
from __future__ import annotations

import argparse

from vitsift_core.method import masking as MK
from vitsift_core.store import distributed, rank_device, read_json
from vitsift_core.experiments.cli_options import add_run_options
from vitsift_core.experiments.maskeval import MaskEvalParams, run_mask_eval


def add_cli(sub) -> None:
    """The ``vitsift mask-eval`` subcommand (registered by ``vitsift_core.cli``, which holds its help line)."""
    p = sub.add_parser("mask-eval", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="scoring ViT ('embedded', timm name, ARCH@PATH); default: "
                   "the classifier's own ViT ('embedded' for the probe)")
    p.add_argument("--classifier", default="embedded-probe",
                   help="'embedded-probe' (linear probe on --model's CLS token), or an ImageNet-1k timm "
                        "classifier name / ARCH@PATH (e.g. vit_base_patch16_224.augreg2_in21k_ft_in1k)")
    p.add_argument("--images", default="imagenette:val", help="'imagenette:val' or a folder with one subfolder per wnid")
    p.add_argument("--limit", type=int, default=None, help="at most this many images (round-robin over classes)")
    p.add_argument("--ratios", default="0,5,10,20,30,40", help="mask ratios in percent of the patches")
    p.add_argument("--orders", default=",".join(MK.DEFAULT_ORDERS), help="comma list of " + "|".join(MK.ORDERS))
    p.add_argument("--mode", default="fill", help="fill | drop | fill,drop")
    p.add_argument("--layer", default="auto", help="score layer(s), 1-based: 'auto' (last Capture layer if the "
                   "stage fit holds, else the middle layer), '7', '7-9', '5,7'")
    p.add_argument("--gamma", type=float, default=1.0, help="detection line height (Eq. 2)")
    p.add_argument("--unweighted", action="store_true", help="unweighted theta_i (Eq. 3, left)")
    p.add_argument("--exclude-self", action="store_true", help="drop j = i from the attended set S_i")
    p.add_argument("--tiebreak", choices=MK.TIEBREAKS, default="random",
                   help="equal scores: seeded per-image permutation, or patch index")
    p.add_argument("--seed", type=int, default=0, help="random order, tie-break, bootstrap, probe init")
    p.add_argument("--probe-train", default="imagenette:train", help="probe training images (labelled)")
    p.add_argument("--probe-per-class", default="100", help="probe training images per class, or 'all'")
    p.add_argument("--probe-weight-decay", type=float, default=1e-3)
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples for the CIs")
    add_run_options(p)


def _csv(s: str) -> list[str]:
    return [x.strip() for x in str(s).split(",") if x.strip()]


def _number(flag: str, s: str, kind=float, allowed: str = "a number"):
    try:
        return kind(s)
    except ValueError:
        raise ValueError(f"{flag} must be {allowed}, got {s!r}") from None


def cli_main(a) -> int:
    per_class = None if str(a.probe_per_class).lower() in ("all", "none") else \
        _number("--probe-per-class", a.probe_per_class, int, "an integer >= 1 or 'all'")
    params = MaskEvalParams(
        classifier=a.classifier, model=a.model, images=a.images, limit=a.limit,
        ratios=[_number("--ratios", r, allowed="comma-separated percentages in [0, 100)") for r in _csv(a.ratios)], orders=_csv(a.orders), modes=_csv(a.mode), layer=a.layer,
        gamma=a.gamma, weighted=not a.unweighted, exclude_self=a.exclude_self, tiebreak=a.tiebreak, seed=a.seed,
        probe_train=a.probe_train, probe_per_class=per_class, probe_weight_decay=a.probe_weight_decay,
        n_boot=a.n_boot, batch_size=a.batch_size, num_workers=a.num_workers, device=a.device, chunk=a.chunk,
        precision=a.precision)
    rank, world, barrier = distributed()
    params = params.replace(device=rank_device(params.device, world))
    run = run_mask_eval(params, a.out, progress=not a.quiet and rank == 0, rank=rank, world=world, barrier=barrier)
    if rank != 0:
        return 0
    info = read_json(run.path / "run.json")
    acc = run.accuracy()
    print(f"wrote {run.path}: {info['n_images']} images ({info['n_skipped']} skipped), score layer(s) "
          f"{info['layers']} ({run.layer()['how']}), clean top-1 {info['clean_top1']:.1f}%")
    show = acc.assign(top1=acc.top1.round(1), ci=[f"[{l:.1f}, {h:.1f}]" for l, h in zip(acc.ci_low, acc.ci_high)])
    print(show[["mode", "order", "ratio", "n", "top1", "ci"]].to_string(index=False))
    return 0
