"""Masking explorer: order (top / bottom / random / keypoints), ratio and mode (fill / drop) ->
the masked image and how the classifier's top-5 changes (Sec 5.1, :mod:`vitsift_core.method.masking`).

Scores and masks come from the cached attention (:func:`core.masking_view`); the classifier runs
once per distinct masked input (:class:`core.Predictor` caches it). The embedded tier's classifier
is the linear probe of :mod:`vitsift_core.experiments.probe`: it is used when already cached (e.g. by
``vitsift mask-eval``), and trained only when asked (the button, or ``train=True``).
"""
from __future__ import annotations

import html
import time
from typing import Callable

import ipywidgets as W
import numpy as np

from vitsift_core.widgets import core as C
from vitsift_core.widgets import render as R
from vitsift_core.widgets.ui import _CSS, _Explorer


# ----------------------------------------------------------------------------------- the classifier
def probe_files(lm, settings=None):
    """(weights, json) paths where :func:`probe.train_or_load_probe` keeps the probe for backbone
    ``lm`` and ``settings`` (the same keys; tests/test_widgets.py checks they agree)."""
    from vitsift_core.experiments.probe import ProbeSettings, probe_paths

    return probe_paths(lm, settings or ProbeSettings())


def probe_classifier(lm, per_class: int | None = 100, train: bool = False, progress: bool = False):
    """The ``embedded-probe`` classifier on backbone ``lm`` when its probe is cached (or when
    ``train``: then it is trained on Imagenette train, minutes on a CPU); else None."""
    from vitsift_core.model.classify import load_classifier
    from vitsift_core.experiments.probe import ProbeSettings

    settings = ProbeSettings(per_class=per_class)
    w, j = probe_files(lm, settings)
    if not train and not (w.exists() and j.exists()):
        return None
    return load_classifier("embedded-probe", backbone=lm, probe=settings, progress=progress)


# ----------------------------------------------------------------------------------- the explorer
class MaskingExplorer(_Explorer):
    """``classifier``: a classify.Classifier on a ViT with the explorer model's input, or None;
    ``load_classifier``: called by the "load classifier" button when ``classifier`` is None."""

    def __init__(self, library: C.ImageLibrary, image: str | None = None, classifier=None,
                 load_classifier: Callable[[], object] | None = None, order: str = "top", ratio: float = 10,
                 mode: str = "fill", layer: int | None = None, gamma: float = 1.0,
                 threshold: float = C.SIFT_DEFAULT, scale: int = 2, load_hint: str = ""):
        from vitsift_core.method import masking as MK

        self.lib = library
        ids = library.ids()
        image = image or ids[0]
        img = library.get(image)
        self.scale = int(scale)
        self.state = C.MaskingState(image, order, float(ratio), mode, int(layer or (img.n_layers + 1) // 2),
                                    float(gamma), float(threshold))
        self.fill_rgb = tuple(255 * np.asarray(library.lm.data_config["mean"], dtype=np.float64))
        self.predictor = C.Predictor(classifier) if classifier is not None else None
        self._names = C.class_names(classifier.classes) if classifier is not None else []
        self._loader = load_classifier
        self.timings: list[tuple[str, float]] = []
        self.view: C.MaskingView | None = None

        st = {"description_width": "90px"}
        lay = W.Layout(width="360px")
        self.w_image = W.Dropdown(options=ids, value=image, description="image", style=st, layout=lay)
        self.w_order = W.ToggleButtons(options=list(MK.SINGLE_IMAGE_ORDERS), value=order, description="order", style=st)
        self.w_ratio = W.IntSlider(value=int(ratio), min=0, max=90, step=5, description="ratio (%)",
                                   continuous_update=False, style=st, layout=lay)
        self.w_mode = W.ToggleButtons(options=list(MK.MODES), value=mode, description="mode", style=st)
        self.w_layer = W.IntSlider(value=self.state.layer, min=1, max=img.n_layers, description="score layer",
                                   continuous_update=False, style=st, layout=lay)
        self.picture = W.Image(format="png", layout=W.Layout(width=f"{img.crop.shape[0] * self.scale}px"))
        self.picture.add_class("vitsift-masked")
        self.caption = W.HTML()
        self.table = W.HTML()
        self.table.add_class("vitsift-top5")
        self.status = W.HTML()
        self.status.add_class("vitsift-status")
        self.w_load = W.Button(description="load / train classifier", layout=W.Layout(width="360px"))
        self.w_load.on_click(lambda _: self._load())
        self.w_load.layout.display = "none" if (self.predictor is not None or load_classifier is None) else None
        self._hint = load_hint

        self.w_image.observe(lambda ch: self._on_image(ch["new"]), names="value")
        self.w_order.observe(lambda ch: self.update(order=ch["new"]), names="value")
        self.w_ratio.observe(lambda ch: self.update(ratio=float(ch["new"])), names="value")
        self.w_mode.observe(lambda ch: self.update(mode=ch["new"]), names="value")
        self.w_layer.observe(lambda ch: self.update(layer=int(ch["new"])), names="value")
        controls = W.VBox([self.w_image, self.w_order, self.w_ratio, self.w_mode, self.w_layer, self.w_load,
                           self.table, self.status])
        self.widget = W.HBox([W.VBox([W.HTML(_CSS), self.picture, self.caption]), controls])
        self.widget.add_class("vitsift-masking-explorer")
        self.redraw()

    def _on_image(self, image_id: str) -> None:
        if image_id != self.state.image:
            self.status.value = f"running the model on {html.escape(image_id)} (once per image) ..."
            self.lib.get(image_id)
            self.update(image=image_id)

    def _load(self) -> None:
        if self._loader is None:
            return
        self.status.value = "loading the classifier (training it the first time: minutes) ..."
        t0 = time.perf_counter()
        try:
            clf = self._loader()
        except Exception as e:
            self.status.value = f"<span style='color:#b00'>classifier unavailable: {html.escape(str(e))}</span>"
            return
        self.predictor = C.Predictor(clf)
        self._names = C.class_names(clf.classes)
        self.w_load.layout.display = "none"
        self.redraw(what="classifier loaded")
        self.status.value += f" (classifier ready after {time.perf_counter() - t0:.0f} s)"

    def update(self, **changes) -> C.MaskingView:
        self.state = self.state.with_(**changes)
        return self.redraw(",".join(sorted(changes)))

    def redraw(self, what: str = "all") -> C.MaskingView:
        t0 = time.perf_counter()
        img = self.lib.get(self.state.image)
        st = self.state
        color = self.fill_rgb if st.mode == "fill" else (0, 0, 0)
        v = C.masking_view(img, st, color)
        self.view = v
        self.picture.value = R.png(R.masked_image(v.image, self.scale))
        how = {"top": "highest score s_i first", "bottom": "lowest s_i first", "random": "seeded random order",
               "keypoints": "most SIFT keypoints first"}[st.order]
        fill = "filled with the normalisation mean" if st.mode == "fill" else "dropped from the token sequence (shown black)"
        self.caption.value = (f"<div style='font-size:12px'>{len(v.masked)} of {img.n} patches masked "
                              f"({st.ratio:g}%, {how}; s_i from layer {st.layer}), {fill}</div>")
        n_fwd = 0
        if self.predictor is None:
            self.table.value = ("<div><i>No classifier loaded.</i> " + html.escape(self._hint) + "</div>")
        else:
            if not (self.predictor.is_cached(img) and self.predictor.is_cached(img, st.mode, v.masked)):
                # the masked image is already on screen; say that the classifier is on its way
                self.status.value = "classifying the masked image (one forward pass of the classifier) ..."
            before = self.predictor.n_forward
            clean = self.predictor.probs(img)
            masked = self.predictor.probs(img, st.mode, v.masked)
            n_fwd = self.predictor.n_forward - before
            self.table.value = self._table(clean, masked, img.label)
        ms = 1000 * (time.perf_counter() - t0)
        self.timings.append((what, ms))
        fwd = ("no classifier" if self.predictor is None else
               f"{n_fwd} classifier forward(s)" if n_fwd else "cached prediction")
        self.status.value = f"redrawn in {ms:.0f} ms ({what}; {fwd})"
        return v

    def _table(self, clean: np.ndarray, masked: np.ndarray, label: str | None) -> str:
        rows = C.top5_change(clean, masked)
        names = self._names
        target = None
        if label is not None and self.predictor is not None:
            target = self.predictor.clf.target(label) if hasattr(self.predictor.clf, "target") else None

        def name(i):
            n = html.escape(names[i] if i < len(names) else str(i))
            return f"<b>{n}</b>" if target is not None and i == target else n
        body = "".join(
            f"<tr><td>{r['rank']}</td><td>{name(r['clean'])}</td><td>{r['p_clean']:.3f}</td>"
            f"<td>{name(r['masked'])}</td><td>{r['p_masked']:.3f}</td>"
            f"<td>{'=' if r['masked_rank_before'] == r['rank'] else r['masked_rank_before']}</td></tr>" for r in rows)
        top_same = rows[0]["clean"] == rows[0]["masked"]
        verdict = "top-1 unchanged" if top_same else "<b>top-1 changed</b>"
        note = (f"<div style='font-size:12px'>{verdict}; clean top-1 probability {rows[0]['p_clean']:.3f} -> "
                f"{rows[0]['p_clean_after']:.3f}" + (" (bold: the image's label)" if target is not None else "") + "</div>")
        return ("<table style='font-size:12px;border-collapse:collapse' cellpadding='3'>"
                "<tr><th>#</th><th>clean</th><th>p</th><th>masked</th><th>p</th><th>clean rank</th></tr>"
                + body + "</table>" + note)

    def static_png(self) -> bytes:
        return R.fig_png(self.figure())

    def figure(self):
        """Static figure: the masked image and the clean vs masked top-5 probabilities."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        from vitsift_core.report import figures as plots

        img = self.lib.get(self.state.image)
        v = self.view or C.masking_view(img, self.state, self.fill_rgb)
        fig = Figure(figsize=(10, 3.8), dpi=100, layout="none")
        FigureCanvasAgg(fig)
        a0, a1 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.6]})
        a0.imshow(v.image)
        a0.set_xticks([]), a0.set_yticks([])
        st = self.state
        a0.set_title(f"{len(v.masked)} patches masked: {st.order}, {st.ratio:g}%, {st.mode}", fontsize=9)
        if self.predictor is None:
            a1.axis("off")
            a1.text(0.5, 0.5, "no classifier loaded:\nthe linear probe is not cached yet\n(the explorer's button, or `vitsift mask-eval`,\ntrains it)",
                    ha="center", va="center", fontsize=10)
        else:
            clean, masked = self.predictor.probs(img), self.predictor.probs(img, st.mode, v.masked)
            idx = [i for i, _ in C.top_k(clean)]
            y = np.arange(len(idx))
            a1.barh(y - 0.2, clean[idx], height=0.4, color=plots.COLORS["KK"], label="clean")
            a1.barh(y + 0.2, masked[idx], height=0.4, color=plots.COLORS["NK"], label="masked")
            a1.set_yticks(y, [self._names[i] if i < len(self._names) else str(i) for i in idx], fontsize=8)
            a1.invert_yaxis()
            a1.set_xlabel("probability")
            a1.legend(fontsize=8)
            a1.set_title("clean top-5 classes before and after masking", fontsize=9)
        fig.suptitle(f"Masking explorer (static) | {img.id} | s_i from layer {st.layer}", fontsize=10)
        fig.subplots_adjust(left=0.02, right=0.98, wspace=0.45, top=0.85, bottom=0.12)
        return fig
