"""images.load_rgb (every awkward input becomes RGB or a clear ImageDecodeError) and
images.model_input (the crop is exactly what timm's eval transform feeds the model)."""
from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import DECODABLE, UNDECODABLE
from vitsift_core.data.images import ImageDecodeError, as_rgb_uint8, eval_transforms, load_rgb, model_input

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EMBEDDED_LIKE = {"input_size": (3, 224, 224), "interpolation": "bicubic", "crop_pct": 1.0,
                 "crop_mode": "center", "mean": IMAGENET_MEAN, "std": IMAGENET_STD}


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _rand_rgb(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# --------------------------------------------------------------------------------------------------
# load_rgb on the shared fixture
# --------------------------------------------------------------------------------------------------

def test_fixture_decodable_files_give_rgb_uint8(bad_images_dir):
    for name in DECODABLE:
        a = load_rgb(bad_images_dir / name)
        assert a.ndim == 3 and a.shape[2] == 3 and a.dtype == np.uint8, name
        assert a.flags["C_CONTIGUOUS"], name
    assert load_rgb(bad_images_dir / "tiny_20x20.png").shape == (20, 20, 3)


@pytest.mark.parametrize("name, words", [
    ("empty.jpg", "empty file"),
    ("not_an_image.jpg", "not a recognised image"),
    ("truncated.jpg", "truncated"),
])
def test_fixture_bad_files_raise_with_reason(bad_images_dir, name, words):
    assert name in UNDECODABLE
    with pytest.raises(ImageDecodeError, match=words) as ei:
        load_rgb(bad_images_dir / name)
    assert name in str(ei.value)  # the message names the file
    assert isinstance(ei.value, ValueError)


def test_missing_file_and_directory_raise_decode_error(tmp_path):
    with pytest.raises(ImageDecodeError, match="not found"):
        load_rgb(tmp_path / "nope.jpg")
    with pytest.raises(ImageDecodeError, match="directory"):
        load_rgb(tmp_path)
    with pytest.raises(ImageDecodeError, match="empty"):
        load_rgb(b"")


@pytest.mark.timeout(60)
def test_special_files_are_refused_without_blocking(tmp_path):
    """Issue 15 case 2: load_rgb on a FIFO (reading would wait for a writer for ever) or a device."""
    import os

    os.mkfifo(tmp_path / "y.png")
    with pytest.raises(ImageDecodeError, match="FIFO"):
        load_rgb(tmp_path / "y.png")
    with pytest.raises(ImageDecodeError, match="character device"):
        load_rgb("/dev/zero")                                   # would read for ever as well


def test_16bit_gray_is_scaled_not_clipped(bad_images_dir):
    a = load_rgb(bad_images_dir / "gray16.png")
    ramp = np.linspace(0, 65535, 64).round()
    expect = np.rint(ramp / 257).astype(np.uint8)
    assert np.array_equal(a[0, :, 0], expect)
    assert a[..., 0].min() == 0 and a[..., 0].max() == 255
    assert (a[..., 0] == 255).mean() < 0.05  # clipping would turn almost everything white
    assert np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 0], a[..., 2])


def test_16bit_rgb_png_is_scaled():
    v = np.array([0, 257 * 128, 65535, 257 * 7], np.uint16)
    img = np.tile(v, (4, 1))
    bgr16 = np.stack([img, img, img], axis=-1)
    ok, enc = cv2.imencode(".png", bgr16)
    assert ok
    a = load_rgb(enc.tobytes())
    assert a.dtype == np.uint8
    assert a[0, :, 0].tolist() == [0, 128, 255, 7]


def test_32bit_int_and_float_gray():
    i32 = Image.fromarray(np.array([[0, 257 * 100, 65535]], np.int32), mode="I")
    assert load_rgb(_encode(i32, "TIFF"))[0, :, 0].tolist() == [0, 100, 255]
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32), mode="F")
    assert load_rgb(_encode(f, "TIFF"))[0, :, 0].tolist() == [0, 128, 255]


def test_rgba_composited_over_white(bad_images_dir):
    a = load_rgb(bad_images_dir / "rgba.png")
    assert (a[:, :32] == (255, 0, 0)).all()
    assert (a[:, 32:] == (255, 255, 255)).all()  # transparent blue must not show
    half = np.zeros((2, 2, 4), np.uint8)
    half[...] = (255, 0, 0, 128)  # 50 % red over white
    b = load_rgb(_encode(Image.fromarray(half, "RGBA"), "PNG"))
    assert b[0, 0].tolist() == [255, 127, 127]


def test_gray_alpha_and_palette_transparency():
    la = np.zeros((2, 2, 2), np.uint8)
    la[..., 0] = 0
    la[..., 1] = 0  # black, fully transparent -> white
    assert (load_rgb(_encode(Image.fromarray(la, "LA"), "PNG")) == 255).all()
    p = Image.new("P", (4, 4), 0)
    p.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    p.putpixel((0, 0), 1)
    a = load_rgb(_encode(p, "PNG", transparency=0))
    assert a[0, 0].tolist() == [10, 20, 30] and (a[1:] == 255).all()


def test_palette_gray_cmyk_match_source_photo(bad_images_dir):
    from conftest import _photo

    ref = np.asarray(_photo("chelsea", (96, 64)), np.float64)
    for name, tol in [("palette.png", 12), ("cmyk.jpg", 8)]:
        a = load_rgb(bad_images_dir / name).astype(np.float64)
        assert np.abs(a - ref).mean() < tol, name
    g = load_rgb(bad_images_dir / "gray.jpg")
    assert np.array_equal(g[..., 0], g[..., 1]) and np.array_equal(g[..., 1], g[..., 2])


def test_cmyk_without_profile_uses_pillow_conversion():
    cmyk = Image.fromarray(np.array([[[0, 0, 0, 0], [255, 0, 0, 0], [0, 0, 0, 255]]], np.uint8), "CMYK")
    a = load_rgb(_encode(cmyk, "TIFF"))
    assert a[0, 0].tolist() == [255, 255, 255]  # no ink = white
    assert a[0, 1].tolist() == [0, 255, 255]    # full cyan
    assert a[0, 2].tolist() == [0, 0, 0]        # full black


def test_bilevel_and_lossless_formats_roundtrip():
    rgb = _rand_rgb(9, 13)
    for fmt, kw in [("PNG", {}), ("BMP", {}), ("TIFF", {}), ("WEBP", {"lossless": True})]:
        assert np.array_equal(load_rgb(_encode(Image.fromarray(rgb), fmt, **kw)), rgb), fmt
    bw = Image.fromarray(np.array([[0, 255]], np.uint8)).convert("1")
    assert load_rgb(_encode(bw, "PNG")).tolist() == [[[0, 0, 0], [255, 255, 255]]]


def test_exif_orientation_applied(tmp_path):
    # Stored 40 wide x 20 high, red block top-left; orientation 6 = "rotate 90 CW to display".
    a = np.zeros((20, 40, 3), np.uint8)
    a[:8, :8] = (255, 0, 0)
    img = Image.fromarray(a)
    exif = img.getexif()
    exif[0x0112] = 6
    p = tmp_path / "rot.jpg"
    img.save(p, quality=95, exif=exif.tobytes())
    out = load_rgb(p)
    assert out.shape == (40, 20, 3)
    assert out[2, -3, 0] > 200 and out[2, 2, 0] < 60  # block moved to the top-right corner


def test_path_str_and_bytes_agree(bad_images_dir):
    p = bad_images_dir / "photo_coffee.jpg"
    assert np.array_equal(load_rgb(p), load_rgb(str(p)))
    assert np.array_equal(load_rgb(p), load_rgb(p.read_bytes()))


def test_as_rgb_uint8():
    g = np.arange(6, dtype=np.uint8).reshape(2, 3)
    assert as_rgb_uint8(g).shape == (2, 3, 3)
    assert as_rgb_uint8(np.array([[True, False]])).tolist() == [[[255] * 3, [0] * 3]]
    assert as_rgb_uint8(np.array([[0.0, 1.0]]))[0, :, 0].tolist() == [0, 255]
    rgba = np.array([[[0, 0, 0, 0]]], np.uint8)
    assert as_rgb_uint8(rgba).tolist() == [[[255, 255, 255]]]
    with pytest.raises(ValueError):
        as_rgb_uint8(np.zeros((2, 2, 5), np.uint8))


# --------------------------------------------------------------------------------------------------
# model_input == timm's eval transform
# --------------------------------------------------------------------------------------------------

def _test_vit_config():
    import timm

    m = timm.create_model("test_vit", pretrained=False)
    return timm.data.resolve_data_config({}, model=m)


CONFIGS = {
    "embedded_like": EMBEDDED_LIKE,
    "crop_0.875_bilinear": {"input_size": (3, 64, 64), "interpolation": "bilinear", "crop_pct": 0.875,
                            "crop_mode": "center", "mean": IMAGENET_MEAN, "std": IMAGENET_STD},
    "squash": {"input_size": (3, 48, 48), "interpolation": "bicubic", "crop_pct": 0.9,
               "crop_mode": "squash", "mean": (0.5,) * 3, "std": (0.5,) * 3},
    "border": {"input_size": (3, 48, 48), "interpolation": "bicubic", "crop_pct": 0.9,
               "crop_mode": "border", "mean": (0.5,) * 3, "std": (0.5,) * 3},
}
SIZES = [(160, 160), (120, 213), (301, 97), (20, 20), (224, 224), (333, 500)]


@pytest.mark.parametrize("cfg_name", ["test_vit", *CONFIGS])
def test_model_input_matches_timm(cfg_name):
    import timm.data

    cfg = _test_vit_config() if cfg_name == "test_vit" else CONFIGS[cfg_name]
    full = timm.data.create_transform(**cfg, is_training=False)
    _, s_h, s_w = cfg["input_size"]
    mean = torch.tensor(cfg["mean"]).view(3, 1, 1)
    std = torch.tensor(cfg["std"]).view(3, 1, 1)
    for i, (h, w) in enumerate(SIZES):
        rgb = _rand_rgb(h, w, seed=i)
        rgb[: h // 2] //= 2  # some structure so resampling differences would show
        crop, tensor = model_input(rgb, cfg)
        assert crop.shape == (s_h, s_w, 3) and crop.dtype == np.uint8
        assert tensor.shape == (3, s_h, s_w) and tensor.dtype == torch.float32
        ref = full(Image.fromarray(rgb))
        assert (tensor - ref).abs().max().item() < 1e-6, (cfg_name, h, w)
        assert torch.equal(tensor, ref), (cfg_name, h, w)  # in fact bit-identical
        # the crop is exactly the pixels behind the tensor
        from_crop = (torch.from_numpy(crop).permute(2, 0, 1).float() / 255.0 - mean) / std
        assert (from_crop - tensor).abs().max().item() < 1e-6, (cfg_name, h, w)


def test_model_input_crop_is_centre_of_resized_image():
    # Independent check of the embedded reading (DESIGN sec. 2): short side -> 224, centre crop.
    rgb = _rand_rgb(160, 240, seed=3)
    crop, _ = model_input(rgb, EMBEDDED_LIKE)
    resized = Image.fromarray(rgb).resize((336, 224), Image.BICUBIC)
    expect = np.asarray(resized)[:, 56:280]
    assert np.abs(crop.astype(int) - expect.astype(int)).max() <= 1


def test_eval_transforms_split_and_cache():
    pre, post = eval_transforms(EMBEDDED_LIKE)
    pre2, _ = eval_transforms(dict(EMBEDDED_LIKE, mean=list(IMAGENET_MEAN)))
    assert pre is pre2  # lists vs tuples give the same cached transform
    assert "ToTensor" in repr(post) and "Normalize" in repr(post)


def test_model_input_rejects_non_rgb():
    with pytest.raises(ValueError):
        model_input(np.zeros((10, 10), np.uint8), EMBEDDED_LIKE)
    with pytest.raises(ValueError):
        model_input(np.zeros((10, 10, 3), np.float32), EMBEDDED_LIKE)
