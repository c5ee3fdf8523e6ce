"""Figure data -> pixels for the explorers: numpy/PIL overlays (a few ms) and matplotlib plots whose
data artists are redrawn over a cached background. Colours as :mod:`vitsift_core.report.figures`.
"""
from __future__ import annotations

import functools
import io

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from PIL import Image, ImageDraw

from vitsift_core.method.stages import STAGE_NAMES, zscore
from vitsift_core.report import figures as plots
from vitsift_core.widgets.core import AttentionView, StageView


def _rgb255(color) -> tuple[int, int, int]:
    return tuple(int(round(255 * v)) for v in to_rgb(color))


KEY_RGB = _rgb255(plots.COLORS["KK"])
NON_RGB = _rgb255(plots.COLORS["NK"])
KP_RGB = _rgb255(plots.PALETTE[8])


@functools.cache
def _lut() -> np.ndarray:
    return (matplotlib.colormaps["magma"](np.linspace(0, 1, 256))[:, :3] * 255).round().astype(np.uint8)


def png(img) -> bytes:
    """PNG of an (H, W, 3) uint8 array, a PIL image (fast compression) or a Figure (at its dpi)."""
    buf = io.BytesIO()
    if isinstance(img, Figure):
        img.savefig(buf, format="png", dpi=img.dpi)
    else:
        im = img if isinstance(img, Image.Image) else Image.fromarray(np.asarray(img))
        im.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def upscale(crop: np.ndarray, scale: int) -> Image.Image:
    im = Image.fromarray(crop)
    return im if scale == 1 else im.resize((crop.shape[1] * scale, crop.shape[0] * scale), Image.BILINEAR)


def _grid_lines(a: np.ndarray, grid, step: int, strength: float = 0.35) -> None:
    """Lighten the pixel rows, then columns, on patch borders in place (uint8 (H, W, 3))."""
    rows, cols = np.arange(1, grid[0]) * step, np.arange(1, grid[1]) * step
    for sl in ((rows, slice(None)), (slice(None), cols)):
        a[sl] = (a[sl].astype(np.float32) * (1 - strength) + 255 * strength).astype(np.uint8)


def _rect(draw: ImageDraw.ImageDraw, j: int, grid, step: int, color, width: int, inset: int = 0) -> None:
    r, c = divmod(int(j), int(grid[1]))
    draw.rectangle([c * step + inset, r * step + inset, (c + 1) * step - 1 - inset, (r + 1) * step - 1 - inset],
                   outline=color, width=width)


def overlay_image(view: AttentionView, crop: np.ndarray, grid, patch_size: int, scale: int = 2,
                  alpha: float = 0.55, show_keypoints: bool = True, show_grid: bool = True) -> np.ndarray:
    """The query's attention over the crop (magma, row scaled to its maximum), patch grid, keypoints,
    S_i outlined in the KK (keypoint patch) or NK colour, the query in white -> (S*scale, S*scale, 3)."""
    step = patch_size * scale
    base = np.asarray(upscale(crop, scale), dtype=np.float32)
    h = np.asarray(view.row, dtype=np.float32).reshape(grid)
    top = float(h.max())
    idx = np.clip(h / top * 255 if top > 0 else h * 0, 0, 255).astype(np.uint8)
    heat = _lut()[idx].repeat(step, axis=0).repeat(step, axis=1).astype(np.float32)
    hh, ww = heat.shape[:2]
    out = base.copy()
    out[:hh, :ww] = base[:hh, :ww] * (1 - alpha) + heat * alpha
    out = out.astype(np.uint8)
    if show_grid:
        _grid_lines(out, grid, step)
    im = Image.fromarray(out)
    d = ImageDraw.Draw(im)
    if show_keypoints and len(view.keypoints):
        r = 1.0 * scale
        for x, y in np.asarray(view.keypoints)[:, :2] * scale:
            d.ellipse([x - r, y - r, x + r, y + r], fill=KP_RGB)
    key = np.asarray(view.counts) > 0
    for j in np.flatnonzero(view.attended):
        _rect(d, j, grid, step, KEY_RGB if key[j] else NON_RGB, max(2, scale))
    _rect(d, view.query, grid, step, (255, 255, 255), 2 * scale)
    _rect(d, view.query, grid, step, (0, 0, 0), 1, inset=2 * scale)
    return np.asarray(im)


def _canvas(figsize, dpi) -> Figure:
    fig = Figure(figsize=figsize, dpi=dpi, layout="none")
    FigureCanvasAgg(fig)
    return fig


class _BlitPlot:
    """A figure whose static parts (axes, labels, legend) are rendered once; with ``blit`` the data
    artists are drawn over that cached background each frame (figures that are saved: blit=False)."""

    def __init__(self, fig: Figure, blit: bool):
        self.fig = fig
        self.blit = blit
        self._bg = None
        self._bg_key = None
        self._dynamic: list = []
        self._limits = None

    def _dyn(self, artist):
        if self.blit:
            artist.set_animated(True)
        self._dynamic.append(artist)

    def _clear_dynamic(self) -> None:
        for a in self._dynamic:
            a.remove()
        self._dynamic = []

    def frame(self, bg_key) -> np.ndarray:
        """(H, W, 3) uint8 of the current state."""
        canvas = self.fig.canvas
        if not self.blit:
            canvas.draw()
        else:
            if self._bg is None or bg_key != self._bg_key:
                canvas.draw()               # animated artists are skipped: the background
                self._bg = canvas.copy_from_bbox(self.fig.bbox)
                self._bg_key = bg_key
            canvas.restore_region(self._bg)
            for a in self._dynamic:
                a.axes.draw_artist(a) if a.axes is not None else self.fig.draw_artist(a)
        return np.asarray(canvas.buffer_rgba())[..., :3].copy()

    def png(self) -> bytes:
        return png(self.frame(self._limits))


class LayerCurvesPlot(_BlitPlot):
    """theta_KK / theta_NK / theta_chance (top) and the focus index (bottom) per layer for one
    image, with the current layer marked."""

    def __init__(self, figsize=(5.2, 4.2), dpi: int = 80, fig: Figure | None = None, axes=None,
                 blit: bool = True):
        super().__init__(fig if fig is not None else _canvas(figsize, dpi), blit)
        if axes is None:
            axes = self.fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 2]})
            self.fig.subplots_adjust(left=0.13, right=0.97, top=0.92, bottom=0.12, hspace=0.1)
        self.ax, self.ax_f = axes
        c = plots.COLORS
        (self.kk,) = self.ax.plot([], [], color=c["KK"], lw=2, marker="o", ms=3, label="theta_KK")
        (self.nk,) = self.ax.plot([], [], color=c["NK"], lw=2, marker="o", ms=3, label="theta_NK")
        (self.ch,) = self.ax.plot([], [], color=c["chance"], lw=1.2, ls="--", label="theta_chance")
        (self.fo,) = self.ax_f.plot([], [], color=plots.PALETTE[5], lw=2, marker="o", ms=3, label="focus")
        self.v1 = self.ax.axvline(1, color="black", lw=1, alpha=0.6)
        self.v2 = self.ax_f.axvline(1, color="black", lw=1, alpha=0.6)
        (self.mark,) = self.ax.plot([], [], "o", ms=9, mfc="none", mec="black")
        self.title = self.ax.set_title(" ", fontsize=9)
        for a in (self.kk, self.nk, self.ch, self.fo, self.v1, self.v2, self.mark, self.title):
            self._dyn(a)
        self.ax.set_ylabel("theta (weighted)")
        self.ax_f.set_ylabel("focus (nats)")
        self.ax_f.set_xlabel("layer")
        self.ax.legend(fontsize=7, loc="lower center", ncol=3)
        self.ax_f.set_title("0 = one patch, log N = uniform", fontsize=7, loc="right", pad=2)
        self.ax.grid(alpha=0.3)
        self.ax_f.grid(alpha=0.3)

    def update(self, view: AttentionView, image_id: str = "") -> None:
        cv = view.curves
        x = cv["layer"]
        self.kk.set_data(x, cv["theta_kk"])
        self.nk.set_data(x, cv["theta_nk"])
        self.ch.set_data(x, np.full(len(x), cv["theta_chance"]))
        self.fo.set_data(x, cv["focus"])
        # fixed scales (theta in [0, 1], focus in [0, log N]): images, heads and gammas compare at a
        # glance, and the cached background stays valid, so a redraw is a blit
        lim = (len(x), (-0.02, 1.02), (0.0, 1.02 * float(np.log(len(view.row)))))
        if lim != self._limits:
            self.ax.set_xlim(0.5, len(x) + 0.5)
            self.ax.set_ylim(*lim[1])
            self.ax_f.set_ylim(*lim[2])
            self._limits = lim
        layer = view.state.layer
        self.v1.set_xdata([layer, layer])
        self.v2.set_xdata([layer, layer])
        self.mark.set_data([layer], [cv["theta_kk"][layer - 1]])
        name = image_id.rsplit("/", 1)[-1]
        self.title.set_text(f"{name[:40]} | {view.head_label} | layer {layer} marked")


class StagePlot(_BlitPlot):
    """Stage explorer: theta_KK / NK / chance per layer (left) and the z-scored curves the stage
    fit uses (right), stages shaded."""

    Z_LIM = (-3.5, 3.5)     # |z| <= sqrt(L - 1) for L points; 12 layers: 3.3

    def __init__(self, figsize=(10.5, 3.8), dpi: int = 80, fig: Figure | None = None, blit: bool = True):
        super().__init__(fig if fig is not None else _canvas(figsize, dpi), blit)
        self.axes = self.fig.subplots(1, 2)
        self.fig.subplots_adjust(left=0.07, right=0.98, top=0.84, bottom=0.13, wspace=0.22)
        a0, a1 = self.axes
        c = plots.COLORS
        a0.set_ylabel("theta (head mean, mean over images)")
        a1.set_ylabel("z-score over layers")
        a0.legend(handles=[Line2D([], [], color=c["KK"], lw=2, label="theta_KK"),
                           Line2D([], [], color=c["NK"], lw=2, label="theta_NK"),
                           Line2D([], [], color=c["chance"], lw=1.2, ls="--", label="theta_chance")],
                  fontsize=7, loc="lower center", ncol=3)
        a1.legend(handles=[Line2D([], [], color=c["KK"], lw=2, label="theta_KK - chance (z)"),
                           Line2D([], [], color=plots.PALETTE[5], lw=2, label="focus index (z)"),
                           Line2D([], [], color="0.3", lw=1, ls=":", label="segment fits")],
                  fontsize=7, loc="lower right")
        for ax in self.axes:
            ax.set_xlabel("layer")
            ax.grid(alpha=0.3)

    def update(self, sv: StageView) -> None:
        a0, a1 = self.axes
        self._clear_dynamic()
        c = plots.COLORS
        x = sv.layer
        lim = (len(x), (-0.02, 1.02))
        if lim != self._limits:
            for ax in self.axes:
                ax.set_xlim(0.5, max(len(x), 1) + 0.5)
            a0.set_ylim(*lim[1])
            a1.set_ylim(*self.Z_LIM)
            self._limits = lim
        for ax in self.axes:
            if sv.fit is not None:                  # plots.shade_stages's spans and labels are data
                before = set(ax.get_children())
                plots.shade_stages(ax, sv.fit.segments, sv.fit.names)
                for a in ax.get_children():
                    if a not in before:
                        self._dyn(a)
        self._dyn(a0.plot(x, sv.theta_kk, color=c["KK"], lw=2, marker="o", ms=3)[0])
        self._dyn(a0.plot(x, sv.theta_nk, color=c["NK"], lw=2, marker="o", ms=3)[0])
        self._dyn(a0.plot(x, sv.theta_chance, color=c["chance"], lw=1.2, ls="--")[0])
        if sv.n_images:
            zt, zf = zscore(sv.theta_curve), zscore(sv.focus)
            self._dyn(a1.plot(x, zt, color=c["KK"], lw=2, marker="o", ms=3)[0])
            self._dyn(a1.plot(x, zf, color=plots.PALETTE[5], lw=2, marker="o", ms=3)[0])
            if sv.fit is not None:
                for k, (a, b) in enumerate(sv.fit.segments):
                    xs = np.arange(a, b + 1)
                    for key, y, col in (("theta", zt, c["KK"]), ("focus", zf, plots.PALETTE[5])):
                        seg = y[a - 1:b]
                        self._dyn(a1.plot(xs, sv.fit.slopes[k][key] * (xs - xs.mean()) + seg.mean(),
                                          color=col, lw=1, ls=":")[0])
        verdict = ("stages hold: " + " / ".join(STAGE_NAMES) if sv.fit is not None and sv.fit.holds
                   else "shape tests fail" if sv.fit is not None else "no fit")
        self._dyn(self.fig.text(0.5, 0.97, f"{sv.n_images} images | gamma={sv.gamma:g} | SIFT threshold="
                                f"{sv.threshold:g} | {verdict}", ha="center", va="top", fontsize=10))


def attention_figure(view: AttentionView, crop: np.ndarray, grid, patch_size: int, image_id: str) -> Figure:
    """A static figure of one attention-explorer state (for notebooks run headless)."""
    fig = _canvas((11, 4.4), 100)
    gs = fig.add_gridspec(2, 2, width_ratios=[1, 1.25], height_ratios=[3, 2], left=0.02, right=0.98,
                          top=0.88, bottom=0.1, wspace=0.15, hspace=0.08)
    ax = fig.add_subplot(gs[:, 0])
    ax.imshow(overlay_image(view, crop, grid, patch_size, scale=2))
    ax.set_xticks([]), ax.set_yticks([])
    ax.set_title(f"query {view.query}: theta_i = {view.theta:.3f} (chance {view.chance:.3f})\n"
                 f"S_i outlined: blue = keypoint patch, orange = no keypoint", fontsize=8)
    a1 = fig.add_subplot(gs[0, 1])
    a2 = fig.add_subplot(gs[1, 1], sharex=a1)
    a1.tick_params(labelbottom=False)
    cp = LayerCurvesPlot(fig=fig, axes=(a1, a2), blit=False)
    cp.update(view, image_id)
    st = view.state
    fig.suptitle(f"Attention explorer (static) | {image_id} | layer {st.layer}, {view.head_label}, "
                 f"gamma={st.gamma:g}, SIFT threshold={st.threshold:g}", fontsize=10)
    return fig
