"""Analysis runs on disk: resumable, chunked, several controls sharing one forward pass.

A run directory (one model, one image set, one control, one ``exclude_self``) holds::

    params.json       every parameter, the model's provenance, library versions
    parts/NNNNN.*     finished chunks (CHUNK images each): head rows + keypoint counts
    heads.parquet     image, layer, head, theta_kk, theta_kn, theta_nk, theta_nn,
                      theta_chance, focus, focus_norm, n_key, n_non   (layer, head 1-based)
    layers.parquet    per layer: means over images and heads, and images counted
    stages.json       the 3-segment stage fit (vitsift_core.method.stages)
    keypoints.npz     ids (n,), counts (n, N): what the notebooks plot without recomputing
    skipped.csv       path, reason for every unreadable image
    run.json          complete flag, images/s, wall time

Re-running with the same parameters skips finished chunks (an interrupted chunk is redone);
different parameters on an existing directory raise :class:`RunMismatch` instead of mixing.

Controls (DESIGN.md section 3): ``shuffle-keypoints`` permutes each image's counts (seeded by
image id), ``random-init`` swaps the weights for a seeded random init, ``mean-attention`` applies
each layer and head's data-set-mean attention map to every image's own keypoints. The real,
shuffled and mean-attention variants need the same forward pass, so :func:`run_suite` computes
them together.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from vitsift_core import __version__
from vitsift_core.method import metrics as M
from vitsift_core.method.stages import recipe_json
from vitsift_core.model.capture import MetricCollector, capture_attention, core_workers, forward_on_cores
from vitsift_core.data.keypoints import KeypointCache, SiftParams

CONTROLS = ("none", "shuffle-keypoints", "random-init", "mean-attention")
# images per resumable chunk; VITSIFT_CHUNK overrides (tests use tiny chunks). Part of a run's identity.
CHUNK = int(os.environ.get("VITSIFT_CHUNK", "64"))
HEAD_COLS = ["image", "layer", "head", "theta_kk", "theta_kn", "theta_nk", "theta_nn",
             "theta_chance", "focus", "focus_norm", "n_key", "n_non"]
METRIC_COLS = HEAD_COLS[3:10]


_TEST_DELAY = float(os.environ.get("VITSIFT_TEST_CHUNK_DELAY", "0"))
# Attention maps are reduced in slices of this many images on CPU, within each core's share of the
# batch (attention.forward_on_cores; cache-sized maps, memory that does not grow with the batch:
# benchmarks/bench_analysis.py); the whole batch on CUDA. VITSIFT_MICRO_BATCH overrides for
# every device (0 = whole batch). How to run, not part of a run's identity.
CPU_MICRO_BATCH = 4


def capture_micro_batch(device: torch.device | str) -> int | None:
    """Images per attention slice for :func:`capture_attention` on ``device`` (None: whole batch)."""
    env = os.environ.get("VITSIFT_MICRO_BATCH")
    if env is not None and env.strip():
        return int(env) or None
    return CPU_MICRO_BATCH if torch.device(device).type == "cpu" else None


PRECISIONS = ("auto", "fp32", "bf16")


def forward_precision(device: torch.device | str, precision: str = "auto") -> str:
    """How the analysis forward pass runs: ``"bf16-autocast"`` or ``"fp32"``.

    ``precision``: "auto" (bf16 autocast on CUDA, fp32 elsewhere), "fp32", or "bf16" (autocast on
    any device; on a CPU with AVX512-BF16 or AMX it is about twice as fast, see
    benchmarks/README.md). The metrics are computed in float32 either way. Recorded in a run's
    params.json: a run's chunks must not mix the two.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        precision = "bf16" if torch.device(device).type == "cuda" else "fp32"
    return "bf16-autocast" if precision == "bf16" else "fp32"


def forward_autocast(device: torch.device | str, precision: str = "auto"):
    """The context the analysis forward runs in: bf16 autocast or none (:func:`forward_precision`)."""
    if forward_precision(device, precision) == "bf16-autocast":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return _null()


def batch_metrics(lm, collector: MetricCollector, x: torch.Tensor,
                  variants: dict, precision: str = "auto") -> dict:
    """One batch of the analysis: the forward pass with capture, every layer and head reduced to
    metrics for every variant (name -> (counts (B, N), exclude_self)) as it goes.

    Returns variant -> metric -> (B, L, H) float32 on CPU (``MetricCollector.finish_batch``).
    This is the whole per-batch cost of ``vitsift analyze`` besides writing rows; the
    benchmarks time exactly this function.
    """
    dev = next(lm.model.parameters()).device
    collector.start_batch(variants)
    # CPU: the batch split over the cores, one thread each (forward_on_cores); on a GPU, one call
    workers = core_workers(dev)
    with torch.inference_mode(), forward_autocast(dev, precision), \
            capture_attention(lm.model, lm.num_prefix_tokens, collector,
                              micro_batch=capture_micro_batch(dev), stop_early=True):
        forward_on_cores(lm.model.forward_features, x.to(dev, non_blocking=True), workers)
    return collector.finish_batch()


class RunMismatch(RuntimeError):
    """The output directory holds a run made with other parameters."""


@dataclass
class AnalysisParams:
    """Everything that decides an analysis' numbers (plus how to run it, which does not)."""

    model: str = "embedded"
    images: str = "samples"
    limit: int | None = None
    gamma: float = 1.0
    weighted: bool = True
    exclude_self: bool = False
    focus_kind: str = "minmax"
    control: str = "none"
    seed: int = 0
    img_size: int | None = None
    sift: dict = field(default_factory=lambda: dataclasses.asdict(SiftParams()))
    # how to run: not part of the identity
    batch_size: int = 32
    device: str = "auto"
    num_workers: int = 1
    # bf16 autocast or fp32 forward (forward_precision); recorded per run folder, never mixed in one
    precision: str = "auto"

    RUNTIME_KEYS = ("batch_size", "device", "num_workers", "precision")

    def __post_init__(self):
        if self.control not in CONTROLS:
            raise ValueError(f"control must be one of {CONTROLS}, got {self.control!r}")
        if self.focus_kind not in M.FOCUS_KINDS:
            raise ValueError(f"focus_kind must be one of {M.FOCUS_KINDS}, got {self.focus_kind!r}")
        if not self.gamma > 0:
            raise ValueError(f"gamma must be > 0, got {self.gamma}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        self.sift = dataclasses.asdict(SiftParams(**self.sift))   # validates the keys

    def identity(self) -> dict:
        d = dataclasses.asdict(self)
        for k in self.RUNTIME_KEYS:
            d.pop(k)
        d["chunk"] = CHUNK
        return d

    def key(self) -> str:
        return hashlib.sha1(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:12]

    def replace(self, **kw) -> "AnalysisParams":
        return dataclasses.replace(self, **kw)


# ------------------------------------------------------------------------------- helpers
def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def _write_json(path: Path, obj) -> None:
    _atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=2, default=str)))


def shuffled_counts(counts: np.ndarray, ids: list[str], seed: int) -> np.ndarray:
    """Permute each image's counts across patches; the permutation depends only on (seed, id).

    counts: (B, N) -> (B, N). Keyed by id so resume and sharding give the same control.
    """
    out = np.empty_like(counts)
    for i, image_id in enumerate(ids):
        rng = np.random.default_rng([seed, zlib.crc32(image_id.encode())])
        out[i] = counts[i][rng.permutation(counts.shape[1])]
    return out


def versions() -> dict:
    import cv2
    import timm
    return {"vitsift": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "opencv": cv2.__version__, "numpy": np.__version__}


def head_rows(ids: list[str], res: dict[str, torch.Tensor], counts: np.ndarray) -> pd.DataFrame:
    """res: metric -> (B, L, H); counts: (B, N) -> one row per (image, layer, head)."""
    b, n_layers, n_heads = res["focus"].shape
    df = pd.DataFrame({
        "image": np.repeat(np.asarray(ids, dtype=object), n_layers * n_heads),
        "layer": np.tile(np.repeat(np.arange(1, n_layers + 1), n_heads), b).astype(np.int16),
        "head": np.tile(np.arange(1, n_heads + 1), b * n_layers).astype(np.int16),
    })
    for k in METRIC_COLS:
        df[k] = res[k].reshape(-1).numpy().astype(np.float32)
    n_key = (counts > 0).sum(1)
    df["n_key"] = np.repeat(n_key, n_layers * n_heads).astype(np.int32)
    df["n_non"] = np.repeat(counts.shape[1] - n_key, n_layers * n_heads).astype(np.int32)
    return df


def layer_table(heads: pd.DataFrame) -> pd.DataFrame:
    """Per layer: mean over images and heads of each metric (NaN skipped), images counted."""
    g = heads.groupby("layer")
    out = g[METRIC_COLS].mean()
    out["kk_minus_chance"] = g.apply(lambda d: (d.theta_kk - d.theta_chance).mean(), include_groups=False)
    out["nk_minus_chance"] = g.apply(lambda d: (d.theta_nk - d.theta_chance).mean(), include_groups=False)
    out["n_images"] = g["image"].nunique()
    out["n_images_kk"] = g.apply(lambda d: d.loc[d.theta_kk.notna(), "image"].nunique(), include_groups=False)
    out["n_images_nk"] = g.apply(lambda d: d.loc[d.theta_nk.notna(), "image"].nunique(), include_groups=False)
    return out.reset_index()


def stage_fit_json(layers: pd.DataFrame) -> dict:
    return recipe_json(layers["kk_minus_chance"].to_numpy(), layers["focus"].to_numpy())


# ------------------------------------------------------------------------------- run dirs
def check_identity(params_json: Path, ident: dict, what: str = "run") -> bool:
    """True when ``params_json`` exists and records ``ident``; RunMismatch naming every differing
    key when it records another; False when there is none yet (a new run)."""
    if not params_json.exists():
        return False
    old = json.loads(params_json.read_text()).get("identity", {})
    diff = sorted(k for k in set(old) | set(ident) if old.get(k) != ident.get(k))
    if diff:
        detail = ", ".join(f"{k}: {old.get(k)!r} there vs {ident.get(k)!r} now" for k in diff)
        raise RunMismatch(f"{params_json.parent} holds a {what} with other parameters ({detail}); "
                          "use another output folder or delete it")
    return True


class RunDir:
    """One variant's output directory and its finished chunks."""

    def __init__(self, path: Path, params: AnalysisParams, rank: int = 0):
        self.path = Path(path)
        self.params = params
        self.parts = self.path / "parts"
        self.rank = rank      # under torchrun: which process; each keeps its own mean-attention sum

    def prepare(self, n_images: int, model_info: dict | None = None) -> None:
        self.parts.mkdir(parents=True, exist_ok=True)
        pj = self.path / "params.json"
        ident = self.params.identity()
        if check_identity(pj, ident, "run"):
            return
        _write_json(pj, {"identity": ident, "key": self.params.key(), "runtime": {
            k: getattr(self.params, k) for k in AnalysisParams.RUNTIME_KEYS},
            "n_images": n_images, "model": model_info or {}, "versions": versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})

    def set_model_info(self, info: dict) -> None:
        """Record the loaded model (and ``info["forward"]``, its forward precision). Refuses,
        before anything is computed, to add chunks in another precision than the finished ones:
        a run begun on a GPU (bf16 autocast) and resumed on a CPU (fp32), or resumed with another
        ``precision``, would mix the two."""
        pj = self.path / "params.json"
        d = json.loads(pj.read_text())
        before = (d.get("model") or {}).get("forward")
        if before and info.get("forward") and before != info["forward"] and any(self.parts.glob("*.npz")):
            raise RunMismatch(f"{self.path} holds chunks computed with a {before} forward pass; this "
                              f"process runs it as {info['forward']} (another kind of device or another "
                              "--precision). Finish it as it was begun, or use another output folder")
        if d.get("model") != info:
            d["model"] = info
            _write_json(pj, d)

    def chunk_done(self, k: int) -> bool:
        if self.params.control == "mean-attention":
            return (self.parts / f"{k:05d}.npz").exists() and k in self._mean_chunks()
        return (self.parts / f"{k:05d}.npz").exists()

    # mean-attention bookkeeping: the running sum lists the chunks it includes. Each torchrun rank
    # keeps its own file (rank 0: mean_attention_sum.npz, rank r: mean_attention_sum.rank<r>.npz),
    # so ranks never read-modify-write the same file; a chunk is in exactly one of them.
    def _mean_file(self) -> Path:
        return self.path / ("mean_attention_sum.npz" if self.rank == 0 else f"mean_attention_sum.rank{self.rank}.npz")

    def _mean_files(self) -> list[Path]:
        return sorted(self.path.glob("mean_attention_sum*.npz"))

    def _mean_chunks(self) -> set[int]:
        out: set[int] = set()
        for f in self._mean_files():
            with np.load(f) as z:
                out |= set(int(c) for c in z["chunks"])
        return out

    def mean_sum(self) -> tuple[np.ndarray, int]:
        """(sum of attention over every image so far (L, H, N, N), number of images)."""
        total, count = None, 0
        for f in self._mean_files():
            with np.load(f) as z:
                total = z["sum"] if total is None else total + z["sum"]
                count += int(z["n"])
        if total is None:
            raise FileNotFoundError(f"no mean_attention_sum*.npz in {self.path}")
        return total, count

    def add_mean(self, k: int, attn_sum: np.ndarray, n: int) -> None:
        f = self._mean_file()
        if f.exists():
            with np.load(f) as z:
                total, count, chunks = z["sum"], int(z["n"]), list(z["chunks"])
            total = total + attn_sum
        else:
            total, count, chunks = attn_sum, 0, []
        _atomic_write(f, lambda p: np.savez(open(p, "wb"), sum=total, n=count + n,
                                            chunks=np.asarray(chunks + [k], dtype=np.int64)))

    def write_chunk(self, k: int, ids, counts, skipped, rows: pd.DataFrame | None) -> None:
        if rows is not None:
            _atomic_write(self.parts / f"{k:05d}.parquet", lambda p: rows.to_parquet(p, index=False))
        sk = np.asarray([(s.path, s.reason) for s in skipped], dtype=object).reshape(-1, 2)
        # the .npz is written last: its presence marks the chunk finished
        _atomic_write(self.parts / f"{k:05d}.npz", lambda p: np.savez(
            open(p, "wb"), ids=np.asarray(ids, dtype=str), counts=counts.astype(np.int32),
            skipped=sk.astype(str)))

    def finalize(self, n_chunks: int, mean_fn=None, stats: dict | None = None) -> None:
        ids, counts, skipped, frames = [], [], [], []
        for k in range(n_chunks):
            with np.load(self.parts / f"{k:05d}.npz") as z:
                ids += list(z["ids"])
                counts.append(z["counts"])
                skipped += [tuple(r) for r in z["skipped"]]
            pq = self.parts / f"{k:05d}.parquet"
            if pq.exists():
                df = pd.read_parquet(pq)
                if len(df):   # a chunk of unreadable files only has no rows (and untyped columns)
                    frames.append(df)
        n_patches = counts[0].shape[1] if counts and counts[0].ndim == 2 else 0
        counts = np.concatenate(counts) if counts else np.zeros((0, n_patches), np.int32)
        if mean_fn is not None:
            heads = mean_fn(ids, counts)
        else:
            heads = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=HEAD_COLS)
        heads = heads[HEAD_COLS]
        _atomic_write(self.path / "heads.parquet", lambda p: heads.to_parquet(p, index=False))
        layers = layer_table(heads) if len(heads) else pd.DataFrame()
        _atomic_write(self.path / "layers.parquet", lambda p: layers.to_parquet(p, index=False))
        _write_json(self.path / "stages.json", stage_fit_json(layers) if len(layers) else
                    {"fitted": False, "reason": "no images analysed"})
        _atomic_write(self.path / "keypoints.npz", lambda p: np.savez(
            open(p, "wb"), ids=np.asarray(ids, dtype=str), counts=counts))
        _atomic_write(self.path / "skipped.csv", lambda p: pd.DataFrame(
            skipped, columns=["path", "reason"]).to_csv(p, index=False))
        _write_json(self.path / "run.json", {"complete": True, "n_images": len(ids),
                                             "n_skipped": len(skipped), **(stats or {})})

    def is_complete(self) -> bool:
        rj = self.path / "run.json"
        return rj.exists() and json.loads(rj.read_text()).get("complete", False)


def mean_attention_heads(run: RunDir, ids, counts, n_layers: int) -> pd.DataFrame:
    """Content-free control: the data-set-mean map of each layer/head, each image's counts."""
    total, count = run.mean_sum()
    mean = torch.from_numpy(total / max(count, 1)).float()                  # (L, H, N, N)
    p = run.params
    c = torch.from_numpy(np.asarray(counts)).long()
    res = {k: [] for k in METRIC_COLS}
    foc = M.focus_index(mean, p.focus_kind)                                  # (L, H) each
    for l in range(n_layers):
        mask = M.attended_mask(mean[l], p.gamma, p.exclude_self)            # (H, N, N)
        theta = M.theta_from_mask(mask[None], c[:, None, :], p.weighted)     # (B, H, N)
        agg = M.aggregate_theta(theta, c[:, None, :])
        agg["theta_chance"] = M.theta_chance(c, p.weighted)[:, None].expand_as(agg["theta_kk"])
        agg["focus"] = foc[0][l][None].expand_as(agg["theta_kk"])
        agg["focus_norm"] = foc[1][l][None].expand_as(agg["theta_kk"])
        for k in METRIC_COLS:
            res[k].append(agg[k])
    res = {k: torch.stack(v, dim=1) for k, v in res.items()}                # (B, L, H)
    return head_rows(list(ids), res, np.asarray(counts))


# ------------------------------------------------------------------------------- the engine
def run_suite(base: AnalysisParams, variants: dict[tuple[str, bool], Path], *,
              progress: bool = True, rank: int = 0, world: int = 1,
              barrier=None) -> dict[tuple[str, bool], RunDir]:
    """Run several (control, exclude_self) variants of ``base``, sharing forward passes.

    variants: (control, exclude_self) -> output dir. Chunks already finished in a variant's
    dir are skipped. With ``world > 1`` this process handles chunks k with k % world == rank;
    rank 0 finalises after ``barrier()`` (torch.distributed's, under torchrun).
    """
    from tqdm.auto import tqdm

    from vitsift_core.data.sources import resolve_images
    from vitsift_core.model.registry import load_model

    records = resolve_images(base.images, base.limit)
    if not records:
        raise ValueError(f"no images found for {base.images!r}")
    n_chunks = (len(records) + CHUNK - 1) // CHUNK
    mine = [k for k in range(n_chunks) if k % world == rank]
    runs = {v: RunDir(d, base.replace(control=v[0], exclude_self=v[1]), rank=rank) for v, d in variants.items()}
    for r in runs.values():
        r.prepare(len(records))
    sift = SiftParams(**base.sift)
    cache = KeypointCache()

    # group variants by the weights their forward pass needs
    groups: dict[str, list[tuple[str, bool]]] = {}
    for v in runs:
        groups.setdefault("random-init" if v[0] == "random-init" else "none", []).append(v)

    stats: dict = {}
    model_infos: dict[str, dict] = {}
    n_layers_of: dict[str, int] = {}
    for weights, vs in groups.items():
        todo = [k for k in mine if any(not runs[v].chunk_done(k) for v in vs)]
        lm = load_model(base.model, control=weights, device=base.device, seed=base.seed,
                        img_size=base.img_size)
        info = {"spec": lm.spec, "arch": lm.arch, "source": lm.source, "patch_size": lm.patch_size,
                "grid": list(lm.grid), "num_prefix_tokens": lm.num_prefix_tokens,
                "data_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in lm.data_config.items()},
                "forward": forward_precision(next(lm.model.parameters()).device, base.precision)}
        model_infos[weights] = info
        for v in vs:
            runs[v].set_model_info(info)
        n_layers = len(lm.model.blocks)
        n_layers_of[weights] = n_layers
        if not todo:
            continue
        want_mean = any(v[0] == "mean-attention" for v in vs)
        collector = MetricCollector(n_layers, base.gamma, base.weighted, base.focus_kind, accumulate_mean=want_mean)
        theta_vs = [v for v in vs if v[0] != "mean-attention"]
        n_img = sum(min(CHUNK, len(records) - k * CHUNK) for k in todo)
        t0, done = time.perf_counter(), 0
        bar = tqdm(total=n_img, unit="img", desc=f"analyze {base.model} [{weights}]", disable=not progress,
                   dynamic_ncols=True)
        from vitsift_core.data.batches import iter_batches
        for k in todo:
            chunk = records[k * CHUNK:(k + 1) * CHUNK]
            ids, counts, skipped, results = [], [], [], {v: [] for v in theta_vs}
            collector.attn_sum, collector.n_summed = None, 0
            for batch, sk in iter_batches(chunk, lm.data_config, lm.grid, lm.patch_size,
                                          batch_size=base.batch_size, sift=sift,
                                          num_workers=base.num_workers, cache=cache, progress=False):
                skipped += sk
                if batch is not None:
                    c = batch.counts.numpy()
                    shuf = torch.from_numpy(shuffled_counts(c, batch.ids, base.seed))
                    out = batch_metrics(lm, collector, batch.tensors,
                                        {v: (shuf if v[0] == "shuffle-keypoints" else batch.counts, v[1])
                                         for v in theta_vs}, base.precision)
                    for v in theta_vs:
                        results[v].append(head_rows(batch.ids, out[v], shuf.numpy() if v[0] == "shuffle-keypoints" else c))
                    ids += batch.ids
                    counts.append(c)
                bar.update(len(sk) + (len(batch) if batch is not None else 0))
            counts_arr = np.concatenate(counts) if counts else np.zeros((0, lm.num_patches), np.int32)
            for v in vs:
                r = runs[v]
                if r.chunk_done(k):
                    continue
                if v[0] == "mean-attention":
                    r.write_chunk(k, ids, counts_arr, skipped, None)
                    s = collector.attn_sum.cpu().numpy() if collector.attn_sum is not None else \
                        np.zeros((n_layers, lm.model.blocks[0].attn.num_heads, lm.num_patches, lm.num_patches))
                    r.add_mean(k, s, collector.n_summed)
                else:
                    rows = pd.concat(results[v], ignore_index=True) if results[v] else pd.DataFrame(columns=HEAD_COLS)
                    # a shuffled run keeps the real counts on disk; its rows carry n_key of the permutation (same)
                    r.write_chunk(k, ids, counts_arr, skipped, rows)
            done += len(chunk)
            if _TEST_DELAY:
                time.sleep(_TEST_DELAY)   # lets the resume test kill a run between chunks
        bar.close()
        dt = time.perf_counter() - t0
        stats[weights] = {"images": done, "seconds": round(dt, 2), "images_per_s": round(done / dt, 3) if dt else None}

    if barrier is not None:
        barrier()
    if rank == 0:
        for v, r in runs.items():
            weights = "random-init" if v[0] == "random-init" else "none"
            missing = [k for k in range(n_chunks) if not r.chunk_done(k)]
            if missing:
                raise RuntimeError(f"{r.path}: chunks {missing} unfinished after the run")
            mean_fn = None
            if v[0] == "mean-attention":
                mean_fn = lambda ids, c, r=r, L=n_layers_of[weights]: mean_attention_heads(r, ids, c, L)
            r.finalize(n_chunks, mean_fn, {"throughput": stats.get(weights)})
    return runs


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def analyze(params: AnalysisParams, out: str | Path, progress: bool = True, **kw) -> RunDir:
    """One variant (``params.control``, ``params.exclude_self``) into ``out``; see module doc."""
    v = (params.control, params.exclude_self)
    return run_suite(params, {v: Path(out)}, progress=progress, **kw)[v]


def variant_dir(root: str | Path, params: AnalysisParams) -> Path:
    """results/<key>/ : where a parameter set's results live, so nothing is computed twice."""
    return Path(root) / f"{params.control}{'-xself' if params.exclude_self else ''}-{params.key()}"
