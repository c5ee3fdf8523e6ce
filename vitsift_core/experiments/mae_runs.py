"""MAE pre-training runs around :func:`run_pretrain`: a profile's recipe, where runs live, training every
run of a recipe, reading runs back, and ``vitsift pretrain``."""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pandas as pd
import yaml

from vitsift_core.data.keypoints import SiftParams
from vitsift_core.experiments import pretrain
from vitsift_core.experiments.cli_options import add_run_options
from vitsift_core.experiments.mae_data import load_train_data
from vitsift_core.experiments.pretrain import PretrainConfig, build_model, is_complete, run_pretrain
from vitsift_core.paths import ROOT, results_dir
from vitsift_core.store import distributed, key_of


#: the profile section holding the MAE recipe; its ``mae_batch_size`` is the global batch
RECIPE_SECTION = "07_guided_mae"


def config_from_params(params: dict, **override) -> PretrainConfig:
    """A config from a parameter dict (other keys ignored); 0 / "" mean None for sizes and limits."""
    names = {f.name for f in dataclasses.fields(PretrainConfig)}
    kw = {k: v for k, v in params.items() if k in names}
    if params.get("mask_ratios") and "mask_ratio" not in kw:   # notebook 07's arms: the first is the recipe's
        kw["mask_ratio"] = float(params["mask_ratios"][0])
    kw.update(override)
    for k in ("patch_size", "depth", "embed_dim", "num_heads", "train_limit", "val_limit",
              "knn_memory", "score_layer", "threads"):
        if k in kw and kw[k] in (0, "", "none", "None"):
            kw[k] = None
    return PretrainConfig(**kw)


def profile_params(profile: str, section: str) -> tuple[dict, dict]:
    """(top-level ``parameters``, the ``notebooks.<section>`` overrides) of ``params/<profile>.yaml``:
    what ``make reproduce`` hands that notebook, for the recipes other notebooks share."""
    d = yaml.safe_load((ROOT / "params" / f"{profile}.yaml").read_text()) or {}
    return dict(d.get("parameters") or {}), dict((d.get("notebooks") or {}).get(section) or {})


def mae_recipe(profile: str, **override) -> PretrainConfig:
    """PretrainConfig's defaults, then ``params/<profile>.yaml``'s runtime keys and
    :data:`RECIPE_SECTION`, then ``override``."""
    top, section = profile_params(profile, RECIPE_SECTION)
    params = {k: v for k, v in top.items() if k in PretrainConfig.RUNTIME_KEYS}
    params.update(section)
    if "mae_batch_size" in params:
        params["batch_size"] = params.pop("mae_batch_size")
    return config_from_params(params, **override)


def run_experiment(base: PretrainConfig, masks=("random", "guided"), seeds=(0, 1, 2), *,
                   root: str | Path | None = None, progress: bool = True) -> dict[tuple[str, int], Path]:
    """Train every (mask, seed) run of ``base`` that is not complete yet; -> {(mask, seed): folder}."""
    out = {}
    for seed in seeds:
        for mk in masks:
            cfg = base.replace(mask=mk, seed=int(seed))
            d = run_dir(cfg, root)
            if not is_complete(d):
                run_pretrain(cfg, d, progress=progress, desc=f"MAE {mk:6s} seed {seed}")
            out[(mk, int(seed))] = d
    return out


def ratio_arms(mask_ratios, seeds, other_ratio_seeds: int = 0) -> dict[float, list[int]]:
    """{mask ratio: its seeds}: every seed for the first ratio, the first ``other_ratio_seeds`` of them
    (0: all) for the others, so that a cheaper setting can still put another ratio beside the first."""
    if not mask_ratios:
        raise ValueError("mask_ratios must name at least one ratio")
    n = int(other_ratio_seeds) or len(seeds)
    return {float(r): [int(s) for s in (seeds if i == 0 else seeds[:n])] for i, r in enumerate(mask_ratios)}


def train_counts(cfg: PretrainConfig):
    """(n, N) SIFT keypoints per patch of ``cfg``'s training images, as its runs see them (cached arrays)."""
    patch = cfg.patch_size or build_model(cfg).patch_size
    return load_train_data(cfg, patch, progress=False).train.counts


def load_pretrained_mae(out: str | Path, device: str = "cpu"):
    """The MAE of a finished (or checkpointed) run folder, eval mode."""
    out = Path(out)
    if not (out / "checkpoint.pt").is_file():
        raise FileNotFoundError(f"no checkpoint.pt in {out}: not a pre-training run folder")
    state = pretrain.read_checkpoint(out / "checkpoint.pt")
    cfg = PretrainConfig(**{k: v for k, v in state["config"].items()
                            if k in {f.name for f in dataclasses.fields(PretrainConfig)}})
    if cfg.objective != "mae":
        raise ValueError(f"{out} is a {cfg.objective} run: it has no MAE decoder; load its encoder "
                         "snapshots with model.registry.load_model(pretrain_state.snapshot_spec(file))")
    model = build_model(cfg)
    model.load_state_dict(state["model"])
    model.source = f"vitsift pre-training {out}"
    model.pretrain_config = cfg
    return model.to(device).eval()


def experiment_dir(cfg: PretrainConfig, root: str | Path | None = None) -> Path:
    """``results/mae/<recipe key>/``: all mask kinds and seeds of one recipe."""
    return Path(root if root is not None else results_dir() / "mae") / cfg.recipe_key()


def run_dir(cfg: PretrainConfig, root: str | Path | None = None) -> Path:
    """``<experiment_dir>/<mask>[-<curriculum key>]-seed<seed>``, or ``supervised-seed<seed>``."""
    name = "supervised" if cfg.objective == "supervised" else cfg.mask
    if cfg.mask == "guided":
        name += "-" + key_of({k: cfg.identity()[k] for k in ("betas", "beta_every", "order", "score_layer")})[:6]
    return experiment_dir(cfg, root) / f"{name}-seed{cfg.seed}"


def load_metrics(out: str | Path) -> pd.DataFrame:
    return pd.read_csv(Path(out) / "metrics.csv")


def load_steps(out: str | Path) -> pd.DataFrame:
    return pd.read_csv(Path(out) / "steps.csv")


def add_cli(sub) -> None:
    """Register ``vitsift pretrain``: every PretrainConfig field as ``--field-name`` (its help line: cli.py)."""
    p = sub.add_parser("pretrain", description=pretrain.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(PretrainConfig):
        name = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.name == "sift":
            p.add_argument("--contrast-threshold", type=float, default=0.04, help="SIFT contrast threshold")
            continue
        if f.name == "betas":
            p.add_argument(name, type=float, nargs="+", default=list(default), help="curriculum betas")
            continue
        if isinstance(default, bool):
            p.add_argument(name, type=lambda s: s.lower() in ("1", "true", "yes"), default=default,
                           metavar="BOOL", help=f"(default {default})")
            continue
        typ = {"int | None": int, "float | None": float}.get(str(f.type), None)
        typ = typ or (type(default) if default is not None else str)
        hint = " (0: all / the architecture's own)" if str(f.type).endswith("| None") else ""
        p.add_argument(name, type=typ, default=default, help=f"(default {default}){hint}")
    add_run_options(p, runtime=False, out_required=False,
                    out_help="run folder (default: results/mae/<recipe>/<mask>-seed<seed>)")


def cmd_pretrain(a) -> int:
    kw = {f.name: getattr(a, f.name) for f in dataclasses.fields(PretrainConfig) if f.name != "sift"}
    kw["sift"] = dataclasses.asdict(SiftParams(contrast_threshold=a.contrast_threshold))
    cfg = config_from_params(kw)   # 0 means "all" / "the architecture's" for limits and sizes
    rank = distributed().rank
    out = Path(a.out) if a.out else run_dir(cfg)
    run_pretrain(cfg, out, progress=not a.quiet)
    if rank == 0:
        m = load_metrics(out)
        last = m.iloc[-1]
        print(f"wrote {out}: {int(m.epoch.max())} epochs (+ epoch 0, untrained), k-NN {last.knn_acc:.4f}, probe {last.probe_acc:.4f}")
    return 0
