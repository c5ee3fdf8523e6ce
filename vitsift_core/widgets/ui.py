"""ipywidgets wiring of the attention and stage explorers to :mod:`.core` (computation) and
:mod:`.render` (drawing). Each displays as its widget plus a static PNG of its state, so a notebook
run headless by papermill still shows a figure.
"""
from __future__ import annotations

import base64
import html
import os
import time
from typing import Sequence

import ipywidgets as W
import numpy as np

from vitsift_core.experiments.study import choose_images
from vitsift_core.widgets import core as C
from vitsift_core.widgets import render as R

_CSS = """<style>
.vitsift-overlay img, img.vitsift-overlay { cursor: crosshair; }
.vitsift-readout { font-family: monospace; font-size: 13px; }
.vitsift-status { color: #666; font-size: 12px; }
</style>"""


def _legend() -> str:
    def sw(rgb, text, extra=""):
        return (f'<span style="display:inline-block;width:12px;height:12px;border:2px solid rgb{rgb};'
                f'margin:0 4px 0 10px;vertical-align:middle;{extra}"></span>{text}')
    return ("<div style='font-size:12px'>" + sw(R.KEY_RGB, "attended, keypoint patch")
            + sw(R.NON_RGB, "attended, no keypoint") + sw((255, 255, 255), "query patch (click another)", "outline:1px solid #000")
            + sw(R.KP_RGB, "SIFT keypoint", f"background:rgb{R.KP_RGB};border-radius:50%;width:6px;height:6px") + "</div>")


def _metric_controls(gamma: float, threshold: float, style: dict, layout) -> tuple:
    """The gamma and SIFT threshold sliders and the exclude-self box both explorers offer."""
    return (W.FloatSlider(value=gamma, min=0.25, max=4.0, step=0.05, description="gamma",
                          continuous_update=False, style=style, layout=layout),
            W.FloatSlider(value=threshold, min=0.005, max=0.2, step=0.005, readout_format=".3f",
                          description="SIFT contrast", continuous_update=False, style=style, layout=layout),
            W.Checkbox(value=False, description="exclude the query's own patch (j != i)", indent=False))


class _Explorer:
    """Common display logic: widget view + static PNG fallback in one output."""

    widget: W.Widget

    def static_png(self) -> bytes:  # pragma: no cover - overridden
        raise NotImplementedError

    def _repr_mimebundle_(self, **kwargs):
        bundle = self.widget._repr_mimebundle_(**kwargs) or {}
        if os.environ.get("VITSIFT_EXPLORE"):      # the Voila page (`make explore`): widgets always render
            return bundle
        try:
            bundle["image/png"] = base64.b64encode(self.static_png()).decode("ascii")
        except Exception as e:   # a static fallback must never break the live widget
            bundle["text/plain"] = f"{type(self).__name__} (static figure unavailable: {e})"
        return bundle


# ----------------------------------------------------------------------------------- attention
class AttentionExplorer(_Explorer):
    """Image, layer, head (or head mean), gamma, SIFT contrast threshold and a query patch picked
    by clicking the image -> overlay with S_i outlined, theta_i / theta_chance readout and this
    image's theta_KK / theta_NK / focus curves with the current layer marked.

    ``library``: a :class:`core.ImageLibrary`; the model runs once per image, on first view.
    """

    def __init__(self, library: C.ImageLibrary, image: str | None = None, layer: int | None = None,
                 head: int | None = None, gamma: float = 1.0, threshold: float = C.SIFT_DEFAULT,
                 query: int | None = None, scale: int = 2, uploads: bool = True):
        import ipyevents

        self.lib = library
        ids = library.ids()
        if not ids:
            raise ValueError("the explorer needs at least one image")
        image = image or ids[0]
        img = library.get(image)
        self.scale = int(scale)
        layer = layer or (img.n_layers + 1) // 2
        self.state = C.AttentionState(image, int(layer), head, float(gamma), float(threshold), query)
        self.timings: list[tuple[str, float]] = []
        self.view: C.AttentionView | None = None
        self._plot = R.LayerCurvesPlot()

        st = {"description_width": "90px"}
        lay = W.Layout(width="330px")
        self.w_image = W.Dropdown(options=ids, value=image, description="image", style=st, layout=lay)
        self.w_upload = W.FileUpload(accept="image/*", multiple=False, description="upload image")
        self.w_layer = W.IntSlider(value=self.state.layer, min=1, max=img.n_layers, description="layer",
                                   style=st, layout=lay)
        self.w_layer.add_class("vitsift-layer")
        self.w_head = W.Dropdown(options=[("mean over heads", 0)] + [(f"head {h}", h) for h in range(1, img.n_heads + 1)],
                                 value=head or 0, description="head", style=st, layout=lay)
        self.w_gamma, self.w_threshold, self.w_xself = _metric_controls(gamma, threshold, st, lay)
        self.w_kp = W.Checkbox(value=True, description="show SIFT keypoints", indent=False)
        self.w_reset = W.Button(description="query: densest keypoint patch", layout=W.Layout(width="330px"))
        s = img.crop.shape[0] * self.scale
        self.overlay = W.Image(format="png", layout=W.Layout(width=f"{s}px", height=f"{s}px"))
        self.overlay.add_class("vitsift-overlay")
        self.readout = W.HTML()
        self.readout.add_class("vitsift-readout")
        self.curves = W.Image(format="png")
        self.curves.add_class("vitsift-curves")
        self.status = W.HTML()
        self.status.add_class("vitsift-status")
        self.events = ipyevents.Event(source=self.overlay, watched_events=["click"])
        self.events.on_dom_event(self._on_click)

        self.w_image.observe(lambda ch: self._on_image(ch["new"]), names="value")
        self.w_layer.observe(lambda ch: self.update(layer=int(ch["new"])), names="value")
        self.w_head.observe(lambda ch: self.update(head=int(ch["new"]) or None), names="value")
        self.w_gamma.observe(lambda ch: self.update(gamma=float(ch["new"])), names="value")
        self.w_threshold.observe(lambda ch: self.update(threshold=float(ch["new"])), names="value")
        self.w_xself.observe(lambda ch: self.update(exclude_self=bool(ch["new"])), names="value")
        self.w_kp.observe(lambda ch: self.redraw(curves=False, what="keypoints shown"), names="value")
        self.w_reset.on_click(lambda _: self.update(query=None))
        self.w_upload.observe(self._on_upload, names="value")

        controls = [self.w_image] + ([self.w_upload] if uploads else []) + [
            self.w_layer, self.w_head, self.w_gamma, self.w_threshold, self.w_xself, self.w_kp, self.w_reset]
        left = W.VBox([W.HTML(_CSS), self.overlay, W.HTML(_legend()), self.readout])
        right = W.VBox(controls + [self.curves, self.status])
        self.widget = W.HBox([left, right])
        self.widget.add_class("vitsift-attention-explorer")
        self.redraw()

    # -- events
    def _on_click(self, event: dict) -> None:
        """ipyevents click on the overlay: dataX/dataY are in the PNG's pixels."""
        img = self.lib.get(self.state.image)
        size = img.crop.shape[0] * self.scale
        if "dataX" in event:
            x, y, w, h = event["dataX"], event["dataY"], size, size
        else:
            x, y = event["relativeX"], event["relativeY"]
            w, h = event.get("boundingRectWidth") or size, event.get("boundingRectHeight") or size
        self.click(x, y, w, h)

    def click(self, x: float, y: float, width: float | None = None, height: float | None = None) -> int:
        """Pick the query patch under (x, y) of the shown overlay (default size: the PNG's)."""
        img = self.lib.get(self.state.image)
        size = img.crop.shape[0] * self.scale
        q = C.patch_at(x, y, width or size, height or size, img.grid)
        self.update(query=q)
        return q

    def _on_image(self, image_id: str) -> None:
        if image_id == self.state.image:
            return
        if not self.lib.is_cached(image_id):
            self.status.value = f"running the model on {html.escape(image_id)} (once per image) ..."
        try:
            self.lib.get(image_id)
        except Exception as e:
            self.status.value = f"<span style='color:#b00'>cannot analyse {html.escape(image_id)}: {html.escape(str(e))}</span>"
            return
        self.update(image=image_id, query=None)

    def _on_upload(self, change) -> None:
        files = change["new"]
        if not files:
            return
        f = files[0]
        try:
            image_id = self.lib.add_upload(f["name"], bytes(f["content"]))
        except Exception as e:
            self.status.value = f"<span style='color:#b00'>upload {html.escape(f['name'])}: {html.escape(str(e))}</span>"
            return
        self.w_image.options = self.lib.ids()
        self.w_image.value = image_id          # runs the model on it, then redraws

    # -- state -> pixels
    def update(self, **changes) -> C.AttentionView:
        """Apply state changes (the widgets call this) and redraw what they affect."""
        old = self.state
        self.state = old.with_(**changes)
        curves = any(getattr(old, k) != getattr(self.state, k)
                     for k in ("image", "layer", "head", "gamma", "threshold", "exclude_self"))
        return self.redraw(curves=curves, what=",".join(sorted(changes)))

    def redraw(self, curves: bool = True, what: str = "all") -> C.AttentionView:
        t0 = time.perf_counter()
        img = self.lib.get(self.state.image)
        v = C.attention_view(img, self.state)
        self.view = v
        self.overlay.value = R.png(R.overlay_image(v, img.crop, img.grid, img.patch_size, self.scale,
                                                   show_keypoints=self.w_kp.value))
        self.readout.value = self._readout(v, img)
        if curves:
            self._plot.update(v, img.id)
            self.curves.value = self._plot.png()
        ms = 1000 * (time.perf_counter() - t0)
        self.timings.append((what, ms))
        self.status.value = (f"redrawn in {ms:.0f} ms from cached attention ({what}); "
                             f"model runs so far: {self.lib.n_forward}")
        return v

    @staticmethod
    def _readout(v: C.AttentionView, img: C.ImageData) -> str:
        r = v.readout()
        row, col = divmod(v.query, img.grid[1])
        th = "undefined (S_i empty)" if np.isnan(r["theta"]) else f"{r['theta']:.4f}"
        return (f"<div><b>query patch {v.query}</b> (row {row}, col {col}; {int(v.counts[v.query])} keypoints) | "
                f"layer {v.state.layer}, {v.head_label}, gamma {v.state.gamma:g}</div>"
                f"<div><b>theta_i = <span class='vitsift-theta'>{th}</span></b> vs "
                f"theta_chance = <span class='vitsift-chance'>{r['chance']:.4f}</span> | "
                f"|S_i| = {r['n_attended']} patches, {r['n_key_attended']} with keypoints</div>"
                f"<div>this layer, all queries: theta_KK = {r['theta_kk']:.4f}, theta_NK = {r['theta_nk']:.4f}</div>")

    def static_png(self) -> bytes:
        img = self.lib.get(self.state.image)
        return R.fig_png(self.figure(img))

    def figure(self, img: C.ImageData | None = None):
        """A matplotlib Figure of the current state (for notebooks run headless / saving)."""
        img = img or self.lib.get(self.state.image)
        v = self.view or C.attention_view(img, self.state)
        return R.attention_figure(v, img.crop, img.grid, img.patch_size, img.id)


# ----------------------------------------------------------------------------------- stages
class StageExplorer(_Explorer):
    """gamma and SIFT threshold sliders refit the Retrieval / Capture / Coach stages over a small
    image set (the model runs once per image) and redraw the curves with the stages shaded."""

    def __init__(self, library: C.ImageLibrary, image_ids: Sequence[str] | None = None, n_images: int = 6,
                 gamma: float = 1.0, threshold: float = C.SIFT_DEFAULT):
        self.lib = library
        ids = list(image_ids) if image_ids is not None else library.ids()[:n_images]
        if not ids:
            raise ValueError("the stage explorer needs at least one image")
        library.keep = max(library.keep, len(ids) + 2)
        self.images = library.get_many(ids)        # one batched forward for the images not seen yet
        self.gamma, self.threshold, self.exclude_self = float(gamma), float(threshold), False
        self.timings: list[tuple[str, float]] = []
        self._plot = R.StagePlot()
        st = {"description_width": "90px"}
        lay = W.Layout(width="360px")
        self.w_gamma, self.w_threshold, self.w_xself = _metric_controls(gamma, threshold, st, lay)
        self.plot = W.Image(format="png")
        self.plot.add_class("vitsift-stages")
        self.summary = W.HTML()
        self.summary.add_class("vitsift-stage-summary")
        self.status = W.HTML()
        self.status.add_class("vitsift-status")
        self.w_gamma.observe(lambda ch: self.update(gamma=float(ch["new"])), names="value")
        self.w_threshold.observe(lambda ch: self.update(threshold=float(ch["new"])), names="value")
        self.w_xself.observe(lambda ch: self.update(exclude_self=bool(ch["new"])), names="value")
        self.widget = W.VBox([W.HBox([self.w_gamma, self.w_threshold, self.w_xself]), self.plot, self.summary,
                              self.status])
        self.widget.add_class("vitsift-stage-explorer")
        self.view: C.StageView | None = None
        self.redraw()

    def update(self, **changes) -> C.StageView:
        for k, v in changes.items():
            setattr(self, k, v)
        return self.redraw(",".join(sorted(changes)))

    def redraw(self, what: str = "all") -> C.StageView:
        t0 = time.perf_counter()
        sv = C.stage_view(self.images, self.gamma, self.threshold, self.exclude_self)
        self.view = sv
        self._plot.update(sv)
        self.plot.value = self._plot.png()
        self.summary.value = self._summary(sv)
        ms = 1000 * (time.perf_counter() - t0)
        self.timings.append((what, ms))
        self.status.value = f"refitted in {ms:.0f} ms from cached attention of {len(self.images)} images"
        return sv

    @staticmethod
    def _summary(sv: C.StageView) -> str:
        out = f"<div><b>{html.escape(sv.summary())}</b></div>"
        if sv.fit is not None:
            cells = "".join(f"<li>{'pass' if ok else '<b>FAIL</b>'}: {html.escape(k)}</li>" for k, ok in sv.fit.tests.items())
            out += f"<ul style='margin:2px 0;font-size:12px'>{cells}</ul>"
        return out

    def static_png(self) -> bytes:
        return self._plot.png()

    def figure(self):
        """A matplotlib Figure of the current state (for saving)."""
        p = R.StagePlot(figsize=(11, 4), dpi=100, blit=False)
        p.update(self.view)
        return p.fig


# ----------------------------------------------------------------------------------- helpers
def library(lm, images: str = "samples", limit: int | None = 8, keep: int = 12) -> C.ImageLibrary:
    """An image library over a data set spec (Imagenette falls back to the bundled photos when
    absent: study.choose_images)."""
    spec, _ = choose_images(images)
    return C.ImageLibrary.from_spec(lm, spec, limit, keep=keep)
