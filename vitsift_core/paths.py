"""One place for every path the project uses.

All paths derive from the project root (this checkout) or from two environment settings:

- ``VITSIFT_DATA``: folder holding data sets (``imagenette2-160/`` ...). Default: ``<root>/data``.
- ``VITSIFT_CACHE``: user cache for converted weights, keypoint caches, trained probes.
  Default: ``$XDG_CACHE_HOME/vitsift`` or ``~/.cache/vitsift``.
"""
from __future__ import annotations

import os
from pathlib import Path

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
