"""Model registry: a spec string -> a ready timm ViT plus what the analysis needs (:class:`LoadedModel`).

Specs: ``"embedded"`` (the offline default), a timm name with or without a pretrained tag or
``"hf-hub:org/repo"`` (hub or its local cache), ``"ARCH@PATH"`` (a local state dict; a vitsift
pre-training snapshot carries the timm arguments it was built with), and ``"random-init:SPEC"``
(SPEC's architecture with seeded random weights, asked for by name so that run folders, tables and
titles say so). ``control="random-init"``: the same architecture, seeded; otherwise missing weights
raise :class:`ModelWeightsUnavailable`, never fall back to random ones.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import pickle
import re
import urllib.error
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from huggingface_hub import constants
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled
from safetensors import safe_open
from safetensors.torch import load_file
from timm.data import resolve_data_config

from vitsift_core.model import embedded
from vitsift_core.model.embedded import ModelWeightsUnavailable

CONTROLS = ("none", "random-init")
_CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
_HUB = ("hf-hub:", "hf_hub:")
RANDOM_INIT = "random-init:"    # spec prefix: the architecture with random weights, explicitly


@dataclass
class LoadedModel:
    """A loaded ViT: (B, 3, H, W) with H, W = ``data_config['input_size'][1:]`` -> tokens
    (B, num_prefix_tokens + num_patches, D), prefix first, then patches row-major over ``grid``."""

    model: torch.nn.Module  # timm VisionTransformer-family, eval mode, on device
    spec: str  # what the user asked for
    arch: str  # timm architecture name (no pretrained tag)
    source: str  # 'embedded' | 'timm-pretrained' | 'checkpoint:<path>' | 'random-init(seed=S)'
    data_config: dict  # timm data config (input_size, interpolation, mean, std, crop_pct, crop_mode)
    patch_size: int
    grid: tuple[int, int]  # (rows, cols) of the patch grid
    num_prefix_tokens: int  # CLS + registers (+ distillation token)

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]


class DeviceUnavailable(RuntimeError):
    """A device that is no device name, or that this machine lacks."""


def display_name(spec: str) -> str:
    """The name figure titles and text use for a model spec: ``embedded.NAME`` for the embedded
    model, the spec itself otherwise."""
    if is_random_init(spec):
        return f"{display_name(spec[len(RANDOM_INIT):])} (random-init weights)"
    return embedded.NAME if spec == "embedded" else spec


def is_random_init(spec: str) -> bool:
    """True for a ``"random-init:SPEC"`` spec."""
    return spec.strip().startswith(RANDOM_INIT)


def random_init_spec(spec: str) -> str:
    """``spec`` asked for with random weights: ``"random-init:" + spec`` (unchanged if it already is)."""
    spec = spec.strip()
    return spec if is_random_init(spec) else RANDOM_INIT + spec


_DIGESTS: dict[tuple, str] = {}


def checkpoint_identity(spec: str) -> str | None:
    """``ARCH@sha256:<hex>`` for an ``ARCH@PATH`` spec (``random-init:`` kept): the file's content in
    place of its path, so a run's identity follows the weights (a moved ``results/`` reuses its
    folders; a file rewritten in place gets new ones). None for other specs or a missing file
    (loading it then fails with its own error). Hashes are cached per (path, size, mtime)."""
    ri = is_random_init(spec)
    inner = spec.strip()[len(RANDOM_INIT):] if ri else spec.strip()
    if "@" not in inner or inner.startswith(_HUB):
        return None
    arch, path = (s.strip() for s in inner.split("@", 1))
    p = Path(path).expanduser()
    if not p.is_file():
        return None
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _DIGESTS[key] = h.hexdigest()
    return (RANDOM_INIT if ri else "") + f"{arch}@sha256:{_DIGESTS[key]}"


def resolve_device(device: str | torch.device) -> torch.device:
    """``'auto'`` -> ``cuda`` when available, else ``cpu``; anything else as given (checked)."""
    if not isinstance(device, torch.device) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise DeviceUnavailable(f"device {device!r}: not a device (auto | cpu | cuda | cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailable(f"device {str(dev)!r} requested but CUDA is not available here; "
                                "use device='cpu' or 'auto'")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise DeviceUnavailable(f"device {str(dev)!r}: this machine has {torch.cuda.device_count()} GPU(s)")
    return dev


def load_model(spec: str, *, control: str = "none", device: str = "cpu", seed: int = 0,
               img_size: int | None = None, model_kwargs: dict | None = None) -> LoadedModel:
    """The model named by ``spec`` (module docstring), eval mode, on ``device``.

    ``img_size``: input resolution (timm resamples position embeddings); ``model_kwargs``: extra
    ``timm.create_model`` arguments a checkpoint was trained with (e.g. ``reg_tokens=4``).
    """
    if control not in CONTROLS:
        raise ValueError(f"control must be one of {CONTROLS}, got {control!r}")
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"model spec must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    if is_random_init(spec):        # the named random-init model: the inner spec's control
        loaded = load_model(spec[len(RANDOM_INIT):], control="random-init", device=device, seed=seed,
                            img_size=img_size, model_kwargs=model_kwargs)
        loaded.spec = spec
        return loaded
    dev = resolve_device(device)
    seed_if_random = seed if control == "random-init" else None
    kwargs = dict(model_kwargs or {})
    if img_size is not None:
        kwargs["img_size"] = img_size
    if spec == "embedded":
        loaded = _load_embedded(seed_if_random, img_size, kwargs)
    elif "@" in spec and not spec.startswith(_HUB):
        arch, path = (s.strip() for s in spec.split("@", 1))
        if not arch or not path:
            raise ValueError(f"checkpoint spec must be 'ARCH@PATH', got {spec!r}")
        _check_arch_name(arch)
        p = Path(path).expanduser()
        if seed_if_random is None:
            loaded = _load_checkpoint(spec, arch, p, kwargs)
        else:   # the checkpoint's architecture (a snapshot says how it was built), new weights
            loaded = _load_timm(spec, arch, seed_if_random, {**(_saved_kwargs(p) if p.is_file() else {}), **kwargs})
    else:
        _check_arch_name(spec)
        loaded = _load_timm(spec, spec, seed_if_random, kwargs)
    loaded.model.to(dev).eval()
    return loaded


def _load_embedded(seed, img_size, kwargs) -> LoadedModel:
    if img_size is not None and img_size != embedded.IMG_SIZE:
        raise ValueError(f"the embedded model is converted at {embedded.IMG_SIZE} px only; "
                         f"got img_size={img_size}")
    if set(kwargs) - {"img_size"}:
        raise ValueError("model_kwargs are not supported for the embedded model")
    if seed is None:
        model, source = embedded.create_embedded_model(), "embedded"
    else:
        model, source = seeded(seed, embedded._new_timm_model), f"random-init(seed={seed})"
    _check_vit(model, embedded.ARCH)
    return _describe(model, "embedded", embedded.ARCH, source, dict(embedded.DATA_CONFIG))


def _load_timm(spec, name, seed, kwargs) -> LoadedModel:
    """timm's pretrained ``name`` (seed None), or the architecture with seeded random weights."""
    if seed is not None:
        # pretrained=False still reads the model config from the hub for 'hf-hub:' names
        model = seeded(seed, lambda: _create_or_unavailable(name, False, kwargs))
        source = f"random-init(seed={seed})"
    else:
        # reject non-ViT architectures before any download, on a meta-device skeleton
        try:
            with torch.device("meta"):
                skeleton = timm.create_model(name, pretrained=False, **kwargs)
        except Exception:  # noqa: BLE001 - some models cannot be built on meta; check after
            skeleton = None
        if skeleton is not None:
            _check_vit(skeleton, name)
        model = _create_or_unavailable(name, True, kwargs)
        source = "timm-pretrained"
    arch = _arch_of(model, name)
    _check_vit(model, name)
    return _describe(model, spec, arch, source, _data_config(model))


def _load_checkpoint(spec, arch, p: Path, kwargs) -> LoadedModel:
    if not p.is_file():
        raise ModelWeightsUnavailable(
            f"checkpoint file for {arch!r} not found: {p} (spec {spec!r}). "
            "Give an existing .safetensors/.pth/.pt/.bin file as ARCH@PATH.")
    state_dict = read_state_dict(p)
    kwargs = {**_saved_kwargs(p), **kwargs}     # a vitsift snapshot says how it was built
    model = timm.create_model(arch, pretrained=False, **kwargs)
    _check_vit(model, arch)
    _strict_load(model, state_dict, arch, p)
    return _describe(model, spec, _arch_of(model, arch), f"checkpoint:{p}", _data_config(model))


def _saved_kwargs(p: Path) -> dict:
    """The ``timm_kwargs`` (JSON) in a .safetensors file's metadata, as a vitsift pre-training
    snapshot stores them (size, patches, depth, input pipeline); {} for any other file."""
    if p.suffix.lower() != ".safetensors":
        return {}
    try:
        with safe_open(str(p), framework="pt") as f:
            return json.loads((f.metadata() or {}).get("timm_kwargs", "{}"))
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"could not read checkpoint {p}: {type(e).__name__}: {e}") from e


def _create_or_unavailable(name: str, pretrained: bool, kwargs: dict) -> torch.nn.Module:
    """``timm.create_model``, turning 'cannot fetch weights' errors into ModelWeightsUnavailable."""
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except Exception as e:  # noqa: BLE001 - classified below
        if _is_unavailable_error(e):
            raise ModelWeightsUnavailable(_unavailable_message(name, e)) from e
        raise


def seeded(seed: int, build):
    """``build()`` under ``torch.manual_seed(seed)``, the caller's RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _check_arch_name(name: str) -> None:
    if name.startswith(_HUB):
        return
    base = name.split(".", 1)[0]
    if timm.is_model(name):
        if "." in name:  # a pretrained tag: check it now, timm would raise a bare RuntimeError
            tags = timm.list_pretrained(f"{base}.*")
            if name not in tags:
                raise ValueError(f"unknown pretrained tag in {name!r}; timm knows: "
                                 f"{', '.join(tags) if tags else 'no tags for ' + base}")
        return
    close = difflib.get_close_matches(base, timm.list_models(), n=5, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown model {name!r}: not 'embedded' and not a timm architecture "
                     f"(see timm.list_models()).{hint}")


def _check_vit(model: torch.nn.Module, name: str) -> None:
    """The analysis hooks into ``blocks[i].attn`` and recomputes attention from ``qkv``."""
    blocks = getattr(model, "blocks", None)
    ok = (isinstance(blocks, torch.nn.Sequential | torch.nn.ModuleList) and len(blocks) > 0
          and all(hasattr(getattr(b, "attn", None), "qkv") for b in blocks)
          and hasattr(model, "patch_embed"))
    if not ok:
        raise ValueError(f"model {name!r} ({type(model).__name__}) is not a ViT-family model this "
                         "project supports: it needs .patch_embed and .blocks[i].attn.qkv "
                         "(timm VisionTransformer and close relatives)")


def _arch_of(model: torch.nn.Module, fallback: str) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or fallback.split(".", 1)[0]


def _data_config(model: torch.nn.Module) -> dict:
    """timm's data config with ``input_size`` the size the model was built at (timm reports the
    pretrained default even when ``img_size`` was overridden)."""
    cfg = dict(resolve_data_config({}, model=model))
    img = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img is not None:
        h, w = (img, img) if isinstance(img, int) else tuple(img)
        cfg["input_size"] = (cfg["input_size"][0], int(h), int(w))
    return cfg


def _describe(model, spec, arch, source, data_config) -> LoadedModel:
    ps = model.patch_embed.patch_size
    ps = (ps, ps) if isinstance(ps, int) else tuple(ps)
    if ps[0] != ps[1]:
        raise ValueError(f"non-square patches {ps} are not supported ({spec!r})")
    return LoadedModel(model=model.eval(), spec=spec, arch=arch, source=source, data_config=data_config,
                       patch_size=int(ps[0]), grid=tuple(int(g) for g in model.patch_embed.grid_size),
                       num_prefix_tokens=int(getattr(model, "num_prefix_tokens", 1)))


def read_state_dict(checkpoint, allow: tuple = ()) -> dict[str, torch.Tensor]:
    """A state dict from a checkpoint file or a loaded checkpoint dict: unwrapped from 'model' /
    'state_dict', DDP's 'module.' prefix dropped; ``allow``: see :func:`load_weights_only`."""
    path = "the given checkpoint" if isinstance(checkpoint, dict) else Path(checkpoint)
    obj = checkpoint if isinstance(checkpoint, dict) else _load_file(path, allow)
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"checkpoint {path} is not a state dict (name -> tensor), nor a dict "
                         "holding one under 'model' or 'state_dict'")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def load_weights_only(path: str | Path, allow: tuple = ()):
    """``torch.load(path, weights_only=True)`` on the CPU: tensors, containers, numbers, strings
    and None, plus the classes in ``allow``; nothing in the file can run code. A file holding other
    pickled objects raises :class:`UnsafeCheckpoint` (one line), any unreadable file ValueError."""
    try:
        with torch.serialization.safe_globals(list(allow)):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        if isinstance(e, pickle.UnpicklingError) and "weights only load failed" in str(e).lower():
            glob = re.search(r"GLOBAL (\S+)", str(e))
            raise UnsafeCheckpoint(f"{path} holds objects other than tensors and plain data"
                                   f"{f' ({glob.group(1)})' if glob else ''}: not loaded, since unpickling "
                                   "them could run code") from None
        msg = " ".join(str(e).split())
        raise ValueError(f"could not read checkpoint {path}: {type(e).__name__}: {msg}") from None


class UnsafeCheckpoint(ValueError):
    """A checkpoint file holds pickled objects beyond tensors and plain data: refused, not run."""


def _load_file(path: Path, allow: tuple = ()):
    suffix = path.suffix.lower()
    if suffix not in _CHECKPOINT_SUFFIXES:
        raise ValueError(f"unsupported checkpoint file type {suffix!r} for {path}; "
                         f"expected one of {', '.join(_CHECKPOINT_SUFFIXES)}")
    if suffix != ".safetensors":
        return load_weights_only(path, allow)
    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"could not read checkpoint {path}: {type(e).__name__}: {e}") from e


def _strict_load(model, state_dict, arch, path) -> None:
    own = model.state_dict()
    shapes = sorted(f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in set(own) & set(state_dict) if state_dict[k].shape != own[k].shape)
    problems = {"missing keys": sorted(set(own) - set(state_dict)),
                "unexpected keys": sorted(set(state_dict) - set(own)), "shape mismatches": shapes}
    parts = [f"{what}: " + ", ".join(xs[:8]) + (f", ... ({len(xs)} in all)" if len(xs) > 8 else "")
             for what, xs in problems.items() if xs]
    if parts:
        raise ValueError(" ".join([f"checkpoint {path} does not match timm architecture {arch!r}:", *parts,
                                   "(was it trained with other settings, e.g. img_size or reg_tokens? "
                                   "pass them as img_size= / model_kwargs=)"]))
    model.load_state_dict(state_dict, strict=True)


def _is_unavailable_error(e: BaseException) -> bool:
    """Errors meaning 'weights not here and cannot be fetched', from timm/hub/torch.hub."""
    hub = (HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled)
    if isinstance(e, hub + (urllib.error.URLError, ConnectionError, TimeoutError, OSError)):
        return True
    if isinstance(e, RuntimeError) and "No pretrained weights exist" in str(e):
        return True
    cause = e.__cause__ or e.__context__
    return cause is not None and cause is not e and _is_unavailable_error(cause)


def _unavailable_message(name: str, e: BaseException) -> str:
    """Where timm would look for ``name``'s weights (hub repo and cache, URL), and how to get them."""
    try:
        cfg = timm.models.get_pretrained_cfg(name) or {}
        cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    except Exception:  # noqa: BLE001 - only for the message
        cfg = {}
    hub_id = name.split(":", 1)[1] if name.startswith(_HUB) else cfg.get("hf_hub_id")
    where = []
    if hub_id:
        where.append(f"Hugging Face hub repo {hub_id!r}, cached as "
                     f"{Path(constants.HF_HUB_CACHE) / ('models--' + hub_id.replace('/', '--'))}")
    if cfg.get("url"):
        where.append(f"URL {cfg['url']} (torch hub cache {Path(torch.hub.get_dir()) / 'checkpoints'})")
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return (
        f"pretrained weights for model {name!r} are not available here ({type(e).__name__}: {first}). "
        f"Looked for: {'; '.join(where) if where else 'timm lists no pretrained weights for it'}. "
        f"To get them: on a machine with internet run "
        f"`python -c \"import timm; timm.create_model('{name}', pretrained=True)\"` with "
        f"HF_HUB_CACHE set to a folder, copy that folder here and point HF_HUB_CACHE at it; "
        f"or pass a local checkpoint file as '{name.split('.', 1)[0]}@/path/to/weights.safetensors'. "
        f"(Set HF_HUB_OFFLINE=1 to fail at once instead of retrying the network.) "
        f"(For a random-weights control use control='random-init'.)"
    )
