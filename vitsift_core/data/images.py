"""Image decoding and the exact model input.

Two jobs, kept apart on purpose:

- :func:`load_rgb` turns *any* common image file into an ``(H, W, 3) uint8`` RGB array, or raises
  :class:`ImageDecodeError` saying why it could not. Every colour mode becomes RGB here, so nothing
  downstream (SIFT, the model, plots) ever sees grayscale, alpha, CMYK or 16-bit data.
- :func:`model_input` produces the crop the model sees and the normalised tensor, both from timm's
  own eval transform, so that SIFT runs on exactly the pixels that the ViT patches cover
  (DESIGN.md sec. 2 and 3).
"""
from __future__ import annotations

import io
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["ImageDecodeError", "load_rgb", "as_rgb_uint8", "model_input", "eval_transforms"]

#: Background that transparent pixels are composited over. White, because that is how viewers and
#: browsers show transparent PNGs on a page; black would invent dark edges that SIFT fires on.
ALPHA_BACKGROUND = (255, 255, 255)


class ImageDecodeError(ValueError):
    """The source is not a decodable image. The message says why (empty, truncated, not an image...)."""


# --------------------------------------------------------------------------------------------------
# decoding
# --------------------------------------------------------------------------------------------------

def _read_bytes(src: str | Path | bytes | bytearray | memoryview) -> tuple[bytes, str]:
    """Return (data, name for messages). Reading everything up front keeps the file handle short-lived
    (safe in DataLoader workers) and lets us tell an empty file from a broken one."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        return bytes(src), "<bytes>"
    path = Path(src)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ImageDecodeError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise ImageDecodeError(f"{path}: is a directory, not an image file") from None
    except OSError as e:  # permission denied, I/O error...
        raise ImageDecodeError(f"{path}: cannot read file ({e.strerror or e})") from None
    return data, str(path)


def load_rgb(src: str | Path | bytes) -> np.ndarray:
    """Decode an image file (path) or its encoded bytes to RGB.

    Returns ``(H, W, 3) uint8``, C-contiguous, with the EXIF orientation applied (so a phone photo
    stored sideways comes out upright, as a viewer shows it).

    Handled: JPEG (RGB, grayscale, CMYK), PNG (8/16-bit, gray, gray+alpha, RGBA, palette with or
    without transparency), WebP, TIFF, BMP, GIF (first frame) and anything else Pillow opens.
    Conversions (see :func:`_to_rgb`):

    - 16-bit grayscale (``I;16*``/``I``) is scaled to 8 bit with ``round(v / 257)`` (65535 -> 255),
      never clipped; 16-bit RGB PNGs are reduced by Pillow's decoder to their high byte.
    - Alpha (RGBA, LA, palette transparency) is composited over white (:data:`ALPHA_BACKGROUND`).
    - CMYK is converted through the embedded ICC profile when there is one, else with Pillow's
      formula.

    The image is fully decoded here (``Image.load``), so a truncated file raises
    :class:`ImageDecodeError` instead of silently yielding grey padding later.
    """
    data, name = _read_bytes(src)
    if len(data) == 0:
        raise ImageDecodeError(f"{name}: empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # A decompression-bomb *warning* is not a failure; the error variant is caught below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            fmt = im.format or "image"
            try:
                im.load()
            except (OSError, SyntaxError, ValueError, EOFError) as e:
                # Pillow reports truncation as OSError("image file is truncated ...") or
                # "broken data stream"; both mean the file ends or is corrupt mid-way.
                raise ImageDecodeError(f"{name}: truncated or corrupt {fmt} data ({e})") from None
            try:
                im = ImageOps.exif_transpose(im)
            except Exception:  # a broken EXIF block should not cost us the pixels
                pass
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError(
            f"{name}: not a recognised image format ({len(data)} bytes, starts with {data[:8]!r})"
        ) from None
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(f"{name}: image too large ({e})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageDecodeError(f"{name}: cannot decode ({e})") from None
    try:
        rgb = _to_rgb(im)
    except ImageDecodeError:
        raise
    except Exception as e:  # exotic modes Pillow cannot convert
        raise ImageDecodeError(f"{name}: cannot convert mode {im.mode!r} to RGB ({e})") from None
    return rgb


def _composite_over_background(rgba: np.ndarray) -> np.ndarray:
    """(H, W, 4) uint8 straight (non-premultiplied) alpha -> (H, W, 3) uint8 over ALPHA_BACKGROUND."""
    rgb = rgba[..., :3].astype(np.float32)
    a = rgba[..., 3:4].astype(np.float32) / 255.0
    bg = np.asarray(ALPHA_BACKGROUND, dtype=np.float32)
    out = rgb * a + bg * (1.0 - a)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _scale_16bit(v: np.ndarray) -> np.ndarray:
    """16-bit range [0, 65535] -> uint8 with round(v / 257), the exact inverse of 8->16 bit (v * 257)."""
    return np.clip(np.rint(v.astype(np.float64) / 257.0), 0, 255).astype(np.uint8)


def _gray_to_rgb(g: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.repeat(g[..., None], 3, axis=2))


def _cmyk_to_rgb(im: Image.Image) -> np.ndarray:
    icc = im.info.get("icc_profile")
    if icc:
        # Real-world CMYK JPEGs (print workflows) carry a profile; Pillow's plain formula ignores
        # it and gives visibly wrong colours, so use littleCMS when the profile is usable.
        try:
            from PIL import ImageCms

            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            dst = ImageCms.createProfile("sRGB")
            out = ImageCms.profileToProfile(im, src, dst, outputMode="RGB")
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
        # 32-bit int. In practice this comes from 16-bit PNG/PGM/TIFF sources, so values in
        # [0, 65535] are read as 16-bit; anything else is min-max stretched.
        a = np.asarray(im).astype(np.float64)
        if a.size and a.min() >= 0 and a.max() <= 65535:
            return _gray_to_rgb(_scale_16bit(a))
        return _gray_to_rgb(_minmax_uint8(a))
    if mode == "F":
        # Float images: [0, 1] is the usual convention; otherwise stretch.
        a = np.asarray(im).astype(np.float64)
        a = np.nan_to_num(a)
        if a.size and a.min() >= 0.0 and a.max() <= 1.0:
            return _gray_to_rgb(np.clip(np.rint(a * 255.0), 0, 255).astype(np.uint8))
        return _gray_to_rgb(_minmax_uint8(a))
    if mode == "CMYK":
        return _cmyk_to_rgb(im)
    if mode == "P":
        # Palette images may declare a transparent index (tRNS); only then is alpha needed.
        if "transparency" in im.info or im.palette is not None and im.palette.mode == "RGBA":
            return _composite_over_background(np.asarray(im.convert("RGBA"), dtype=np.uint8))
        return np.asarray(im.convert("RGB"), dtype=np.uint8)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Pillow un-premultiplies RGBa/La when converting to RGBA.
        return _composite_over_background(np.asarray(im.convert("RGBA"), dtype=np.uint8))
    # RGBX, YCbCr, HSV, LAB and anything else: let Pillow convert.
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def _minmax_uint8(a: np.ndarray) -> np.ndarray:
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if hi <= lo:
        return np.zeros(a.shape, dtype=np.uint8)
    return np.clip(np.rint((a - lo) / (hi - lo) * 255.0), 0, 255).astype(np.uint8)


def as_rgb_uint8(arr: np.ndarray) -> np.ndarray:
    """An in-memory array (e.g. from ``skimage.data``) -> ``(H, W, 3) uint8`` with the same rules as
    :func:`load_rgb`: gray is repeated, alpha composited over white, bool -> {0, 255}, floats in
    [0, 1] scaled by 255, uint16 scaled by 1/257."""
    a = np.asarray(arr)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif a.dtype == np.uint16:
        a = _scale_16bit(a)
    elif np.issubdtype(a.dtype, np.floating):
        a = np.nan_to_num(a.astype(np.float64))
        a = (np.clip(np.rint(a * 255.0), 0, 255) if a.min() >= 0 and a.max() <= 1
             else _minmax_uint8(a)).astype(np.uint8)
    elif a.dtype != np.uint8:
        a = _minmax_uint8(a.astype(np.float64)) if (a.min() < 0 or a.max() > 255) else a.astype(np.uint8)
    if a.ndim == 2:
        return _gray_to_rgb(a)
    if a.ndim == 3 and a.shape[2] == 1:
        return _gray_to_rgb(a[..., 0])
    if a.ndim == 3 and a.shape[2] == 2:  # gray + alpha
        a = np.concatenate([np.repeat(a[..., :1], 3, axis=2), a[..., 1:]], axis=2)
    if a.ndim == 3 and a.shape[2] == 4:
        return _composite_over_background(a)
    if a.ndim == 3 and a.shape[2] == 3:
        return np.ascontiguousarray(a)
    raise ValueError(f"cannot interpret array of shape {a.shape} as an image")


# --------------------------------------------------------------------------------------------------
# model input
# --------------------------------------------------------------------------------------------------

# The keys of timm's data config that create_transform understands for eval.
_CFG_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


def _freeze(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return tuple(_freeze(x) for x in v)
    if isinstance(v, torch.Tensor):
        return tuple(v.flatten().tolist())
    if isinstance(v, np.ndarray):
        return tuple(v.flatten().tolist())
    return v


def _config_key(data_config: dict) -> tuple:
    return tuple((k, _freeze(data_config[k])) for k in _CFG_KEYS if k in data_config)


@lru_cache(maxsize=32)
def _eval_transforms_cached(key: tuple):
    import timm.data
    from torchvision import transforms as T

    cfg = dict(key)
    full = timm.data.create_transform(**cfg, is_training=False)
    steps = list(full.transforms) if isinstance(full, T.Compose) else [full]
    # Split where the PIL -> tensor conversion happens: everything before works on PIL images
    # (resize / crop / pad), so its output *is* the picture the model sees; everything from there
    # on (ToTensor / MaybeToTensor, Normalize) only changes dtype and scale.
    cut = next(
        (i for i, s in enumerate(steps) if type(s).__name__ in ("ToTensor", "MaybeToTensor", "PILToTensor")),
        None,
    )
    if cut is None:
        raise ValueError(f"timm eval transform has no ToTensor step: {full}")
    return T.Compose(steps[:cut]), T.Compose(steps[cut:]), full


def _plain_normalize(post) -> tuple[np.ndarray, np.ndarray] | None:
    """``(mean, std)`` as ``(3, 1, 1) float32`` if ``post`` is exactly [ToTensor-like, Normalize], else None."""
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
    """timm's eval transform for ``data_config`` split in two: ``(geometric, to_tensor)``.

    ``geometric`` maps a PIL image to the PIL crop the model sees; ``to_tensor`` maps that crop to the
    normalised tensor. ``to_tensor(geometric(img))`` is timm's full transform, step for step.
    """
    pre, post, _ = _eval_transforms_cached(_config_key(data_config))
    return pre, post


def model_input(rgb: np.ndarray, data_config: dict) -> tuple[np.ndarray, torch.Tensor]:
    """The exact model input for one RGB image.

    Args:
        rgb: ``(H, W, 3) uint8`` RGB (from :func:`load_rgb`).
        data_config: timm data config (``timm.data.resolve_data_config``): ``input_size`` (3, S, S),
            ``interpolation``, ``mean``, ``std``, ``crop_pct``, ``crop_mode``.

    Returns:
        ``crop``: ``(S, S, 3) uint8`` -- exactly the pixels the model sees (timm's eval resize and crop,
        before ToTensor/Normalize). SIFT runs on this.
        ``tensor``: ``(3, S, S) float32``, normalised; equal to timm's full eval transform applied to
        ``Image.fromarray(rgb)``.

    Images smaller than the input (e.g. 20x20) are upsampled, as timm does.
    """
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"model_input expects (H, W, 3) uint8 RGB, got {rgb.shape} {rgb.dtype}")
    pre, post = eval_transforms(data_config)
    crop_img = pre(Image.fromarray(rgb))
    if not isinstance(crop_img, Image.Image):  # pragma: no cover - would mean timm changed its pipeline
        raise TypeError(f"timm's geometric transform returned {type(crop_img)}, expected a PIL image")
    crop = np.array(crop_img.convert("RGB"), dtype=np.uint8)
    norm = _plain_normalize(post)
    if norm is not None:
        # Same float32 operations as ToTensor (x / 255) + Normalize ((x - mean) / std), so the result
        # is bit-identical (tested), but in numpy: torch's intra-op threads made this tiny op ~50x
        # slower on a busy 2-core machine when called in the main process.
        mean, std = norm
        x = crop.transpose(2, 0, 1).astype(np.float32) / np.float32(255.0)
        tensor = torch.from_numpy(np.ascontiguousarray((x - mean) / std))
    else:  # any other tail timm might add: run it as is
        tensor = post(crop_img)
        if tensor.dtype != torch.float32:
            tensor = tensor.float()
    _, h, w = (int(x) for x in data_config["input_size"])
    if crop.shape != (h, w, 3) or tuple(tensor.shape) != (3, h, w):  # pragma: no cover
        raise RuntimeError(f"unexpected model input shapes {crop.shape}, {tuple(tensor.shape)}")
    return crop, tensor.contiguous()
