"""Model randomisation (DESIGN.md section 3, control (e); Adebayo et al. 2018, "Sanity checks for
saliency maps"): the trained model's blocks re-initialised from the last one down (``cascade``, step k
= the last k blocks random) and one at a time (``single``, step b = block b random), with the weights
the ``random-init`` control gives the same architecture and seed. Every step scores each image's maps
with its own keypoint counts (``real``) and a donor image's (``donor``, the seeded derangement
``masking.donor_rows``) in ONE forward pass per batch; results are cached per parameter set.
"""
from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from vitsift_core.data.batches import iter_batches
from vitsift_core.data.keypoints import CountsIdentity, KeypointCache, SiftParams
from vitsift_core.data.sources import resolve_images
from vitsift_core.experiments.analysis import batch_metrics, check_forward
from vitsift_core.method import metrics as M
from vitsift_core.method.masking import donor_rows
from vitsift_core.model.collectors import MetricCollector
from vitsift_core.model.infer import PRECISIONS, forward_precision
from vitsift_core.model.registry import load_model
from vitsift_core.paths import atomic_write, results_dir
from vitsift_core.store import Params, RunFolder, at_least_one, in_range, load_parquet, savez

KINDS = ("cascade", "single")
VARIANTS = ("real", "donor")
METRICS = ("theta_kk", "theta_nk", "theta_chance", "focus")
ROW_COLS = ["kind", "step", "image", "layer", "variant", *METRICS]


@dataclass(frozen=True)
class Step:
    """One randomisation step: ``kind`` cascade|single, ``step`` (cascade: how many of the last blocks
    are random, 0 = the trained model; single: the 1-based block), ``blocks`` (0-based, random)."""
    kind: str
    step: int
    blocks: tuple[int, ...]

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.step:02d}"


def plan_steps(n_blocks: int, single: bool = True) -> list[Step]:
    """Cascade steps 0..n_blocks (step k: blocks n-k..n-1 random), then each block alone."""
    steps = [Step("cascade", k, tuple(range(n_blocks - k, n_blocks))) for k in range(n_blocks + 1)]
    if single:
        steps += [Step("single", b + 1, (b,)) for b in range(n_blocks)]
    return steps


def randomise_blocks(model: nn.Module, reference: nn.Module, blocks) -> nn.Module:
    """A copy of ``model`` whose ``blocks`` (0-based) hold ``reference``'s weights (a random-init
    model of the same architecture); every other tensor, and ``model`` itself, untouched."""
    out = copy.deepcopy(model)
    for b in blocks:
        out.blocks[b].load_state_dict(reference.blocks[b].state_dict(), strict=True)
    return out


def reference_model(spec: str, seed: int, img_size: int | None = None) -> nn.Module:
    """The weights a re-initialised block takes: the ``random-init`` control's model (same seed)."""
    return load_model(spec, control="random-init", device="cpu", seed=seed, img_size=img_size).model


def image_rows(ids: list[str], res: dict[str, torch.Tensor], variant: str) -> pd.DataFrame:
    """res: metric -> (B, L, H) -> one row per (image, layer): the head mean (NaN when undefined)."""
    b, n_layers, _ = res["focus"].shape
    df = pd.DataFrame({"image": np.repeat(np.asarray(ids, dtype=object), n_layers),
                       "layer": np.tile(np.arange(1, n_layers + 1), b).astype(np.int16), "variant": variant})
    for k in METRICS:
        df[k] = torch.nanmean(res[k].double(), dim=2).reshape(-1).numpy().astype(np.float32)
    return df


def score_step(lm, reference: nn.Module, step: Step, x: torch.Tensor, counts: torch.Tensor,
               donor_counts: torch.Tensor, ids: list[str], *, gamma: float = 1.0, weighted: bool = True,
               exclude_self: bool = False, focus_kind: str = "minmax", batch_size: int = 32,
               precision: str = "auto") -> pd.DataFrame:
    """One step on images x (n, 3, S, S) with counts and donor_counts (n, N): rows ``ROW_COLS``, one
    forward pass per batch for both variants (``analysis.batch_metrics``)."""
    net = dataclasses.replace(lm, model=randomise_blocks(lm.model, reference, step.blocks)) if step.blocks else lm
    collector = MetricCollector(len(lm.model.blocks), gamma, weighted, focus_kind)
    frames = []
    for s in range(0, len(x), batch_size):
        sl = slice(s, s + batch_size)
        out = batch_metrics(net, collector, x[sl], {"real": (counts[sl], exclude_self),
                                                    "donor": (donor_counts[sl], exclude_self)}, precision)
        frames += [image_rows(ids[sl], out[v], v) for v in VARIANTS]
    df = pd.concat(frames, ignore_index=True)
    df.insert(0, "step", np.int16(step.step))
    df.insert(0, "kind", step.kind)
    return df[ROW_COLS]


@dataclass
class RandParams(CountsIdentity, Params):
    """What decides a randomisation run's numbers (plus how to run it, which does not)."""
    model: str = "embedded"
    images: str = "imagenette:val"
    limit: int | None = 64
    gamma: float = 1.0
    weighted: bool = True
    exclude_self: bool = False
    focus_kind: str = "minmax"
    seed: int = 0                   # the random-init weights and the donor derangement
    single: bool = True             # also each block alone
    img_size: int | None = None
    sift: dict = field(default_factory=lambda: dataclasses.asdict(SiftParams()))
    dedupe_keypoints: bool = False  # one count per keypoint location, as the analysis' option
    # how to run: not part of the identity
    batch_size: int = 32
    device: str = "auto"
    num_workers: int = 1
    precision: str = "auto"

    RUNTIME_KEYS = ("batch_size", "device", "num_workers", "precision")

    def __post_init__(self):
        if self.focus_kind not in M.FOCUS_KINDS:
            raise ValueError(f"focus_kind must be one of {M.FOCUS_KINDS}, got {self.focus_kind!r}")
        in_range("gamma", self.gamma, 0, lo_open=True)
        at_least_one(limit=self.limit, batch_size=self.batch_size, img_size=self.img_size)
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        self.sift = dataclasses.asdict(SiftParams(**self.sift))


class RandRun(RunFolder):
    """``params.json``, one ``parts/<step>.parquet`` per finished step, then ``steps.parquet``,
    ``keypoints.npz`` (ids, counts, donor rows) and ``run.json`` (seconds)."""
    what = "randomisation run"
    outputs = ("steps.parquet", "keypoints.npz")

    def step_file(self, step: Step) -> Path:
        return self.parts / f"{step.name}.parquet"

    def rows(self) -> pd.DataFrame:
        return pd.read_parquet(self.path / "steps.parquet")


def load_inputs(lm, params: RandParams) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """The image set in memory: (ids, x (n, 3, S, S), counts (n, N)); undecodable files left out."""
    records = resolve_images(params.images, params.limit)
    ids, xs, cs = [], [], []
    for batch, _ in iter_batches(records, lm.data_config, lm.grid, lm.patch_size, batch_size=params.batch_size,
                                 sift=SiftParams(**params.sift), num_workers=params.num_workers,
                                 cache=KeypointCache(), progress=False, dedupe_keypoints=params.dedupe_keypoints):
        if batch is not None:
            ids += batch.ids
            xs.append(batch.tensors)
            cs.append(batch.counts)
    if len(ids) < 2:
        raise ValueError(f"{params.images!r}: {len(ids)} usable images; the donor control needs >= 2")
    return ids, torch.cat(xs), torch.cat(cs)


def _done(run: RandRun, step: Step, n_rows: int) -> bool:
    df = load_parquet(run.step_file(step))
    return df is not None and len(df) == n_rows and list(df.columns) == ROW_COLS


def run_randomisation(params: RandParams, root: str | Path | None = None, progress: bool = True,
                      reference: nn.Module | None = None) -> RandRun:
    """Run (or read back, or resume step by step) ``params``' randomisation in
    ``root/<params.key()>`` (root default ``results_dir()/randomisation``)."""
    root = Path(root) if root is not None else results_dir() / "randomisation"
    run = RandRun(root / params.key(), params)
    if run.finished():
        return run
    with run.lock():
        lm = load_model(params.model, device=params.device, img_size=params.img_size)
        ref = reference if reference is not None else reference_model(params.model, params.seed, params.img_size)
        ids, x, counts = load_inputs(lm, params)
        forward = forward_precision(next(lm.model.parameters()).device, params.precision)
        run.prepare(len(ids), model={"spec": lm.spec, "arch": lm.arch, "source": lm.source, "forward": forward})
        check_forward(run, forward, "*.parquet", default=None)
        donor = donor_rows(ids, params.seed)
        steps = plan_steps(len(lm.model.blocks), params.single)
        n_rows = len(ids) * len(lm.model.blocks) * len(VARIANTS)
        kw = dict(gamma=params.gamma, weighted=params.weighted, exclude_self=params.exclude_self,
                  focus_kind=params.focus_kind, batch_size=params.batch_size, precision=params.precision)
        t0, computed = time.perf_counter(), 0
        for step in tqdm(steps, desc=f"randomise {params.model}", unit="step", disable=not progress):
            if _done(run, step, n_rows):
                continue
            df = score_step(lm, ref, step, x, counts, counts[donor], ids, **kw)
            atomic_write(run.step_file(step), lambda p, df=df: df.to_parquet(p, index=False))
            computed += 1
        seconds = time.perf_counter() - t0
        rows = pd.concat([pd.read_parquet(run.step_file(s)) for s in steps], ignore_index=True)
        atomic_write(run.path / "steps.parquet", lambda p: rows.to_parquet(p, index=False))
        savez(run.path / "keypoints.npz", ids=np.asarray(ids, dtype=str), counts=counts.numpy().astype(np.int32),
              donor=donor)
        run.mark_complete(n_images=len(ids), n_steps=len(steps), steps_computed=computed,
                          seconds=round(seconds, 1))
    return run
