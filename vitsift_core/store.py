"""The run store: parameter sets (identity, key), resumable run folders (``params.json``, ``parts/``,
``run.json``), atomic writes, and the torchrun helper every experiment uses.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import hashlib
import json
import math
import numbers
import os
import socket
import sys
import time
import zipfile
from pathlib import Path
from typing import Callable, ClassVar

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist

from vitsift_core import __version__
from vitsift_core.options import DEFAULT_CHUNK  # noqa: F401 (images per resumable chunk; re-exported)
from vitsift_core.paths import atomic_write


class RunMismatch(RuntimeError):
    """The output folder holds a run made with other parameters."""


class RunBusy(RuntimeError):
    """Another process holds the run folder's lock."""


def write_json(path: str | Path, obj) -> None:
    """``obj`` as indented JSON (``default=str``), atomically."""
    atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=2, default=str)))


def write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text))


def savez(path: str | Path, **arrays) -> None:
    """``np.savez`` atomically, to the name as given (no ``.npz`` appended)."""
    def write(p: Path) -> None:
        with open(p, "wb") as f:
            np.savez(f, **arrays)
    atomic_write(path, write)


def read_json(path: str | Path):
    return json.loads(Path(path).read_text())


def load_npz(path: str | Path, keys: tuple = ()) -> dict | None:
    """The arrays of an ``.npz`` (only ``keys`` when given), or None when it is missing, unreadable
    (truncated, not a zip) or lacks one of ``keys``."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in (keys or z.files)}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile):
        return None


def load_parquet(path: str | Path) -> pd.DataFrame | None:
    """A parquet table, or None when it is missing or unreadable."""
    try:
        return pd.read_parquet(path)
    except (OSError, ValueError):       # pyarrow's ArrowInvalid is a ValueError
        return None


def ids_of_chunk(ids, n_skipped: int, records: list) -> bool:
    """True if ``ids`` are the ids of ``records`` (in order) less ``n_skipped`` skipped ones."""
    left = iter(r.id for r in records)
    return len(ids) + n_skipped == len(records) and all(i in left for i in ids)


def key_of(obj) -> str:
    """12 hex digits naming ``obj``: sha1 of its sorted JSON (``default=str``)."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


@dataclasses.dataclass
class Params:
    """What decides a run's numbers (``identity``) plus how to run it (``RUNTIME_KEYS``, not in it)."""
    RUNTIME_KEYS: ClassVar[tuple] = ()

    def _identity(self, d: dict) -> dict:
        """Hook: a subclass edits the identity."""
        return d

    def identity(self) -> dict:
        d = dataclasses.asdict(self)
        for k in self.RUNTIME_KEYS:
            d.pop(k)
        return self._identity(d)

    def key(self) -> str:
        return key_of(self.identity())

    def runtime(self) -> dict:
        return {k: getattr(self, k) for k in self.RUNTIME_KEYS}

    def replace(self, **kw):
        return dataclasses.replace(self, **kw)


def at_least_one(**values) -> None:
    """ValueError naming every value below 1 (None is allowed: no limit)."""
    bad = [f"{k} must be >= 1, got {v}" for k, v in values.items() if v is not None and v < 1]
    if bad:
        raise ValueError("; ".join(bad))


def in_range(name: str, value, lo: float, hi: float | None = None, *, lo_open: bool = False,
             hi_open: bool = True, integer: bool = False) -> None:
    """ValueError naming ``name`` and the allowed range unless ``value`` is a finite number (an integer
    when ``integer``) within it; ``hi`` None: no upper bound."""
    kind = numbers.Integral if integer else numbers.Real
    ok = isinstance(value, kind) and not isinstance(value, bool) and math.isfinite(value) and \
        (value > lo if lo_open else value >= lo) and (hi is None or (value < hi if hi_open else value <= hi))
    if not ok:
        rng = f"{'>' if lo_open else '>='} {lo}" if hi is None else \
            f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise ValueError(f"{name} must be {'an integer' if integer else 'a finite number'} {rng}, got {value!r}")


def check_identity(params_json: Path, ident: dict, what: str = "run") -> bool:
    """True if ``params_json`` records ``ident``, False if absent; RunMismatch naming the differences."""
    if not Path(params_json).exists():
        return False
    old = read_json(params_json).get("identity", {})
    ident = json.loads(json.dumps(ident, default=str))     # as written: tuples come back as lists
    diff = sorted(k for k in set(old) | set(ident) if old.get(k) != ident.get(k))
    if diff:
        detail = ", ".join(f"{k}: {old.get(k)!r} there vs {ident.get(k)!r} now" for k in diff)
        raise RunMismatch(f"{Path(params_json).parent} holds a {what} with other parameters ({detail}); "
                          "use another output folder or delete it")
    return True


def versions() -> dict:
    import cv2      # slow imports: only when a run folder is created
    import timm
    return {"vitsift": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "opencv": cv2.__version__, "numpy": np.__version__}


def n_chunks(n: int, chunk: int) -> int:
    return (n + chunk - 1) // chunk


class RunFolder:
    """One resumable run: ``params.json``, chunk parts under ``parts/``, ``run.json``."""
    what = "run"        # named in RunMismatch
    outputs: tuple = ()  # the tables a finished run holds beside run.json

    def __init__(self, path: str | Path, params: Params):
        self.path, self.params = Path(path), params
        self.parts, self.params_json = self.path / "parts", self.path / "params.json"

    def prepare(self, n_images: int, **extra) -> None:
        """Create the folder with its params.json, or check that it holds this identity. Experiments call
        it once computing starts (the model loaded), so a failed start leaves no params.json behind."""
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
        """Run folders beside this one whose identity seen through ``project`` is this one's."""
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

    def finished(self) -> bool:
        """True if the folder holds this identity's complete run with every file of ``outputs`` (read only)."""
        return check_identity(self.params_json, self.params.identity(), self.what) and self.is_complete() \
            and all((self.path / f).exists() for f in self.outputs)

    @contextlib.contextmanager
    def lock(self):
        """Hold the folder for this process (``.lock``, fcntl.flock): RunBusy naming the holder if another
        process has it. Temporary files left by a killed writer are removed once it is held."""
        self.parts.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 400, 0).decode(errors="replace").strip() or "another process"
                raise RunBusy(f"{self.path} is in use by {holder}; wait for it to finish or use another "
                              "output folder") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                          f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n".encode(), 0)
            for d in (self.path, self.parts):
                for tmp in d.glob(".*.tmp*"):
                    tmp.unlink(missing_ok=True)
            yield self
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)            # releases the lock

    def drop_damaged(self, chunks, fault: Callable[[int], str | None], marker: Callable[[int], Path]) -> list[int]:
        """Chunks among ``chunks`` whose ``marker`` file exists but ``fault(k)`` names a fault: the marker
        is removed, so they count as unfinished and are recomputed, never merged; said once on stderr."""
        bad = {k: f for k in chunks if marker(k).exists() and (f := fault(k))}
        for k in bad:
            marker(k).unlink()
        if bad:
            print(f"warning: {self.path}: recomputing damaged chunks " +
                  "; ".join(f"{k} ({f})" for k, f in bad.items()), file=sys.stderr)
        return list(bad)

    def mark_complete(self, **info) -> None:
        write_json(self.path / "run.json", {"complete": True, **info})

    def is_complete(self) -> bool:
        rj = self.path / "run.json"
        return rj.exists() and read_json(rj).get("complete", False)


@dataclasses.dataclass
class Dist:
    """This process's place under torchrun: rank, world size, barrier (None alone)."""
    rank: int = 0
    world: int = 1
    barrier: Callable | None = None

    def sync(self) -> None:
        if self.barrier is not None:
            self.barrier()

    def rank0_first(self, fn: Callable):
        """fn() on rank 0, then, after a barrier, on the other ranks."""
        if self.rank == 0:
            out = fn()
        self.sync()
        return out if self.rank == 0 else fn()

    def __iter__(self):
        """``rank, world, barrier = distributed()``"""
        return iter((self.rank, self.world, self.barrier))


def distributed() -> Dist:
    """Join the torchrun group (gloo, or nccl on GPU LOCAL_RANK) when WORLD_SIZE > 1, else ``Dist()``;
    barrier timeout VITSIFT_DIST_TIMEOUT seconds (12 h)."""
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
