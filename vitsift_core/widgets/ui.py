"""The explorers' ipywidgets (attention, stages, masking) on :mod:`.core` and :mod:`.render`. Each shows
its widget plus a static PNG of its state, so a notebook run headless by papermill still has a figure.
"""
from __future__ import annotations

import base64
import html
import os
import time
from dataclasses import replace
from typing import Callable, Sequence

import ipyevents
import ipywidgets as W
import numpy as np

from vitsift_core.experiments.classify import load_classifier
from vitsift_core.experiments.probe import ProbeSettings, probe_paths
from vitsift_core.method import masking as MK
from vitsift_core.report import figures as plots
from vitsift_core.widgets import core as C
from vitsift_core.widgets import render as R

_CSS = """<style>
.vitsift-overlay img, img.vitsift-overlay { cursor: crosshair; }
.vitsift-readout { font-family: monospace; font-size: 13px; }
.vitsift-status { color: #666; font-size: 12px; }
</style>"""
_STYLE = {"description_width": "90px"}


def _tagged(widget: W.Widget, css_class: str) -> W.Widget:
    widget.add_class(css_class)
    return widget


def _error(text: str) -> str:
    return f"<span style='color:#b00'>{html.escape(text)}</span>"


def _legend() -> str:
    def sw(rgb, text, extra=""):
        return (f'<span style="display:inline-block;width:12px;height:12px;border:2px solid rgb{rgb};'
                f'margin:0 4px 0 10px;vertical-align:middle;{extra}"></span>{text}')
    dot = f"background:rgb{R.KP_RGB};border-radius:50%;width:6px;height:6px"
    return ("<div style='font-size:12px'>" + sw(R.KEY_RGB, "attended, keypoint patch")
            + sw(R.NON_RGB, "attended, no keypoint")
            + sw((255, 255, 255), "query patch (click another)", "outline:1px solid #000")
            + sw(R.KP_RGB, "SIFT keypoint", dot) + "</div>")


class _Explorer:
    """Common logic: the image library, status line, timings, and widget + static PNG in one output."""

    widget: W.Widget
    NEW_IMAGE: dict = {}            # state changes that come with another image

    def __init__(self, library: C.ImageLibrary):
        self.lib = library
        self.timings: list[tuple[str, float]] = []
        self.status = _tagged(W.HTML(), "vitsift-status")

    def _metric_controls(self, gamma: float, threshold: float, layout) -> tuple:
        """The gamma and SIFT threshold sliders and the exclude-self box, wired to ``update``."""
        ws = (W.FloatSlider(value=gamma, min=0.25, max=4.0, step=0.05, description="gamma",
                            continuous_update=False, style=_STYLE, layout=layout),
              W.FloatSlider(value=threshold, min=0.005, max=0.2, step=0.005, readout_format=".3f",
                            description="SIFT contrast", continuous_update=False, style=_STYLE, layout=layout),
              W.Checkbox(value=False, description="exclude the query's own patch (j != i)", indent=False))
        for w, key in zip(ws, ("gamma", "threshold", "exclude_self")):
            w.observe(lambda ch, key=key: self.update(**{key: ch["new"]}), names="value")
        return ws

    def _lap(self, what: str, t0: float) -> float:
        ms = 1000 * (time.perf_counter() - t0)
        self.timings.append((what, ms))
        return ms

    def _image_picker(self, image: str, layout) -> W.Dropdown:
        w = W.Dropdown(options=self.lib.ids(), value=image, description="image", style=_STYLE, layout=layout)
        w.observe(lambda ch: self._on_image(ch["new"]), names="value")
        return w

    def _on_image(self, image_id: str) -> None:
        """Run the model on a newly picked image unless cached (errors shown), then redraw."""
        if image_id == self.state.image:
            return
        if not self.lib.is_cached(image_id):
            self.status.value = f"running the model on {html.escape(image_id)} (once per image) ..."
        try:
            self.lib.get(image_id)
        except Exception as e:
            self.status.value = _error(f"cannot analyse {image_id}: {e}")
            return
        self.update(image=image_id, **self.NEW_IMAGE)

    def static_png(self) -> bytes:
        return R.png(self.figure())

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
    """Image, layer, head (or head mean), gamma, SIFT threshold and a query patch picked by clicking
    the image -> overlay with S_i outlined, theta_i / theta_chance readout and this image's
    theta_KK / theta_NK / focus curves with the current layer marked."""

    NEW_IMAGE = {"query": None}

    def __init__(self, library: C.ImageLibrary, image: str | None = None, layer: int | None = None,
                 head: int | None = None, gamma: float = 1.0, threshold: float = C.SIFT_DEFAULT,
                 query: int | None = None, scale: int = 2, uploads: bool = True):
        super().__init__(library)
        ids = library.ids()
        if not ids:
            raise ValueError("the explorer needs at least one image")
        image = image or ids[0]
        img = library.get(image)
        self.scale = int(scale)
        layer = layer or (img.n_layers + 1) // 2
        self.state = C.AttentionState(image, int(layer), head, float(gamma), float(threshold), query)
        self._plot = R.LayerCurvesPlot()

        lay = W.Layout(width="330px")
        self.w_image = self._image_picker(image, lay)
        self.w_upload = W.FileUpload(accept="image/*", multiple=False, description="upload image")
        self.w_layer = _tagged(W.IntSlider(value=self.state.layer, min=1, max=img.n_layers, description="layer",
                                           style=_STYLE, layout=lay), "vitsift-layer")
        heads = [("mean over heads", 0)] + [(f"head {h}", h) for h in range(1, img.n_heads + 1)]
        self.w_head = W.Dropdown(options=heads, value=head or 0, description="head", style=_STYLE, layout=lay)
        self.w_gamma, self.w_threshold, self.w_xself = self._metric_controls(gamma, threshold, lay)
        self.w_kp = W.Checkbox(value=True, description="show SIFT keypoints", indent=False)
        self.w_reset = W.Button(description="query: densest keypoint patch", layout=W.Layout(width="330px"))
        s = img.crop.shape[0] * self.scale
        self.overlay = _tagged(W.Image(format="png", layout=W.Layout(width=f"{s}px", height=f"{s}px")),
                               "vitsift-overlay")
        self.readout = _tagged(W.HTML(), "vitsift-readout")
        self.curves = _tagged(W.Image(format="png"), "vitsift-curves")
        self.events = ipyevents.Event(source=self.overlay, watched_events=["click"])
        self.events.on_dom_event(self._on_click)

        self.w_layer.observe(lambda ch: self.update(layer=int(ch["new"])), names="value")
        self.w_head.observe(lambda ch: self.update(head=int(ch["new"]) or None), names="value")
        self.w_kp.observe(lambda ch: self.redraw(curves=False, what="keypoints shown"), names="value")
        self.w_reset.on_click(lambda _: self.update(query=None))
        self.w_upload.observe(self._on_upload, names="value")

        controls = [self.w_image] + ([self.w_upload] if uploads else []) + [
            self.w_layer, self.w_head, self.w_gamma, self.w_threshold, self.w_xself, self.w_kp, self.w_reset]
        left = W.VBox([W.HTML(_CSS), self.overlay, W.HTML(_legend()), self.readout])
        self.widget = _tagged(W.HBox([left, W.VBox(controls + [self.curves, self.status])]),
                              "vitsift-attention-explorer")
        self.redraw()

    def _on_click(self, event: dict) -> None:
        """ipyevents click on the overlay: dataX/dataY in the PNG's pixels, else relative to its shown size."""
        img = self.lib.get(self.state.image)
        size = img.crop.shape[0] * self.scale
        if "dataX" in event:
            x, y, w, h = event["dataX"], event["dataY"], size, size
        else:
            x, y = event["relativeX"], event["relativeY"]
            w, h = event.get("boundingRectWidth") or size, event.get("boundingRectHeight") or size
        self.update(query=C.patch_at(x, y, w, h, img.grid))

    def _on_upload(self, change) -> None:
        if not change["new"]:
            return
        f = change["new"][0]
        try:
            image_id = self.lib.add_upload(f["name"], bytes(f["content"]))
        except Exception as e:
            self.status.value = _error(f"upload {f['name']}: {e}")
            return
        self.w_image.options = self.lib.ids()
        self.w_image.value = image_id          # runs the model on it, then redraws

    def update(self, **changes) -> C.AttentionView:
        """Apply state changes (the widgets call this) and redraw what they affect."""
        old = self.state
        self.state = replace(old, **changes)
        curves = any(getattr(old, k) != getattr(self.state, k)
                     for k in ("image", "layer", "head", "gamma", "threshold", "exclude_self"))
        return self.redraw(curves=curves, what=",".join(sorted(changes)))

    def redraw(self, curves: bool = True, what: str = "all") -> C.AttentionView:
        t0 = time.perf_counter()
        img = self.lib.get(self.state.image)
        v = self.view = C.attention_view(img, self.state)
        self.overlay.value = R.png(R.overlay_image(v, img.crop, img.grid, img.patch_size, self.scale,
                                                   show_keypoints=self.w_kp.value))
        self.readout.value = self._readout(v, img)
        if curves:
            self._plot.update(v, img.id)
            self.curves.value = self._plot.png()
        ms = self._lap(what, t0)
        self.status.value = (f"redrawn in {ms:.0f} ms from cached attention ({what}); "
                             f"model runs so far: {self.lib.n_forward}")
        return v

    @staticmethod
    def _readout(v: C.AttentionView, img: C.ImageData) -> str:
        row, col = divmod(v.query, img.grid[1])
        th = "undefined (S_i empty)" if np.isnan(v.theta) else f"{v.theta:.4f}"
        n_key = int((v.attended & (v.counts > 0)).sum())
        kk, nk = (v.curves[k][v.state.layer - 1] for k in ("theta_kk", "theta_nk"))
        return (f"<div><b>query patch {v.query}</b> (row {row}, col {col}; "
                f"{int(v.counts[v.query])} keypoints) | "
                f"layer {v.state.layer}, {v.head_label}, gamma {v.state.gamma:g}</div>"
                f"<div><b>theta_i = <span class='vitsift-theta'>{th}</span></b> vs "
                f"theta_chance = <span class='vitsift-chance'>{v.chance:.4f}</span> | "
                f"|S_i| = {int(v.attended.sum())} patches, {n_key} with keypoints</div>"
                f"<div>this layer, all queries: theta_KK = {kk:.4f}, theta_NK = {nk:.4f}</div>")

    def figure(self):
        """A matplotlib Figure of the current state (for notebooks run headless / saving)."""
        img = self.lib.get(self.state.image)
        return R.attention_figure(self.view, img.crop, img.grid, img.patch_size, img.id)


# ----------------------------------------------------------------------------------- stages
class StageExplorer(_Explorer):
    """gamma and SIFT threshold sliders refit the Retrieval / Capture / Coach stages over a small
    image set and redraw the curves with the stages shaded."""

    def __init__(self, library: C.ImageLibrary, image_ids: Sequence[str] | None = None, n_images: int = 6,
                 gamma: float = 1.0, threshold: float = C.SIFT_DEFAULT):
        super().__init__(library)
        ids = list(image_ids) if image_ids is not None else library.ids()[:n_images]
        if not ids:
            raise ValueError("the stage explorer needs at least one image")
        library.keep = max(library.keep, len(ids) + 2)
        self.images = library.get_many(ids)        # one batched forward for the images not seen yet
        self.gamma, self.threshold, self.exclude_self = float(gamma), float(threshold), False
        self._plot = R.StagePlot()
        lay = W.Layout(width="360px")
        self.w_gamma, self.w_threshold, self.w_xself = self._metric_controls(gamma, threshold, lay)
        self.plot = _tagged(W.Image(format="png"), "vitsift-stages")
        self.summary = _tagged(W.HTML(), "vitsift-stage-summary")
        self.widget = _tagged(W.VBox([W.HBox([self.w_gamma, self.w_threshold, self.w_xself]), self.plot,
                                      self.summary, self.status]), "vitsift-stage-explorer")
        self.redraw()

    def update(self, **changes) -> C.StageView:
        for k, v in changes.items():
            setattr(self, k, v)
        return self.redraw(",".join(sorted(changes)))

    def redraw(self, what: str = "all") -> C.StageView:
        t0 = time.perf_counter()
        sv = self.view = C.stage_view(self.images, self.gamma, self.threshold, self.exclude_self)
        self._plot.update(sv)
        self.plot.value = self._plot.png()
        self.summary.value = f"<div><b>{html.escape(sv.summary())}</b></div>"
        if sv.fit is not None:
            cells = "".join(f"<li>{'pass' if ok else '<b>FAIL</b>'}: {html.escape(k)}</li>"
                            for k, ok in sv.fit.tests.items())
            self.summary.value += f"<ul style='margin:2px 0;font-size:12px'>{cells}</ul>"
        ms = self._lap(what, t0)
        self.status.value = f"refitted in {ms:.0f} ms from cached attention of {len(self.images)} images"
        return sv

    def static_png(self) -> bytes:
        return self._plot.png()

    def figure(self):
        """A matplotlib Figure of the current state (for saving)."""
        p = R.StagePlot(figsize=(11, 4), dpi=100, blit=False)
        p.update(self.view)
        return p.fig


# ----------------------------------------------------------------------------------- masking
def probe_classifier(lm, per_class: int | None = 100, train: bool = False, progress: bool = False):
    """The ``embedded-probe`` classifier on backbone ``lm`` when its probe is cached (or when
    ``train``: then it is trained on Imagenette train, minutes on a CPU); else None."""
    settings = ProbeSettings(per_class=per_class)
    if not train and not all(p.exists() for p in probe_paths(lm, settings)):
        return None
    return load_classifier("embedded-probe", backbone=lm, probe=settings, progress=progress)


class MaskingExplorer(_Explorer):
    """Order, ratio and mode -> the masked image and how the classifier's top-5 changes (Sec 5.1).
    ``classifier``: a classify.Classifier on a ViT with the explorer model's input, or None;
    ``load_classifier``: called by the "load classifier" button when ``classifier`` is None."""

    HOW = {"top": "highest score s_i first", "bottom": "lowest s_i first", "random": "seeded random order",
           "keypoints": "most SIFT keypoints first"}

    def __init__(self, library: C.ImageLibrary, image: str | None = None, classifier=None,
                 load_classifier: Callable[[], object] | None = None, order: str = "top", ratio: float = 10,
                 mode: str = "fill", layer: int | None = None, gamma: float = 1.0,
                 threshold: float = C.SIFT_DEFAULT, scale: int = 2, load_hint: str = ""):
        super().__init__(library)
        image = image or library.ids()[0]
        img = library.get(image)
        self.scale = int(scale)
        self.state = C.MaskingState(image, order, float(ratio), mode, int(layer or (img.n_layers + 1) // 2),
                                    float(gamma), float(threshold))
        self.fill_rgb = tuple(255 * np.asarray(library.lm.data_config["mean"], dtype=np.float64))
        self.predictor = self._names = None
        if classifier is not None:
            self._use(classifier)
        self._loader, self._hint = load_classifier, load_hint

        lay = W.Layout(width="360px")
        self.w_image = self._image_picker(image, lay)
        self.w_order = W.ToggleButtons(options=list(MK.SINGLE_IMAGE_ORDERS), value=order, description="order",
                                       style=_STYLE)
        self.w_ratio = W.IntSlider(value=int(ratio), min=0, max=90, step=5, description="ratio (%)",
                                   continuous_update=False, style=_STYLE, layout=lay)
        self.w_mode = W.ToggleButtons(options=list(MK.MODES), value=mode, description="mode", style=_STYLE)
        self.w_layer = W.IntSlider(value=self.state.layer, min=1, max=img.n_layers, description="score layer",
                                   continuous_update=False, style=_STYLE, layout=lay)
        width = f"{img.crop.shape[0] * self.scale}px"
        self.picture = _tagged(W.Image(format="png", layout=W.Layout(width=width)), "vitsift-masked")
        self.caption = W.HTML()
        self.table = _tagged(W.HTML(), "vitsift-top5")
        self.w_load = W.Button(description="load / train classifier", layout=W.Layout(width="360px"))
        self.w_load.on_click(lambda _: self._load())
        self.w_load.layout.display = "none" if (self.predictor is not None or load_classifier is None) else None

        self.w_order.observe(lambda ch: self.update(order=ch["new"]), names="value")
        self.w_ratio.observe(lambda ch: self.update(ratio=float(ch["new"])), names="value")
        self.w_mode.observe(lambda ch: self.update(mode=ch["new"]), names="value")
        self.w_layer.observe(lambda ch: self.update(layer=int(ch["new"])), names="value")
        controls = W.VBox([self.w_image, self.w_order, self.w_ratio, self.w_mode, self.w_layer, self.w_load,
                           self.table, self.status])
        self.widget = _tagged(W.HBox([W.VBox([W.HTML(_CSS), self.picture, self.caption]), controls]),
                              "vitsift-masking-explorer")
        self.redraw()

    def _use(self, classifier) -> None:
        self.predictor = C.Predictor(classifier)
        self._names = C.class_names(classifier.classes)

    def _load(self) -> None:
        if self._loader is None:
            return
        self.status.value = "loading the classifier (training it the first time: minutes) ..."
        t0 = time.perf_counter()
        try:
            self._use(self._loader())
        except Exception as e:
            self.status.value = _error(f"classifier unavailable: {e}")
            return
        self.w_load.layout.display = "none"
        self.redraw(what="classifier loaded")
        self.status.value += f" (classifier ready after {time.perf_counter() - t0:.0f} s)"

    def update(self, **changes) -> C.MaskingView:
        self.state = replace(self.state, **changes)
        return self.redraw(",".join(sorted(changes)))

    def _probs(self, img: C.ImageData, v: C.MaskingView) -> tuple[np.ndarray, np.ndarray]:
        return self.predictor.probs(img), self.predictor.probs(img, v.state.mode, v.masked)

    def redraw(self, what: str = "all") -> C.MaskingView:
        t0 = time.perf_counter()
        img = self.lib.get(self.state.image)
        st = self.state
        v = self.view = C.masking_view(img, st, self.fill_rgb if st.mode == "fill" else (0, 0, 0))
        self.picture.value = R.png(R.upscale(v.image, self.scale))
        fill = ("filled with the normalisation mean" if st.mode == "fill"
                else "dropped from the token sequence (shown black)")
        self.caption.value = (f"<div style='font-size:12px'>{len(v.masked)} of {img.n} patches masked "
                              f"({st.ratio:g}%, {self.HOW[st.order]}; s_i from layer {st.layer}), {fill}</div>")
        fwd = "no classifier"
        if self.predictor is None:
            self.table.value = "<div><i>No classifier loaded.</i> " + html.escape(self._hint) + "</div>"
        else:
            if not (self.predictor.is_cached(img) and self.predictor.is_cached(img, st.mode, v.masked)):
                # the masked image is already on screen; say that the classifier is on its way
                self.status.value = "classifying the masked image (one forward pass of the classifier) ..."
            before = self.predictor.n_forward
            self.table.value = self._table(*self._probs(img, v), img.label)
            n_fwd = self.predictor.n_forward - before
            fwd = f"{n_fwd} classifier forward(s)" if n_fwd else "cached prediction"
        ms = self._lap(what, t0)
        self.status.value = f"redrawn in {ms:.0f} ms ({what}; {fwd})"
        return v

    def _name(self, i: int) -> str:
        return self._names[i] if i < len(self._names) else str(i)

    def _table(self, clean: np.ndarray, masked: np.ndarray, label: str | None) -> str:
        rows = C.top5_change(clean, masked)
        target = None
        if label is not None and hasattr(self.predictor.clf, "target"):
            target = self.predictor.clf.target(label)

        def name(i):
            n = html.escape(self._name(i))
            return f"<b>{n}</b>" if target is not None and i == target else n
        body = "".join(
            f"<tr><td>{r['rank']}</td><td>{name(r['clean'])}</td><td>{r['p_clean']:.3f}</td>"
            f"<td>{name(r['masked'])}</td><td>{r['p_masked']:.3f}</td>"
            f"<td>{'=' if r['masked_rank_before'] == r['rank'] else r['masked_rank_before']}</td></tr>"
            for r in rows)
        verdict = "top-1 unchanged" if rows[0]["clean"] == rows[0]["masked"] else "<b>top-1 changed</b>"
        bold = " (bold: the image's label)" if target is not None else ""
        note = (f"<div style='font-size:12px'>{verdict}; clean top-1 probability {rows[0]['p_clean']:.3f} -> "
                f"{rows[0]['p_clean_after']:.3f}{bold}</div>")
        return ("<table style='font-size:12px;border-collapse:collapse' cellpadding='3'>"
                "<tr><th>#</th><th>clean</th><th>p</th><th>masked</th><th>p</th><th>clean rank</th></tr>"
                + body + "</table>" + note)

    def figure(self):
        """Static figure: the masked image and the clean vs masked top-5 probabilities."""
        img = self.lib.get(self.state.image)
        st = self.state
        v = self.view
        fig = R._canvas((10, 3.8), 100)
        a0, a1 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.6]})
        a0.imshow(v.image)
        a0.set_xticks([]), a0.set_yticks([])
        a0.set_title(f"{len(v.masked)} patches masked: {st.order}, {st.ratio:g}%, {st.mode}", fontsize=9)
        if self.predictor is None:
            a1.axis("off")
            a1.text(0.5, 0.5, "no classifier loaded:\nthe linear probe is not cached yet\n"
                    "(the explorer's button, or `vitsift mask-eval`,\ntrains it)", ha="center", va="center",
                    fontsize=10)
        else:
            clean, masked = self._probs(img, v)
            idx = [i for i, _ in C.top_k(clean)]
            y = np.arange(len(idx))
            a1.barh(y - 0.2, clean[idx], height=0.4, color=plots.COLORS["KK"], label="clean")
            a1.barh(y + 0.2, masked[idx], height=0.4, color=plots.COLORS["NK"], label="masked")
            a1.set_yticks(y, [self._name(i) for i in idx], fontsize=8)
            a1.invert_yaxis()
            a1.set_xlabel("probability")
            a1.legend(fontsize=8)
            a1.set_title("clean top-5 classes before and after masking", fontsize=9)
        fig.suptitle(f"Masking explorer (static) | {img.id} | s_i from layer {st.layer}", fontsize=10)
        fig.subplots_adjust(left=0.02, right=0.98, wspace=0.45, top=0.85, bottom=0.12)
        return fig
