"""An MAE decoder trained on a FROZEN pretrained backbone (paper Sec. 2.1 offline): the closest analogue
of Fig. 2's pretrained MAE when no official checkpoint is at hand. The encoder (default: the embedded
model) sees the visible patches only, with its own position embeddings; only the official-layout decoder
(:class:`vitsift_core.model.mae.MAE`) learns, on masked-patch pixel error. ``encoder_layers`` hands the
decoder earlier blocks' tokens instead of the last block's (which carry little colour / texture). One run = one
:class:`DecoderConfig` in one resumable folder (checkpoint every ``ckpt_every`` steps)."""
from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from vitsift_core.data.keypoints import SiftParams
from vitsift_core.experiments import decoder_latents as DL
from vitsift_core.experiments.mae_data import ArraySet, prepare_arrays, to_input
from vitsift_core.experiments.pretrain import param_groups, train_runtime, train_step
from vitsift_core.experiments import recovery
from vitsift_core.experiments.recovery import _masked_errors as masked_errors
from vitsift_core.method import guided as MM
from vitsift_core.model.infer import native_cpu_bf16
from vitsift_core.model.mae import MAE
from vitsift_core.model.registry import display_name, load_model, load_weights_only, resolve_device, seeded
from vitsift_core.paths import atomic_write, results_dir
from vitsift_core.store import Params, RunFolder, RunMismatch, at_least_one, in_range, read_json

STEP_COLS = ["step", "loss", "lr"]
CURVE_COLS = ["step", "images_seen", "val_rel_error", "val_error", "val_rel_sum"]
#: k random patches masked per val image for the learning curve (the notebook's "random" condition)
CURVE_K = 4


@dataclass
class DecoderConfig(Params):
    """Everything that decides a frozen-encoder decoder run's numbers (plus runtime keys)."""

    backbone: str = "embedded"          # model.registry spec of the frozen encoder
    decoder_dim: int = 128
    decoder_depth: int = 2
    decoder_heads: int = 4
    norm_pix_loss: bool = False         # False: the loss (and the recovery error) in ImageNet-normalised pixels
    train_images: str = "imagenette:train"
    train_limit: int | None = 4000
    crop_pct: float = 1.0               # the embedded model's own eval crop (short side to 224, centre)
    flip: bool = True
    mask_ratio: float = 0.1             # recovery masks 1-16 of 256 patches: train near that (0.75 did not transfer)
    steps: int = 250
    batch_size: int = 16
    lr: float = 1e-3                    # AdamW, linear warm-up then constant (a run is a prefix of a longer one)
    warmup_steps: int = 10
    weight_decay: float = 0.05
    seed: int = 0
    encoder_precision: str = "auto"     # the frozen encoder's forward: bf16 autocast | fp32 | auto (bf16 on CUDA
                                        # or a CPU with native bf16, else fp32); the decoder is always fp32
    encoder_layers: tuple[int, ...] | None = None   # 1-based encoder blocks whose (final-normed) tokens the decoder
                                        # reads, concatenated then projected; None: the last block (MAE's layout)
    masks_per_image: int = 0            # 0: a fresh random mask every step (MAE's way); K: K fixed masks per image,
                                        # their encoder latents computed once and reused (decoder_latents.py)
    # runtime: not part of the identity
    device: str = "auto"
    threads: int | None = None          # torch CPU threads (None: leave as is)
    num_workers: int = 1                # decode + SIFT workers when preparing the arrays
    ckpt_every: int = 25                # steps between checkpoints (resume points)
    val_images: str = "imagenette:val"  # learning curve: k random patches of these held-out images
    val_limit: int = 64
    eval_every: int = 0                 # steps between learning-curve points (0: only at the end)

    RUNTIME_KEYS = ("device", "threads", "num_workers", "ckpt_every", "val_images", "val_limit", "eval_every")

    def __post_init__(self):
        at_least_one(decoder_dim=self.decoder_dim, decoder_depth=self.decoder_depth, decoder_heads=self.decoder_heads,
                     train_limit=self.train_limit, steps=self.steps, batch_size=self.batch_size,
                     threads=self.threads, ckpt_every=self.ckpt_every, val_limit=self.val_limit)
        in_range("mask_ratio", self.mask_ratio, 0, 1, lo_open=True)   # some patches masked, some visible
        in_range("lr", self.lr, 0, lo_open=True)
        in_range("weight_decay", self.weight_decay, 0)
        in_range("crop_pct", self.crop_pct, 0, 1, lo_open=True, hi_open=False)
        for name in ("warmup_steps", "num_workers", "eval_every", "seed", "masks_per_image"):
            in_range(name, getattr(self, name), 0, integer=True)
        if self.encoder_layers is not None:
            self.encoder_layers = tuple(sorted({int(i) for i in self.encoder_layers}))
            if not self.encoder_layers or self.encoder_layers[0] < 1:
                raise ValueError(f"encoder_layers must be 1-based block numbers (>= 1), got {self.encoder_layers}")
        if self.encoder_precision not in ENCODER_PRECISIONS:
            raise ValueError(f"encoder_precision must be one of {ENCODER_PRECISIONS}, got {self.encoder_precision!r}")

    def _identity(self, d: dict) -> dict:
        d["format"] = "frozen-decoder-v1"
        d["encoder_precision"] = encoder_precision(self)     # resolved: 'auto' differs between machines
        if d["encoder_layers"] is None:
            d.pop("encoder_layers")       # the last-block default keeps the keys of runs made before the option
        if not d["masks_per_image"]:
            d.pop("masks_per_image")      # likewise for fresh masks
        return d


ENCODER_PRECISIONS = ("auto", "bf16", "fp32")


def encoder_precision(cfg: DecoderConfig) -> str:
    """'bf16' or 'fp32': ``cfg.encoder_precision`` with 'auto' resolved on ``cfg.device`` (bf16 on CUDA and
    on CPUs with a native bf16 matmul, :func:`~vitsift_core.model.infer.native_cpu_bf16`; emulated bf16 is
    several times slower than fp32)."""
    if cfg.encoder_precision != "auto":
        return cfg.encoder_precision
    if resolve_device(cfg.device).type == "cuda":
        return "bf16"
    return "bf16" if native_cpu_bf16() else "fp32"


class FrozenEncoderMAE(MAE):
    """:class:`MAE` whose encoder is frozen: no gradients, always eval mode, weights and position
    embeddings untouched (``fixed_pos_embed=False, init='none'``); the decoder is MAE-initialised.
    ``encoder_bf16``: the encoder's forward under bf16 autocast (its latent handed on as float32).
    ``encoder_layers``: 1-based blocks whose tokens, each through the encoder's final norm, are concatenated
    (B, npt + V, len * D) and projected by ``decoder_embed``; blocks after the last one listed are not run.
    None: the last block's normed tokens (the plain MAE latent)."""

    def __init__(self, encoder: torch.nn.Module, decoder_embed_dim: int, decoder_depth: int,
                 decoder_num_heads: int, norm_pix_loss: bool = False, encoder_bf16: bool = False,
                 encoder_layers: tuple[int, ...] | None = None):
        super().__init__(encoder, decoder_embed_dim, decoder_depth, decoder_num_heads, 4.0, norm_pix_loss,
                         fixed_pos_embed=False, init="none")
        self.encoder.requires_grad_(False)
        self.encoder.eval()
        self.encoder_bf16 = bool(encoder_bf16)
        self.encoder_layers = None if encoder_layers is None else tuple(encoder_layers)
        if self.encoder_layers is not None:
            depth = len(self.encoder.blocks)
            if max(self.encoder_layers) > depth or min(self.encoder_layers) < 1:
                raise ValueError(f"encoder_layers {self.encoder_layers} outside the encoder's blocks 1..{depth}")
            if len(self.encoder_layers) > 1:     # wider input: a new projection, MAE-initialised like the old
                self.decoder_embed = torch.nn.Linear(len(self.encoder_layers) * self.embed_dim, decoder_embed_dim)
                torch.nn.init.xavier_uniform_(self.decoder_embed.weight)
                torch.nn.init.zeros_(self.decoder_embed.bias)

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()          # frozen: no dropout / drop-path, whatever the caller asks
        return self

    def forward_encoder(self, imgs, mask=None):
        # nothing upstream of the latent learns: keep no graph for it; the frozen forward dominates a
        # step's cost, bf16 autocast cuts it ~4x on a CPU with native bf16 (the decoder stays fp32)
        with torch.no_grad(), torch.autocast(imgs.device.type, dtype=torch.bfloat16, enabled=self.encoder_bf16):
            if self.encoder_layers is None:
                latent, ids_restore = super().forward_encoder(imgs, mask)
            else:
                latent, ids_restore = self._layer_tokens(imgs, mask)
        return latent.float(), ids_restore

    def _layer_tokens(self, imgs, mask):
        """(B, npt + V, len(encoder_layers) * D): the listed blocks' visible tokens, each final-normed."""
        x, ids_restore = self.embed_visible(imgs, mask)
        enc, outs = self.encoder, []
        for i, blk in enumerate(enc.blocks[:max(self.encoder_layers)], start=1):
            x = blk(x)
            if i in self.encoder_layers:
                outs.append(enc.norm(x))
        return torch.cat(outs, dim=-1), ids_restore

    def decoder_state(self) -> dict[str, torch.Tensor]:
        """The trainable part's state dict (everything but ``encoder.*``)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("encoder.")}


def encoder_sha(encoder: torch.nn.Module) -> str:
    """12 hex digits of sha256 over the encoder's tensors (names, shapes, bytes): the frozen weights' identity."""
    h = hashlib.sha256()
    for k, v in sorted(encoder.state_dict().items()):
        h.update(k.encode())
        h.update(str(tuple(v.shape)).encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def build_decoder_model(cfg: DecoderConfig, encoder: torch.nn.Module | None = None) -> FrozenEncoderMAE:
    """The frozen backbone ``cfg.backbone`` (or ``encoder``) plus a decoder initialised under ``cfg.seed``."""
    enc = encoder if encoder is not None else load_model(cfg.backbone).model
    bf16 = encoder_precision(cfg) == "bf16"
    return seeded(cfg.seed, lambda: FrozenEncoderMAE(enc, cfg.decoder_dim, cfg.decoder_depth, cfg.decoder_heads,
                                                     cfg.norm_pix_loss, bf16, cfg.encoder_layers))


def run_dir(cfg: DecoderConfig, root: str | Path | None = None) -> Path:
    """``results/recovery_decoder/<key>/``."""
    return Path(root if root is not None else results_dir() / "recovery_decoder") / cfg.key()


def lr_at(cfg: DecoderConfig, step: int) -> float:
    """Linear warm-up over ``warmup_steps``, then constant: the first n steps of any longer run are this run."""
    return cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr


def batch_indices(cfg: DecoderConfig, n: int, step: int, what: str = "training images") -> np.ndarray:
    """Sorted indices (B,) into n items of optimiser step ``step``: epochs are seeded permutations."""
    if n < cfg.batch_size:
        raise ValueError(f"{n} {what} < one batch of {cfg.batch_size}")
    epoch, s = divmod(step, n // cfg.batch_size)
    perm = np.random.default_rng([cfg.seed, epoch, 0xDEC0]).permutation(n)
    return np.sort(perm[s * cfg.batch_size:(s + 1) * cfg.batch_size])


def step_batch(cfg: DecoderConfig, train: ArraySet, step: int, n_patches: int, grid) -> tuple[np.ndarray, np.ndarray]:
    """Images (B, S, S, 3) uint8 and masks (B, N) bool of optimiser step ``step``: flips and masks depend on
    (seed, step, image index) only, so a resumed run draws the same."""
    idx = batch_indices(cfg, len(train), step)
    imgs = np.array(train.images[idx])
    masks = np.zeros((len(idx), n_patches), bool)
    for j, i in enumerate(idx):
        masks[j], flip = DL.draw(cfg, n_patches, step, i)
        if flip:
            imgs[j] = imgs[j, :, ::-1]
    return imgs, masks


def curve_point(model: FrozenEncoderMAE, val: ArraySet, cfg: DecoderConfig, device, step: int) -> dict:
    """Learning-curve row: mean masked-patch error and error relative to the mean-colour fill of
    :data:`CURVE_K` random patches per val image (same patches at every step), as the mean of per-image
    ratios (``val_rel_error``) and as summed error / summed fill error (``val_rel_sum``)."""
    n = model.num_patches
    masks = np.stack([MM.patch_set_mask(MM.sample_rng(0, CURVE_K, i, MM.STREAM_RECOVERY).choice(
        n, CURVE_K, replace=False), n) for i in range(len(val))])
    was = model.training
    model.eval()
    err, rel, fill = masked_errors(model, np.asarray(val.images), masks, device, 32)
    model.train(was)
    return {"step": step, "images_seen": step * cfg.batch_size, "val_rel_error": float(np.mean(rel)),
            "val_error": float(np.mean(err)), "val_rel_sum": float(np.sum(err) / np.sum(fill))}


def _save(folder: Path, model, opt, cfg: DecoderConfig, step: int, steps: list, curve: list) -> None:
    state = {"decoder": model.decoder_state(), "optimizer": opt.state_dict(), "step": int(step),
             "steps": steps, "curve": curve, "key": cfg.key()}
    atomic_write(folder / "checkpoint.pt", lambda p: torch.save(state, p))
    for rows, cols, name in ((steps, STEP_COLS, "steps.csv"), (curve, CURVE_COLS, "curve.csv")):
        df = pd.DataFrame(rows, columns=cols)
        atomic_write(folder / name, lambda p: df.to_csv(p, index=False, float_format="%.9g"))


def _load(path: Path, model, opt, cfg: DecoderConfig) -> tuple[int, list, list]:
    if not path.exists():
        return 0, [], []
    state = load_weights_only(path)
    if state.get("key") != cfg.key():
        raise RunMismatch(f"{path} belongs to another config ({state.get('key')} != {cfg.key()})")
    model.load_state_dict({**model.state_dict(), **state["decoder"]})
    if opt is not None:
        opt.load_state_dict(state["optimizer"])
    return int(state["step"]), list(state["steps"]), list(state["curve"])


def train_arrays(cfg: DecoderConfig, model: MAE, progress: bool) -> ArraySet:
    size = model.grid[0] * model.patch_size
    return prepare_arrays(cfg.train_images, cfg.train_limit, size, model.patch_size, cfg.crop_pct, SiftParams(),
                          num_workers=cfg.num_workers, progress=progress)


def run_decoder(cfg: DecoderConfig, out: str | Path | None = None, *, progress: bool = True,
                on_step=None, encoder: torch.nn.Module | None = None) -> Path:
    """Train (or resume, or return at once if complete) the decoder run ``cfg`` in ``out`` (default
    :func:`run_dir`); ``on_step(step)`` is called before every optimiser step; ``encoder``: the
    already loaded backbone (else ``cfg.backbone`` is loaded)."""
    folder = RunFolder(out if out is not None else run_dir(cfg), cfg)
    folder.what = "frozen-decoder run"
    if folder.path.exists() and folder.finished():
        return folder.path
    device = resolve_device(cfg.device)
    with train_runtime(cfg, device, tf32=False), folder.lock():
        _train(cfg, folder, device, progress, on_step, encoder)
    return folder.path


def _train(cfg: DecoderConfig, folder: RunFolder, device, progress: bool, on_step, encoder) -> None:
    t0 = time.perf_counter()
    model = build_decoder_model(cfg, encoder).to(device)
    sha = encoder_sha(model.encoder)
    train = train_arrays(cfg, model, progress)
    val = prepare_arrays(cfg.val_images, cfg.val_limit, model.grid[0] * model.patch_size, model.patch_size,
                         cfg.crop_pct, SiftParams(), num_workers=cfg.num_workers, progress=progress)
    folder.prepare(len(train), encoder_sha=sha, backbone_name=display_name(cfg.backbone))
    if read_json(folder.params_json).get("encoder_sha") != sha:
        raise RunMismatch(f"{folder.path} was trained on other {cfg.backbone} weights")
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95))
    start, steps, curve = _load(folder.path / "checkpoint.pt", model, opt, cfg)
    data_s, t_enc = time.perf_counter() - t0, time.perf_counter()
    cached = DL.encode_pairs(model, train, cfg, device, progress) if cfg.masks_per_image and start < cfg.steps else None
    encode_s, c0, t1 = time.perf_counter() - t_enc, time.process_time(), time.perf_counter()
    model.train()
    bar = tqdm(total=cfg.steps, initial=start, unit="step", dynamic_ncols=True, disable=not progress,
               desc=f"MAE decoder on frozen {display_name(cfg.backbone)}")
    for step in range(start, cfg.steps):
        if on_step is not None:
            on_step(step)
        lr = lr_at(cfg, step)
        lval = _step(model, opt, cfg, train, cached, step, lr, device)
        if not math.isfinite(lval):
            raise FloatingPointError(f"decoder loss is {lval} at step {step}")
        steps.append({"step": step, "loss": lval, "lr": lr})
        bar.update(1)
        bar.set_postfix(loss=f"{lval:.4f}")
        done = step + 1
        if (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps:
            curve.append(curve_point(model, val, cfg, device, done))
            bar.write(f"step {done}: val masked-patch error / mean-colour fill {curve[-1]['val_rel_error']:.3f}")
        if done % cfg.ckpt_every == 0 or done == cfg.steps:
            _save(folder.path, model, opt, cfg, done, steps, curve)
    bar.close()
    if encoder_sha(model.encoder) != sha:
        raise RuntimeError("the frozen encoder's weights changed during decoder training")
    n_new = cfg.steps - start
    folder.mark_complete(steps=cfg.steps, n_train=len(train), resumed_from_step=start, data_s=round(data_s, 2),
                         encode_s=round(encode_s, 2),
                         train_s_this_process=round(time.perf_counter() - t1, 2),
                         cpu_s_this_process=round(time.process_time() - c0, 2), images_trained=n_new * cfg.batch_size,
                         threads=torch.get_num_threads(), device=str(device), encoder_sha=sha)


def _step(model: FrozenEncoderMAE, opt, cfg: DecoderConfig, train: ArraySet, cached: DL.Latents | None,
          step: int, lr: float, device) -> float:
    """One optimiser step -> its loss: a fresh-mask batch through the frozen encoder, or (``cached``) a
    batch of cached pairs, where only the decoder runs."""
    if cached is None:
        imgs, masks = step_batch(cfg, train, step, model.num_patches, model.grid)
        return train_step(model, opt, to_input(imgs, device), torch.from_numpy(masks).to(device), lr, amp=False)
    p = batch_indices(cfg, len(cached), step, "cached pairs")
    lat, ids = cached.latent[p].float(), cached.ids_restore[p]
    x = to_input(DL.pair_images(train, cached.image[p], cached.flip[p]), device)
    return train_step(lambda xb, mb: model.decode_loss(xb, lat, ids, mb), opt, x, cached.mask[p], lr, amp=False)


def load_decoder(out: str | Path, device: str | torch.device = "cpu",
                 encoder: torch.nn.Module | None = None) -> FrozenEncoderMAE:
    """The model of a finished (or checkpointed) run folder, eval mode; its encoder checked against
    the run's ``encoder_sha``."""
    out = Path(out)
    meta = read_json(out / "params.json")
    names = {f.name for f in dataclasses.fields(DecoderConfig)}
    cfg = DecoderConfig(**{k: v for k, v in meta["identity"].items() if k in names})
    model = build_decoder_model(cfg, encoder)
    if encoder_sha(model.encoder) != meta.get("encoder_sha"):
        raise RunMismatch(f"{out} was trained on other {cfg.backbone} weights than those loaded now")
    _load(out / "checkpoint.pt", model, None, cfg)
    model.decoder_config = cfg
    model.source = f"MAE decoder trained on the frozen {display_name(cfg.backbone)} ({out})"
    return model.to(device).eval()


def load_curve(out: str | Path) -> pd.DataFrame:
    return pd.read_csv(Path(out) / "curve.csv")


def load_steps(out: str | Path) -> pd.DataFrame:
    return pd.read_csv(Path(out) / "steps.csv")


# ----------------------------------------------------------------------------- notebook 01's model
RECOVERY_MODELS = ("frozen-embedded", "tiny-mae")


@dataclass
class RecoveryModel:
    """What notebook 01 reconstructs with: the MAE, where it comes from, a short description for titles,
    and the eval crop / SIFT settings its recovery images are prepared with."""

    mae: MAE
    source: str
    description: str
    crop_pct: float
    sift: dict
    mask_ratio: float = 0.75            # the share of patches it was trained to fill in (official MAE: 0.75)


def model_for_recovery(recovery_model: str = "frozen-embedded", *, checkpoint: str = "", profile: str = "embedded",
                       crop_pct: float = 0.875, device: str = "cpu", progress: bool = True,
                       decoder: dict | None = None) -> RecoveryModel:
    """An official MAE ``checkpoint`` if given; else ``'frozen-embedded'``: the decoder run
    ``DecoderConfig(**decoder)`` on the frozen embedded model (trained now if missing), or
    ``'tiny-mae'``: ``profile``'s from-scratch MAE recipe (notebook 07's random-mask run, seed 0)."""
    if checkpoint or recovery_model == "tiny-mae":
        mae, source = recovery.mae_for_recovery(checkpoint, profile=profile, device=device, progress=progress)
        cfg = getattr(mae, "pretrain_config", None)
        size = mae.grid[0] * mae.patch_size
        desc = (f"{'official MAE' if checkpoint else 'from-scratch MAE'} {mae.embed_dim}-wide x "
                f"{len(mae.encoder.blocks)} blocks, {size}px, patch {mae.patch_size}")
        return RecoveryModel(mae, source, desc, cfg.crop_pct if cfg is not None else crop_pct,
                             cfg.sift if cfg is not None else {},
                             cfg.mask_ratio if cfg is not None else RecoveryModel.mask_ratio)
    if recovery_model != "frozen-embedded":
        raise ValueError(f"recovery_model must be one of {RECOVERY_MODELS}, got {recovery_model!r}")
    kw = dict(decoder or {})
    if kw.get("train_limit") == 0:       # notebook parameters are ints: 0 means every image
        kw["train_limit"] = None
    kw.setdefault("decoder_heads", max(1, int(kw.get("decoder_dim", DecoderConfig.decoder_dim)) // 32))
    cfg = DecoderConfig(backbone="embedded", device=device, **kw)
    out = run_dir(cfg)
    trained_now = not (out.exists() and RunFolder(out, cfg).finished())
    if trained_now:
        run_decoder(cfg, out, progress=progress)
    mae = load_decoder(out, device=device)
    info = read_json(out / "run.json")
    spent = info["data_s"] + info.get("encode_s", 0.0) + info["train_s_this_process"]
    how = f"trained now in {spent:.0f} s" if trained_now else f"found in results, trained in {spent:.0f} s"
    size = mae.grid[0] * mae.patch_size
    reads = "" if cfg.encoder_layers is None else f" reading blocks {list(cfg.encoder_layers)}"
    fixed = f", {cfg.masks_per_image} cached masks per image" if cfg.masks_per_image else ""
    desc = (f"{display_name(cfg.backbone)} (frozen) + MAE decoder {cfg.decoder_dim}-wide x {cfg.decoder_depth} "
            f"blocks{reads}, {size}px, patch {mae.patch_size}")
    source = (f"an MAE decoder ({cfg.decoder_dim}-wide, {cfg.decoder_depth} blocks, loss on masked pixels) "
              f"trained for {cfg.steps} steps of {cfg.batch_size} {cfg.train_images} images "
              f"(first {cfg.train_limit}, mask ratio {cfg.mask_ratio}{fixed}) on the frozen "
              f"{display_name(cfg.backbone)} ({how}: {out})")
    return RecoveryModel(mae, source, desc, cfg.crop_pct, dataclasses.asdict(SiftParams()), cfg.mask_ratio)
