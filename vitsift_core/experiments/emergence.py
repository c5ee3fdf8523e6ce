"""When does the semantic part of the keypoint bias emerge during training? (issue 19, items 2-3)

One pre-training recipe (notebook 07's, ``mae_runs.mae_recipe``) trained with three objectives from the
same seeded encoder: supervised, MAE with random masks, MAE with guided masks, each keeping encoder
snapshots every ``snapshot_every`` epochs (``pretrain_state``). Every snapshot goes through the same
analysis suite as any model (``study.suite``: real, donor keypoints, shuffled keypoints; chance from the
real run; exclude_self), in the normal run folders ``results/analysis/<variant>-<key>/`` keyed by the
snapshot's ``"ARCH@PATH"`` spec, so ``vitsift analyze --model ARCH@PATH`` on a snapshot file reads
or writes the very same numbers.

The semantic part of one image at one layer is (KK - NK)(real) - (KK - NK)(donor keypoints), heads
averaged (report.randomisation's definition); per (objective, epoch, layer) it is the mean over the
images kept at every epoch, with a percentile bootstrap CI over images (the same resamples everywhere).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from vitsift_core.data.keypoints import SiftParams
from vitsift_core.data.sources import resolve_images
from vitsift_core.method import stats as S
from vitsift_core.experiments import study
from vitsift_core.experiments.analysis import AnalysisParams, RunDir
from vitsift_core.experiments.mae_data import prepare_arrays
from vitsift_core.experiments.mae_runs import mae_recipe, profile_params, run_dir
from vitsift_core.experiments.pretrain import PretrainConfig, is_complete, run_pretrain
from vitsift_core.experiments.pretrain_state import snapshot_spec, snapshots

#: the three training objectives: name -> PretrainConfig overrides
OBJECTIVES = {"supervised": {"objective": "supervised", "mask": "random"},
              "mae-random": {"objective": "mae", "mask": "random"},
              "mae-guided": {"objective": "mae", "mask": "guided"}}
#: the suite run on every snapshot: (control, exclude_self); chance comes with the real run
VARIANTS = (("none", True), ("donor-keypoints", True), ("shuffle-keypoints", True))
ALL_LAYERS = 0          # the ``layer`` value of the mean over layers in the tables below


def train(base: PretrainConfig, objectives=tuple(OBJECTIVES), seed: int = 0, *, root: str | Path | None = None,
          progress: bool = True) -> dict[str, Path]:
    """Train (or resume, or read) each objective's run of ``base`` (which must keep snapshots)
    -> {objective: run folder}."""
    if not base.snapshot_every:
        raise ValueError("the emergence runs need encoder snapshots: set snapshot_every >= 1")
    out = {}
    for name in objectives:
        if name not in OBJECTIVES:
            raise ValueError(f"unknown objective {name!r}; have {list(OBJECTIVES)}")
        cfg = base.replace(seed=int(seed), **OBJECTIVES[name])
        d = run_dir(cfg, root)
        if not is_complete(d):
            run_pretrain(cfg, d, progress=progress, desc=f"{name} seed {seed}")
        out[name] = d
    return out


def final_specs(runs: dict[str, Path]) -> dict[str, str]:
    """{objective: ``"ARCH@PATH"`` of its last snapshot}: the trained encoders, for the model registry."""
    out = {}
    for name, d in runs.items():
        snaps = snapshots(d)
        if not snaps:
            raise FileNotFoundError(f"{d} keeps no encoder snapshots")
        out[name] = snapshot_spec(snaps[max(snaps)])
    return out


def analyze_snapshots(runs: dict[str, Path], base: AnalysisParams, *, root: str | Path | None = None,
                      progress: bool = True) -> dict[tuple[str, int], dict[tuple[str, bool], RunDir]]:
    """:data:`VARIANTS` of ``base`` on every snapshot -> {(objective, epoch): {variant: run folder}}."""
    out = {}
    for name, d in runs.items():
        for epoch, path in snapshots(d).items():
            p = base.replace(model=snapshot_spec(path))
            out[(name, epoch)] = study.suite(p, controls=tuple(dict.fromkeys(c for c, _ in VARIANTS)),
                                             exclude_self=(True,), root=root, progress=progress)
    return out


def _gap(heads: pd.DataFrame) -> pd.DataFrame:
    """(images x layers): KK - NK per image and layer, heads averaged."""
    return study.per_image_layer(heads, "theta_kk") - study.per_image_layer(heads, "theta_nk")


def per_image_semantic(suites: dict) -> dict[tuple[str, int], pd.DataFrame]:
    """{(objective, epoch): (images x layers) semantic part} over the images defined at every layer."""
    out = {}
    for key, runs in suites.items():
        real, donor = (study.heads(runs[(c, True)]) for c in ("none", "donor-keypoints"))
        out[key] = (_gap(real) - _gap(donor)).dropna(how="any")
    return out


def semantic_curves(suites: dict, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """One row per (objective, epoch, layer) with layer :data:`ALL_LAYERS` = the mean over layers:
    ``semantic`` (mean over images), ``low`` / ``high`` (95 % bootstrap CI), ``n_images``. Images: those
    defined in every snapshot of an objective (counts do not change with the weights), one bootstrap
    draw of them for every column."""
    per = per_image_semantic(suites)
    rows = []
    for name in dict.fromkeys(k[0] for k in per):
        epochs = sorted(e for n, e in per if n == name)
        images = sorted(set.intersection(*(set(per[(name, e)].index) for e in epochs)))
        if not images:
            raise ValueError(f"{name}: no image has the semantic part defined at every layer and epoch")
        blocks = []
        for e in epochs:
            m = per[(name, e)].loc[images]
            blocks.append(np.column_stack([m.to_numpy().mean(1), m.to_numpy()]))   # (I, 1 + L)
        vals = np.concatenate(blocks, axis=1)
        mean, lo, hi = S.bootstrap_means(vals, S.bootstrap_weights(len(images), n_boot, seed))
        layers = [ALL_LAYERS] + [int(c) for c in per[(name, epochs[0])].columns]
        for i, (e, layer) in enumerate((e, layer) for e in epochs for layer in layers):
            rows.append({"objective": name, "epoch": e, "layer": layer, "semantic": mean[i], "low": lo[i],
                         "high": hi[i], "n_images": len(images)})
    return pd.DataFrame(rows)


def first_appearance(curve: pd.DataFrame) -> dict | None:
    """The rule: the first epoch from which the semantic part stays above 0 with a CI excluding 0
    (``low > 0``) at every later snapshot too; ``curve``: rows of one objective and layer (epoch,
    semantic, low, high). None: it never does. Why "stays": taking the first of E per-epoch CIs
    that excludes 0 would raise false alarms about 1 - 0.975^E of the time; a run that must last to
    the final snapshot can be a false alarm no more often than that one CI."""
    c = curve.sort_values("epoch")
    above = ((c.semantic > 0) & (c.low > 0)).to_numpy()
    stays = np.logical_and.accumulate(above[::-1])[::-1]      # above here and at every later epoch
    if not stays.any():
        return None
    r = c.iloc[int(np.argmax(stays))]
    return {"epoch": int(r.epoch), "semantic": float(r.semantic), "low": float(r.low), "high": float(r.high)}


def first_table(curves: pd.DataFrame) -> pd.DataFrame:
    """Per (objective, layer): the first-appearance epoch (:func:`first_appearance`; NaN: not within
    the run) with the semantic part and its CI at that epoch, and the epochs looked at."""
    rows = []
    for (name, layer), c in curves.groupby(["objective", "layer"], sort=False):
        f = first_appearance(c) or {"epoch": np.nan, "semantic": np.nan, "low": np.nan, "high": np.nan}
        rows.append({"objective": name, "layer": "all (mean)" if layer == ALL_LAYERS else str(layer),
                     "first_epoch": f["epoch"], "semantic": f["semantic"], "low": f["low"], "high": f["high"],
                     "epochs_seen": f"{int(c.epoch.min())}-{int(c.epoch.max())}"})
    return pd.DataFrame(rows)


def guided_earlier(guided: int | float | None, random: int | float | None) -> tuple[bool, str]:
    """The rule: guided masking makes the semantic part appear earlier when it appears under guided
    masks and either never under random masks or at a strictly earlier epoch. -> (holds, reason)."""
    g = None if guided is None or pd.isna(guided) else int(guided)
    r = None if random is None or pd.isna(random) else int(random)
    if g is None:
        return False, ("it appears under neither mask" if r is None else
                       f"it appears only under random masks (epoch {r})")
    if r is None:
        return True, f"it appears under guided masks (epoch {g}) and never under random masks"
    if g < r:
        return True, f"guided epoch {g} < random epoch {r}"
    return False, f"guided epoch {g} {'=' if g == r else '>'} random epoch {r}"


def suite_curves(suites: dict) -> pd.DataFrame:
    """Per (objective, epoch, layer): the whole suite's layer curves (``study.layer_curves`` with
    exclude_self: real kk / nk / gap, chance-paired kk_minus_chance, each control's gap_<control>,
    semantic / semantic_gap)."""
    return pd.concat([study.layer_curves(runs, exclude_self=True).assign(objective=name, epoch=epoch)
                      for (name, epoch), runs in suites.items()], ignore_index=True)


# ---- the input size: the smallest at which SIFT still finds enough keypoints on the model's input ----

def keypoint_sizes(images: str, limit: int | None, sizes, patch_size: int, crop_pct: float = 0.875,
                   sift: dict | None = None, num_workers: int = 1) -> pd.DataFrame:
    """Per input size: patches per image, mean keypoint patches per image (SIFT count > 0, on the
    model's own crop, as pre-training sees it: ``mae_data.prepare_arrays``), their share, and the
    share of images with both a keypoint and a non-keypoint patch (KK and NK defined)."""
    rows = []
    for s in sorted(int(x) for x in sizes):
        c = prepare_arrays(images, limit, s, patch_size, crop_pct, sift or SiftParams(), num_workers=num_workers,
                           progress=False).counts
        k = (c > 0).sum(1)
        rows.append({"img_size": s, "patches": c.shape[1], "images": len(c), "key_patches_per_image": k.mean(),
                     "key_share": (c > 0).mean(), "both_kinds": ((k > 0) & (k < c.shape[1])).mean()})
    return pd.DataFrame(rows)


def choose_size(table: pd.DataFrame, min_key_share: float, min_key_patches: float) -> int:
    """The rule: the smallest size whose keypoint-patch share is at least ``min_key_share`` and whose
    images have at least ``min_key_patches`` keypoint patches on average (the largest size if none)."""
    ok = table[(table.key_share >= min_key_share) & (table.key_patches_per_image >= min_key_patches)]
    return int(ok.img_size.min()) if len(ok) else int(table.img_size.max())


def usable_objectives(cfg: PretrainConfig, objectives) -> tuple[list[str], str]:
    """(objectives to train, a note): supervised needs at least two labelled classes in the training images."""
    labels = {r.label for r in resolve_images(cfg.train_images, cfg.train_limit)}
    if "supervised" in objectives and (len(labels) < 2 or None in labels):
        return [o for o in objectives if o != "supervised"], (
            f"{cfg.train_images} has no class labels (folders), so the supervised objective is skipped.")
    return list(objectives), ""


# ---- one recipe for notebook 10 and for whoever wants its trained encoders (notebook 09) ----

SECTION = "10_emergence"
#: notebook 10's recipe parameters; its parameters cell holds the same defaults (tested)
DEFAULTS = {"train_images": "imagenette:train", "train_limit": 1500, "val_images": "imagenette:val",
            "val_limit": 500, "epochs": 10, "snapshot_every": 2, "img_sizes": [32, 48], "patch_size": 8,
            "min_key_share": 0.3, "min_key_patches": 8.0, "objectives": list(OBJECTIVES), "seed": 0,
            "num_workers": 1}


def setup(profile: str, **params) -> dict:
    """The emergence recipe of ``profile`` (notebook 07's MAE recipe, ``mae_runs.mae_recipe``) with
    :data:`DEFAULTS` updated by ``params``: Imagenette falls back to the bundled photos (``notes``),
    the input size follows :func:`choose_size` -> {base, sizes, img_size, objectives, seed, notes}."""
    p = {**DEFAULTS, **{k: v for k, v in params.items() if k in DEFAULTS}}
    train_used, train_note = study.choose_images(p["train_images"])
    val_used, _ = study.choose_images(p["val_images"])
    sizes = keypoint_sizes(train_used, p["train_limit"] or None, p["img_sizes"], p["patch_size"],
                           num_workers=p["num_workers"])
    img_size = choose_size(sizes, p["min_key_share"], p["min_key_patches"])
    base = mae_recipe(profile, img_size=img_size, patch_size=p["patch_size"], train_images=train_used,
                      train_limit=p["train_limit"], val_images=val_used, val_limit=p["val_limit"],
                      epochs=p["epochs"], snapshot_every=p["snapshot_every"], seed=p["seed"])
    objectives, skip_note = usable_objectives(base, p["objectives"])
    return {"base": base, "sizes": sizes, "img_size": img_size, "objectives": objectives, "seed": p["seed"],
            "notes": " ".join(n for n in (train_note, skip_note) if n)}


def profile_specs(profile: str, progress: bool = True) -> dict[str, str]:
    """{objective: ``"ARCH@PATH"``} of the final encoders notebook 10 trains under ``profile``
    (``params/<profile>.yaml`` as ``reproduce`` hands it to notebook 10: its top-level parameters, then
    its ``10_emergence`` section, over :data:`DEFAULTS`); trains what is not in results yet (the same
    run folders notebook 10 reads)."""
    top, section = profile_params(profile, SECTION)
    s = setup(profile, **{**top, **section})
    return final_specs(train(s["base"], s["objectives"], s["seed"], progress=progress))
