"""Retrieval / Capture / Coach (Sec 4.3): a joint 3-segment fit of the z-scored curves over layers,
and the one recipe (which images, curves and guards) every caller uses.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

STAGE_NAMES = ("Retrieval", "Capture", "Coach")


@dataclass
class StageFit:
    """Segments [(first, last)] * 3 (1-based), per-segment slopes and means, shape tests, names,
    and the shortest segment length the search allowed."""
    boundaries: tuple[int, int]
    segments: list[tuple[int, int]]
    slopes: list[dict[str, float]]
    means: list[dict[str, float]]
    sse: float
    tests: dict[str, bool] = field(default_factory=dict)
    names: list[str] | None = None
    flat_tol: float = 0.05
    min_len: int = 2                # the shortest segment the search allowed

    @property
    def holds(self) -> bool:
        return self.names is not None

    def failed(self) -> list[str]:
        return [k for k, v in self.tests.items() if not v]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["holds"] = self.holds
        d["failed"] = self.failed()
        return d

    def summary(self) -> str:
        parts = []
        for k, (a, b) in enumerate(self.segments):
            label = self.names[k] if self.names else f"segment {k + 1}"
            parts.append(f"{label}: layers {a}-{b}")
        tail = "shape tests passed" if self.holds else "failed: " + ", ".join(self.failed())
        return "; ".join(parts) + f" ({tail})"


def zscore(y: np.ndarray) -> np.ndarray:
    """(L,) -> (L,); a constant curve becomes all zeros rather than NaN."""
    y = np.asarray(y, dtype=np.float64)
    sd = y.std()
    return (y - y.mean()) / sd if sd > 0 else np.zeros_like(y)


def line_fit(x: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, float]:
    """Least-squares lines of several curves over the same x: x (n,), ys (C, n) -> slopes (C,), sse."""
    xc = x - x.mean()
    denom = (xc ** 2).sum()
    yc = ys - ys.mean(axis=1, keepdims=True)
    slopes = (yc @ xc) / denom
    resid = yc - slopes[:, None] * xc[None, :]
    return slopes, float((resid ** 2).sum())


def min_segment(n_layers: int) -> int:
    """The shortest stage segment for a model of ``n_layers``: 3 layers from 12 layers on, else 2.
    A 2-layer segment's "slope" is one difference; deep models can afford a real line."""
    return 3 if n_layers >= 12 else 2


def fit_stages(theta_curve, focus_curve, min_len: int | None = None, flat_tol: float = 0.05) -> StageFit:
    """Exhaustive least-squares fit of three segments to theta_curve and focus_curve (L,), then the
    shape tests (DESIGN.md section 3) that name them. ``min_len`` None: :func:`min_segment` (L)."""
    th = np.asarray(theta_curve, dtype=np.float64)
    fo = np.asarray(focus_curve, dtype=np.float64)
    if th.shape != fo.shape or th.ndim != 1:
        raise ValueError(f"curves must be 1-D and equal length, got {th.shape} and {fo.shape}")
    n = th.shape[0]
    min_len = min_segment(n) if min_len is None else min_len
    if n < 3 * min_len:
        raise ValueError(f"need at least {3 * min_len} layers for 3 segments of >= {min_len}, got {n}")
    if np.isnan(th).any() or np.isnan(fo).any():
        raise ValueError("curves contain NaN; drop undefined layers before fitting")
    ys = np.stack([zscore(th), zscore(fo)])
    x = np.arange(1, n + 1, dtype=np.float64)
    best = None
    for b1 in range(min_len, n - 2 * min_len + 1):
        for b2 in range(b1 + min_len, n - min_len + 1):
            sse = sum(line_fit(x[lo:hi], ys[:, lo:hi])[1] for lo, hi in ((0, b1), (b1, b2), (b2, n)))
            if best is None or sse < best[0] - 1e-12:       # exact ties: the earliest breakpoints
                best = (sse, b1, b2)
    sse, b1, b2 = best
    segs = [(1, b1), (b1 + 1, b2), (b2 + 1, n)]
    slopes, means = [], []
    for lo, hi in ((0, b1), (b1, b2), (b2, n)):
        s, _ = line_fit(x[lo:hi], ys[:, lo:hi])
        slopes.append({"theta": float(s[0]), "focus": float(s[1])})
        means.append({"theta": float(ys[0, lo:hi].mean()), "focus": float(ys[1, lo:hi].mean())})
    tests = {
        "capture_theta_rises": slopes[1]["theta"] > 0,
        "capture_focus_falls": slopes[1]["focus"] < 0,
        "coach_theta_not_rising": slopes[2]["theta"] <= flat_tol,
        "coach_focus_not_falling": slopes[2]["focus"] >= -flat_tol,
        "retrieval_theta_low": means[0]["theta"] < means[1]["theta"],
        "retrieval_focus_broad": means[0]["focus"] > means[1]["focus"],
    }
    tests = {k: bool(v) for k, v in tests.items()}
    names = list(STAGE_NAMES) if all(tests.values()) else None
    return StageFit((b1, b2), segs, slopes, means, float(sse), tests, names, flat_tol, min_len)


MIN_LAYERS = 6                  # three segments of >= min_segment(L) layers (2 below 12 layers)
CURVES = {"theta": "theta_kk - theta_chance (head mean)", "focus": "focus (head mean)"}


def stage_curves(kk, nk, chance, focus) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-image head means, each (I, L) -> (keep (I,): KK and NK defined in every layer, mean of
    KK - chance over kept images (L,), their mean focus (L,))."""
    kk, nk, chance, focus = (np.asarray(a) for a in (kk, nk, chance, focus))
    keep = ~np.isnan(kk).any(axis=1) & ~np.isnan(nk).any(axis=1)
    if not keep.any():
        return keep, np.full(kk.shape[1], np.nan), np.full(kk.shape[1], np.nan)
    return keep, np.nanmean(kk[keep] - chance[keep], axis=0), np.nanmean(focus[keep], axis=0)


def fit_recipe(theta_curve, focus_curve) -> tuple[StageFit | None, str]:
    """The guards, then :func:`fit_stages`: (fit, "") or (None, why there is no fit)."""
    th, fo = np.asarray(theta_curve), np.asarray(focus_curve)
    if len(th) < MIN_LAYERS:
        return None, f"{len(th)} layers: a 3-stage fit needs at least {MIN_LAYERS}"
    if np.isnan(th).any() or np.isnan(fo).any():
        return None, "undefined (NaN) layer means: no image with keypoints?"
    return fit_stages(th, fo), ""


def recipe_json(theta_curve, focus_curve) -> dict:
    """:func:`fit_recipe` as the ``stages.json`` dict (``fitted``, and the fit or the reason)."""
    fit, why = fit_recipe(theta_curve, focus_curve)
    if fit is None:
        return {"fitted": False, "reason": why}
    return {"fitted": True, "curves": dict(CURVES), "summary": fit.summary(), **fit.to_dict()}
