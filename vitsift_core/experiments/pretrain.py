"""Pre-training of a small ViT encoder: MAE with random or keypoint-guided masks (paper Sec. 5.2), or
supervised (cross-entropy on the image labels; ``objective``), same encoder, data, schedule and seeds.
One run = one :class:`PretrainConfig` in one resumable folder, k-NN evaluated untrained (epoch 0) and after
every epoch, encoder snapshots every ``snapshot_every`` epochs (pretrain_state), DDP under torchrun."""
from __future__ import annotations

import dataclasses
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from vitsift_core.method import guided as MM
from vitsift_core.model.infer import amp_precision, forward_autocast
from vitsift_core.method.linear import knn_accuracy, linear_probe
from vitsift_core.data.keypoints import CountsIdentity, SiftParams
from vitsift_core.experiments.mae_data import TrainData, load_train_data, to_input
from vitsift_core.experiments.pretrain_eval import encode, head_accuracy, theta_scores  # noqa: F401
from vitsift_core.experiments.pretrain_state import (CHECKPOINT_KEYS, load_checkpoint, read_checkpoint,  # noqa: F401
                                                     save_checkpoint, save_snapshot, snapshot_epochs)
from vitsift_core.model.classifier import SupervisedViT
from vitsift_core.model.mae import build_mae
from vitsift_core.model.registry import resolve_device
from vitsift_core.store import (Params, at_least_one, atomic_write, check_identity, distributed,
                                in_range, key_of, local_rank, read_json, write_json)


METRIC_COLS = ["epoch", "beta", "key_share", "train_loss", "lr", "knn_acc", "probe_acc"]
STEP_COLS = ["epoch", "step", "loss", "lr"]
OBJECTIVES = ("mae", "supervised")
#: what a supervised run does not use: nulled in its identity (MAE identities never hold ``objective``).
#: Not decoder_dim / decoder_depth: build_mae draws the decoder's layers from the seeded stream before
#: re-initialising the encoder, so they set a supervised run's initial encoder too
MAE_ONLY = ("decoder_heads", "norm_pix_loss", "mask", "mask_ratio")


@dataclass
class PretrainConfig(CountsIdentity, Params):
    """Everything that decides a pre-training run's numbers (plus runtime keys that do not)."""

    encoder: str = "vit_tiny_patch16_224"
    objective: str = "mae"             # 'mae' | 'supervised' (cross-entropy on the train labels, CLS head)
    img_size: int = 64
    patch_size: int | None = 8
    depth: int | None = 4
    embed_dim: int | None = 128
    num_heads: int | None = 4
    decoder_dim: int = 64
    decoder_depth: int = 1
    decoder_heads: int = 4
    norm_pix_loss: bool = False
    train_images: str = "imagenette:train"
    train_limit: int | None = 2000
    val_images: str = "imagenette:val"
    val_limit: int | None = 500
    knn_memory: int | None = None      # first n train images as k-NN memory (None: all)
    crop_pct: float = 0.875
    flip: bool = True
    sift: dict = field(default_factory=lambda: dataclasses.asdict(SiftParams()))
    mask: str = "random"               # 'random' | 'guided'
    mask_ratio: float = 0.75
    betas: tuple = (0.1, 0.2, 0.3, 0.4, 0.5)
    beta_every: int = 10
    order: str = "random"              # guided only: 'random' | 'score' (theta score of score_layer)
    score_layer: int | None = None     # 0-based encoder block for order='score' (None: the middle one)
    epochs: int = 10
    batch_size: int = 64               # global batch
    blr: float = 1.5e-4                # lr = blr * batch_size / 256
    min_lr: float = 0.0
    warmup_epochs: float = 1.0
    weight_decay: float = 0.05
    seed: int = 0
    knn_k: int = 20
    knn_t: float | None = 0.07
    probe: bool = True                 # linear probe after the last epoch
    probe_every: int = 0               # also after every k-th epoch (0: only at the end)
    snapshot_every: int = 0            # encoder snapshot at epoch 0, every k-th and the last (0: none)
    # runtime: not part of the identity
    device: str = "auto"
    amp: bool = True                   # bf16 autocast on CUDA (ignored on CPU); guided scoring too
    num_workers: int = 1               # decode + SIFT workers when preparing the arrays
    threads: int | None = None         # torch CPU threads (None: leave as is)
    eval_batch_size: int = 256

    RUNTIME_KEYS = ("device", "amp", "num_workers", "threads", "eval_batch_size")

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.objective == "supervised" and self.mask != "random":
            raise ValueError("a supervised run masks nothing: leave mask='random' (guided masks are MAE's)")
        if self.mask not in MM.MASK_KINDS:
            raise ValueError(f"mask must be one of {MM.MASK_KINDS}, got {self.mask!r}")
        if self.order not in ("random", "score"):
            raise ValueError(f"order must be 'random' or 'score', got {self.order!r}")
        self.betas = tuple(float(b) for b in self.betas)
        MM.BetaSchedule(self.betas, self.beta_every)        # validates
        MM.mae_mask_count(16, self.mask_ratio)              # validates
        if self.batch_size < 1 or self.epochs < 1:
            raise ValueError("batch_size and epochs must be >= 1")
        at_least_one(img_size=self.img_size, patch_size=self.patch_size, depth=self.depth, embed_dim=self.embed_dim,
                     num_heads=self.num_heads, decoder_dim=self.decoder_dim, decoder_depth=self.decoder_depth,
                     decoder_heads=self.decoder_heads, train_limit=self.train_limit, val_limit=self.val_limit,
                     knn_memory=self.knn_memory, knn_k=self.knn_k, threads=self.threads,
                     eval_batch_size=self.eval_batch_size)
        for name, lo_open in (("blr", True), ("min_lr", False), ("warmup_epochs", False), ("weight_decay", False)):
            in_range(name, getattr(self, name), 0, lo_open=lo_open)
        in_range("crop_pct", self.crop_pct, 0, 1, lo_open=True, hi_open=False)
        for name in ("num_workers", "probe_every", "snapshot_every") + (("score_layer",) if self.score_layer is not None else ()):
            in_range(name, getattr(self, name), 0, integer=True)
        if self.knn_t is not None:
            in_range("knn_t", self.knn_t, 0, lo_open=True)
        self.sift = dataclasses.asdict(SiftParams(**self.sift))
        in_range("contrast_threshold", self.sift["contrast_threshold"], 0)

    @property
    def lr(self) -> float:
        return self.blr * self.batch_size / 256

    def _identity(self, d: dict) -> dict:
        d["betas"] = list(d["betas"])
        if self.mask == "random":   # curriculum settings do not touch a random-mask run
            d["betas"], d["beta_every"], d["order"], d["score_layer"] = None, None, None, None
        if self.objective == "mae":
            d.pop("objective")                # so MAE keys are those of before the objective existed
        else:
            d.update(dict.fromkeys(MAE_ONLY))
        if not self.snapshot_every:
            d.pop("snapshot_every")
        d["format"] = "mae-pretrain-v2"       # v2: metrics.csv starts with epoch 0 (untrained)
        return super()._identity(d)             # guided masks and key shares use counts: the rule

    def recipe_key(self) -> str:
        """Hash of everything except objective, mask kind, curriculum and seed: one experiment's folder."""
        skip = ("mask", "seed", "betas", "beta_every", "order", "score_layer")
        return key_of({k: v for k, v in self.replace(objective="mae").identity().items() if k not in skip})

    def schedule(self) -> MM.BetaSchedule:
        return MM.BetaSchedule(self.betas, self.beta_every)


def build_model(cfg: PretrainConfig):
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


def param_groups(model, weight_decay: float):
    """AdamW groups of the trainable parameters: no weight decay on biases and norms (ndim <= 1)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
            {"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay}]


def _resolve_device(cfg: PretrainConfig) -> torch.device:
    dev = resolve_device(cfg.device)
    if dev.type == "cuda" and dev.index is None:   # one GPU per process under torchrun (store's LOCAL_RANK)
        dev = torch.device(f"cuda:{local_rank() % torch.cuda.device_count()}")
    return dev


def is_complete(out: str | Path) -> bool:
    p = Path(out) / "run.json"
    return p.exists() and read_json(p).get("complete", False)


@contextmanager
def train_runtime(cfg: PretrainConfig, device: torch.device, tf32: bool = True):
    """torch threads (``cfg.threads``) and, on CUDA with ``tf32``, TF32 matmuls; both restored after."""
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


def metric_cols(cfg: PretrainConfig) -> list[str]:
    """metrics.csv's columns: a supervised run adds its own head's val accuracy (``head_acc``)."""
    return METRIC_COLS + (["head_acc"] if cfg.objective == "supervised" else [])


def trainee(cfg: PretrainConfig, model, n_classes: int):
    """What is trained: the MAE ``model`` itself, or (supervised) its encoder with a seeded class head."""
    return SupervisedViT(model, n_classes, cfg.seed) if cfg.objective == "supervised" else model


def evaluate(model, data: TrainData, cfg: PretrainConfig, device, probe: bool) -> tuple[float, float]:
    """(k-NN accuracy, linear-probe accuracy or NaN) of the CLS features: memory ``data.mem``, queries val."""
    f_mem = encode(model, data.train.images[:data.mem], device, cfg.eval_batch_size, cfg.amp)
    f_val = encode(model, data.val.images, device, cfg.eval_batch_size, cfg.amp)
    y_mem, n_cls = data.y_train[:data.mem], len(data.classes)
    acc = knn_accuracy(f_mem, y_mem, f_val, data.y_val, n_cls, cfg.knn_k, cfg.knn_t)
    return acc, (linear_probe(f_mem, y_mem, f_val, data.y_val, n_cls)["val_acc"] if probe else float("nan"))


def epoch_batch(cfg: PretrainConfig, data: TrainData, epoch: int, idx: np.ndarray, grid, beta: float,
                scores: np.ndarray | None):
    """Images (B, S, S, 3) uint8, counts (B, N), masks (B, N) bool of train images ``idx``; flips and
    masks depend on (seed, epoch, image index) only."""
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
    with forward_autocast(x.device, amp_precision(amp)):
        loss, _, _ = ddp(x, m)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    lval = loss.detach().float()
    if dist is not None:
        dist.all_reduce(lval)
        lval = lval / world
    return float(lval)


def _steps(cfg: PretrainConfig, n_train: int) -> int:
    steps = n_train // cfg.batch_size
    if steps < 1:
        raise ValueError(f"{n_train} training images < one global batch of {cfg.batch_size}")
    return steps


def _train_epoch(ddp, opt, cfg: PretrainConfig, data: TrainData, epoch: int, device, step_rows: list,
                 on_step, bar, rank: int = 0, dist=None, world: int = 1) -> dict:
    """One epoch of optimiser steps (appended to ``step_rows``) -> the epoch's row, not yet evaluated."""
    model = ddp.module if dist is not None else ddp
    steps = _steps(cfg, len(data.train))
    total, warmup = steps * cfg.epochs, int(round(cfg.warmup_epochs * steps))
    beta = cfg.schedule()(epoch) if cfg.mask == "guided" else float("nan")
    scores = None
    if cfg.mask == "guided" and cfg.order == "score":
        layer = cfg.score_layer if cfg.score_layer is not None else len(model.encoder.blocks) // 2
        scores = theta_scores(model, data.train.images, data.train.counts, layer, device, cfg.eval_batch_size,
                              amp_precision(cfg.amp))
    perm = np.random.default_rng([cfg.seed, epoch, 0xDA7A]).permutation(len(data.train))
    local_b = cfg.batch_size // world
    model.train()
    key_masked, total_masked, loss_sum = 0, 0, 0.0
    for s in range(steps):
        it = epoch * steps + s
        if on_step is not None:
            on_step(it)
        lr = lr_at(cfg, it, total, warmup)
        idx = perm[s * cfg.batch_size:(s + 1) * cfg.batch_size]
        idx = np.sort(idx[rank * local_b:(rank + 1) * local_b])
        imgs, counts, masks = epoch_batch(cfg, data, epoch, idx, model.grid, beta, scores)
        key_masked += int(((counts > 0) & masks).sum())
        total_masked += int(masks.sum())
        # the loss's second input: MAE's masks, or (supervised) the labels; flips and masks are drawn alike
        target = masks if cfg.objective == "mae" else data.y_train[idx]
        x, m = to_input(imgs, device), torch.from_numpy(target).to(device)
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
    share = key_masked / max(total_masked, 1) if cfg.objective == "mae" else float("nan")
    return {"epoch": epoch + 1, "beta": beta, "key_share": share,
            "train_loss": loss_sum / steps, "lr": lr}


def run_pretrain(cfg: PretrainConfig, out: str | Path, *, progress: bool = True, desc: str | None = None,
                 on_step=None) -> Path:
    """Train (or resume, or return at once if complete) the run ``cfg`` in folder ``out``;
    ``on_step(global_step)`` is called before every optimiser step."""
    out = Path(out)
    procs = distributed()
    rank, world, barrier = procs
    dist = torch.distributed if world > 1 else None
    if cfg.batch_size % world:
        raise ValueError(f"global batch {cfg.batch_size} is not divisible by {world} processes")
    _check_identity(cfg, out, rank)
    if is_complete(out):
        return out
    device = _resolve_device(cfg)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    with train_runtime(cfg, device):
        t_start = time.perf_counter()
        model = build_model(cfg)
        data = load_train_data(cfg, model.patch_size, progress, rank, barrier)
        model = trainee(cfg, model, len(data.classes))
        times = {"t_start": t_start, "data_s": time.perf_counter() - t_start, "train_s": 0.0}
        steps = _steps(cfg, len(data.train))
        model.to(device)
        opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95))
        start_epoch, history, step_rows = load_checkpoint(out / "checkpoint.pt", model, opt, cfg)
        if start_epoch == 0 and rank == 0:   # epoch 0: the untrained encoder, before any optimiser step
            history = [epoch0_row(model, data, cfg, device)]
            if 0 in snapshot_epochs(cfg):
                save_snapshot(out, model.encoder, cfg, 0)
        ddp = model
        if dist is not None:
            ddp = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        bar = tqdm(total=steps * cfg.epochs, initial=start_epoch * steps, unit="step", dynamic_ncols=True,
                   desc=desc or f"{_label(cfg)} seed {cfg.seed}", disable=not (progress and rank == 0))
        for epoch in range(start_epoch, cfg.epochs):
            t0 = time.perf_counter()
            row = _train_epoch(ddp, opt, cfg, data, epoch, device, step_rows, on_step, bar, rank, dist, world)
            times["train_s"] += time.perf_counter() - t0
            if rank == 0:
                probe = (epoch + 1 == cfg.epochs and cfg.probe) or bool(
                    cfg.probe_every and (epoch + 1) % cfg.probe_every == 0)
                row["knn_acc"], row["probe_acc"] = evaluate(model, data, cfg, device, probe)
                if cfg.objective == "supervised":
                    row["head_acc"] = head_accuracy(model, data, cfg, device)
                history.append(row)
                if epoch + 1 in snapshot_epochs(cfg):      # before the checkpoint: a resumed run has it
                    save_snapshot(out, model.encoder, cfg, epoch + 1)
                _save_epoch(out, model, opt, cfg, history, step_rows, data.classes)
                if progress:
                    beta = f", beta {row['beta']:.2f}" if cfg.mask == "guided" else ""
                    bar.write(f"[{out.name}] epoch {row['epoch']}/{cfg.epochs}: loss {row['train_loss']:.4f}, "
                              f"k-NN {row['knn_acc']:.3f}{beta}, keypoint share of masked {row['key_share']:.2f}")
            procs.sync()
        bar.close()
        if rank == 0:
            _finish(out, cfg, data, steps, start_epoch, times, device, world)
    procs.sync()
    return out


def _save_epoch(out: Path, model, opt, cfg: PretrainConfig, history: list, step_rows: list, classes) -> None:
    """After an epoch: the checkpoint, then metrics.csv and steps.csv."""
    save_checkpoint(out / "checkpoint.pt", model, opt, cfg, int(history[-1]["epoch"]), history, step_rows, classes)
    for rows, cols, name in ((history, metric_cols(cfg), "metrics.csv"), (step_rows, STEP_COLS, "steps.csv")):
        df = pd.DataFrame(rows, columns=cols)
        atomic_write(out / name, lambda p: df.to_csv(p, index=False, float_format="%.9g"))


def _finish(out: Path, cfg: PretrainConfig, data: TrainData, steps: int, start_epoch: int, times: dict,
            device, world: int) -> None:
    """run.json: the complete flag and how the run went (not part of the numbers)."""
    n_seen = (cfg.epochs - start_epoch) * steps * cfg.batch_size
    t_train = times["train_s"]
    write_json(out / "run.json", {
        "complete": True, "epochs": cfg.epochs, "steps_per_epoch": steps, "n_train": len(data.train),
        "n_val": len(data.val), "knn_memory": data.mem, "classes": data.classes,
        "n_skipped": len(data.train.skipped) + len(data.val.skipped),
        "wall_s_this_process": round(time.perf_counter() - times["t_start"], 2),
        "data_s": round(times["data_s"], 2), "train_s_this_process": round(t_train, 2),
        "train_img_per_s": round(n_seen / t_train, 1) if t_train else None, "device": str(device),
        "world": world, "threads": torch.get_num_threads(), "resumed_from_epoch": start_epoch})


def _check_identity(cfg: PretrainConfig, out: Path, rank: int) -> None:
    """Rank 0: write ``config.json`` in a new folder, refuse a folder holding another config."""
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if not check_identity(out / "config.json", cfg.identity(), "pretrain run"):
            write_json(out / "config.json",
                       {"identity": cfg.identity(), "key": cfg.key(), "recipe_key": cfg.recipe_key()})


def epoch0_row(model, data: TrainData, cfg: PretrainConfig, device) -> dict:
    """The metrics row of epoch 0: k-NN (and probe, when ``cfg.probe``) of the model as it is (untrained)."""
    knn, probe = evaluate(model, data, cfg, device, cfg.probe)
    head = {"head_acc": head_accuracy(model, data, cfg, device)} if cfg.objective == "supervised" else {}
    return {"epoch": 0, **dict.fromkeys(("beta", "key_share", "train_loss", "lr"), float("nan")),
            "knn_acc": knn, "probe_acc": probe, **head}


def _label(cfg: PretrainConfig) -> str:
    return "supervised" if cfg.objective == "supervised" else f"MAE {cfg.mask}"


def initial_accuracy(cfg: PretrainConfig, progress: bool = False) -> dict:
    """Epoch 0: k-NN and probe accuracy of ``cfg``'s untrained encoder (every run's start, without a run)."""
    device = _resolve_device(cfg)
    with train_runtime(cfg, device, tf32=False):
        model = build_model(cfg).to(device)
        knn, probe = evaluate(model, load_train_data(cfg, model.patch_size, progress), cfg, device, probe=True)
    return {"knn_acc": knn, "probe_acc": probe}
