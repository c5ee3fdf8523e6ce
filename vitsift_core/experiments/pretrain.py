"""MAE pre-training with random or keypoint-guided masks (paper Sec. 5.2): one run = one
:class:`PretrainConfig` in one folder (config.json, checkpoint.pt, metrics.csv, steps.csv, run.json),
resumable to identical files, evaluated by k-NN every epoch, DDP under torchrun. README "MAE
pre-training" and DESIGN.md "Convergence" give the recipe; ``vitsift pretrain --help`` the options.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from vitsift_core.method import guided as MM
from vitsift_core.method.linear import knn_accuracy, linear_probe
from vitsift_core.data.keypoints import SiftParams
from vitsift_core.experiments.mae_data import ArraySet, prepare_arrays, to_input
from vitsift_core.store import Params, atomic_write, check_identity, distributed, key_of, read_json, write_json

__all__ = ["PretrainConfig", "run_pretrain", "initial_accuracy",
           "run_dir", "experiment_dir", "load_metrics", "load_steps",
           "is_complete", "config_from_params", "main"]

METRIC_COLS = ["epoch", "beta", "key_share", "train_loss", "lr", "knn_acc", "probe_acc"]


@dataclass
class PretrainConfig(Params):
    """Everything that decides a pre-training run's numbers (plus runtime keys that do not)."""

    # encoder: a timm architecture, with optional overrides (None keeps the architecture's value)
    encoder: str = "vit_tiny_patch16_224"
    img_size: int = 64
    patch_size: int | None = 8
    depth: int | None = 4
    embed_dim: int | None = 128
    num_heads: int | None = 4
    # decoder (official MAE: 512, 8, 16)
    decoder_dim: int = 64
    decoder_depth: int = 1
    decoder_heads: int = 4
    norm_pix_loss: bool = False
    # data
    train_images: str = "imagenette:train"
    train_limit: int | None = 2000
    val_images: str = "imagenette:val"
    val_limit: int | None = 500
    knn_memory: int | None = None      # first n train images as k-NN memory (None: all)
    crop_pct: float = 0.875
    flip: bool = True
    sift: dict = field(default_factory=lambda: dataclasses.asdict(SiftParams()))
    # masking
    mask: str = "random"               # 'random' | 'guided'
    mask_ratio: float = 0.75
    betas: tuple = (0.1, 0.2, 0.3, 0.4, 0.5)
    beta_every: int = 10
    order: str = "random"              # guided only: 'random' | 'score' (theta score of score_layer)
    score_layer: int | None = None     # 0-based encoder block for order='score' (None: the middle one)
    # optimisation
    epochs: int = 10
    batch_size: int = 64               # global batch
    blr: float = 1.5e-4                # lr = blr * batch_size / 256
    min_lr: float = 0.0
    warmup_epochs: float = 1.0
    weight_decay: float = 0.05
    seed: int = 0
    # evaluation
    knn_k: int = 20
    knn_t: float | None = 0.07
    probe: bool = True                 # linear probe after the last epoch
    probe_every: int = 0               # also after every k-th epoch (0: only at the end)
    # runtime: not part of the identity
    device: str = "auto"
    amp: bool = True                   # bf16 autocast on CUDA (ignored on CPU)
    num_workers: int = 1               # decode + SIFT workers when preparing the arrays
    threads: int | None = None         # torch CPU threads (None: leave as is)
    eval_batch_size: int = 256

    RUNTIME_KEYS = ("device", "amp", "num_workers", "threads", "eval_batch_size")

    def __post_init__(self):
        if self.mask not in MM.MASK_KINDS:
            raise ValueError(f"mask must be one of {MM.MASK_KINDS}, got {self.mask!r}")
        if self.order not in ("random", "score"):
            raise ValueError(f"order must be 'random' or 'score', got {self.order!r}")
        self.betas = tuple(float(b) for b in self.betas)
        MM.BetaSchedule(self.betas, self.beta_every)        # validates
        MM.n_masked(16, self.mask_ratio)                    # validates
        if self.batch_size < 1 or self.epochs < 1:
            raise ValueError("batch_size and epochs must be >= 1")
        self.sift = dataclasses.asdict(SiftParams(**self.sift))

    @property
    def lr(self) -> float:
        return self.blr * self.batch_size / 256

    def _identity(self, d: dict) -> dict:
        d["betas"] = list(d["betas"])
        if self.mask == "random":   # curriculum settings do not touch a random-mask run
            d["betas"], d["beta_every"], d["order"], d["score_layer"] = None, None, None, None
        d["format"] = "mae-pretrain-v1"
        return d

    def recipe_key(self) -> str:
        """Hash of everything except mask kind, curriculum and seed: one experiment's folder."""
        d = self.identity()
        for k in ("mask", "seed", "betas", "beta_every", "order", "score_layer"):
            d.pop(k)
        return key_of(d)

    def schedule(self) -> MM.BetaSchedule:
        return MM.BetaSchedule(self.betas, self.beta_every)


def config_from_params(params: dict, **override) -> PretrainConfig:
    """A config from a parameter dict (keys that are not fields are ignored); 0 / "" mean None for
    the optional sizes and limits."""
    names = {f.name for f in dataclasses.fields(PretrainConfig)}
    kw = {k: v for k, v in params.items() if k in names}
    kw.update(override)
    for k in ("patch_size", "depth", "embed_dim", "num_heads", "train_limit", "val_limit",
              "knn_memory", "score_layer", "threads"):
        if k in kw and kw[k] in (0, "", "none", "None"):
            kw[k] = None   # notebooks and the command line use 0 for "the default / all"
    return PretrainConfig(**kw)


# ---------------------------------------------------------------------- helpers
def build_model(cfg: PretrainConfig):
    from vitsift_core.model.mae import build_mae
    return build_mae(cfg.encoder, img_size=cfg.img_size, patch_size=cfg.patch_size, depth=cfg.depth,
                     embed_dim=cfg.embed_dim, num_heads=cfg.num_heads, decoder_embed_dim=cfg.decoder_dim,
                     decoder_depth=cfg.decoder_depth, decoder_num_heads=cfg.decoder_heads,
                     norm_pix_loss=cfg.norm_pix_loss, seed=cfg.seed)


def lr_at(cfg: PretrainConfig, it: float, total: int, warmup: int) -> float:
    """Linear warmup over ``warmup`` iterations, then half-cosine from lr to min_lr."""
    if it < warmup:
        return cfg.lr * it / warmup
    frac = (it - warmup) / max(1, total - warmup)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * frac))


def _param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def _csv(df: pd.DataFrame, path: Path) -> None:
    atomic_write(path, lambda p: df.to_csv(p, index=False, float_format="%.9g"))


def _labels_to_int(labels: list, classes: list[str]) -> np.ndarray:
    index = {c: i for i, c in enumerate(classes)}
    missing = sorted({str(l) for l in labels if l not in index})
    if missing:
        raise ValueError(f"labels {missing[:5]} are not among the train classes {classes[:10]}")
    return np.array([index[l] for l in labels], dtype=np.int64)


@torch.no_grad()
def encode(model, images: np.ndarray, device, batch_size: int = 256, amp: bool = False) -> torch.Tensor:
    """CLS features (n, D) float32 on CPU of full images, in eval mode."""
    was = model.training
    model.eval()
    out = []
    for s in range(0, len(images), batch_size):
        x = to_input(images[s:s + batch_size], device)
        with _autocast(device, amp):
            out.append(model.features(x).float().cpu())
    model.train(was)
    return torch.cat(out) if out else torch.zeros(0, model.embed_dim)


@torch.no_grad()
def theta_scores(model, images: np.ndarray, counts: np.ndarray, layer: int, device,
                 batch_size: int = 256) -> np.ndarray:
    """Per-patch theta score s_i (heads of ``layer`` averaged; metrics.patch_scores) for all
    images with the current encoder, (n, N) float32."""
    from vitsift_core.model.capture import PatchScoreCollector, capture_attention, core_workers, forward_on_cores
    was = model.training
    model.eval()
    out = []
    col = PatchScoreCollector([layer], gamma=1.0, weighted=True, exclude_self=False)
    # CPU: the batch split over the cores; the collector scores each slice with its own images' keypoints
    workers = core_workers(device)
    for s in range(0, len(images), batch_size):
        x = to_input(images[s:s + batch_size], device)
        col.start_batch(torch.from_numpy(np.asarray(counts[s:s + batch_size])).to(device))
        with capture_attention(model.encoder, model.num_prefix_tokens, col, [layer], stop_early=True):
            forward_on_cores(lambda xs: model.forward_encoder(xs, None), x, workers)
        out.append(col.finish_batch()[0][:, 0].numpy())
    model.train(was)
    return np.concatenate(out)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _autocast(device, amp: bool):
    dev = torch.device(device)
    if amp and dev.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return _null()


def _resolve_device(cfg: PretrainConfig, rank: int, world: int) -> torch.device:
    dev = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                       "cpu" if cfg.device == "auto" else cfg.device)
    if dev.type == "cuda" and dev.index is None:   # one GPU per process under torchrun
        dev = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', rank)) % torch.cuda.device_count()}")
    return dev


# ---------------------------------------------------------------------- the run
def is_complete(out: str | Path) -> bool:
    p = Path(out) / "run.json"
    return p.exists() and read_json(p).get("complete", False)


@contextmanager
def _runtime(cfg: PretrainConfig, device: torch.device, tf32: bool = True):
    """torch threads (``cfg.threads``) and, on CUDA with ``tf32``, TF32 matmuls for the block; both
    restored after."""
    threads = torch.get_num_threads()
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    if device.type == "cuda" and tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


@dataclass
class _Data:
    """Train and val arrays with integer labels; the first ``mem`` train images are the k-NN memory."""

    train: ArraySet
    val: ArraySet
    classes: list[str]
    y_train: np.ndarray
    y_val: np.ndarray
    mem: int


def _load_data(cfg: PretrainConfig, patch: int, progress: bool, rank: int = 0, dist=None) -> _Data:
    def prep(images, limit):
        return prepare_arrays(images, limit, cfg.img_size, patch, cfg.crop_pct, cfg.sift,
                              num_workers=cfg.num_workers, progress=progress and rank == 0)

    # rank 0 decodes first; the others then read its cache
    if rank == 0:
        train, val = prep(cfg.train_images, cfg.train_limit), prep(cfg.val_images, cfg.val_limit)
    if dist is not None:
        dist.barrier()
    if rank != 0:
        train, val = prep(cfg.train_images, cfg.train_limit), prep(cfg.val_images, cfg.val_limit)
    classes = sorted({str(l) for l in train.labels})
    mem = len(train) if cfg.knn_memory is None else min(int(cfg.knn_memory), len(train))
    return _Data(train, val, classes, _labels_to_int([str(l) for l in train.labels], classes),
                 _labels_to_int([str(l) for l in val.labels], classes), mem)


def evaluate(model, data: _Data, cfg: PretrainConfig, device, probe: bool) -> tuple[float, float]:
    """(k-NN accuracy, linear-probe accuracy or NaN) of the encoder's CLS features: memory = the
    first ``data.mem`` train images, queries = the val images."""
    f_mem = encode(model, data.train.images[:data.mem], device, cfg.eval_batch_size, cfg.amp)
    f_val = encode(model, data.val.images, device, cfg.eval_batch_size, cfg.amp)
    y_mem, n_cls = data.y_train[:data.mem], len(data.classes)
    acc = knn_accuracy(f_mem, y_mem, f_val, data.y_val, n_cls, cfg.knn_k, cfg.knn_t)
    return acc, (linear_probe(f_mem, y_mem, f_val, data.y_val, n_cls)["val_acc"] if probe else float("nan"))


def save_checkpoint(path: Path, model, opt, cfg: PretrainConfig, epoch: int, history: list,
                    step_rows: list, classes: list[str]) -> None:
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch,
                "history": history, "steps": step_rows, "key": cfg.key(), "classes": classes,
                "config": ident_for_checkpoint(cfg)}
    atomic_write(path, lambda p: torch.save(state, p))


def load_checkpoint(path: Path, model, opt, cfg: PretrainConfig) -> tuple[int, list, list]:
    """Restore model and optimiser from ``path`` if it exists -> (epochs done, history, step rows)."""
    if not path.exists():
        return 0, [], []
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state["key"] != cfg.key():
        raise RuntimeError(f"{path} belongs to another config ({state['key']} != {cfg.key()})")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    return state["epoch"], state["history"], state["steps"]


def epoch_batch(cfg: PretrainConfig, data: _Data, epoch: int, idx: np.ndarray, grid, beta: float,
                scores: np.ndarray | None):
    """Images (B, S, S, 3) uint8, counts (B, N) and masks (B, N) bool of train images ``idx`` in
    ``epoch``: flips and masks are functions of (seed, epoch, image index) only."""
    imgs = np.asarray(data.train.images[idx])
    counts = data.train.counts[idx].copy()
    masks = np.zeros(counts.shape, bool)
    for j, i in enumerate(idx):
        flipped = cfg.flip and MM.sample_rng(cfg.seed, epoch, i, MM.STREAM_FLIP).random() < 0.5
        if flipped:   # the image and its keypoint grid alike
            imgs[j] = imgs[j, :, ::-1]
            counts[j] = counts[j].reshape(grid)[:, ::-1].reshape(-1)
        rng = MM.sample_rng(cfg.seed, epoch, i, MM.STREAM_MASK)
        if cfg.mask == "random":
            masks[j] = MM.random_mask(counts.shape[1], cfg.mask_ratio, rng)
        else:
            sc = None
            if scores is not None:
                sc = scores[i].reshape(grid)[:, ::-1].reshape(-1) if flipped else scores[i]
            masks[j] = MM.guided_mask(counts[j], cfg.mask_ratio, beta, rng, cfg.order, sc)
    return imgs, counts, masks


def train_step(ddp, opt, x: torch.Tensor, m: torch.Tensor, lr: float, amp: bool, dist=None, world: int = 1) -> float:
    """One optimiser step on the (local slice of the) batch -> the global-batch loss."""
    for g in opt.param_groups:
        g["lr"] = lr
    with _autocast(x.device, amp):
        loss, _, _ = ddp(x, m)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    lval = loss.detach().float()
    if dist is not None:
        dist.all_reduce(lval)
        lval = lval / world
    return float(lval)


def _train_epoch(ddp, opt, cfg: PretrainConfig, data: _Data, epoch: int, sched: _Schedule, step_rows: list,
                 on_step, bar, rank: int = 0, dist=None, world: int = 1) -> dict:
    """One epoch of optimiser steps (appended to ``step_rows``) -> the epoch's row, not yet evaluated."""
    model = ddp.module if dist is not None else ddp
    beta = sched.betas(epoch) if cfg.mask == "guided" else float("nan")
    scores = None
    if cfg.mask == "guided" and cfg.order == "score":
        scores = theta_scores(model, data.train.images, data.train.counts, sched.score_layer, sched.device,
                              cfg.eval_batch_size)
    perm = np.random.default_rng([cfg.seed, epoch, 0xDA7A]).permutation(len(data.train))
    local_b = cfg.batch_size // world
    model.train()
    key_masked = total_masked = 0
    loss_sum = 0.0
    for s in range(sched.steps):
        it = epoch * sched.steps + s
        if on_step is not None:
            on_step(it)
        lr = lr_at(cfg, it, sched.total, sched.warmup)
        idx = perm[s * cfg.batch_size:(s + 1) * cfg.batch_size]
        idx = np.sort(idx[rank * local_b:(rank + 1) * local_b])
        imgs, counts, masks = epoch_batch(cfg, data, epoch, idx, model.grid, beta, scores)
        key_masked += int(((counts > 0) & masks).sum())
        total_masked += int(masks.sum())
        x, m = to_input(imgs, sched.device), torch.from_numpy(masks).to(sched.device)
        lval = train_step(ddp, opt, x, m, lr, cfg.amp, dist, world)
        if not math.isfinite(lval):
            raise FloatingPointError(f"loss is {lval} at epoch {epoch + 1}, step {s}")
        loss_sum += lval
        step_rows.append({"epoch": epoch + 1, "step": s, "loss": lval, "lr": lr})
        bar.update(1)
        bar.set_postfix(epoch=epoch + 1, loss=f"{lval:.4f}")
    if dist is not None:
        t_ = torch.tensor([key_masked, total_masked], dtype=torch.float64)
        dist.all_reduce(t_)
        key_masked, total_masked = t_.tolist()
    return {"epoch": epoch + 1, "beta": beta, "key_share": key_masked / max(total_masked, 1),
            "train_loss": loss_sum / sched.steps, "lr": lr}


@dataclass
class _Schedule:
    """Steps per epoch, total steps, warmup steps, the guided betas, the score layer, the device."""

    steps: int
    total: int
    warmup: int
    betas: MM.BetaSchedule
    score_layer: int
    device: torch.device


def _schedule(cfg: PretrainConfig, n_train: int, model, device) -> _Schedule:
    steps = n_train // cfg.batch_size
    if steps < 1:
        raise ValueError(f"{n_train} training images < one global batch of {cfg.batch_size}")
    layer = cfg.score_layer if cfg.score_layer is not None else len(model.encoder.blocks) // 2
    return _Schedule(steps, steps * cfg.epochs, int(round(cfg.warmup_epochs * steps)), cfg.schedule(),
                     layer, device)


def run_pretrain(cfg: PretrainConfig, out: str | Path, *, progress: bool = True, desc: str | None = None,
                 on_step=None) -> Path:
    """Train (or resume, or return at once if complete) the run ``cfg`` in folder ``out``.

    ``on_step(global_step)`` is called before every optimiser step (tests use it to kill the run)."""
    out = Path(out)
    rank, world, _ = distributed()
    dist = torch.distributed if world > 1 else None
    if cfg.batch_size % world:
        raise ValueError(f"global batch {cfg.batch_size} is not divisible by {world} processes")
    _check_identity(cfg, out, rank)
    if is_complete(out):
        return out
    device = _resolve_device(cfg, rank, world)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    with _runtime(cfg, device):
        t_start = time.perf_counter()
        model = build_model(cfg)
        data = _load_data(cfg, model.patch_size, progress, rank, dist)
        t_data = time.perf_counter() - t_start
        sched = _schedule(cfg, len(data.train), model, device)
        model.to(device)
        opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95))
        ck = out / "checkpoint.pt"
        start_epoch, history, step_rows = load_checkpoint(ck, model, opt, cfg)
        ddp = model
        if dist is not None:
            ddp = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        bar = tqdm(total=sched.total, initial=start_epoch * sched.steps, unit="step", dynamic_ncols=True,
                   desc=desc or f"MAE {cfg.mask} seed {cfg.seed}", disable=not (progress and rank == 0))
        t_train = 0.0
        for epoch in range(start_epoch, cfg.epochs):
            t0 = time.perf_counter()
            row = _train_epoch(ddp, opt, cfg, data, epoch, sched, step_rows, on_step, bar, rank, dist, world)
            t_train += time.perf_counter() - t0
            if rank == 0:
                probe = (epoch + 1 == cfg.epochs and cfg.probe) or bool(
                    cfg.probe_every and (epoch + 1) % cfg.probe_every == 0)
                row["knn_acc"], row["probe_acc"] = evaluate(model, data, cfg, device, probe)
                history.append(row)
                save_checkpoint(ck, model, opt, cfg, epoch + 1, history, step_rows, data.classes)
                _csv(pd.DataFrame(history, columns=METRIC_COLS), out / "metrics.csv")
                _csv(pd.DataFrame(step_rows, columns=["epoch", "step", "loss", "lr"]),
                            out / "steps.csv")
                if progress:
                    bar.write(_epoch_line(out, cfg, row))
            if dist is not None:
                dist.barrier()
        bar.close()
        if rank == 0:
            n_seen = (cfg.epochs - start_epoch) * sched.steps * cfg.batch_size
            write_json(out / "run.json", {"complete": True, "epochs": cfg.epochs, "steps_per_epoch": sched.steps,
                          "n_train": len(data.train), "n_val": len(data.val), "knn_memory": data.mem,
                          "classes": data.classes, "n_skipped": len(data.train.skipped) + len(data.val.skipped),
                          "wall_s_this_process": round(time.perf_counter() - t_start, 2),
                          "data_s": round(t_data, 2), "train_s_this_process": round(t_train, 2),
                          "train_img_per_s": round(n_seen / t_train, 1) if t_train else None,
                          "device": str(device), "world": world, "threads": torch.get_num_threads(),
                          "resumed_from_epoch": start_epoch})
    if dist is not None:
        dist.barrier()
    return out


def _epoch_line(out: Path, cfg: PretrainConfig, row: dict) -> str:
    return (f"[{out.name}] epoch {row['epoch']}/{cfg.epochs}: loss {row['train_loss']:.4f}, "
            f"k-NN {row['knn_acc']:.3f}" + (f", beta {row['beta']:.2f}" if cfg.mask == "guided" else "")
            + f", keypoint share of masked {row['key_share']:.2f}")


def _check_identity(cfg: PretrainConfig, out: Path, rank: int) -> None:
    """Rank 0: write ``config.json`` in a new folder, refuse a folder holding another config."""
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if not check_identity(out / "config.json", cfg.identity(), "pretrain run"):
            write_json(out / "config.json", {"identity": cfg.identity(), "key": cfg.key(), "recipe_key": cfg.recipe_key()})


def initial_accuracy(cfg: PretrainConfig, progress: bool = False) -> dict:
    """Epoch 0: k-NN and linear-probe accuracy of the *untrained* encoder of ``cfg``'s seed (the
    weights every run with that seed starts from), on the same memory and queries as the runs."""
    device = _resolve_device(cfg, 0, 1)
    with _runtime(cfg, device, tf32=False):
        model = build_model(cfg).to(device)
        knn, probe = evaluate(model, _load_data(cfg, model.patch_size, progress), cfg, device, probe=True)
    return {"knn_acc": knn, "probe_acc": probe}


def ident_for_checkpoint(cfg: PretrainConfig) -> dict:
    d = dataclasses.asdict(cfg)
    d["betas"] = list(d["betas"])
    return d


# ---------------------------------------------------------------------- experiments and results
def experiment_dir(cfg: PretrainConfig, root: str | Path | None = None) -> Path:
    """``results/mae/<recipe key>/``: all mask kinds and seeds of one recipe."""
    from vitsift_core.paths import results_dir
    return Path(root if root is not None else results_dir() / "mae") / cfg.recipe_key()


def run_dir(cfg: PretrainConfig, root: str | Path | None = None) -> Path:
    """``<experiment_dir>/<mask>[-<curriculum key>]-seed<seed>``."""
    name = cfg.mask
    if cfg.mask == "guided":
        name += "-" + key_of({k: cfg.identity()[k] for k in ("betas", "beta_every", "order", "score_layer")})[:6]
    return experiment_dir(cfg, root) / f"{name}-seed{cfg.seed}"


def load_metrics(out: str | Path) -> pd.DataFrame:
    return pd.read_csv(Path(out) / "metrics.csv")


def load_steps(out: str | Path) -> pd.DataFrame:
    return pd.read_csv(Path(out) / "steps.csv")


# ---------------------------------------------------------------------- command line
def add_arguments(p) -> None:
    """The ``vitsift pretrain`` options: every PretrainConfig field as ``--field-name``."""
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
    p.add_argument("--out", default=None, help="run folder (default: results/mae/<recipe>/<mask>-seed<seed>)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_cli(sub) -> None:
    """Register ``vitsift pretrain`` on the main command line's subparsers."""
    p = sub.add_parser("pretrain", help="MAE pre-training with random or keypoint-guided masks "
                       "(resumable; torchrun for DDP)", description=__doc__,
                       formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    add_arguments(p)


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
        print(f"wrote {out}: {len(m)} epochs, k-NN {last.knn_acc:.4f}, probe {last.probe_acc:.4f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="python -m vitsift_core.experiments.pretrain",
                                 description="MAE pre-training with random or keypoint-guided masks")
    add_arguments(ap)
    return cmd_pretrain(ap.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
