"""Model registry: local checkpoints, random-init control, offline hub, errors, LoadedModel facts.

Only timm's tiny test ViTs (test_vit: 64-dim, 6 blocks, patch 16, 160 px), built here; no network.
"""
from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from vitsift_core.model.registry import LoadedModel, ModelWeightsUnavailable, load_model, resolve_device


def _tiny(arch="test_vit", seed=123, **kw):
    torch.manual_seed(seed)
    return timm.create_model(arch, pretrained=False, **kw).eval()


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    """test_vit and its 4-register variant saved as safetensors and .pth (several layouts)."""
    d = tmp_path_factory.mktemp("ckpt")
    plain, reg = _tiny(), _tiny(reg_tokens=4)
    files = {"plain": plain, "reg": reg}
    save_file(plain.state_dict(), str(d / "vit.safetensors"))
    torch.save(plain.state_dict(), d / "vit.pth")
    torch.save({"model": plain.state_dict(), "epoch": 3}, d / "wrapped.pth")
    torch.save({"state_dict": {f"module.{k}": v for k, v in plain.state_dict().items()}}, d / "ddp.bin")
    save_file(reg.state_dict(), str(d / "reg.safetensors"))
    files["dir"] = d
    return files


@pytest.mark.parametrize("name", ["vit.safetensors", "vit.pth", "wrapped.pth", "ddp.bin"])
def test_checkpoint_roundtrip(tiny_files, name):
    path = tiny_files["dir"] / name
    lm = load_model(f"test_vit@{path}")
    assert isinstance(lm, LoadedModel)
    assert lm.source == f"checkpoint:{path}" and lm.arch == "test_vit"
    assert lm.spec == f"test_vit@{path}"
    assert not lm.model.training
    assert _same_weights(lm.model, tiny_files["plain"])


def test_loaded_model_fields_plain_and_registers(tiny_files):
    lm = load_model(f"test_vit@{tiny_files['dir'] / 'vit.safetensors'}")
    assert (lm.patch_size, lm.grid, lm.num_prefix_tokens, lm.num_patches) == (16, (10, 10), 1, 100)
    assert lm.data_config["input_size"] == (3, 160, 160)

    reg = load_model(f"test_vit@{tiny_files['dir'] / 'reg.safetensors'}", model_kwargs={"reg_tokens": 4})
    assert _same_weights(reg.model, tiny_files["reg"])
    assert (reg.patch_size, reg.grid, reg.num_prefix_tokens) == (16, (10, 10), 5)  # CLS + 4 registers

    # test_vit2: registered timm config with 1 register token and no CLS token
    v2 = load_model("test_vit2", control="random-init")
    assert (v2.grid, v2.num_prefix_tokens) == ((10, 10), 1)

    small = load_model("test_vit", control="random-init", img_size=96)
    assert small.grid == (6, 6) and small.num_patches == 36
    assert small.data_config["input_size"] == (3, 96, 96)
    with torch.no_grad():
        tokens = small.model.forward_features(torch.zeros(1, 3, 96, 96))
    assert tokens.shape == (1, small.num_prefix_tokens + small.num_patches, 64)


def test_register_checkpoint_without_kwargs_is_a_clear_error(tiny_files):
    with pytest.raises(ValueError, match=r"unexpected keys: reg_token"):
        load_model(f"test_vit@{tiny_files['dir'] / 'reg.safetensors'}")


def test_random_init_is_seeded_and_never_the_checkpoint(tiny_files):
    spec = f"test_vit@{tiny_files['dir'] / 'vit.safetensors'}"
    state = torch.random.get_rng_state()
    a = load_model(spec, control="random-init", seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)  # caller's RNG untouched
    b = load_model(spec, control="random-init", seed=0)
    c = load_model(spec, control="random-init", seed=1)
    assert a.source == "random-init(seed=0)"
    assert _same_weights(a.model, b.model)
    assert not _same_weights(a.model, c.model)
    assert not _same_weights(a.model, tiny_files["plain"])
    # the same by timm name (no hub access for random-init)
    assert _same_weights(load_model("test_vit", control="random-init", seed=0).model, a.model)


def test_random_init_of_a_snapshot_keeps_its_architecture(tmp_path):
    """A vitsift snapshot (timm_kwargs in its metadata) built unlike the arch's defaults: the
    random-init control is that architecture (depth, grid, input size) with new weights."""
    import json
    kw = {"depth": 2, "img_size": 32, "patch_size": 8, "num_classes": 0}
    trained = _tiny(**kw)
    path = tmp_path / "snap.safetensors"
    save_file(trained.state_dict(), str(path), metadata={"timm_kwargs": json.dumps(kw)})
    real = load_model(f"test_vit@{path}")
    rand = load_model(f"test_vit@{path}", control="random-init", seed=0)
    assert len(rand.model.blocks) == len(real.model.blocks) == 2
    assert rand.grid == real.grid == (4, 4) and rand.data_config["input_size"] == real.data_config["input_size"]
    assert not _same_weights(rand.model, real.model)


def test_a_checkpoint_runs_identity_follows_its_content_not_its_path(tmp_path):
    """ARCH@PATH analysis keys: a moved file keeps its key, a file rewritten in place gets a new one."""
    import os
    import shutil

    from vitsift_core.experiments.analysis import AnalysisParams
    a, b = tmp_path / "a" / "w.safetensors", tmp_path / "b" / "w.safetensors"
    a.parent.mkdir()
    b.parent.mkdir()
    save_file(_tiny(seed=1).state_dict(), str(a))
    key = AnalysisParams(model=f"test_vit@{a}").key()
    shutil.copy(a, b)
    assert AnalysisParams(model=f"test_vit@{b}").key() == key                     # moved: same weights
    assert AnalysisParams(model=f"random-init:test_vit@{b}").key() != key
    save_file(_tiny(seed=2).state_dict(), str(a))
    os.utime(a, ns=(1, 1))                                                        # whatever the clock
    assert AnalysisParams(model=f"test_vit@{a}").key() != key                     # rewritten in place
    assert AnalysisParams(model="embedded").identity()["model"] == "embedded"     # other specs as given


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """No hub access and an empty HF cache (huggingface_hub reads these at import, so patch both)."""
    import huggingface_hub.constants as hfc

    cache = tmp_path / "hf"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hfc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hfc, "HF_HUB_CACHE", str(cache))
    return cache


def test_unavailable_hub_weights_raise(offline_hub):
    with pytest.raises(ModelWeightsUnavailable) as ei:
        load_model("test_vit")
    msg = str(ei.value)
    assert "'test_vit'" in msg
    assert str(offline_hub) in msg  # where it looked
    assert "HF_HUB_CACHE" in msg and "test_vit@" in msg  # how to get it


def test_bad_specs_are_clear(tmp_path, offline_hub):
    with pytest.raises(ModelWeightsUnavailable, match="not found"):
        load_model(f"test_vit@{tmp_path / 'nope.safetensors'}")
    bad = tmp_path / "junk.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="could not read checkpoint"):
        load_model(f"test_vit@{bad}")
    txt = tmp_path / "w.txt"
    txt.write_text("x")
    with pytest.raises(ValueError, match="unsupported checkpoint file type"):
        load_model(f"test_vit@{txt}")
    with pytest.raises(ValueError, match="unknown model 'vit_tiny_patch16_2244'.*vit_tiny_patch16_224"):
        load_model("vit_tiny_patch16_2244")
    with pytest.raises(ValueError, match="unknown model"):
        load_model(f"no_such_arch@{tmp_path / 'w.pth'}")
    with pytest.raises(ValueError, match="unknown pretrained tag"):
        load_model("test_vit.no_such_tag")
    # non-ViT rejected before any download is tried (offline: would otherwise be unavailable)
    with pytest.raises(ValueError, match="not a ViT-family"):
        load_model("resnet18")
    with pytest.raises(ValueError, match="control"):
        load_model("test_vit", control="shuffle")


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            resolve_device("cuda")


def test_malicious_pth_checkpoint_is_refused_not_run(tmp_path):
    """Issue 15, case 1: ARCH@file.pth holding a pickled object never runs it; one clear error."""
    from conftest import write_malicious_checkpoint
    marker = tmp_path / "ran"
    p = write_malicious_checkpoint(tmp_path / "evil.pth", marker)
    with pytest.raises(ValueError, match=r"evil\.pth holds objects other than tensors") as e:
        load_model(f"test_vit@{p}")
    assert not marker.exists()
    assert "\n" not in str(e.value) and "posix.system" in str(e.value)
