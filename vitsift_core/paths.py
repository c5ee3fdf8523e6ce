"""One place for every path the project uses, and the one atomic file write.

All paths derive from the project root (this checkout) or from two environment settings:

- ``VITSIFT_DATA``: folder holding data sets (``imagenette2-160/`` ...). Default: ``<root>/data``.
- ``VITSIFT_CACHE``: user cache for converted weights, keypoint caches, trained probes.
  Default: ``$XDG_CACHE_HOME/vitsift`` or ``~/.cache/vitsift``.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent


def data_dir() -> Path:
    return Path(os.environ.get("VITSIFT_DATA", ROOT / "data")).expanduser()


def cache_dir() -> Path:
    env = os.environ.get("VITSIFT_CACHE")
    if env:
        p = Path(env).expanduser()
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        p = base / "vitsift"
    p.mkdir(parents=True, exist_ok=True)
    return p


def results_dir() -> Path:
    return Path(os.environ.get("VITSIFT_RESULTS", ROOT / "results"))


def reports_dir() -> Path:
    return Path(os.environ.get("VITSIFT_REPORTS", ROOT / "reports"))


def tmp_path(path: str | Path) -> Path:
    """The temporary name beside ``path`` that :func:`atomic_write` writes first (one per thread)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp{os.getpid()}-{threading.get_ident()}")


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, then move it in place (``os.replace``):
    a reader sees the old file or the whole new one, never a half-written one. ``write`` must open
    the path it is given as is (``np.save`` appends ``.npy`` to a name: give it an open file)."""
    path = Path(path)
    tmp = tmp_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.is_file():
            tmp.unlink()
