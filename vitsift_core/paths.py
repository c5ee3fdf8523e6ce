"""Every path the project uses (from the checkout or VITSIFT_DATA / _CACHE / _RESULTS / _REPORTS), and
the one atomic file write.
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
    xdg = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    env = os.environ.get("VITSIFT_CACHE")
    p = Path(env).expanduser() if env else xdg / "vitsift"
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
    """``write(tmp)`` beside ``path``, then ``os.replace``: readers never see a half-written file.
    ``write`` must use the path as is (give ``np.save`` an open file)."""
    path = Path(path)
    tmp = tmp_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.is_file():
            tmp.unlink()
