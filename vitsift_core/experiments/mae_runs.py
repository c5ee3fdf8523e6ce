"""A profile's MAE recipe (``params/<profile>.yaml``) and its runs: train every (mask, seed) run of a
recipe, read a run's MAE back. Notebooks 01 and 07 and recovery start here."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import yaml

from vitsift_core.experiments.pretrain import (PretrainConfig, build_model, config_from_params, is_complete,
                                               run_dir, run_pretrain)
from vitsift_core.paths import ROOT

__all__ = ["RECIPE_SECTION", "mae_recipe", "run_experiment", "load_pretrained_mae"]

#: the profile section holding the MAE recipe (notebook 07 trains it, notebook 01 reuses its MAE);
#: its ``mae_batch_size`` is the global batch (the profiles' shared ``batch_size`` is an inference batch)
RECIPE_SECTION = "07_guided_mae"


def mae_recipe(profile: str, **override) -> PretrainConfig:
    """PretrainConfig's defaults, then ``params/<profile>.yaml``'s shared runtime keys (device,
    num_workers, threads), then its :data:`RECIPE_SECTION`, then ``override``."""
    d = yaml.safe_load((ROOT / "params" / f"{profile}.yaml").read_text()) or {}
    params = {k: v for k, v in (d.get("parameters") or {}).items() if k in PretrainConfig.RUNTIME_KEYS}
    params.update((d.get("notebooks") or {}).get(RECIPE_SECTION) or {})
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


def load_pretrained_mae(out: str | Path, device: str = "cpu"):
    """The MAE of a finished (or checkpointed) run folder, eval mode."""
    out = Path(out)
    state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)
    cfg = PretrainConfig(**{k: v for k, v in state["config"].items()
                            if k in {f.name for f in dataclasses.fields(PretrainConfig)}})
    model = build_model(cfg)
    model.load_state_dict(state["model"])
    model.source = f"vitsift pre-training {out}"
    model.pretrain_config = cfg
    return model.to(device).eval()
