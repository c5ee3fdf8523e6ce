"""What the explorers compute, without any widget: explorer state -> figure data.

The model runs once per image (:func:`analyse`, kept by :class:`ImageLibrary`); every slider or
click after that is answered from the cached attention maps (:class:`ImageData`) through
:mod:`vitsift_core.method.metrics`, the study's own implementation (tests/test_widgets.py checks it).
"""
from __future__ import annotations

import math
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np
import torch

from vitsift_core.data.images import load_rgb, model_input
from vitsift_core.data.keypoints import SiftParams, keypoint_counts
from vitsift_core.data.sources import read_record, resolve_images
from vitsift_core.experiments.study import densest_keypoint_patch, query_numbers
from vitsift_core.method import metrics as M
from vitsift_core.method.stages import fit_recipe, stage_curves
from vitsift_core.model.capture import attention_maps

SIFT_DEFAULT = 0.04          # OpenCV's contrast threshold (keypoints.SiftParams default)


# ----------------------------------------------------------------------------------- one image
class ImageData:
    """One image as the model sees it, analysed once.

    crop: (S, S, 3) uint8; x: (3, S, S) normalised tensor; maps: (L, H, N, N) float32 attention of
    the patch block (rows = query patch, columns = key patch), layer 0 first.
    """

    def __init__(self, image_id: str, crop: np.ndarray, x, maps: np.ndarray, grid: tuple[int, int],
                 patch_size: int, label: str | None = None):
        self.id = image_id
        self.crop = crop
        self.x = x
        self.maps = np.ascontiguousarray(maps, dtype=np.float32)
        self.grid = (int(grid[0]), int(grid[1]))
        self.patch_size = int(patch_size)
        self.label = label
        self.n_layers, self.n_heads, self.n = self.maps.shape[:3]
        self.t = torch.from_numpy(self.maps)                                  # shares the memory
        # head mean per layer, the same torch reduction as study.query_view (a.mean(0))
        self.head_mean = np.stack([self.t[l].mean(0).numpy() for l in range(self.n_layers)])
        # focus index (Eq. 5) per (layer, head): independent of gamma and keypoints
        self.focus = M.focus_index(self.t)[0].numpy().astype(np.float64)
        self._kp: dict[float, tuple[np.ndarray, np.ndarray]] = {}
        self._mask_key = None
        self._mask = None
        self._curves: OrderedDict = OrderedDict()

    # -- keypoints
    def keypoints(self, threshold: float = SIFT_DEFAULT) -> tuple[np.ndarray, np.ndarray]:
        """(counts (N,) int64, keypoints (K, 4)) for a SIFT contrast threshold; cached."""
        th = round(float(threshold), 6)
        if th not in self._kp:
            self._kp[th] = keypoint_counts(self.crop, self.grid, self.patch_size,
                                           SiftParams(contrast_threshold=th))
        return self._kp[th]

    # -- attended sets
    def mask(self, gamma: float = 1.0, exclude_self: bool = False):
        """(L, H, N, N) float32 0/1 attended sets S_i (metrics.attended_mask) of every layer and
        head; the last (gamma, exclude_self) asked for is kept."""
        key = (round(float(gamma), 9), bool(exclude_self))
        if self._mask_key != key:
            self._mask = M.attended_mask(self.t, gamma, exclude_self, dtype=self.t.dtype)
            self._mask_key = key
        return self._mask

    def head_curves(self, gamma: float = 1.0, threshold: float = SIFT_DEFAULT,
                    exclude_self: bool = False) -> dict:
        """Per (layer, head): theta_kk, theta_nk (L, H); theta_chance (scalar); focus (L, H).

        metrics.theta_from_mask / aggregate_theta / theta_chance on this image's maps (weighted)."""
        key = (round(float(gamma), 9), round(float(threshold), 6), bool(exclude_self))
        if key in self._curves:
            self._curves.move_to_end(key)
            return self._curves[key]
        counts = torch.from_numpy(self.keypoints(threshold)[0])
        theta = M.theta_from_mask(self.mask(gamma, exclude_self), counts)    # (L, H, N)
        agg = M.aggregate_theta(theta, counts)
        out = {"theta_kk": agg["theta_kk"].numpy(), "theta_nk": agg["theta_nk"].numpy(),
               "theta_chance": float(M.theta_chance(counts)), "focus": self.focus}
        self._curves[key] = out
        while len(self._curves) > 16:
            self._curves.popitem(last=False)
        return out


def analyse(lm, rgb: np.ndarray, image_id: str, label: str | None = None) -> ImageData:
    """Run the model once on one RGB image: its crop, input and every layer's attention maps."""
    return analyse_many(lm, [rgb], [image_id], [label])[0]


def analyse_many(lm, rgbs: Sequence[np.ndarray], ids: Sequence[str], labels: Sequence | None = None,
                 batch_size: int = 8) -> list[ImageData]:
    """:func:`analyse` for several images, in batches (one forward pass per batch)."""
    labels = list(labels) if labels is not None else [None] * len(ids)
    dev = next(lm.model.parameters()).device
    out = []
    for k in range(0, len(ids), batch_size):
        inputs = [model_input(rgb, lm.data_config) for rgb in rgbs[k:k + batch_size]]
        x = torch.stack([t for _, t in inputs])
        m = attention_maps(lm.model, lm.num_prefix_tokens, x.to(dev))
        for b, (crop, t) in enumerate(inputs):
            maps = np.stack([m[l][b].numpy() for l in sorted(m)])
            out.append(ImageData(ids[k + b], crop, t, maps, tuple(lm.grid), lm.patch_size, labels[k + b]))
    return out


def from_example(ex) -> ImageData:
    """An :class:`study.Example` with attention (``study.example(lm, rec)``) as ImageData, so a
    notebook that already ran the model on an image does not run it again."""
    if not ex.maps:
        raise ValueError("the example has no attention maps (study.example(..., with_attention=True))")
    maps = np.stack([ex.maps[l].numpy() for l in sorted(ex.maps)])
    return ImageData(ex.id, ex.crop, ex.x, maps, ex.grid, ex.patch_size)


def nanmean(a: np.ndarray, axis) -> np.ndarray:
    """np.nanmean without the all-NaN warning (head means of per-head curves)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(a, axis=axis)


# ----------------------------------------------------------------------------------- image library
@dataclass
class Source:
    """An image the explorers can show: a record of a data set spec, or uploaded bytes."""

    id: str
    record: object = None           # data.ImageRecord
    data: bytes | None = None       # uploaded file
    label: str | None = None

    def rgb(self) -> np.ndarray:
        return load_rgb(self.data) if self.data is not None else read_record(self.record)


class ImageLibrary:
    """The images an explorer offers, each analysed by the model at most once (LRU of ``keep``).

    ``n_forward`` counts images the model has analysed, so tests can check that interactions never
    run the model.
    """

    def __init__(self, lm, records: Sequence = (), keep: int = 12):
        self.lm = lm
        self.sources: dict[str, Source] = {}
        for r in records:
            self.sources[r.id] = Source(r.id, record=r, label=getattr(r, "label", None))
        self.keep = int(keep)
        self._cache: OrderedDict[str, ImageData] = OrderedDict()
        self.n_forward = 0

    @classmethod
    def from_spec(cls, lm, images: str, limit: int | None, keep: int = 12) -> "ImageLibrary":
        return cls(lm, resolve_images(images, limit), keep=keep)

    def add_records(self, records: Sequence) -> None:
        """Offer more images (records of another spec); ids already offered are kept as they are."""
        for r in records:
            self.sources.setdefault(r.id, Source(r.id, record=r, label=getattr(r, "label", None)))

    def ids(self) -> list[str]:
        return list(self.sources)

    def add_upload(self, name: str, data: bytes) -> str:
        """Register an uploaded file (decoded on first use); returns its id ``upload/<name>``."""
        load_rgb(bytes(data))               # fail now, with the decoder's message, not later
        image_id = f"upload/{name}"
        self.sources[image_id] = Source(image_id, data=bytes(data))
        self._cache.pop(image_id, None)
        return image_id

    def is_cached(self, image_id: str) -> bool:
        return image_id in self._cache

    def put(self, img: ImageData) -> None:
        """Offer an already analysed image (e.g. :func:`from_example`); no model run."""
        if img.id not in self.sources:
            self.sources[img.id] = Source(img.id, label=img.label)
        self._remember(img)

    def _remember(self, img: ImageData) -> None:
        self._cache[img.id] = img
        self._cache.move_to_end(img.id)
        while len(self._cache) > self.keep:
            self._cache.popitem(last=False)

    def get(self, image_id: str) -> ImageData:
        if image_id in self._cache:
            self._cache.move_to_end(image_id)
            return self._cache[image_id]
        return self.get_many([image_id])[0]

    def get_many(self, ids: Sequence[str]) -> list[ImageData]:
        """Several images; the ones not analysed yet go through the model together, in batches."""
        self.keep = max(self.keep, len(ids))
        todo = [i for i in dict.fromkeys(ids) if i not in self._cache]
        if todo:
            srcs = [self.sources[i] for i in todo]
            for img in analyse_many(self.lm, [s.rgb() for s in srcs], todo, [s.label for s in srcs]):
                self.n_forward += 1
                self._remember(img)
        out = [self._cache[i] for i in ids]
        for i in ids:
            self._cache.move_to_end(i)
        return out


# ----------------------------------------------------------------------------------- attention explorer
@dataclass(frozen=True)
class AttentionState:
    """Everything the attention explorer shows depends on only these. layer, head: 1-based;
    head None = the mean over heads; query None = the patch with most keypoints."""

    image: str
    layer: int = 6
    head: int | None = None
    gamma: float = 1.0
    threshold: float = SIFT_DEFAULT
    query: int | None = None
    exclude_self: bool = False

    def with_(self, **kw) -> "AttentionState":
        return replace(self, **kw)


@dataclass
class AttentionView:
    """Figure data for one AttentionState."""

    state: AttentionState
    query: int
    row: np.ndarray            # (N,) attention of the query row
    attended: np.ndarray       # (N,) bool, S_i
    line: float                # detection line gamma * mean_j alpha_ij
    theta: float               # theta_i (NaN when S_i is empty)
    chance: float              # theta_chance of the image
    counts: np.ndarray         # (N,) keypoints per patch
    keypoints: np.ndarray      # (K, 4)
    curves: dict = field(default_factory=dict)   # layer, theta_kk, theta_nk, focus (L,), theta_chance

    @property
    def head_label(self) -> str:
        return "head mean" if self.state.head is None else f"head {self.state.head}"

    def readout(self) -> dict:
        """The numbers the readout line shows (also what the browser test compares)."""
        l = self.state.layer - 1
        return {"query": self.query, "theta": self.theta, "chance": self.chance,
                "n_attended": int(self.attended.sum()), "n_key_attended": int((self.attended & (self.counts > 0)).sum()),
                "theta_kk": float(self.curves["theta_kk"][l]), "theta_nk": float(self.curves["theta_nk"][l])}


def attention_view(img: ImageData, st: AttentionState) -> AttentionView:
    """State -> figure data, from the cached maps only (as study.query_view)."""
    if not 1 <= st.layer <= img.n_layers:
        raise ValueError(f"layer must be in 1..{img.n_layers}, got {st.layer}")
    if st.head is not None and not 1 <= st.head <= img.n_heads:
        raise ValueError(f"head must be None or in 1..{img.n_heads}, got {st.head}")
    counts, kps = img.keypoints(st.threshold)
    q = densest_keypoint_patch(counts) if st.query is None else int(st.query)
    if not 0 <= q < img.n:
        raise ValueError(f"query patch must be in 0..{img.n - 1}, got {q}")
    a = img.head_mean[st.layer - 1] if st.head is None else img.maps[st.layer - 1, st.head - 1]
    qv = query_numbers(torch.from_numpy(a), counts, q, st.gamma, st.exclude_self)
    hc = img.head_curves(st.gamma, st.threshold, st.exclude_self)
    if st.head is None:
        kk, nk, fo = (nanmean(hc[k], axis=1) for k in ("theta_kk", "theta_nk", "focus"))
    else:
        kk, nk, fo = (hc[k][:, st.head - 1] for k in ("theta_kk", "theta_nk", "focus"))
    curves = {"layer": np.arange(1, img.n_layers + 1), "theta_kk": kk, "theta_nk": nk, "focus": fo,
              "theta_chance": hc["theta_chance"]}
    return AttentionView(st, q, a[q], qv["attended"], qv["line"], qv["theta"], qv["chance"], counts, kps, curves)


def patch_at(x: float, y: float, width: float, height: float, grid: tuple[int, int]) -> int:
    """Patch index (row-major) under the point (x, y) of an image shown ``width`` x ``height``
    pixels; points on or past the edge are clamped to the border patches."""
    gr, gc = int(grid[0]), int(grid[1])
    c = min(max(int(math.floor(float(x) / float(width) * gc)), 0), gc - 1)
    r = min(max(int(math.floor(float(y) / float(height) * gr)), 0), gr - 1)
    return r * gc + c


# ----------------------------------------------------------------------------------- stage explorer
@dataclass
class StageView:
    """Curves over the image set and their 3-segment fit (None with fewer than 6 layers or no
    usable image). Per layer (L,): head means averaged over the images that have both a
    keypoint and a non-keypoint patch."""

    gamma: float
    threshold: float
    n_images: int
    layer: np.ndarray
    theta_kk: np.ndarray
    theta_nk: np.ndarray
    theta_chance: np.ndarray
    focus: np.ndarray
    theta_curve: np.ndarray    # mean over images of head-mean (theta_KK - theta_chance)
    fit: object = None         # stages.StageFit
    note: str = ""

    def summary(self) -> str:
        head = f"{self.n_images} images, gamma={self.gamma:g}, SIFT contrast threshold={self.threshold:g}: "
        return head + (self.fit.summary() if self.fit is not None else self.note)


_POOL = None


def _parallel(fn, items: Sequence) -> list:
    """``[fn(x) for x in items]`` on a small thread pool (each item is touched by one thread)."""
    global _POOL
    if len(items) < 2:
        return [fn(x) for x in items]
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)), thread_name_prefix="vitsift-explorer")
    return list(_POOL.map(fn, items))


def stage_view(images: Sequence[ImageData], gamma: float = 1.0, threshold: float = SIFT_DEFAULT,
               exclude_self: bool = False) -> StageView:
    """Refit the stages (stages.stage_curves + fit_recipe, as study's claims) from cached maps."""
    n_layers = images[0].n_layers if images else 0
    layer = np.arange(1, n_layers + 1)
    # SIFT and the attended sets of several images in threads (OpenCV and torch release the GIL)
    curves = _parallel(lambda im: im.head_curves(gamma, threshold, exclude_self), images)
    kk, nk, fo = (np.array([nanmean(hc[k], axis=1) for hc in curves]).reshape(len(curves), n_layers)
                  for k in ("theta_kk", "theta_nk", "focus"))
    ch = np.array([np.full(n_layers, hc["theta_chance"]) for hc in curves]).reshape(len(curves), n_layers)
    keep, th_curve, fo_curve = stage_curves(kk, nk, ch, fo)
    if not keep.any():
        nan = np.full(n_layers, np.nan)
        return StageView(gamma, threshold, 0, layer, nan, nan, nan, nan, nan, None,
                         "no image has both keypoint and keypoint-free patches at this threshold")
    fit, note = fit_recipe(th_curve, fo_curve)
    return StageView(gamma, threshold, int(keep.sum()), layer, kk[keep].mean(0), nk[keep].mean(0),
                     ch[keep].mean(0), fo_curve, th_curve, fit, note and f"no stage fit: {note}")
