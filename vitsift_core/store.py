"""The run store: parameter sets with an identity and a key, resumable run folders, atomic writes,
and the torchrun helper every experiment uses.

A run folder holds ``params.json`` (identity, key, runtime, versions), ``parts/`` (finished chunks,
each written whole) and ``run.json`` (the complete flag); README "Run folders" lists each
experiment's files.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Callable, ClassVar

import numpy as np
import torch
import torch.distributed as dist

from vitsift_core import __version__
from vitsift_core.paths import atomic_write, tmp_path  # noqa: F401 (the store's writers; tmp_path for callers)

DEFAULT_CHUNK = 64      # images per resumable chunk; part of a run's identity ("chunk")


class RunMismatch(RuntimeError):
    """The output folder holds a run made with other parameters."""


# ------------------------------------------------------------------------------ atomic writes
def write_json(path: str | Path, obj) -> None:
    """``obj`` as indented JSON (``default=str``), atomically."""
    atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=2, default=str)))


def write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text))


def savez(path: str | Path, **arrays) -> None:
    """``np.savez`` atomically (the file name is kept as given: no ``.npz`` appended)."""
    def write(p: Path) -> None:
        with open(p, "wb") as f:
            np.savez(f, **arrays)
    atomic_write(path, write)


def read_json(path: str | Path):
    return json.loads(Path(path).read_text())


# ------------------------------------------------------------------------------ parameter sets
def key_of(obj) -> str:
    """12 hex digits naming ``obj``: sha1 of its sorted JSON (``default=str``)."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


@dataclasses.dataclass
class Params:
    """Base of the dataclasses that decide a run's numbers (``identity``) plus how to run it
    (``RUNTIME_KEYS``, left out of the identity). A ``chunk`` field goes last in the identity."""

    RUNTIME_KEYS: ClassVar[tuple] = ()

    def _identity(self, d: dict) -> dict:
        """Hook: a subclass edits the identity (drops keys that mean nothing, adds a format)."""
        return d

    def identity(self) -> dict:
        d = dataclasses.asdict(self)
        for k in self.RUNTIME_KEYS:
            d.pop(k)
        d = self._identity(d)
        if "chunk" in d:
            d["chunk"] = d.pop("chunk")
        return d

    def key(self) -> str:
        return key_of(self.identity())

    def runtime(self) -> dict:
        return {k: getattr(self, k) for k in self.RUNTIME_KEYS}

    def replace(self, **kw):
        return dataclasses.replace(self, **kw)


def check_identity(params_json: Path, ident: dict, what: str = "run") -> bool:
    """True when ``params_json`` exists and records ``ident``; RunMismatch naming every differing
    key when it records another; False when there is none yet (a new run)."""
    if not Path(params_json).exists():
        return False
    old = read_json(params_json).get("identity", {})
    diff = sorted(k for k in set(old) | set(ident) if old.get(k) != ident.get(k))
    if diff:
        detail = ", ".join(f"{k}: {old.get(k)!r} there vs {ident.get(k)!r} now" for k in diff)
        raise RunMismatch(f"{Path(params_json).parent} holds a {what} with other parameters ({detail}); "
                          "use another output folder or delete it")
    return True


def versions() -> dict:
    import cv2      # slow imports, needed only when a run folder is created
    import timm
    return {"vitsift": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "opencv": cv2.__version__, "numpy": np.__version__}


# ------------------------------------------------------------------------------ run folders
def n_chunks(n: int, chunk: int) -> int:
    return (n + chunk - 1) // chunk


class RunFolder:
    """One resumable run: ``params.json``, chunk parts under ``parts/``, ``run.json``."""

    what = "run"        # named in RunMismatch

    def __init__(self, path: str | Path, params: Params):
        self.path, self.params = Path(path), params
        self.parts = self.path / "parts"

    @property
    def params_json(self) -> Path:
        return self.path / "params.json"

    def prepare(self, n_images: int, **extra) -> None:
        """Create the folder, or check that it holds this identity (:class:`RunMismatch` if not).
        A new folder's params.json: identity, key, runtime, n_images, ``extra``, versions, created."""
        self.parts.mkdir(parents=True, exist_ok=True)
        ident = self.params.identity()
        if check_identity(self.params_json, ident, self.what):
            return
        write_json(self.params_json, {"identity": ident, "key": self.params.key(),
                                      "runtime": self.params.runtime(), "n_images": n_images, **extra,
                                      "versions": versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})

    def set_info(self, **info) -> None:
        """Record facts known after loading (the model, the classifier) in params.json."""
        d = read_json(self.params_json)
        if any(d.get(k) != v for k, v in info.items()):
            d.update(info)
            write_json(self.params_json, d)

    def part(self, k: int, prefix: str = "", ext: str = "npz") -> Path:
        return self.parts / f"{prefix}{k:05d}.{ext}"

    def siblings(self, project: Callable[[dict], dict]) -> list[Path]:
        """Run folders beside this one whose identity, seen through ``project``, is this one's:
        their finished parts can be copied instead of recomputed."""
        mine = project(self.params.identity())
        out = []
        for pj in sorted(self.path.parent.glob("*/params.json")):
            if pj.parent.resolve() == self.path.resolve():
                continue
            try:
                ident = project(read_json(pj)["identity"])
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                continue          # not this kind of run (or a half-written one): not a source
            if ident == mine:
                out.append(pj.parent)
        return out

    def mark_complete(self, **info) -> None:
        write_json(self.path / "run.json", {"complete": True, **info})

    def is_complete(self) -> bool:
        rj = self.path / "run.json"
        return rj.exists() and read_json(rj).get("complete", False)


# ------------------------------------------------------------------------------ torchrun
@dataclasses.dataclass
class Dist:
    """This process's place under torchrun: rank, world size, barrier (None alone)."""

    rank: int = 0
    world: int = 1
    barrier: Callable | None = None

    def sync(self) -> None:
        if self.barrier is not None:
            self.barrier()

    def __iter__(self):
        """``rank, world, barrier = distributed()``"""
        return iter((self.rank, self.world, self.barrier))


def distributed() -> Dist:
    """Join the torchrun process group when WORLD_SIZE > 1, else ``Dist()`` (rank 0 of 1).

    gloo on CPU, nccl on CUDA with process LOCAL_RANK on GPU LOCAL_RANK. The timeout
    (VITSIFT_DIST_TIMEOUT seconds, default 12 h) bounds how long a rank waits at a barrier
    (rank 0 finalising, a cold decode): torch's default (30 min) is too short for a large run.
    """
    if dist.is_available() and dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), dist.barrier)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Dist()
    timeout = datetime.timedelta(seconds=float(os.environ.get("VITSIFT_DIST_TIMEOUT", 12 * 3600)))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank() % torch.cuda.device_count())
        dist.init_process_group("nccl", timeout=timeout)
    else:
        dist.init_process_group("gloo", timeout=timeout)
    return Dist(dist.get_rank(), dist.get_world_size(), dist.barrier)


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def rank_device(device: str, world: int) -> str:
    """Under torchrun with CUDA, 'auto'/'cuda' means this process's GPU (LOCAL_RANK)."""
    if world > 1 and device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{local_rank() % torch.cuda.device_count()}"
    return device


def end_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
