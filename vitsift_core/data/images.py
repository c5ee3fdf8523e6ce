"""Image decoding and the exact model input.

:func:`load_rgb` turns any common image file into (H, W, 3) uint8 RGB or raises
:class:`ImageDecodeError` saying why; :func:`model_input` gives the crop the model sees and the
normalised tensor, both from timm's own eval transform, so SIFT runs on exactly the ViT's pixels.
"""
from __future__ import annotations

import contextlib
import io
import os
import stat
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

# transparent pixels are composited over white, as viewers show them (black would invent edges)
ALPHA_BACKGROUND = (255, 255, 255)
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError)


class ImageDecodeError(ValueError):
    """The source is not a decodable image. The message says why (empty, truncated, not an image...)."""


def file_kind(mode: int) -> str:
    """What a non-regular ``st_mode`` is, for messages ("a FIFO (named pipe)", "a socket", ...)."""
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return kind
    return "not a regular file"


def _not_regular(path: Path, mode: int) -> ImageDecodeError:
    return ImageDecodeError(f"{path}: is {file_kind(mode)}, not an image file (never opened)")


def _read_regular(path: Path) -> bytes:
    """The bytes of a regular file; anything else (FIFO, socket, device, folder) is refused from its
    ``stat`` before opening (a FIFO would block for ever), and again from the open descriptor."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise _not_regular(path, st.st_mode)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode
        if not stat.S_ISREG(mode):  # swapped after the stat above
            raise _not_regular(path, mode)
        return f.read()


def _read_bytes(src: str | Path | bytes | bytearray | memoryview) -> tuple[bytes, str]:
    """(data, name for messages); reading up front keeps file handles short-lived in workers."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        return bytes(src), "<bytes>"
    path = Path(src)
    try:
        return _read_regular(path), str(path)
    except FileNotFoundError:
        raise ImageDecodeError(f"{path}: file not found") from None
    except OSError as e:  # permission denied, I/O error, link loop...
        raise ImageDecodeError(f"{path}: cannot read file ({e.strerror or e})") from None


def load_rgb(src: str | Path | bytes) -> np.ndarray:
    """Decode an image file (path) or its bytes to (H, W, 3) uint8 RGB, C-contiguous, EXIF
    orientation applied; fully decoded here, so a truncated file raises :class:`ImageDecodeError`.

    16-bit gray becomes round(v / 257); alpha is composited over white; CMYK goes through its ICC
    profile when there is one.
    """
    data, name = _read_bytes(src)
    if len(data) == 0:
        raise ImageDecodeError(f"{name}: empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # a decompression-bomb *warning* is not a failure; the error variant is caught below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            fmt = im.format or "image"
            try:
                im.load()
            except _DECODE_ERRORS as e:
                raise ImageDecodeError(f"{name}: truncated or corrupt {fmt} data ({e})") from None
            with contextlib.suppress(Exception):  # a broken EXIF block should not cost us the pixels
                im = ImageOps.exif_transpose(im)
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError(
            f"{name}: not a recognised image format ({len(data)} bytes, starts with {data[:8]!r})"
        ) from None
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(f"{name}: image too large ({e})") from None
    except _DECODE_ERRORS as e:
        raise ImageDecodeError(f"{name}: cannot decode ({e})") from None
    try:
        return _to_rgb(im)
    except Exception as e:  # exotic modes Pillow cannot convert
        raise ImageDecodeError(f"{name}: cannot convert mode {im.mode!r} to RGB ({e})") from None


def _composite_over_background(rgba: np.ndarray) -> np.ndarray:
    """(H, W, 4) uint8 straight alpha -> (H, W, 3) uint8 over ALPHA_BACKGROUND."""
    rgb = rgba[..., :3].astype(np.float32)
    a = rgba[..., 3:4].astype(np.float32) / 255.0
    bg = np.asarray(ALPHA_BACKGROUND, dtype=np.float32)
    out = rgb * a + bg * (1.0 - a)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _scale_16bit(v: np.ndarray) -> np.ndarray:
    """16-bit range [0, 65535] -> uint8 with round(v / 257), the exact inverse of 8->16 bit (v * 257)."""
    return np.clip(np.rint(v.astype(np.float64) / 257.0), 0, 255).astype(np.uint8)


def _minmax_uint8(a: np.ndarray) -> np.ndarray:
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if hi <= lo:
        return np.zeros(a.shape, dtype=np.uint8)
    return np.clip(np.rint((a - lo) / (hi - lo) * 255.0), 0, 255).astype(np.uint8)


def _float_uint8(a: np.ndarray) -> np.ndarray:
    """Floats in [0, 1] scaled by 255 (NaN -> 0), other ranges stretched."""
    a = np.nan_to_num(np.asarray(a).astype(np.float64))
    if a.size and a.min() >= 0.0 and a.max() <= 1.0:
        return np.clip(np.rint(a * 255.0), 0, 255).astype(np.uint8)
    return _minmax_uint8(a)


def _gray_to_rgb(g: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.repeat(g[..., None], 3, axis=2))


def _cmyk_to_rgb(im: Image.Image) -> np.ndarray:
    icc = im.info.get("icc_profile")
    if icc:
        # print-workflow CMYK JPEGs carry a profile; Pillow's plain formula gives wrong colours
        try:
            from PIL import ImageCms

            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            out = ImageCms.profileToProfile(im, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
            if out is not None:
                return np.asarray(out, dtype=np.uint8)
        except Exception:
            pass  # broken or unsupported profile: fall back to the formula below
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def _to_rgb(im: Image.Image) -> np.ndarray:
    """Any Pillow mode -> (H, W, 3) uint8 RGB (see load_rgb for the rules)."""
    mode = im.mode
    if mode == "RGB":
        return np.array(im, dtype=np.uint8)
    if mode in ("L", "1"):
        return _gray_to_rgb(np.asarray(im.convert("L"), dtype=np.uint8))
    if mode.startswith("I;16"):
        # Pillow's own I;16 -> L conversion clips at 255 (almost everything turns white); scale.
        return _gray_to_rgb(_scale_16bit(np.asarray(im)))
    if mode == "I":
        # 32-bit int, in practice from 16-bit sources: [0, 65535] is read as 16-bit, else stretched
        a = np.asarray(im).astype(np.float64)
        return _gray_to_rgb(_scale_16bit(a) if a.size and a.min() >= 0 and a.max() <= 65535
                            else _minmax_uint8(a))
    if mode == "F":
        return _gray_to_rgb(_float_uint8(np.asarray(im)))
    if mode == "CMYK":
        return _cmyk_to_rgb(im)
    # palette images need alpha only with a transparent index (tRNS) or an RGBA palette;
    # Pillow un-premultiplies RGBa/La when converting to RGBA
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or mode == "P" and (
            "transparency" in im.info or im.palette is not None and im.palette.mode == "RGBA"):
        return _composite_over_background(np.asarray(im.convert("RGBA"), dtype=np.uint8))
    # P without alpha, RGBX, YCbCr, HSV, LAB and anything else: let Pillow convert
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def as_rgb_uint8(arr: np.ndarray) -> np.ndarray:
    """An in-memory array (e.g. from ``skimage.data``) -> (H, W, 3) uint8 with :func:`load_rgb`'s
    rules: bool -> {0, 255}, floats in [0, 1] scaled by 255, uint16 by 1/257."""
    a = np.asarray(arr)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif a.dtype == np.uint16:
        a = _scale_16bit(a)
    elif np.issubdtype(a.dtype, np.floating):
        a = _float_uint8(a)
    elif a.dtype != np.uint8:
        a = _minmax_uint8(a.astype(np.float64)) if (a.min() < 0 or a.max() > 255) else a.astype(np.uint8)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim == 3 and a.shape[2] in (1, 2):  # gray (+ alpha)
        a = np.concatenate([np.repeat(a[..., :1], 3, axis=2), a[..., 1:]], axis=2)
    if a.ndim == 3 and a.shape[2] == 4:
        return _composite_over_background(a)
    if a.ndim == 3 and a.shape[2] == 3:
        return np.ascontiguousarray(a)
    raise ValueError(f"cannot interpret array of shape {a.shape} as an image")


# The keys of timm's data config that create_transform understands for eval.
_CFG_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


def _freeze(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return tuple(_freeze(x) for x in v)
    if isinstance(v, (torch.Tensor, np.ndarray)):
        return tuple(v.flatten().tolist())
    return v


@lru_cache(maxsize=32)
def _eval_transforms_cached(key: tuple):
    import timm.data
    from torchvision import transforms as T

    full = timm.data.create_transform(**dict(key), is_training=False)
    steps = list(full.transforms) if isinstance(full, T.Compose) else [full]
    # split at the PIL -> tensor conversion: the steps before (resize / crop / pad) make the picture
    # the model sees, the steps from there on only change dtype and scale
    cut = next((i for i, s in enumerate(steps)
                if type(s).__name__ in ("ToTensor", "MaybeToTensor", "PILToTensor")), None)
    if cut is None:
        raise ValueError(f"timm eval transform has no ToTensor step: {full}")
    return T.Compose(steps[:cut]), T.Compose(steps[cut:])


def _plain_normalize(post) -> tuple[np.ndarray, np.ndarray] | None:
    """``(mean, std)`` as (3, 1, 1) float32 if ``post`` is exactly [ToTensor-like, Normalize], else None."""
    steps = list(getattr(post, "transforms", []))
    if len(steps) != 2 or type(steps[0]).__name__ not in ("ToTensor", "MaybeToTensor") \
            or type(steps[1]).__name__ != "Normalize":
        return None
    mean = np.asarray(_freeze(steps[1].mean), dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(_freeze(steps[1].std), dtype=np.float32).reshape(-1, 1, 1)
    if mean.shape[0] not in (1, 3) or std.shape[0] not in (1, 3):
        return None
    return mean, std


def eval_transforms(data_config: dict):
    """timm's eval transform split in two: ``(geometric, to_tensor)``, PIL -> PIL crop -> tensor."""
    key = tuple((k, _freeze(data_config[k])) for k in _CFG_KEYS if k in data_config)
    return _eval_transforms_cached(key)


def model_input(rgb: np.ndarray, data_config: dict) -> tuple[np.ndarray, torch.Tensor]:
    """The exact model input for one (H, W, 3) uint8 RGB image and a timm data config: ``crop``
    (S, S, 3) uint8, the pixels the model sees (SIFT runs on it), and ``tensor`` (3, S, S) float32,
    equal to timm's full eval transform of ``Image.fromarray(rgb)``."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"model_input expects (H, W, 3) uint8 RGB, got {rgb.shape} {rgb.dtype}")
    pre, post = eval_transforms(data_config)
    crop_img = pre(Image.fromarray(rgb))
    crop = np.array(crop_img.convert("RGB"), dtype=np.uint8)
    norm = _plain_normalize(post)
    if norm is not None:
        # ToTensor + Normalize's float32 operations in numpy, bit-identical (tested) and ~50x faster
        # than torch's intra-op threads on a busy machine
        mean, std = norm
        x = crop.transpose(2, 0, 1).astype(np.float32) / np.float32(255.0)
        tensor = torch.from_numpy(np.ascontiguousarray((x - mean) / std))
    else:  # any other tail timm might add: run it as is
        tensor = post(crop_img).float()
    _, h, w = (int(x) for x in data_config["input_size"])
    if crop.shape != (h, w, 3) or tuple(tensor.shape) != (3, h, w):  # pragma: no cover
        raise RuntimeError(f"unexpected model input shapes {crop.shape}, {tuple(tensor.shape)}")
    return crop, tensor.contiguous()
