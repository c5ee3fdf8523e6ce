"""Image sources: ``resolve_images(spec)`` -> [:class:`ImageRecord`], ``read_record`` -> RGB.

Specs: ``samples`` (photos inside the scikit-image wheel), ``imagenette:val`` / ``imagenette:train``
(Imagenette v2 160 px under ``data_dir()``, i.e. ``VITSIFT_DATA``; fetched and verified with
``python -m vitsift_core.data.sources download-imagenette [--dest DIR]``), or a folder of images.
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
import shutil
import stat
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from vitsift_core.data.images import ImageDecodeError, as_rgb_uint8, file_kind, load_rgb
from vitsift_core.paths import atomic_write, data_dir

# Imagenette's 10 ImageNet-1k classes, wnid -> name.
IMAGENETTE_CLASSES: dict[str, str] = {
    "n01440764": "tench", "n02102040": "English springer", "n02979186": "cassette player",
    "n03000684": "chain saw", "n03028079": "church", "n03394916": "French horn",
    "n03417042": "garbage truck", "n03425413": "gas pump", "n03445777": "golf ball",
    "n03888257": "parachute",
}
IMAGENETTE_DIRNAME = "imagenette2-160"
IMAGENETTE_URL = "https://s3.amazonaws.com/fast-ai-imageclas/imagenette2-160.tgz"
# fast.ai publishes no sha256; this md5 is the one torchvision's `datasets.Imagenette` checks for the
# same URL. The extracted tree is verified by structure too (JPEGs per split, the 10 wnids).
IMAGENETTE_MD5 = "e793b78cc4c9e9a4ccc0c1155377a412"
IMAGENETTE_COUNTS = {"train": 9469, "val": 3925}
DOWNLOAD_COMMAND = "python -m vitsift_core.data.sources download-imagenette"

# extensions treated as images in folders (compared lower-case)
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".pbm"}
)
# image formats vitsift does not decode: listed as skipped with the reason, never silently dropped
UNREAD_IMAGE_EXTENSIONS = frozenset(
    {".heic", ".heif", ".avif", ".jxl", ".svg", ".psd", ".jp2", ".j2k",
     ".dng", ".cr2", ".cr3", ".nef", ".arw", ".orf", ".rw2", ".raf"}
)
_LISTED_EXTENSIONS = IMAGE_EXTENSIONS | UNREAD_IMAGE_EXTENSIONS
# natural photos in the scikit-image wheel that load offline (0.26); synthetic or drawn images, tiny
# crops and those needing a download are left out
SAMPLE_NAMES: tuple[str, ...] = (
    "astronaut", "brick", "camera", "cell", "chelsea", "clock", "coffee", "coins", "grass", "gravel",
    "hubble_deep_field", "immunohistochemistry", "moon", "motorcycle", "page", "retina", "rocket", "text",
)
_ALLOWED_SPECS = "'samples', 'imagenette:val', 'imagenette:train', or a path to an existing folder of images"


@dataclass(frozen=True)
class ImageRecord:
    """One image: ``id`` unique within a spec (path relative to the folder or Imagenette root, or
    ``samples/<name>``); ``path`` None for samples; ``label`` the first-level subfolder (the wnid);
    ``skip`` why an entry found in a folder is listed but never opened (FIFO, broken link, .heic...)."""

    id: str
    path: Path | None
    label: str | None = None
    skip: str | None = None


def resolve_images(spec: str, limit: int | None = None, *, by_class: bool = False) -> list[ImageRecord]:
    """Records for ``spec`` sorted by id; with ``limit``, at most that many round-robin over the
    sorted classes (a prefix of any larger limit; ``by_class``: that order without a limit too, so
    every prefix spans the classes). Files that do not decode are kept (reported later).
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
        return _round_robin(recs, len(recs)) if by_class else recs
    return _round_robin(recs, int(limit))


def _folder_records(folder: Path, id_base: Path) -> list[ImageRecord]:
    """Files with an image name below ``folder`` (recursive, hidden names skipped), sorted by id.

    Linked folders are followed once per real folder (a link loop ends) and each real file is
    analysed once, under its first id. What cannot be an image (FIFO, socket, device, broken or
    looping link, a second name for a file, a format vitsift does not read) is kept with a ``skip``
    reason, so it reaches skipped.csv without ever being opened.
    """
    found, seen_dirs = [], set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real_dir = os.path.realpath(dirpath)
        if real_dir in seen_dirs:  # reached again through a link: a loop or a second name
            dirnames[:] = []
            continue
        seen_dirs.add(real_dir)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in filenames:
            ext = Path(fn).suffix.lower()
            if fn.startswith(".") or ext not in _LISTED_EXTENSIONS:
                continue
            path = Path(dirpath) / fn
            rel_folder = path.relative_to(folder)
            label = rel_folder.parts[0] if len(rel_folder.parts) > 1 else None
            real, skip = _examine(path, os.path.join(real_dir, fn))
            if skip is None and ext in UNREAD_IMAGE_EXTENSIONS:
                skip = f"{path}: {ext} images are not read by vitsift (it reads " \
                       f"{', '.join(sorted(IMAGE_EXTENSIONS))}); convert it to PNG or JPEG"
            found.append((ImageRecord(path.relative_to(id_base).as_posix(), path, label, skip), real))
    found.sort(key=lambda t: t[0].id)
    out, first = [], {}
    for rec, real in found:
        if rec.skip is None and first.setdefault(real, rec.id) != rec.id:
            rec = dataclasses.replace(rec, skip=f"{rec.path}: same file as {first[real]} (analysed once)")
        out.append(rec)
    return out


def _examine(path: Path, real: str) -> tuple[str, str | None]:
    """(real path, None) for a regular file, else (path, why it is skipped); ``real`` is the
    resolved folder joined with the name. Only ``stat``s: nothing here is opened."""
    try:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            real = os.path.realpath(path)
            st = os.stat(path)
    except OSError as e:
        if not os.path.islink(path):
            return str(path), f"{path}: cannot read file ({e.strerror or e})"
        if e.errno == errno.ELOOP:
            return str(path), f"{path}: symbolic link loop"
        return str(path), f"{path}: broken symbolic link (to {os.readlink(path)})"
    if not stat.S_ISREG(st.st_mode):
        return str(path), f"{path}: is {file_kind(st.st_mode)}, not an image file (never opened)"
    return real, None


def _round_robin(recs: list[ImageRecord], limit: int) -> list[ImageRecord]:
    groups: dict[str, list[ImageRecord]] = {}
    for r in recs:  # recs are sorted by id, so each group is sorted too
        groups.setdefault(r.label or "", []).append(r)
    lists = [groups[k] for k in sorted(groups)]
    longest = max((len(g) for g in lists), default=0)
    return [g[i] for i in range(longest) for g in lists if i < len(g)][:limit]


def read_record(rec: ImageRecord) -> np.ndarray:
    """``(H, W, 3) uint8`` RGB for a record; raises ``images.ImageDecodeError`` for bad files and
    for records found with a ``skip`` reason (never opened)."""
    if rec.skip is not None:
        raise ImageDecodeError(rec.skip)
    if rec.path is not None:
        return load_rgb(rec.path)
    if not rec.id.startswith("samples/"):
        raise ValueError(f"record {rec.id!r} has no path and is not a scikit-image sample")
    import skimage.data

    name = rec.id.split("/", 1)[1]
    if name not in SAMPLE_NAMES:
        raise ValueError(f"unknown scikit-image sample {name!r}; available: {', '.join(SAMPLE_NAMES)}")
    if name == "motorcycle":
        return as_rgb_uint8(skimage.data.stereo_motorcycle()[0])  # left view of the stereo pair
    return as_rgb_uint8(getattr(skimage.data, name)())


def _looks_like_imagenette(root: Path) -> bool:
    return all((root / s).is_dir() for s in IMAGENETTE_COUNTS)


def imagenette_root(download: bool = False) -> Path:
    """``data_dir()/imagenette2-160`` if present; else downloaded (``download``) or a
    FileNotFoundError that says what to do."""
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
            while chunk := resp.read(1 << 20):
                f.write(chunk)
                bar.update(len(chunk))


def _safe_members(tar: tarfile.TarFile, top: str) -> list[tarfile.TarInfo]:
    """All members, each checked to be a plain file or folder strictly inside ``top/`` (no absolute
    names, ``..``, links or devices: an archive must not write outside the extraction folder)."""
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


def _verify_tree(root: Path) -> None:
    """train/ and val/, exactly the 10 wnids in each, and IMAGENETTE_COUNTS JPEGs per split."""
    for split, count in IMAGENETTE_COUNTS.items():
        d = root / split
        if not d.is_dir():
            raise ValueError(f"archive has no {IMAGENETTE_DIRNAME}/{split}/ folder")
        wnids = sorted(p.name for p in d.iterdir() if p.is_dir())
        if wnids != sorted(IMAGENETTE_CLASSES):
            raise ValueError(f"{split}/ has class folders {wnids}, expected the 10 Imagenette wnids")
        n = sum(1 for p in d.rglob("*") if p.suffix.upper() == ".JPEG")
        if n != count:
            raise ValueError(f"{split}/ has {n} JPEGs, expected {count}")


def download_imagenette(dest: str | Path | None = None, *, progress: bool = True) -> Path:
    """Download Imagenette v2 (160 px) into ``dest`` (default ``data_dir()``) -> ``dest/imagenette2-160``.

    An existing valid copy is returned untouched. The archive's md5 is checked, it is extracted into
    a temporary folder with path checks, its structure verified, and only then moved into place.
    """
    dest = Path(dest) if dest is not None else data_dir()
    target = dest / IMAGENETTE_DIRNAME
    if _looks_like_imagenette(target):
        return target
    dest.mkdir(parents=True, exist_ok=True)
    archive = dest / f"{IMAGENETTE_DIRNAME}.tgz"
    if not archive.exists():
        atomic_write(archive, lambda p: _fetch(IMAGENETTE_URL, p, progress))
    with open(archive, "rb") as f:
        got = hashlib.file_digest(f, "md5").hexdigest()
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
        _verify_tree(tmp / IMAGENETTE_DIRNAME)
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
    print(download_imagenette(ap.parse_args(argv).dest))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
