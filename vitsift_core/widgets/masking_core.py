"""What the masking explorer computes, without any widget: state -> masked patches and picture
(from the cached attention of :class:`core.ImageData`), and the classifier's probabilities.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch

from vitsift_core.method import masking as MK
from vitsift_core.method import metrics as M
from vitsift_core.model.masked import masked_features
from vitsift_core.report import maskplots
from vitsift_core.report.maskplots import masked_crop
from vitsift_core.widgets.core import SIFT_DEFAULT, ImageData


@dataclass(frozen=True)
class MaskingState:
    """order: top | bottom | random | keypoints (masking.SINGLE_IMAGE_ORDERS); ratio: percent of patches;
    mode: fill | drop; layer: 1-based layer whose head-mean theta_i is the score s_i."""

    image: str
    order: str = "top"
    ratio: float = 10.0
    mode: str = "fill"
    layer: int = 6
    gamma: float = 1.0
    threshold: float = SIFT_DEFAULT
    seed: int = 0

    def with_(self, **kw) -> "MaskingState":
        return replace(self, **kw)


@dataclass
class MaskingView:
    state: MaskingState
    scores: np.ndarray        # (N,) s_i of the score layer (NaN where undefined in every head)
    ranking: np.ndarray       # (N,) masking order, first = masked first
    masked: np.ndarray        # (M,) masked patch indices, ascending
    image: np.ndarray         # (S, S, 3) uint8: the crop with the masked patches painted
    counts: np.ndarray


def patch_scores(img: ImageData, layer: int, gamma: float = 1.0, threshold: float = SIFT_DEFAULT) -> np.ndarray:
    """s_i (Sec 5.1) of ``layer``: metrics.patch_scores on the cached map. -> (N,) float32."""
    counts = torch.from_numpy(img.keypoints(threshold)[0])
    return M.patch_scores(img.t[layer - 1][None], counts[None], gamma)[0].numpy()


def masking_view(img: ImageData, st: MaskingState, fill_rgb=(0, 0, 0)) -> MaskingView:
    """State -> masked patches and the picture of them, from cached attention and keypoints.
    ``fill_rgb``: colour painted on masked patches (0-255; the normalisation mean for ``fill``)."""
    if st.order not in MK.SINGLE_IMAGE_ORDERS:
        # top_other / bottom_other need another image's score map: they live in mask-eval runs
        raise ValueError(f"order must be one of {MK.SINGLE_IMAGE_ORDERS}, got {st.order!r}")
    if st.mode not in MK.MODES:
        raise ValueError(f"mode must be one of {MK.MODES}, got {st.mode!r}")
    counts, _ = img.keypoints(st.threshold)
    scores = patch_scores(img, st.layer, st.gamma, st.threshold)
    rank = MK.rank_patches(st.order, scores=scores[None], counts=counts[None], ids=[img.id], seed=st.seed)
    masked = MK.mask_indices(rank, st.ratio)[0]
    pic = masked_crop(img.crop, masked, img.grid, img.patch_size, fill_rgb)
    return MaskingView(st, scores, rank[0], masked, pic, counts)


class Predictor:
    """A classifier's probabilities for an image with some patches masked; each (image, mode,
    masked set) is computed once. ``classifier``: a classify.Classifier (``lm``, ``logits``,
    ``classes``) whose ViT shares the explorer model's input (grid and patch size)."""

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
        m = np.asarray(masked, dtype=np.int64).reshape(1, -1)
        key = self._key(img, mode, masked)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        lm = self.clf.lm
        dev = next(lm.model.parameters()).device
        with torch.inference_mode():
            tokens = masked_features(lm.model, img.x[None].to(dev), mode, m, img.grid, img.patch_size)
            p = torch.softmax(self.clf.logits(tokens).float(), dim=-1)[0].cpu().numpy()
        self.n_forward += 1
        self._cache[key] = p
        while len(self._cache) > self.keep:
            self._cache.popitem(last=False)
        return p


def class_names(classes: Sequence[str]) -> list[str]:
    """Readable names of wnid labels, "name (wnid)" (maskplots.class_names); other labels as they are."""
    names = maskplots.class_names([str(c) for c in classes])
    return [str(c) if names[str(c)] == str(c) else f"{names[str(c)]} ({c})" for c in classes]


def top_k(probs: np.ndarray, k: int = 5) -> list[tuple[int, float]]:
    """[(class index, probability)] of the k most probable classes (ties: lower index first)."""
    p = np.asarray(probs)
    idx = np.lexsort((np.arange(len(p)), -p))[:k]
    return [(int(i), float(p[i])) for i in idx]


def top5_change(clean: np.ndarray, masked: np.ndarray, k: int = 5) -> list[dict]:
    """Row r: the clean and the masked r-th class with probabilities, and how each moved
    (rank in the other list, probability change). Used for the masking explorer's table."""
    tc, tm = top_k(clean, k), top_k(masked, k)
    rank_c = {c: r for r, c in enumerate(np.lexsort((np.arange(len(clean)), -np.asarray(clean))))}
    rank_m = {c: r for r, c in enumerate(np.lexsort((np.arange(len(masked)), -np.asarray(masked))))}
    rows = []
    for r in range(min(k, len(tc))):
        (ci, cp), (mi, mp) = tc[r], tm[r]
        rows.append({"rank": r + 1, "clean": ci, "p_clean": cp, "clean_rank_after": rank_m[ci] + 1,
                     "p_clean_after": float(masked[ci]), "masked": mi, "p_masked": mp,
                     "masked_rank_before": rank_c[mi] + 1})
    return rows
