"""MAE pre-training data: each split decoded once to the eval crop beside its SIFT counts per patch,
kept as uint8 arrays under ``cache_dir()/mae_arrays``."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vitsift_core.data.batches import iter_batches
from vitsift_core.data.keypoints import KEYPOINT_RULE, KeypointCache, SiftParams
from vitsift_core.data.sources import resolve_images
from vitsift_core.paths import cache_dir, data_dir, tmp_path
from vitsift_core.store import Dist, key_of


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ArraySet:
    """One split decoded once: ``images`` (n, S, S, 3) uint8 model crops, ``counts`` (n, N) int32
    SIFT keypoints per patch, ``labels`` (n,) str, ``ids`` (n,); unreadable files in ``skipped``."""

    ids: list[str]
    images: np.ndarray
    counts: np.ndarray
    labels: list[str]
    skipped: list[tuple[str, str]]
    path: Path | None = None

    def __len__(self) -> int:
        return len(self.ids)


def data_config(img_size: int, crop_pct: float = 0.875) -> dict:
    """timm eval data config: bicubic resize of the short side to S / crop_pct, centre crop S."""
    return {"input_size": (3, int(img_size), int(img_size)), "interpolation": "bicubic",
            "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "crop_pct": float(crop_pct), "crop_mode": "center"}


def prepare_arrays(images: str, limit: int | None, img_size: int, patch_size: int,
                   crop_pct: float = 0.875, sift: SiftParams | dict = SiftParams(), *,
                   num_workers: int = 1, progress: bool = True, root: Path | None = None,
                   by_class: bool = False) -> ArraySet:
    """``resolve_images(images, limit, by_class=by_class)`` as model crops and SIFT counts, decoded
    once (cached under ``root``, later calls memory-map it)."""
    sift = sift if isinstance(sift, SiftParams) else SiftParams(**sift)
    if img_size % patch_size:
        raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
    records = resolve_images(images, limit, by_class=by_class)
    if not records:
        raise ValueError(f"no images for {images!r}")
    g = img_size // patch_size
    ident = {"images": images, "data": str(data_dir()) if images.startswith("imagenette") else None,
             "ids": hashlib.sha1("\n".join(r.id for r in records).encode()).hexdigest(),
             "n": len(records), "img_size": int(img_size), "patch_size": int(patch_size),
             "crop_pct": float(crop_pct), "sift": sift.key(), "format": "mae-arrays-v1",
             "keypoint_rule": KEYPOINT_RULE}     # counts.npy holds counts: a new rule, new arrays
    d = (Path(root) if root is not None else cache_dir() / "mae_arrays") / key_of(ident)
    if (d / "done.json").exists():
        return _load_arrays(d)
    imgs = np.zeros((len(records), img_size, img_size, 3), np.uint8)
    counts = np.zeros((len(records), g * g), np.int32)
    ok = np.zeros(len(records), bool)
    pos = {r.id: i for i, r in enumerate(records)}
    skipped = []
    for batch, bad in iter_batches(records, data_config(img_size, crop_pct), (g, g), patch_size,
                                   batch_size=32, sift=sift, num_workers=num_workers, cache=KeypointCache(),
                                   progress=progress, desc=f"decode + SIFT {images} ({img_size}px)", crops=True):
        skipped += [(s.id, s.reason) for s in bad]
        if batch is not None:
            i = [pos[k] for k in batch.ids]
            imgs[i], counts[i], ok[i] = batch.crops, batch.counts.numpy(), True
    keep = np.flatnonzero(ok)
    tmp = tmp_path(d)
    tmp.mkdir(parents=True, exist_ok=True)
    np.save(tmp / "images.npy", imgs[keep])
    np.save(tmp / "counts.npy", counts[keep])
    (tmp / "meta.json").write_text(json.dumps({
        "ids": [records[i].id for i in keep], "labels": [records[i].label for i in keep],
        "skipped": skipped, "identity": ident}))
    (tmp / "done.json").write_text("{}")
    try:
        os.replace(tmp, d)
    except OSError:   # another process finished first: use theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return _load_arrays(d)


def _load_arrays(d: Path) -> ArraySet:
    meta = json.loads((d / "meta.json").read_text())
    return ArraySet(ids=meta["ids"], images=np.load(d / "images.npy", mmap_mode="r"),
                    counts=np.load(d / "counts.npy"), labels=meta["labels"],
                    skipped=[tuple(s) for s in meta["skipped"]], path=d)


@dataclass
class TrainData:
    """Train and val arrays with integer labels; the first ``mem`` train images are the k-NN memory."""

    train: ArraySet
    val: ArraySet
    classes: list[str]
    y_train: np.ndarray
    y_val: np.ndarray
    mem: int


def load_train_data(cfg, patch: int, progress: bool, rank: int = 0, barrier=None) -> TrainData:
    """The arrays of ``cfg`` (a PretrainConfig); under torchrun rank 0 decodes first."""
    def prep(images, limit, by_class=False):
        return prepare_arrays(images, limit, cfg.img_size, patch, cfg.crop_pct, cfg.sift,
                              num_workers=cfg.num_workers, progress=progress and rank == 0, by_class=by_class)

    # the k-NN memory and the probe's train set are the first ``mem`` train images: class-interleaved
    # with no limit too (sorted by id, 2,000 of all held 2-3 classes)
    train, val = Dist(rank, barrier=barrier).rank0_first(
        lambda: (prep(cfg.train_images, cfg.train_limit, by_class=True), prep(cfg.val_images, cfg.val_limit)))
    classes = sorted({str(l) for l in train.labels})
    mem = len(train) if cfg.knn_memory is None else min(int(cfg.knn_memory), len(train))
    return TrainData(train, val, classes, _labels_to_int([str(l) for l in train.labels], classes),
                     _labels_to_int([str(l) for l in val.labels], classes), mem)


def _labels_to_int(labels: list, classes: list[str]) -> np.ndarray:
    index = {c: i for i, c in enumerate(classes)}
    missing = sorted({str(l) for l in labels if l not in index})
    if missing:
        raise ValueError(f"labels {missing[:5]} are not among the train classes {classes[:10]}")
    return np.array([index[l] for l in labels], dtype=np.int64)


def to_input(images_uint8: np.ndarray, device=None) -> torch.Tensor:
    """(B, S, S, 3) uint8 -> (B, 3, S, S) float32, ImageNet-normalised."""
    a = np.asarray(images_uint8)
    a = np.ascontiguousarray(a) if a.flags.writeable else np.array(a)   # memmap slices are read-only
    x = torch.from_numpy(a).to(device).permute(0, 3, 1, 2).float().div_(255)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std
