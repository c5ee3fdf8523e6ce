"""Shared test fixtures.

``bad_images_dir``: a folder with one file per awkward case, for decoding, pipeline and CLI tests.
What each file is and whether it must decode (see also the ``bad_images_manifest`` fixture):

=====================  =========  ==================================================================
file                   decodes?   content
=====================  =========  ==================================================================
truncated.jpg          NO         a valid 120x96 JPEG cut to half its bytes
empty.jpg              NO         zero bytes
not_an_image.jpg       NO         a text file with a .jpg name
gray16.png             yes        16-bit grayscale PNG (mode I;16), horizontal ramp 0..65535, 64x48
rgba.png               yes        RGBA PNG, 64x48, left half opaque red, right half fully transparent
cmyk.jpg               yes        CMYK JPEG (photo), 96x64, no ICC profile
palette.png            yes        palette (mode P) PNG (photo, 64 colours), 96x64
gray.jpg               yes        grayscale (mode L) JPEG (photo), 96x64
tiny_20x20.png         yes        20x20 RGB noise (upsampled by the model transform)
black.png              yes        all-black RGB 64x64 (SIFT finds 0 keypoints)
photo_astronaut.jpg    yes        scikit-image astronaut, 160x160 RGB JPEG
photo_coffee.jpg       yes        scikit-image coffee, 160x107 RGB JPEG (landscape)
notes.txt              ignored    not an image extension: folder specs must skip it
=====================  =========  ==================================================================

So a folder spec over it resolves to 12 records: 9 decodable, 3 that must be reported as skipped.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

DECODABLE = (
    "black.png",
    "cmyk.jpg",
    "gray.jpg",
    "gray16.png",
    "palette.png",
    "photo_astronaut.jpg",
    "photo_coffee.jpg",
    "rgba.png",
    "tiny_20x20.png",
)
UNDECODABLE = ("empty.jpg", "not_an_image.jpg", "truncated.jpg")
IGNORED = ("notes.txt",)

# Tests read data from VITSIFT_DATA when set, else the shared copy on the dev machines.
DATASETS = Path(os.environ.get("VITSIFT_DATA") or "/work/shared/datasets")


def _photo(name: str, size: tuple[int, int]) -> Image.Image:
    import skimage.data

    return Image.fromarray(getattr(skimage.data, name)()).convert("RGB").resize(size, Image.BICUBIC)


def write_bad_images(d: Path) -> Path:
    """Write the files listed in the module docstring into ``d`` (created if needed); return ``d``."""
    d.mkdir(parents=True, exist_ok=True)
    photo = _photo("chelsea", (96, 64))

    buf = io.BytesIO()
    _photo("chelsea", (120, 96)).save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    (d / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (d / "empty.jpg").write_bytes(b"")
    (d / "not_an_image.jpg").write_text("this is not a JPEG, just text with the wrong name\n")

    ramp = np.tile(np.linspace(0, 65535, 64).round().astype(np.uint16), (48, 1))
    Image.fromarray(ramp).save(d / "gray16.png")  # Pillow writes I;16 as a 16-bit PNG

    rgba = np.zeros((48, 64, 4), np.uint8)
    rgba[:, :32] = (255, 0, 0, 255)
    rgba[:, 32:] = (0, 0, 255, 0)  # colour under zero alpha must not show
    Image.fromarray(rgba, "RGBA").save(d / "rgba.png")

    photo.convert("CMYK").save(d / "cmyk.jpg", quality=95)
    photo.convert("P", palette=Image.ADAPTIVE, colors=64).save(d / "palette.png")
    photo.convert("L").save(d / "gray.jpg", quality=95)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(d / "tiny_20x20.png")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(d / "black.png")
    _photo("astronaut", (160, 160)).save(d / "photo_astronaut.jpg", quality=90)
    _photo("coffee", (160, 107)).save(d / "photo_coffee.jpg", quality=90)
    (d / "notes.txt").write_text("not an image; folder specs ignore this file\n")
    return d


# hostile folder (issue 15): name -> why it must be listed in skipped.csv (a word of the reason);
# a.png and b.jpg are the only real images, x.jpg/ is a folder and loop -> . a symlink loop
HOSTILE_SKIPPED = {"broken.jpg": "broken symbolic link", "photo.heic": ".heic", "s.webp": "socket",
                   "same.png": "same file as a.png", "self.png": "symbolic link loop", "y.png": "FIFO"}


def write_hostile_images(d: Path) -> Path:
    """Two real images among a FIFO, a UNIX socket, a symlink loop, a broken link, a self-looping
    link, a link to a real image, a folder named x.jpg and a .heic file; return ``d``."""
    import socket

    d.mkdir(parents=True, exist_ok=True)
    _photo("astronaut", (64, 48)).save(d / "a.png")
    _photo("coffee", (64, 48)).save(d / "b.jpg", quality=90)
    os.mkfifo(d / "y.png")
    cwd = os.getcwd()
    try:  # bind by a relative name: AF_UNIX paths are limited to ~100 characters
        os.chdir(d)
        with socket.socket(socket.AF_UNIX) as s:
            s.bind("s.webp")
    finally:
        os.chdir(cwd)
    (d / "loop").symlink_to(".")
    (d / "broken.jpg").symlink_to("missing.jpg")
    (d / "self.png").symlink_to("self.png")
    (d / "same.png").symlink_to("a.png")
    (d / "x.jpg").mkdir()
    (d / "photo.heic").write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(64))
    return d


@pytest.fixture
def bad_images_dir(tmp_path: Path) -> Path:
    """Folder of awkward image files (table in this module's docstring)."""
    return write_bad_images(tmp_path / "bad_images")


@pytest.fixture
def bad_images_manifest() -> dict[str, tuple[str, ...]]:
    """``{'decodable': names, 'undecodable': names, 'ignored': names}`` for ``bad_images_dir``."""
    return {"decodable": DECODABLE, "undecodable": UNDECODABLE, "ignored": IGNORED}


@pytest.fixture
def vitsift_data(monkeypatch) -> Path:
    """Point VITSIFT_DATA at the shared Imagenette copy, or skip when it is not on this machine."""
    if not (DATASETS / "imagenette2-160" / "val").is_dir():
        pytest.skip(f"Imagenette copy not found at {DATASETS}/imagenette2-160 (set up VITSIFT_DATA)")
    monkeypatch.setenv("VITSIFT_DATA", str(DATASETS))
    return DATASETS


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory):
    """Every test runs with VITSIFT_CACHE in a temporary folder, so the suite never reads or writes
    the user's cache (converted weights, keypoints, probes); tests that need a cache of their own
    set it again. The embedded weights are converted once per session here."""
    mp = pytest.MonkeyPatch()
    mp.setenv("VITSIFT_CACHE", str(tmp_path_factory.mktemp("vitsift-cache")))
    yield
    mp.undo()


@pytest.fixture
def kp_cache_dir(tmp_path: Path, monkeypatch) -> Path:
    """Isolated VITSIFT_CACHE so tests never touch the user's cache."""
    d = tmp_path / "cache"
    monkeypatch.setenv("VITSIFT_CACHE", str(d))
    return d


# --------------------------------------------------------------------------- tiny models
def sharp_test_vit(reg_tokens: int = 0, seed: int = 0):
    """timm's tiny ``test_vit`` (6 layers x 2 heads, 10x10 patches), seeded, qkv scaled by 4:
    random init gives near-uniform attention, and sharper maps keep the checks non-trivial."""
    import timm
    import torch

    torch.manual_seed(seed)
    m = timm.create_model("test_vit", reg_tokens=reg_tokens, pretrained=False).eval()
    with torch.no_grad():
        for blk in m.blocks:
            blk.attn.qkv.weight.mul_(4.0)
    return m


class _RunsCode:
    """Pickles as ``os.system("touch MARKER")``: loading it with plain pickle runs the command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import shlex
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def write_malicious_checkpoint(path: Path, marker: Path, **plain) -> Path:
    """A torch checkpoint holding ``plain`` items and, under "model", an object whose unpickling
    creates ``marker`` (the hostile file of issue 15, case 1)."""
    import torch

    torch.save({**plain, "model": _RunsCode(marker)}, path)
    return path


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """``test_vit@<file>``: :func:`sharp_test_vit` written as safetensors, loaded by spec."""
    from safetensors.torch import save_file

    p = tmp_path_factory.mktemp("ckpt") / "test_vit.safetensors"
    save_file(sharp_test_vit().state_dict(), str(p))
    return f"test_vit@{p}"


@pytest.fixture
def one_torch_thread():
    """Tiny models: one thread is fastest, and immune to OpenMP spinning when the cores are shared."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
