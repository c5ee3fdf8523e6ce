"""Explorers without a browser: state -> figure data equals the study/metrics code, interactions
never run the model again, and the widgets wire the right state changes.

A small random-init ViT-Tiny at 112 px (7x7 patches, 12 layers, 3 heads) keeps these fast; the
numbers are compared against the reference implementations on the same maps, so any ViT will do.
"""
from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch

from vitsift_core.method import metrics as M
from vitsift_core.experiments import study as study
from vitsift_core.data.sources import resolve_images
from vitsift_core.model.registry import load_model
from vitsift_core.widgets import core as C


@pytest.fixture(scope="module")
def lm():
    return load_model("vit_tiny_patch16_224", control="random-init", img_size=112)


@pytest.fixture(scope="module")
def records():
    return resolve_images("samples", 3)


def _rgb(rec):
    from vitsift_core.data.sources import read_record
    return read_record(rec)


@pytest.fixture(scope="module")
def img(lm, records):
    return C.analyse(lm, _rgb(records[0]), records[0].id)


@pytest.fixture(scope="module")
def ex(lm, records):
    return study.example(lm, records[0])


# ----------------------------------------------------------------------------------- core
def test_patch_at_maps_display_pixels_to_patches():
    g = (7, 7)
    assert C.patch_at(0, 0, 224, 224, g) == 0
    assert C.patch_at(223.9, 223.9, 224, 224, g) == 48
    assert C.patch_at(33, 0, 224, 224, g) == 1            # 224 / 7 = 32 px per patch
    assert C.patch_at(0, 32, 224, 224, g) == 7
    assert C.patch_at(-5, 500, 224, 224, g) == 42         # clamped: bottom-left patch
    assert C.patch_at(50, 50, 112, 112, g) == C.patch_at(100, 100, 224, 224, g)  # any display size
    assert C.patch_at(10, 10, 100, 50, (2, 4)) == 0 and C.patch_at(99, 49, 100, 50, (2, 4)) == 7


def test_analyse_keeps_every_layer(img, lm):
    assert img.maps.shape == (12, 3, 49, 49)
    assert img.grid == tuple(lm.grid) and img.crop.shape == (112, 112, 3)
    np.testing.assert_allclose(img.maps.sum(-1), 1.0, atol=0.05)   # rows minus the CLS column


@pytest.mark.parametrize("gamma,xself", [(1.0, False), (0.5, False), (2.0, True)])
def test_attention_view_equals_study_query_view(img, ex, gamma, xself):
    np.testing.assert_array_equal(np.stack([ex.maps[l].numpy() for l in range(12)]), img.maps)
    for layer in (1, 6, 12):
        for head in (None, 1, 3):
            for q in (0, 24, 48):
                ref = study.query_view(ex, layer, head, q, gamma=gamma, exclude_self=xself)
                v = C.attention_view(img, C.AttentionState(img.id, layer, head, gamma, C.SIFT_DEFAULT, q, xself))
                np.testing.assert_array_equal(v.row, ref["row"])
                np.testing.assert_array_equal(v.attended, ref["attended"])
                np.testing.assert_allclose(v.theta, ref["theta"], rtol=1e-6, equal_nan=True)
                assert v.chance == pytest.approx(ref["chance"], rel=1e-6)
                assert v.line == pytest.approx(ref["line"], rel=1e-6)


def test_from_example_and_batched_analysis_give_the_same_maps(lm, records, img, ex):
    np.testing.assert_array_equal(C.from_example(ex).maps, img.maps)
    many = C.analyse_many(lm, [_rgb(r) for r in records[:2]], [r.id for r in records[:2]])
    np.testing.assert_allclose(many[0].maps, img.maps, atol=1e-5)   # batch of 2 vs 1: same up to float
    lib = C.ImageLibrary(lm, [])
    lib.put(C.from_example(ex))
    assert lib.ids() == [ex.id] and lib.get(ex.id).id == ex.id and lib.n_forward == 0


def test_default_query_is_densest_keypoint_patch(img, ex):
    v = C.attention_view(img, C.AttentionState(img.id))
    assert v.query == study.densest_keypoint_patch(ex.counts)
    np.testing.assert_array_equal(v.counts, ex.counts)


@pytest.mark.parametrize("gamma,threshold,xself", [(1.0, 0.04, False), (1.5, 0.02, True)])
def test_layer_curves_equal_head_metrics(img, gamma, threshold, xself):
    counts, _ = img.keypoints(threshold)
    hc = img.head_curves(gamma, threshold, xself)
    c = torch.from_numpy(counts)
    for l in range(img.n_layers):
        ref = M.head_metrics(torch.from_numpy(img.maps[l])[None], c[None], gamma=gamma, exclude_self=xself)
        np.testing.assert_allclose(hc["theta_kk"][l], ref["theta_kk"][0].numpy(), rtol=1e-5, equal_nan=True)
        np.testing.assert_allclose(hc["theta_nk"][l], ref["theta_nk"][0].numpy(), rtol=1e-5, equal_nan=True)
        np.testing.assert_allclose(hc["focus"][l], ref["focus"][0].numpy(), rtol=1e-5)
        assert hc["theta_chance"] == pytest.approx(float(ref["theta_chance"][0, 0]), rel=1e-6)
    # the view's curves: head mean of the per-head values, or one head's
    v = C.attention_view(img, C.AttentionState(img.id, 3, None, gamma, threshold, None, xself))
    np.testing.assert_allclose(v.curves["theta_kk"], C.nanmean(hc["theta_kk"], axis=1))
    v2 = C.attention_view(img, C.AttentionState(img.id, 3, 2, gamma, threshold, None, xself))
    np.testing.assert_allclose(v2.curves["focus"], hc["focus"][:, 1])


@pytest.mark.parametrize("gamma,xself", [(1.0, False), (1.5, True)])
def test_explorer_numbers_are_the_core_metrics(lm, img, gamma, xself):
    """The explorer's mask, head curves and patch scores are metrics' own, bit for bit, and equal
    what the study's MetricCollector records on the same model and image."""
    from vitsift_core.model.capture import capture_attention
    from vitsift_core.model.collectors import MetricCollector

    counts, _ = img.keypoints()
    c, maps = torch.from_numpy(counts), torch.from_numpy(img.maps)
    ref_mask = M.attended_mask(maps, gamma, xself)
    np.testing.assert_array_equal(img.mask(gamma, xself).numpy(), ref_mask.numpy())
    theta = M.theta_from_mask(ref_mask, c)
    agg = M.aggregate_theta(theta, c)
    hc = img.head_curves(gamma, C.SIFT_DEFAULT, xself)
    np.testing.assert_array_equal(hc["theta_kk"], agg["theta_kk"].numpy())
    np.testing.assert_array_equal(hc["theta_nk"], agg["theta_nk"].numpy())
    assert hc["theta_chance"] == float(M.theta_chance(c))
    for layer in (1, 6, 12):
        ref = M.patch_scores(maps[layer - 1][None], c[None], gamma)[0]
        np.testing.assert_array_equal(C.patch_scores(img, layer, gamma), ref.numpy())
    col = MetricCollector(img.n_layers, gamma=gamma)
    col.start_batch({"real": (c[None], xself)})
    with torch.inference_mode(), capture_attention(lm.model, lm.num_prefix_tokens, col):
        lm.model.forward_features(img.x[None])
    out = col.finish_batch()["real"]
    for k in ("theta_kk", "theta_nk"):
        np.testing.assert_allclose(hc[k], out[k][0].numpy(), rtol=1e-6, atol=1e-7, equal_nan=True)
    np.testing.assert_allclose(hc["focus"], out["focus"][0].numpy(), rtol=1e-5)
    assert hc["theta_chance"] == pytest.approx(float(out["theta_chance"][0, 0, 0]), rel=1e-7)


def test_threshold_changes_keypoints(img):
    lo, _ = img.keypoints(0.01)
    hi, _ = img.keypoints(0.15)
    assert lo.sum() >= hi.sum()
    assert img.keypoints(0.01)[0] is lo            # cached


def test_stage_view_follows_the_claims_recipe(lm, records):
    from vitsift_core.method.stages import fit_stages

    imgs = [C.analyse(lm, _rgb(r), r.id) for r in records]
    sv = C.stage_view(imgs, 1.0, 0.04)
    th, fo = [], []
    for im in imgs:
        counts, _ = im.keypoints(0.04)
        c = torch.from_numpy(counts)
        per = [M.head_metrics(torch.from_numpy(im.maps[l])[None], c[None]) for l in range(im.n_layers)]
        kk = np.array([np.nanmean(p["theta_kk"][0].numpy()) for p in per])
        ch = np.array([float(p["theta_chance"][0, 0]) for p in per])
        nk = np.array([np.nanmean(p["theta_nk"][0].numpy()) for p in per])
        if np.isfinite(kk).all() and np.isfinite(nk).all():
            th.append(kk - ch)
            fo.append([np.mean(p["focus"][0].numpy()) for p in per])
    assert sv.n_images == len(th) > 0
    np.testing.assert_allclose(sv.theta_curve, np.mean(th, axis=0), atol=1e-6)
    np.testing.assert_allclose(sv.focus, np.mean(fo, axis=0), rtol=1e-5)
    ref = fit_stages(np.mean(th, axis=0), np.mean(fo, axis=0))
    assert sv.fit.segments == ref.segments and sv.fit.tests == ref.tests
    assert "layers" in sv.summary()


def test_stage_view_without_usable_images(img):
    sv = C.stage_view([img], 1.0, threshold=10.0)   # no keypoint survives: KK undefined
    assert sv.n_images == 0 and sv.fit is None and "no image" in sv.summary()


def test_patch_scores_equal_metrics(img):
    counts, _ = img.keypoints()
    for layer in (1, 7):
        ref = M.patch_scores(torch.from_numpy(img.maps[layer - 1])[None], torch.from_numpy(counts)[None])[0]
        np.testing.assert_allclose(C.patch_scores(img, layer), ref.numpy(), rtol=1e-5, equal_nan=True)


def test_masking_view_orders_and_ratios(img):
    from vitsift_core.method import masking as MK

    counts, _ = img.keypoints()
    prev = set()
    for ratio in (0, 10, 30, 60):
        v = C.masking_view(img, C.MaskingState(img.id, "keypoints", ratio), fill_rgb=(1, 2, 3))
        assert len(v.masked) == MK.n_masked_pct(ratio, img.n)
        assert prev <= set(v.masked.tolist())                      # nested across ratios
        prev = set(v.masked.tolist())
        for j in v.masked:
            r, c = divmod(int(j), img.grid[1])
            assert (v.image[r * 16:(r + 1) * 16, c * 16:(c + 1) * 16] == (1, 2, 3)).all()
    v = C.masking_view(img, C.MaskingState(img.id, "keypoints", 10))
    assert counts[v.ranking[0]] == counts.max()
    top = C.masking_view(img, C.MaskingState(img.id, "top", 20))
    s = top.scores
    assert np.nanmin(s[top.masked]) >= np.nanmax(np.delete(s, top.masked)) - 1e-7
    with pytest.raises(ValueError):
        C.masking_view(img, C.MaskingState(img.id, "sideways", 20))


def test_top5_change():
    clean = np.array([0.1, 0.5, 0.2, 0.05, 0.15])
    masked = np.array([0.6, 0.1, 0.1, 0.1, 0.1])
    rows = C.top5_change(clean, masked, k=3)
    assert [r["clean"] for r in rows] == [1, 2, 4] and rows[0]["masked"] == 0
    assert rows[0]["clean_rank_after"] == 2 and rows[0]["masked_rank_before"] == 4
    assert rows[0]["p_clean_after"] == pytest.approx(0.1)


# ----------------------------------------------------------------------------------- widgets
@pytest.fixture(scope="module")
def analysed(lm, records):
    return C.analyse_many(lm, [_rgb(r) for r in records[:2]], [r.id for r in records[:2]])


@pytest.fixture
def library(lm, records, analysed):
    """A fresh library whose two images are already analysed (n_forward starts at 0)."""
    lib = C.ImageLibrary(lm, records[:2])
    for im in analysed:
        lib.put(copy.copy(im))
    return lib


def test_attention_explorer_interactions_use_the_cache(lm, records):
    from vitsift_core.widgets.ui import AttentionExplorer

    library = C.ImageLibrary(lm, records[:2])              # nothing analysed yet
    e = AttentionExplorer(library)
    assert library.n_forward == 1
    seen = {"overlay": {e.overlay.value}, "readout": {e.readout.value}, "curves": {e.curves.value}}

    def step():
        for k, w in (("overlay", e.overlay), ("readout", e.readout), ("curves", e.curves)):
            seen[k].add(w.value)

    e.w_layer.value = 3
    assert e.state.layer == 3
    step()
    e._on_click({"dataX": 5, "dataY": 5})                           # top-left patch of the PNG
    assert e.state.query == 0 and e.view.query == 0
    step()
    e._on_click({"relativeX": 223, "relativeY": 223, "boundingRectWidth": 224, "boundingRectHeight": 224})
    assert e.state.query == 48
    e.w_head.value = 2
    assert e.state.head == 2
    e.w_head.value = 0
    assert e.state.head is None
    e.w_gamma.value = 1.5
    e.w_threshold.value = 0.02
    e.w_xself.value = True
    step()
    e.w_reset.click()
    assert e.state.query is None
    assert library.n_forward == 1                                   # the model never ran again
    assert len(seen["overlay"]) >= 3 and len(seen["readout"]) >= 3 and len(seen["curves"]) >= 2
    assert "theta_i" in e.readout.value and "vitsift-theta" in e.readout.value
    e.w_image.value = library.ids()[1]
    assert library.n_forward == 2 and e.state.image == library.ids()[1] and e.state.query is None
    e.w_image.value = library.ids()[0]
    assert library.n_forward == 2                                   # back to a cached image
    assert all(ms >= 0 for _, ms in e.timings)


def test_upload_adds_an_image(library):
    from PIL import Image

    from vitsift_core.widgets.ui import AttentionExplorer

    e = AttentionExplorer(library)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(buf, "PNG")
    e._on_upload({"new": ({"name": "noise.png", "content": memoryview(buf.getvalue())},)})
    assert e.state.image == "upload/noise.png" and "upload/noise.png" in e.w_image.options
    e._on_upload({"new": ({"name": "bad.png", "content": memoryview(b"not an image")},)})
    assert "upload bad.png" in e.status.value and e.state.image == "upload/noise.png"


def test_explorer_displays_widget_and_static_png(library):
    from PIL import Image

    from vitsift_core.widgets.ui import AttentionExplorer, StageExplorer

    for e in (AttentionExplorer(library), StageExplorer(library, n_images=2)):
        b = e._repr_mimebundle_()
        assert "application/vnd.jupyter.widget-view+json" in b
        import base64
        im = Image.open(io.BytesIO(base64.b64decode(b["image/png"])))
        assert im.size[0] > 300
        assert e.figure() is not None


def test_stage_explorer_refits_from_cache(library):
    from vitsift_core.widgets.ui import StageExplorer

    e = StageExplorer(library, n_images=2)
    assert library.n_forward == 0                                   # both analysed already
    first = e.plot.value
    e.w_gamma.value = 2.0
    assert e.view.gamma == 2.0
    e.w_threshold.value = 0.01
    assert e.view.threshold == 0.01 and e.plot.value != first
    e.w_xself.value = True
    assert library.n_forward == 0 and "images" in e.summary.value


class _FakeClassifier:
    """A classify.Classifier look-alike: fixed random linear head on the CLS token."""

    def __init__(self, lm, n=10):
        g = torch.Generator().manual_seed(0)
        self.lm = lm
        self.w = torch.randn(lm.model.embed_dim, n, generator=g)
        self.classes = [f"c{i}" for i in range(n)]

    def logits(self, tokens):
        return tokens[:, 0] @ self.w

    def target(self, label):
        return None


def test_masking_explorer(library, lm):
    from vitsift_core.widgets.ui import MaskingExplorer

    e = MaskingExplorer(library, ratio=0, load_classifier=lambda: _FakeClassifier(lm), load_hint="click load")
    assert e.predictor is None and "No classifier" in e.table.value
    e.w_ratio.value = 20
    assert len(e.view.masked) == 10                                   # ceil(0.2 * 49)
    e.w_load.click()
    assert e.predictor is not None and "<table" in e.table.value
    n = e.predictor.n_forward
    assert n == 2                                                     # clean + masked
    for order in ("bottom", "random", "keypoints", "top"):
        e.w_order.value = order
    e.w_mode.value = "drop"
    e.w_layer.value = 3
    assert e.predictor.n_forward == n + 5
    e.w_order.value = "bottom"
    e.w_order.value = "top"                                           # seen before: cached
    assert e.predictor.n_forward == n + 6
    e.w_ratio.value = 0
    clean = e.predictor.probs(library.get(e.state.image))
    masked = e.predictor.probs(library.get(e.state.image), "drop", e.view.masked)
    np.testing.assert_array_equal(clean, masked)
    assert library.n_forward == 0
    assert e._repr_mimebundle_()["image/png"]


def test_probe_paths_match_the_probe_cache(lm, tmp_path, kp_cache_dir):
    from PIL import Image

    from vitsift_core.experiments.probe import ProbeSettings, probe_paths, train_or_load_probe

    for cls in ("a", "b"):
        d = tmp_path / "train" / cls
        d.mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((40, 40, 3), 60 * i + (100 if cls == "a" else 0), np.uint8)).save(d / f"{i}.png")
    s = ProbeSettings(train_images=str(tmp_path / "train"), per_class=2, max_iter=5)
    w, j = probe_paths(lm, s)
    assert not w.exists()
    train_or_load_probe(lm, s, batch_size=4, num_workers=0, progress=False)
    assert w.exists() and j.exists()


# ----------------------------------------------------------------------------------- make explore
def test_serve_helpers(tmp_path):
    import socket

    from vitsift_core.widgets import serve

    port = serve.free_port()
    with socket.socket() as s:          # really free: we can bind it
        s.bind(("127.0.0.1", port))
    cmd = serve.voila_command(serve.NOTEBOOK, port)
    assert str(serve.NOTEBOOK) in cmd and f"--port={port}" in cmd and "--strip_sources=True" in cmd
    assert "--Voila.ip=127.0.0.1" in cmd and "--no-browser" in cmd
    env = serve.explore_env(images="samples", n=3, base={"PATH": "/bin"})
    assert env["VITSIFT_EXPLORE"] == "1" and env["VITSIFT_EXPLORE_IMAGES"] == "samples"
    assert env["VITSIFT_EXPLORE_N"] == "3" and "VITSIFT_EXPLORE_MODEL" not in env
    assert serve.wait_until_up(f"http://127.0.0.1:{serve.free_port()}/", timeout=0.5) is False
    assert serve.NOTEBOOK.exists()


def test_explorers_notebook_offers_every_explorer():
    """The Voila page shows outputs only; the notebook must keep one explorer per section."""
    import json

    from vitsift_core.widgets import serve

    nb = json.loads(serve.NOTEBOOK.read_text())
    src = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    for name in ("AttentionExplorer(", "StageExplorer(", "MaskingExplorer("):
        assert name in src
    assert "VITSIFT_EXPLORE_IMAGES" in src


def test_explore_server_refuses_requests_without_its_token(tmp_path, capsys):
    """issue 15 case 7: `make explore` served the page (and its kernel) to anyone on the host. Now the
    printed URL carries a random token, a request without it is sent to the login page, the token is
    not on Voila's command line, and a token-less page is refused on a non-loopback --host."""
    import json
    import queue
    import re
    import signal
    import subprocess
    import sys
    import threading
    import urllib.error
    import urllib.request

    pytest.importorskip("voila")
    from vitsift_core.widgets import serve

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(serve.subprocess, "Popen", lambda *a, **k: pytest.fail("Voila started without a token"))
        assert serve.main(["--no-token", "--host", "0.0.0.0"]) == 2
    assert "--no-token with --host 0.0.0.0" in capsys.readouterr().err
    assert "secret" not in " ".join(serve.voila_command(serve.NOTEBOOK, 1, token="secret"))
    nb = tmp_path / "page.ipynb"
    nb.write_text(json.dumps({"cells": [{"cell_type": "code", "metadata": {}, "execution_count": None,
                                         "outputs": [], "source": ["print('vitsift page ' + str(6 * 7))"]}],
                              "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                          "language": "python"}},
                              "nbformat": 4, "nbformat_minor": 5}))
    proc = subprocess.Popen([sys.executable, "-m", "vitsift_core.widgets.serve", "--notebook", str(nb)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    try:
        line = ""
        while "vitsift explorers: " not in line:
            line = lines.get(timeout=90)
        m = re.search(r"vitsift explorers: (http://127\.0\.0\.1:\d+/\?token=[\w-]{40,})\s*$", line)
        assert m, line
        url = m.group(1)
        base = url.split("?")[0]

        class NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *a, **k):
                return None
        opener = urllib.request.build_opener(NoRedirect)
        for bare in (base, base + "api/kernels", base + "?token=wrong"):
            with pytest.raises(urllib.error.HTTPError) as e:
                opener.open(bare, timeout=60)
            assert e.value.code in (302, 401, 403), bare
            assert e.value.code != 302 or e.value.headers["Location"].startswith("/login"), bare
        with opener.open(url, timeout=120) as r:
            assert r.status == 200 and "vitsift page 42" in r.read().decode()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
