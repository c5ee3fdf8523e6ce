"""Feed the model: decode -> model input -> SIFT counts, in DataLoader worker processes, in record
order; a file that fails becomes a :class:`Skipped` entry with a reason, never an exception.
"""
from __future__ import annotations

import traceback
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from vitsift_core.data.sources import ImageRecord, read_record
from vitsift_core.data.images import ImageDecodeError, model_input
from vitsift_core.data.keypoints import KeypointCache, SiftParams, keypoint_counts


@dataclass
class Batch:
    """Good images of one loader batch, in record order: ``tensors`` (B, 3, S, S) float32 model
    input, ``counts`` (B, N) int64 keypoints per patch, ``crops`` (B, S, S, 3) uint8 if asked for."""

    ids: list[str]
    tensors: torch.Tensor
    counts: torch.Tensor
    labels: list[str | None]
    crops: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class Skipped:
    """An image that could not be used, and why (e.g. ``'x.jpg: empty file (0 bytes)'``)."""

    id: str
    path: str
    reason: str


@dataclass
class _Good:
    id: str
    tensor: torch.Tensor
    counts: torch.Tensor
    label: str | None
    crop: np.ndarray | None


class ImageDataset(Dataset):
    """Item i = record i -> ``_Good`` (tensor ``(3, S, S)``, counts ``(N,)``) or :class:`Skipped`."""

    def __init__(self, records: Sequence[ImageRecord], data_config: dict, grid: tuple[int, int],
                 patch_size: int, sift: SiftParams, cache: KeypointCache | None, crops: bool,
                 dedupe: bool = False):
        self.records, self.data_config, self.crops, self.dedupe = list(records), dict(data_config), crops, dedupe
        self.grid, self.patch_size = (int(grid[0]), int(grid[1])), int(patch_size)
        self.sift, self.cache = sift, cache

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        rec = self.records[i]
        path = str(rec.path) if rec.path is not None else ""
        try:
            rgb = read_record(rec)
            crop, tensor = model_input(rgb, self.data_config)
            t, _ = keypoint_counts(crop, self.grid, self.patch_size, self.sift, cache=self.cache,
                                   dedupe=self.dedupe)
        except ImageDecodeError as e:
            return Skipped(rec.id, path, str(e))
        except Exception as e:  # never kill the run for one image; keep where it failed
            where = traceback.extract_tb(e.__traceback__)[-1]
            return Skipped(rec.id, path, f"unexpected {type(e).__name__}: {e} "
                                         f"(at {where.filename.rsplit('/', 1)[-1]}:{where.lineno})")
        return _Good(rec.id, tensor, torch.from_numpy(np.ascontiguousarray(t, dtype=np.int64)), rec.label,
                     crop if self.crops else None)


def _collate(items: list) -> tuple[Batch | None, list[Skipped]]:
    good = [it for it in items if isinstance(it, _Good)]
    skipped = [it for it in items if isinstance(it, Skipped)]
    if not good:
        return None, skipped
    return Batch(ids=[g.id for g in good], tensors=torch.stack([g.tensor for g in good]),
                 counts=torch.stack([g.counts for g in good]), labels=[g.label for g in good],
                 crops=np.stack([g.crop for g in good]) if good[0].crop is not None else None), skipped


def chunk_batches(chunks: Sequence[int], batch_size: int) -> list[list[int]]:
    """Record indices per batch: consecutive chunks of sizes ``chunks``, each cut into batches of
    ``batch_size`` (its last one shorter), none spanning two chunks."""
    out, at = [], 0
    for size in chunks:
        out += [list(range(at + i, at + min(i + batch_size, size))) for i in range(0, size, batch_size)]
        at += size
    return out


def iter_batches(records: Sequence[ImageRecord], data_config: dict, grid: tuple[int, int],
                 patch_size: int, *, batch_size: int = 32, sift: SiftParams = SiftParams(),
                 num_workers: int = 1, cache: KeypointCache | None = None, progress: bool = True,
                 desc: str = "images", crops: bool = False, dedupe_keypoints: bool = False,
                 chunks: Sequence[int] | None = None) -> Iterator[tuple[Batch | None, list[Skipped]]]:
    """``(batch, skipped)`` per loader batch of ``batch_size`` records, in record order (``batch``
    None when all failed). ``num_workers=0`` runs in this process (same results); a tqdm bar in img/s.
    ``dedupe_keypoints``: counts with one keypoint per (x, y) location (the cache keeps them all).
    ``chunks``: the records are consecutive chunks of these sizes and no batch spans two (a chunk's
    batches are those of ``iter_batches`` on the chunk alone); one loader for all of them keeps its
    workers decoding the next chunk while the current one is computed.
    """
    from tqdm.auto import tqdm

    _, h, w = (int(x) for x in data_config["input_size"])
    if int(grid[0]) * int(patch_size) != h or int(grid[1]) * int(patch_size) != w:
        raise ValueError(f"grid {tuple(grid)} x patch {patch_size} does not tile the {h}x{w} model input")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ds = ImageDataset(records, data_config, grid, patch_size, sift, cache, crops, dedupe_keypoints)
    if len(ds) == 0:
        return
    num_workers = max(0, int(num_workers))
    # no worker_init calling cv2.setNumThreads(1): it deadlocks a forked worker whose parent ran
    # OpenCV parallel code (opencv 5.0 / pthreads)
    if chunks is not None and sum(chunks) != len(ds):
        raise ValueError(f"chunk sizes {list(chunks)} do not add up to the {len(ds)} records")
    by = {"batch_size": batch_size, "shuffle": False} if chunks is None else \
        {"batch_sampler": chunk_batches(chunks, batch_size)}
    loader = DataLoader(ds, num_workers=num_workers, collate_fn=_collate,
                        prefetch_factor=2 if num_workers > 0 else None, persistent_workers=False, **by)
    n_skipped = 0
    with tqdm(total=len(ds), unit="img", desc=desc, disable=not progress, dynamic_ncols=True) as bar:
        for batch, skipped in loader:
            n = (len(batch) if batch is not None else 0) + len(skipped)
            n_skipped += len(skipped)
            bar.update(n)
            if skipped:
                bar.set_postfix(skipped=n_skipped)
            yield batch, skipped
