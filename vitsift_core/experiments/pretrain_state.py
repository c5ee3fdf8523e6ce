"""What a pre-training run keeps on disk besides its tables: the resumable ``checkpoint.pt`` (model,
optimiser, history; weights-only loadable) and the encoder snapshots ``snapshots/epochNNNN.safetensors``
every ``snapshot_every`` epochs, each loadable by the model registry as ``"ARCH@PATH"`` (the timm
arguments that rebuild the architecture and its input pipeline travel in the file's metadata).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vitsift_core.experiments.mae_data import IMAGENET_MEAN, IMAGENET_STD
from vitsift_core.model.registry import load_weights_only
from vitsift_core.store import RunMismatch, atomic_write

CHECKPOINT_KEYS = ("model", "optimizer", "epoch", "history", "steps", "key", "classes", "config")
SNAPSHOT_DIR = "snapshots"


def save_checkpoint(path: Path, model, opt, cfg, epoch: int, history: list, step_rows: list,
                    classes: list[str]) -> None:
    """Tensors, containers, numbers and strings only, so :func:`read_checkpoint` loads it weights-only."""
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": int(epoch),
             "history": _plain(history), "steps": _plain(step_rows), "key": cfg.key(),
             "classes": _plain(classes), "config": _plain({**dataclasses.asdict(cfg), "betas": list(cfg.betas)})}
    atomic_write(path, lambda p: torch.save(state, p))


def _plain(obj):
    """``obj`` with numpy scalars as Python numbers; any other non-plain value is an error."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"checkpoint value of type {type(obj).__name__} is not plain data")


def read_checkpoint(path: Path) -> dict:
    """A run folder's ``checkpoint.pt``, loaded weights-only: nothing in a handed-over folder runs
    code (UnsafeCheckpoint, a ValueError, otherwise)."""
    state = load_weights_only(path)
    if not isinstance(state, dict) or any(k not in state for k in CHECKPOINT_KEYS):
        raise ValueError(f"{path} is not a vitsift pre-training checkpoint (expected keys {CHECKPOINT_KEYS})")
    return state


def load_checkpoint(path: Path, model, opt, cfg) -> tuple[int, list, list]:
    """Restore model and optimiser from ``path`` if it exists -> (epochs done, history, step rows)."""
    if not path.exists():
        return 0, [], []
    state = read_checkpoint(path)
    if state["key"] != cfg.key():
        raise RunMismatch(f"{path} belongs to another config ({state['key']} != {cfg.key()})")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    return state["epoch"], state["history"], state["steps"]


# ---- encoder snapshots ------------------------------------------------------------------------------

def snapshot_epochs(cfg) -> list[int]:
    """The epochs a run with ``cfg.snapshot_every = k`` keeps: 0 (untrained), every k-th, and the last."""
    k = int(cfg.snapshot_every)
    return sorted({0, cfg.epochs} | set(range(k, cfg.epochs + 1, k))) if k else []


def snapshot_path(out: str | Path, epoch: int) -> Path:
    return Path(out) / SNAPSHOT_DIR / f"epoch{int(epoch):04d}.safetensors"


def timm_kwargs(cfg) -> dict:
    """``timm.create_model`` arguments rebuilding ``cfg``'s encoder (no head) with the input pipeline
    it was trained on (ImageNet mean/std, bicubic resize to S / crop_pct, centre crop)."""
    kw = {"num_classes": 0, "img_size": int(cfg.img_size)}
    for k in ("patch_size", "depth", "embed_dim", "num_heads"):
        if getattr(cfg, k) is not None:
            kw[k] = int(getattr(cfg, k))
    kw["pretrained_cfg_overlay"] = {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                                    "crop_pct": float(cfg.crop_pct), "interpolation": "bicubic",
                                    "crop_mode": "center"}
    return kw


def save_snapshot(out: str | Path, encoder: torch.nn.Module, cfg, epoch: int) -> Path:
    """The encoder's weights at ``epoch`` as safetensors; metadata: arch, timm_kwargs (JSON), epoch,
    objective, mask and the run's key."""
    path = snapshot_path(out, epoch)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in encoder.state_dict().items()}
    meta = {"arch": cfg.encoder, "timm_kwargs": json.dumps(timm_kwargs(cfg)), "epoch": str(int(epoch)),
            "objective": cfg.objective, "mask": cfg.mask, "run_key": cfg.key()}
    def write(p: Path) -> None:
        save_file(tensors, str(p), metadata=meta)
        sort_header(p)
    atomic_write(path, write)
    return path


def sort_header(path: str | Path) -> None:
    """Rewrite a safetensors header with its keys sorted, same length: safetensors writes the metadata in
    hash-map order, so two identical snapshots differed byte for byte, and so did their content identity
    (``registry.checkpoint_identity``) and the analysis folders keyed by it."""
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) <= n:                     # the same items: always; else leave the file as written
            f.seek(8)
            f.write(text + b" " * (n - len(text)))


def snapshot_meta(path: str | Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def snapshot_spec(path: str | Path) -> str:
    """The registry spec ``"ARCH@PATH"`` that loads snapshot ``path`` (``vitsift analyze --model``)."""
    meta = snapshot_meta(path)
    if "arch" not in meta:
        raise ValueError(f"{path} is not a vitsift encoder snapshot (no 'arch' in its metadata)")
    return f"{meta['arch']}@{Path(path).resolve()}"


def snapshots(out: str | Path) -> dict[int, Path]:
    """{epoch: snapshot file} of a run folder (empty when it keeps none)."""
    d = Path(out) / SNAPSHOT_DIR
    return {int(p.stem[len("epoch"):]): p for p in sorted(d.glob("epoch*.safetensors"))} if d.is_dir() else {}
