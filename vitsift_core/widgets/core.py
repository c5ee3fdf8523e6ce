"""What the explorers compute, without widgets: explorer state -> figure data.

The model runs once per image (:class:`ImageLibrary`); every slider or click after that is answered
from the cached maps by the study's own code (method.metrics, stages, masking; tests/test_widgets.py).
"""
from __future__ import annotations

import math
import os
import warnings
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from vitsift_core.data.images import load_rgb, model_input
from vitsift_core.data.keypoints import SiftParams, keypoint_counts
from vitsift_core.data.sources import read_record, resolve_images
from vitsift_core.experiments.study import densest_keypoint_patch, query_numbers
from vitsift_core.method import masking as MK
from vitsift_core.method import metrics as M
from vitsift_core.method.stages import StageFit, fit_recipe, stage_curves
from vitsift_core.model.capture import attention_maps
from vitsift_core.model.infer import infer
from vitsift_core.model.masked import masked_features
from vitsift_core.report import maskplots

SIFT_DEFAULT = SiftParams().contrast_threshold          # OpenCV's, 0.04


def _lru_put(cache: OrderedDict, key, value, keep: int):
    """Store ``value`` as the newest entry of ``cache``, dropping the oldest beyond ``keep``."""
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > keep:
        cache.popitem(last=False)
    return value


# ----------------------------------------------------------------------------------- one image
class ImageData:
    """One image analysed once. crop: (S, S, 3) uint8; x: (3, S, S) input; maps: (L, H, N, N)
    float32 patch-block attention (rows = query, columns = key), layer 0 first."""

    def __init__(self, image_id: str, crop: np.ndarray, x, maps: np.ndarray, grid: tuple[int, int],
                 patch_size: int, label: str | None = None):
        self.id, self.crop, self.x, self.label = image_id, crop, x, label
        self.maps = np.ascontiguousarray(maps, dtype=np.float32)
        self.grid = (int(grid[0]), int(grid[1]))
        self.patch_size = int(patch_size)
        self.n_layers, self.n_heads, self.n = self.maps.shape[:3]
        self.t = torch.from_numpy(self.maps)                                  # shares the memory
        # head mean per layer, the same torch reduction as study.query_view (a.mean(0))
        self.head_mean = np.stack([self.t[l].mean(0).numpy() for l in range(self.n_layers)])
        self.focus = M.focus_index(self.t)[0].numpy().astype(np.float64)     # Eq. 5, (L, H)
        self._kp: dict[float, tuple[np.ndarray, np.ndarray]] = {}
        self._mask_key = self._mask = None
        self._curves: OrderedDict = OrderedDict()

    def keypoints(self, threshold: float = SIFT_DEFAULT) -> tuple[np.ndarray, np.ndarray]:
        """(counts (N,) int64, keypoints (K, 4)) for a SIFT contrast threshold; cached."""
        th = round(float(threshold), 6)
        if th not in self._kp:
            self._kp[th] = keypoint_counts(self.crop, self.grid, self.patch_size,
                                           SiftParams(contrast_threshold=th))
        return self._kp[th]

    def mask(self, gamma: float = 1.0, exclude_self: bool = False):
        """metrics.attended_mask of every layer and head: (L, H, N, N) float32 0/1; the last one kept."""
        key = (round(float(gamma), 9), bool(exclude_self))
        if self._mask_key != key:
            self._mask = M.attended_mask(self.t, gamma, exclude_self, dtype=self.t.dtype)
            self._mask_key = key
        return self._mask

    def head_curves(self, gamma: float = 1.0, threshold: float = SIFT_DEFAULT,
                    exclude_self: bool = False) -> dict:
        """theta_kk, theta_nk, focus: (L, H); theta_chance: scalar (metrics on this image's maps)."""
        key = (round(float(gamma), 9), round(float(threshold), 6), bool(exclude_self))
        if key in self._curves:
            self._curves.move_to_end(key)
            return self._curves[key]
        counts = torch.from_numpy(self.keypoints(threshold)[0])
        theta = M.theta_from_mask(self.mask(gamma, exclude_self), counts)    # (L, H, N)
        agg = M.aggregate_theta(theta, counts)
        out = {"theta_kk": agg["theta_kk"].numpy(), "theta_nk": agg["theta_nk"].numpy(),
               "theta_chance": float(M.theta_chance(counts)), "focus": self.focus}
        return _lru_put(self._curves, key, out, 16)


def analyse(lm, rgb: np.ndarray, image_id: str, label: str | None = None) -> ImageData:
    """Run the model once on one RGB image."""
    return analyse_many(lm, [rgb], [image_id], [label])[0]


def analyse_many(lm, rgbs: Sequence[np.ndarray], ids: Sequence[str], labels: Sequence | None = None,
                 batch_size: int = 8) -> list[ImageData]:
    """:func:`analyse` for several images, one forward pass per batch."""
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
    """A ``study.example(lm, rec)`` (with attention) as ImageData: no second model run."""
    if not ex.maps:
        raise ValueError("the example has no attention maps (study.example(..., with_attention=True))")
    maps = np.stack([ex.maps[l].numpy() for l in sorted(ex.maps)])
    return ImageData(ex.id, ex.crop, ex.x, maps, ex.grid, ex.patch_size)


def nanmean(a: np.ndarray, axis) -> np.ndarray:
    """np.nanmean without the all-NaN warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(a, axis=axis)


class ImageLibrary:
    """The images an explorer offers (data set records or uploads), each analysed at most once and
    kept in an LRU of ``keep``; ``n_forward`` counts model runs (tests check interactions add none)."""

    def __init__(self, lm, records: Sequence = (), keep: int = 12):
        self.lm = lm
        self.keep = int(keep)
        self.n_forward = 0
        self.sources: dict[str, tuple] = {}          # id -> (record | uploaded bytes, label)
        self._cache: OrderedDict[str, ImageData] = OrderedDict()
        self.add_records(records)

    @classmethod
    def from_spec(cls, lm, images: str, limit: int | None, keep: int = 12) -> "ImageLibrary":
        return cls(lm, resolve_images(images, limit), keep=keep)

    def add_records(self, records: Sequence) -> None:
        """Offer more images; ids already offered are kept as they are."""
        for r in records:
            self.sources.setdefault(r.id, (r, getattr(r, "label", None)))

    def ids(self) -> list[str]:
        return list(self.sources)

    def add_upload(self, name: str, data: bytes) -> str:
        """Offer an uploaded file as ``upload/<name>``; it is decoded now, so a bad file fails here."""
        data = bytes(data)
        load_rgb(data)
        image_id = f"upload/{name}"
        self.sources[image_id] = (data, None)
        self._cache.pop(image_id, None)
        return image_id

    def is_cached(self, image_id: str) -> bool:
        return image_id in self._cache

    def put(self, img: ImageData) -> None:
        """Offer an already analysed image (e.g. :func:`from_example`): no model run."""
        self.sources.setdefault(img.id, (None, img.label))
        _lru_put(self._cache, img.id, img, self.keep)

    def get(self, image_id: str) -> ImageData:
        return self.get_many([image_id])[0]

    def get_many(self, ids: Sequence[str]) -> list[ImageData]:
        """Several images; those not analysed yet go through the model together."""
        self.keep = max(self.keep, len(ids))
        todo = [i for i in dict.fromkeys(ids) if i not in self._cache]
        if todo:
            src = [self.sources[i] for i in todo]
            rgbs = [load_rgb(s) if isinstance(s, bytes) else read_record(s) for s, _ in src]
            for img in analyse_many(self.lm, rgbs, todo, [label for _, label in src]):
                self.n_forward += 1
                _lru_put(self._cache, img.id, img, self.keep)
        for i in ids:
            self._cache.move_to_end(i)
        return [self._cache[i] for i in ids]


# ----------------------------------------------------------------------------------- attention explorer
@dataclass(frozen=True)
class AttentionState:
    """layer, head: 1-based; head None = the mean over heads; query None = the patch with most keypoints."""

    image: str
    layer: int = 6
    head: int | None = None
    gamma: float = 1.0
    threshold: float = SIFT_DEFAULT
    query: int | None = None
    exclude_self: bool = False


@dataclass
class AttentionView:
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


def attention_view(img: ImageData, st: AttentionState) -> AttentionView:
    """State -> figure data from the cached maps (study.query_numbers, as study.query_view)."""
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
    return AttentionView(st, q, a[q], qv["attended"], qv["line"], qv["theta"], qv["chance"], counts, kps,
                         curves)


def patch_at(x: float, y: float, width: float, height: float, grid: tuple[int, int]) -> int:
    """Row-major patch under (x, y) of an image shown ``width`` x ``height``; clamped to the border."""
    gr, gc = int(grid[0]), int(grid[1])
    c = min(max(int(math.floor(float(x) / float(width) * gc)), 0), gc - 1)
    r = min(max(int(math.floor(float(y) / float(height) * gr)), 0), gr - 1)
    return r * gc + c


# ----------------------------------------------------------------------------------- stage explorer
@dataclass
class StageView:
    """Per layer (L,): head means averaged over the images with both a keypoint and a keypoint-free
    patch; theta_curve: mean of head-mean (theta_KK - theta_chance); fit None without a stage fit."""

    gamma: float
    threshold: float
    n_images: int
    layer: np.ndarray
    theta_kk: np.ndarray
    theta_nk: np.ndarray
    theta_chance: np.ndarray
    focus: np.ndarray
    theta_curve: np.ndarray
    fit: StageFit | None = None
    note: str = ""

    def summary(self) -> str:
        head = f"{self.n_images} images, gamma={self.gamma:g}, SIFT contrast threshold={self.threshold:g}: "
        return head + (self.fit.summary() if self.fit is not None else self.note)


def stage_view(images: Sequence[ImageData], gamma: float = 1.0, threshold: float = SIFT_DEFAULT,
               exclude_self: bool = False) -> StageView:
    """Refit the stages from cached maps (stages.stage_curves + fit_recipe, as the study's claims)."""
    n_layers = images[0].n_layers if images else 0
    layer = np.arange(1, n_layers + 1)
    # SIFT and the attended sets of several images in threads (OpenCV and torch release the GIL)
    with ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1)), thread_name_prefix="vitsift-explorer") as pool:
        curves = list(pool.map(lambda im: im.head_curves(gamma, threshold, exclude_self), images))
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


# ----------------------------------------------------------------------------------- masking explorer
@dataclass(frozen=True)
class MaskingState:
    """order: one of masking.SINGLE_IMAGE_ORDERS; ratio: percent of patches; mode: fill | drop;
    layer: 1-based layer whose head-mean theta_i is the score s_i."""

    image: str
    order: str = "top"
    ratio: float = 10.0
    mode: str = "fill"
    layer: int = 6
    gamma: float = 1.0
    threshold: float = SIFT_DEFAULT
    seed: int = 0


@dataclass
class MaskingView:
    state: MaskingState
    scores: np.ndarray        # (N,) s_i of the score layer (NaN where undefined in every head)
    ranking: np.ndarray       # (N,) masking order, first = masked first
    masked: np.ndarray        # (M,) masked patch indices, ascending
    image: np.ndarray         # (S, S, 3) uint8: the crop with the masked patches painted
    counts: np.ndarray


def patch_scores(img: ImageData, layer: int, gamma: float = 1.0, threshold: float = SIFT_DEFAULT) -> np.ndarray:
    """s_i (Sec 5.1) of ``layer``: metrics.patch_scores on the cached map -> (N,) float32."""
    counts = torch.from_numpy(img.keypoints(threshold)[0])
    return M.patch_scores(img.t[layer - 1][None], counts[None], gamma)[0].numpy()


def masking_view(img: ImageData, st: MaskingState, fill_rgb=(0, 0, 0)) -> MaskingView:
    """State -> masked patches (masking.rank_patches) and the crop with them painted ``fill_rgb``."""
    if st.mode not in MK.MODES:
        raise ValueError(f"mode must be one of {MK.MODES}, got {st.mode!r}")
    counts, _ = img.keypoints(st.threshold)
    scores = patch_scores(img, st.layer, st.gamma, st.threshold)
    rank = MK.rank_patches(st.order, scores=scores[None], counts=counts[None], ids=[img.id], seed=st.seed)
    masked = MK.mask_indices(rank, st.ratio)[0]
    pic = maskplots.masked_crop(img.crop, masked, img.grid, img.patch_size, fill_rgb)
    return MaskingView(st, scores, rank[0], masked, pic, counts)


class Predictor:
    """Class probabilities of an image with some patches masked, each (image, mode, masked set) once.
    ``classifier``: a classify.Classifier (``lm``, ``logits``, ``classes``) on the explorer's input."""

    def __init__(self, classifier, keep: int = 256):
        self.clf = classifier
        self.keep = keep
        self._cache: OrderedDict = OrderedDict()
        self.n_forward = 0

    @staticmethod
    def _key(img: ImageData, mode: str, masked) -> tuple:
        m = np.asarray(masked, dtype=np.int64).reshape(1, -1)
        return (img.id, mode if m.shape[1] else "clean", m.tobytes())

    def is_cached(self, img: ImageData, mode: str = "fill", masked=()) -> bool:
        return self._key(img, mode, masked) in self._cache

    def probs(self, img: ImageData, mode: str = "fill", masked=()) -> np.ndarray:
        """(C,) probabilities (model.infer, fp32) with ``masked`` patches hidden by ``mode``."""
        key = self._key(img, mode, masked)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        m = np.asarray(masked, dtype=np.int64).reshape(1, -1)
        model = self.clf.lm.model
        logits = infer(self.clf.lm, img.x[None], precision="fp32", head=self.clf.logits,
                       forward=lambda x: masked_features(model, x, mode, m, img.grid, img.patch_size))
        self.n_forward += 1
        return _lru_put(self._cache, key, torch.softmax(logits.float(), dim=-1)[0].cpu().numpy(), self.keep)


def class_names(classes: Sequence[str]) -> list[str]:
    """"name (wnid)" for wnid labels (maskplots.class_names); other labels as they are."""
    names = maskplots.class_names([str(c) for c in classes])
    return [str(c) if names[str(c)] == str(c) else f"{names[str(c)]} ({c})" for c in classes]


def _ranked(probs: np.ndarray) -> np.ndarray:
    """Class indices, most probable first (ties: lower index first)."""
    return np.lexsort((np.arange(len(probs)), -np.asarray(probs)))


def top_k(probs: np.ndarray, k: int = 5) -> list[tuple[int, float]]:
    """[(class index, probability)] of the k most probable classes."""
    return [(int(i), float(probs[i])) for i in _ranked(probs)[:k]]


def top5_change(clean: np.ndarray, masked: np.ndarray, k: int = 5) -> list[dict]:
    """Row r: the clean and the masked r-th class with probabilities, and each one's rank in the
    other list (the masking explorer's table)."""
    rank_c, rank_m = np.argsort(_ranked(clean)), np.argsort(_ranked(masked))     # class -> rank
    rows = []
    for r, ((ci, cp), (mi, mp)) in enumerate(zip(top_k(clean, k), top_k(masked, k))):
        rows.append({"rank": r + 1, "clean": ci, "p_clean": cp, "clean_rank_after": int(rank_m[ci]) + 1,
                     "p_clean_after": float(masked[ci]), "masked": mi, "p_masked": mp,
                     "masked_rank_before": int(rank_c[mi]) + 1})
    return rows
