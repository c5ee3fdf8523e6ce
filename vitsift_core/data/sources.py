"""Image sources: scikit-image's bundled photos, Imagenette, any image folder.

``resolve_images(spec)`` turns a short spec into a list of :class:`ImageRecord`; ``read_record``
decodes one to ``(H, W, 3) uint8`` RGB. Specs:

- ``samples``: natural photos shipped inside the scikit-image wheel (no download needed).
- ``imagenette:val`` / ``imagenette:train``: Imagenette v2 (160 px) under
  ``data_dir()/imagenette2-160`` (``VITSIFT_DATA``), downloadable with
  ``python -m vitsift_core.data.sources download-imagenette``.
- a folder path: every file with an image extension below it, recursively.

Run as a script for the download: ``python -m vitsift_core.data.sources download-imagenette [--dest DIR]``.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from vitsift_core.data.images import as_rgb_uint8, load_rgb
from vitsift_core.paths import atomic_write, data_dir

__all__ = [
    "ImageRecord",
    "resolve_images",
    "read_record",
    "imagenette_root",
    "download_imagenette",
    "IMAGENETTE_CLASSES",
    "IMAGENETTE_URL",
    "SAMPLE_NAMES",
    "IMAGE_EXTENSIONS",
]

#: Imagenette's 10 ImageNet-1k classes, wnid -> name.
IMAGENETTE_CLASSES: dict[str, str] = {
    "n01440764": "tench",
    "n02102040": "English springer",
    "n02979186": "cassette player",
    "n03000684": "chain saw",
    "n03028079": "church",
    "n03394916": "French horn",
    "n03417042": "garbage truck",
    "n03425413": "gas pump",
    "n03445777": "golf ball",
    "n03888257": "parachute",
}

IMAGENETTE_DIRNAME = "imagenette2-160"
IMAGENETTE_URL = "https://s3.amazonaws.com/fast-ai-imageclas/imagenette2-160.tgz"
# fast.ai publishes no sha256 for this archive. The md5 below is the one torchvision's
# `datasets.Imagenette` checks for the same URL (an independent, widely used record); on top of it
# the extracted tree is verified by structure (image counts per split and the 10 wnids), which is
# what actually matters for the study.
IMAGENETTE_MD5 = "e793b78cc4c9e9a4ccc0c1155377a412"
#: Expected number of JPEGs per split of Imagenette v2 (13,394 in all).
IMAGENETTE_COUNTS = {"train": 9469, "val": 3925}
DOWNLOAD_COMMAND = "python -m vitsift_core.data.sources download-imagenette"

#: Extensions treated as images in folders (compared lower-case).
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".pbm"}
)

#: Natural photos bundled in the scikit-image wheel, readable offline (checked against scikit-image
#: 0.26: these load without pooch). Left out on purpose: synthetic or drawn images (binary_blobs,
#: checkerboard, colorwheel, horse silhouette, logo, shepp_logan_phantom), the 25x25 lfw faces, the
#: 102x102 microaneurysms crop, and everything that needs a download (brain, cells3d, kidney, ...).
SAMPLE_NAMES: tuple[str, ...] = (
    "astronaut",
    "brick",
    "camera",
    "cell",
    "chelsea",
    "clock",
    "coffee",
    "coins",
    "grass",
    "gravel",
    "hubble_deep_field",
    "immunohistochemistry",
    "moon",
    "motorcycle",
    "page",
    "retina",
    "rocket",
    "text",
)

_ALLOWED_SPECS = "'samples', 'imagenette:val', 'imagenette:train', or a path to an existing folder of images"


@dataclass(frozen=True)
class ImageRecord:
    """One image. ``id`` is stable and unique within a spec: the path relative to the folder (or to
    the Imagenette root, e.g. ``val/n01440764/ILSVRC2012_val_00000293.JPEG``) or ``samples/<name>``.
    ``path`` is None for in-memory samples. ``label``: the wnid for Imagenette, the first-level
    subfolder for folders (None for files directly in it), None for samples."""

    id: str
    path: Path | None
    label: str | None = None


# --------------------------------------------------------------------------------------------------
# resolving specs
# --------------------------------------------------------------------------------------------------

def resolve_images(spec: str, limit: int | None = None) -> list[ImageRecord]:
    """Records for ``spec`` (see module doc), in a deterministic order.

    ``limit``: take at most that many, round-robin over the classes (label groups) in sorted order,
    so a small subset spans all classes; ``resolve_images(s, n)`` is a prefix of
    ``resolve_images(s, m)`` for ``n < m``. Without ``limit`` the order is sorted by id.

    Files with an image extension that do not decode are *kept*: the pipeline reports them.
    """
    if limit is not None and int(limit) < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    spec = str(spec).strip()
    if spec == "samples":
        recs = [ImageRecord(f"samples/{n}", None, None) for n in SAMPLE_NAMES]
    elif spec.startswith("imagenette"):
        split = spec.partition(":")[2]
        if split not in IMAGENETTE_COUNTS:
            raise ValueError(f"unknown image spec {spec!r}: use {_ALLOWED_SPECS}")
        root = imagenette_root()
        recs = _folder_records(root / split, id_base=root)
    else:
        p = Path(spec).expanduser()
        if not p.is_dir():
            why = "is a file, not a folder" if p.exists() else "does not exist"
            raise ValueError(f"unknown image spec {spec!r} ({p} {why}): use {_ALLOWED_SPECS}")
        recs = _folder_records(p, id_base=p)
    if limit is None:
        return recs
    return _round_robin(recs, int(limit))


def _folder_records(folder: Path, id_base: Path) -> list[ImageRecord]:
    """Image files below ``folder`` (recursive, hidden files and folders skipped), sorted by id."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in filenames:
            if fn.startswith(".") or Path(fn).suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            path = Path(dirpath) / fn
            rel_folder = path.relative_to(folder)
            label = rel_folder.parts[0] if len(rel_folder.parts) > 1 else None
            out.append(ImageRecord(path.relative_to(id_base).as_posix(), path, label))
    out.sort(key=lambda r: r.id)
    return out


def _round_robin(recs: list[ImageRecord], limit: int) -> list[ImageRecord]:
    groups: dict[str, list[ImageRecord]] = {}
    for r in recs:  # recs are sorted by id, so each group is sorted too
        groups.setdefault(r.label or "", []).append(r)
    lists = [groups[k] for k in sorted(groups)]
    out: list[ImageRecord] = []
    i = 0
    while len(out) < limit and any(i < len(g) for g in lists):
        for g in lists:
            if i < len(g) and len(out) < limit:
                out.append(g[i])
        i += 1
    return out


def read_record(rec: ImageRecord) -> np.ndarray:
    """``(H, W, 3) uint8`` RGB for a record; raises ``images.ImageDecodeError`` for bad files."""
    if rec.path is None:
        if rec.id.startswith("samples/"):
            return _load_sample(rec.id.split("/", 1)[1])
        raise ValueError(f"record {rec.id!r} has no path and is not a scikit-image sample")
    return load_rgb(rec.path)


def _load_sample(name: str) -> np.ndarray:
    import skimage.data

    if name not in SAMPLE_NAMES:
        raise ValueError(f"unknown scikit-image sample {name!r}; available: {', '.join(SAMPLE_NAMES)}")
    if name == "motorcycle":
        arr = skimage.data.stereo_motorcycle()[0]  # left view of the stereo pair
    else:
        arr = getattr(skimage.data, name)()
    return as_rgb_uint8(arr)


# --------------------------------------------------------------------------------------------------
# Imagenette
# --------------------------------------------------------------------------------------------------

def _looks_like_imagenette(root: Path) -> bool:
    return all((root / s).is_dir() for s in IMAGENETTE_COUNTS)


def imagenette_root(download: bool = False) -> Path:
    """``data_dir()/imagenette2-160`` if present (``VITSIFT_DATA`` points at its parent); with
    ``download=True`` it is fetched when absent, otherwise a FileNotFoundError explains what to do."""
    base = data_dir()
    root = base / IMAGENETTE_DIRNAME
    if _looks_like_imagenette(root):
        return root
    if download:
        return download_imagenette(base)
    raise FileNotFoundError(
        f"Imagenette not found: looked for {root} (with train/ and val/ inside). Set VITSIFT_DATA "
        f"to the folder that contains {IMAGENETTE_DIRNAME}/ (currently "
        f"{os.environ.get('VITSIFT_DATA', '<unset>, default ' + str(base))}), or download it "
        f"(~94 MB) with: {DOWNLOAD_COMMAND}"
    )


def _fetch(url: str, dest: Path, progress: bool = True) -> None:
    """Stream ``url`` to ``dest`` with a tqdm progress bar (replaced in tests: no network there)."""
    import urllib.request

    from tqdm.auto import tqdm

    req = urllib.request.Request(url, headers={"User-Agent": "vitsift"})
    with urllib.request.urlopen(req, timeout=60) as resp, open(dest, "wb") as f:
        total = int(resp.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                  desc=Path(url).name, disable=not progress) as bar:
            while True:
                chunk = resp.read(1 << 20)
                if not chunk:
                    break
                f.write(chunk)
                bar.update(len(chunk))


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _safe_members(tar: tarfile.TarFile, top: str) -> list[tarfile.TarInfo]:
    """All members, after checking that each is a plain file or folder strictly inside ``top/``.

    Rejects absolute names, ``..`` components, links and device files: a hostile or damaged archive
    must not write outside the extraction folder.
    """
    members = tar.getmembers()
    for m in members:
        name = m.name
        pp = PurePosixPath(name)
        if name.startswith(("/", "\\")) or pp.is_absolute() or ".." in pp.parts or "\\" in name \
                or (len(name) > 1 and name[1] == ":"):
            raise ValueError(f"unsafe path in archive: {name!r}")
        if not (m.isfile() or m.isdir()):
            raise ValueError(f"unexpected member type in archive (link or device): {name!r}")
        if pp.parts[:1] != (top,) and str(pp) not in (top, "."):
            raise ValueError(f"archive member outside {top}/: {name!r}")
    return members


def _verify_tree(root: Path, counts: dict[str, int] | None) -> None:
    """Imagenette structure: train/ and val/, exactly the 10 wnids in each, and the expected number
    of JPEGs per split (``counts``; None skips the count check)."""
    for split in IMAGENETTE_COUNTS:
        d = root / split
        if not d.is_dir():
            raise ValueError(f"archive has no {IMAGENETTE_DIRNAME}/{split}/ folder")
        wnids = sorted(p.name for p in d.iterdir() if p.is_dir())
        if wnids != sorted(IMAGENETTE_CLASSES):
            raise ValueError(f"{split}/ has class folders {wnids}, expected the 10 Imagenette wnids")
        if counts is not None:
            n = sum(1 for p in d.rglob("*") if p.suffix.upper() == ".JPEG")
            if n != counts[split]:
                raise ValueError(f"{split}/ has {n} JPEGs, expected {counts[split]}")


def download_imagenette(dest: str | Path | None = None, *, progress: bool = True) -> Path:
    """Download, verify and extract Imagenette v2 (160 px) into ``dest`` (default ``data_dir()``).

    Returns ``dest/imagenette2-160``. An existing valid copy is returned untouched. The archive
    (:data:`IMAGENETTE_URL`) is streamed to ``dest``, its md5 checked against
    :data:`IMAGENETTE_MD5`, extracted into a temporary folder beside the target with path checks (no
    traversal, no links), its structure verified (:data:`IMAGENETTE_COUNTS`, the 10 wnids), and only
    then moved into place, so an interrupted run never leaves a half tree that looks valid.
    """
    dest = Path(dest) if dest is not None else data_dir()
    target = dest / IMAGENETTE_DIRNAME
    if _looks_like_imagenette(target):
        return target
    dest.mkdir(parents=True, exist_ok=True)
    archive = dest / f"{IMAGENETTE_DIRNAME}.tgz"
    if not archive.exists():
        atomic_write(archive, lambda p: _fetch(IMAGENETTE_URL, p, progress))
    if IMAGENETTE_MD5 is not None:
        got = _md5(archive)
        if got != IMAGENETTE_MD5:
            bad = archive.with_name(archive.name + ".bad")
            os.replace(archive, bad)  # keep it for inspection, but never reuse it
            raise ValueError(f"{archive}: md5 {got} != expected {IMAGENETTE_MD5} (moved to {bad})")
    tmp = Path(tempfile.mkdtemp(prefix=".imagenette-", dir=dest))
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = _safe_members(tar, IMAGENETTE_DIRNAME)
            kw = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(tmp, members=members, **kw)
        _verify_tree(tmp / IMAGENETTE_DIRNAME, IMAGENETTE_COUNTS)
        if target.exists():  # an invalid leftover (checked above): replace it
            shutil.rmtree(target)
        os.replace(tmp / IMAGENETTE_DIRNAME, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m vitsift_core.data.sources")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("download-imagenette", help=f"download {IMAGENETTE_URL}")
    d.add_argument("--dest", type=Path, default=None, help="parent folder (default: VITSIFT_DATA)")
    args = ap.parse_args(argv)
    if args.cmd == "download-imagenette":
        print(download_imagenette(args.dest))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
