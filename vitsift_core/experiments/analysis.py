"""The analysis suite (``vitsift analyze|suite``): SIFT x attention metrics per image, layer and head,
resumable in chunks (:class:`RunDir`), the controls (DESIGN.md section 3) sharing one forward pass."""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from vitsift_core.method import metrics as M
from vitsift_core.model.collectors import MetricCollector
from vitsift_core.model.infer import PRECISIONS, forward_precision, infer
from vitsift_core.model.registry import checkpoint_identity, load_model, resolve_device
from vitsift_core.data.batches import iter_batches
from vitsift_core.data.keypoints import CountsIdentity, KeypointCache, SiftParams
from vitsift_core.data.sources import resolve_images
from vitsift_core.experiments.tables import (HEAD_COLS, METRIC_COLS, donor_counts, head_rows,  # noqa: F401
                                             layer_table, shuffled_counts, stage_fit_json)
from vitsift_core.store import (DEFAULT_CHUNK, Dist, Params, RunFolder, RunMismatch, at_least_one, atomic_write,
                                ids_of_chunk, in_range, load_npz, load_parquet, n_chunks, read_json, savez,
                                write_json)
from vitsift_core.options import CONTROLS  # the controls a run may name (light module: the CLI lists them)


def batch_metrics(lm, collector: MetricCollector, x: torch.Tensor,
                  variants: dict, precision: str = "auto") -> dict:
    """One batch's forward pass with capture, reduced to metrics for every variant (name -> (counts
    (B, N), exclude_self)) -> variant -> metric -> (B, L, H) float32 on CPU. The benchmarks time it."""
    collector.start_batch(variants)
    infer(lm, x, collector=collector, precision=precision, micro_batch="auto", stop_early=True)
    return collector.finish_batch()


@dataclass
class AnalysisParams(CountsIdentity, Params):
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
    dedupe_keypoints: bool = False      # one count per keypoint location (default: the paper's count)
    chunk: int = DEFAULT_CHUNK          # images per resumable chunk
    # how to run: not part of the identity
    batch_size: int = 32
    device: str = "auto"
    num_workers: int = 1
    precision: str = "auto"             # infer.PRECISIONS; recorded per run folder, never mixed in one

    RUNTIME_KEYS = ("batch_size", "device", "num_workers", "precision")

    def _identity(self, d: dict) -> dict:
        d = super()._identity(d)
        by_content = checkpoint_identity(self.model)     # ARCH@PATH: the file's content, not its path
        if by_content is not None:
            d["model"] = by_content
        return d

    def __post_init__(self):
        if self.control not in CONTROLS:
            raise ValueError(f"control must be one of {CONTROLS}, got {self.control!r}")
        if self.focus_kind not in M.FOCUS_KINDS:
            raise ValueError(f"focus_kind must be one of {M.FOCUS_KINDS}, got {self.focus_kind!r}")
        in_range("gamma", self.gamma, 0, lo_open=True)
        at_least_one(limit=self.limit, batch_size=self.batch_size, chunk=self.chunk, img_size=self.img_size)
        in_range("num_workers", self.num_workers, 0, integer=True)
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        self.sift = dataclasses.asdict(SiftParams(**self.sift))   # validates the keys
        in_range("contrast_threshold", self.sift["contrast_threshold"], 0)


def recorded_forward(run: RunFolder, default: str | None = "fp32") -> str | None:
    """The forward precision recorded in a run's params.json (``default`` when none is)."""
    pj = run.params_json
    return (read_json(pj).get("model") or {}).get("forward", default) if pj.exists() else default


def check_forward(run: RunFolder, forward: str, parts: str = "*", default: str | None = "fp32") -> None:
    """Refuse to add chunks computed in another forward precision than the finished ``parts`` (a glob)."""
    before = recorded_forward(run, default)
    if before and forward and before != forward and any(run.parts.glob(parts)):
        raise RunMismatch(f"{run.path} holds chunks computed with a {before} forward pass; this "
                          f"process runs it as {forward} (another kind of device or another "
                          "--precision). Finish it as it was begun, or use another output folder")


def finished(run: RunFolder, device: str, precision: str) -> bool:
    """True if ``run`` is finished (then only read), in the forward precision this process would use
    (RunMismatch if not)."""
    if not run.finished():
        return False
    check_forward(run, forward_precision(resolve_device(device), precision), default=None)
    return True


class RunDir(RunFolder):
    """One variant's output folder: its finished chunks and, for mean-attention, the running sums."""
    outputs = ("heads.parquet", "layers.parquet", "stages.json", "keypoints.npz", "skipped.csv")

    def __init__(self, path: Path, params: Params, rank: int = 0):
        super().__init__(path, params)
        self.rank = rank      # under torchrun each process keeps its own mean-attention sum

    def set_model_info(self, info: dict) -> None:
        """Record the loaded model; refuses to mix forward precisions (``info["forward"]``) in one run."""
        check_forward(self, info.get("forward"), "*.npz", default=None)
        self.set_info(model=info)

    def chunk_done(self, k: int) -> bool:
        if self.params.control == "mean-attention":
            return self.part(k).exists() and k in self._mean_chunks()
        return self.part(k).exists()

    def chunk_fault(self, k: int, records: list, per_image: int) -> str | None:
        """What is wrong with chunk k's parts (None: nothing): readable, holding exactly the ids of its
        ``records`` (less the skipped) and ``per_image`` (layers x heads) head rows per image."""
        z = load_npz(self.part(k), ("ids", "counts", "skipped"))
        if z is None:
            return "unreadable .npz"
        ids = [str(i) for i in z["ids"]]
        if not ids_of_chunk(ids, len(z["skipped"]), records) or len(z["counts"]) != len(ids):
            return "its .npz holds other images"
        if self.params.control == "mean-attention":
            return None if k in self._mean_chunks() else "not in the mean-attention sum"
        df = load_parquet(self.part(k, ext="parquet"))
        if df is None or "image" not in df:
            return "no readable .parquet"
        if df["image"].tolist() != list(np.repeat(ids, per_image)):
            return f".parquet holds {len(df)} rows, not those of {len(ids)} images x {per_image}"
        return None

    # mean-attention: rank r keeps its running sum (and the chunks it includes) in its own file
    def _mean_file(self) -> Path:
        return self.path / ("mean_attention_sum.npz" if self.rank == 0 else
                            f"mean_attention_sum.rank{self.rank}.npz")

    def _mean_chunks(self) -> set[int]:
        """The chunks in every rank's readable running sum (an unreadable file counts for none)."""
        zs = (load_npz(f, ("chunks",)) for f in sorted(self.path.glob("mean_attention_sum*.npz")))
        return {int(c) for z in zs if z is not None for c in z["chunks"]}

    def _read_means(self) -> tuple[np.ndarray | None, int, set[int]]:
        """(sum of attention (L, H, N, N) or None, images, chunks) over every rank's readable file."""
        total, count, chunks = None, 0, set()
        for f in sorted(self.path.glob("mean_attention_sum*.npz")):
            z = load_npz(f, ("sum", "n", "chunks"))
            if z is None:
                continue
            total = z["sum"] if total is None else total + z["sum"]
            count += int(z["n"])
            chunks |= set(int(c) for c in z["chunks"])
        return total, count, chunks

    def mean_sum(self) -> tuple[np.ndarray, int]:
        """(sum of attention over every image so far (L, H, N, N), number of images)."""
        total, count, _ = self._read_means()
        if total is None:
            raise FileNotFoundError(f"no mean_attention_sum*.npz in {self.path}")
        return total, count

    def add_mean(self, k: int, attn_sum: np.ndarray, n: int) -> None:
        """Chunk k's share of the mean map, once (a recomputed chunk already in the sum adds nothing)."""
        if k in self._mean_chunks():
            return
        f = self._mean_file()
        z = load_npz(f, ("sum", "n", "chunks"))      # an unreadable file: its chunks are recomputed
        if z is not None:
            total, count, chunks = z["sum"] + attn_sum, int(z["n"]), list(z["chunks"])
        else:
            total, count, chunks = attn_sum, 0, []
        savez(f, sum=total, n=count + n, chunks=np.asarray(chunks + [k], dtype=np.int64))

    def write_chunk(self, k: int, ids, counts, skipped, rows: pd.DataFrame | None) -> None:
        if rows is not None:
            atomic_write(self.part(k, ext="parquet"), lambda p: rows.to_parquet(p, index=False))
        sk = np.asarray([(s.path, s.reason) for s in skipped], dtype=object).reshape(-1, 2)
        # the .npz is written last: its presence marks the chunk finished
        savez(self.part(k), ids=np.asarray(ids, dtype=str), counts=counts.astype(np.int32), skipped=sk.astype(str))

    def read_chunks(self, n_chunks: int) -> tuple[list, np.ndarray, list, list[pd.DataFrame]]:
        """(ids, counts (n, N), skipped, head-row frames) of chunks 0..n_chunks-1."""
        ids, counts, skipped, frames = [], [], [], []
        for k in range(n_chunks):
            with np.load(self.part(k)) as z:
                ids += list(z["ids"])
                counts.append(z["counts"])
                skipped += [tuple(r) for r in z["skipped"]]
            pq = self.part(k, ext="parquet")
            if pq.exists():
                df = pd.read_parquet(pq)
                if len(df):   # a chunk of unreadable files only has no rows (and untyped columns)
                    frames.append(df)
        n_patches = counts[0].shape[1] if counts and counts[0].ndim == 2 else 0
        counts = np.concatenate(counts) if counts else np.zeros((0, n_patches), np.int32)
        return ids, counts, skipped, frames

    def write_results(self, heads: pd.DataFrame, layers: pd.DataFrame, stages: dict, ids: list,
                      counts: np.ndarray, skipped: list, stats: dict | None = None) -> None:
        """The run's tables, then the complete flag."""
        atomic_write(self.path / "heads.parquet", lambda p: heads.to_parquet(p, index=False))
        atomic_write(self.path / "layers.parquet", lambda p: layers.to_parquet(p, index=False))
        write_json(self.path / "stages.json", stages)
        savez(self.path / "keypoints.npz", ids=np.asarray(ids, dtype=str), counts=counts)
        atomic_write(self.path / "skipped.csv", lambda p: pd.DataFrame(
            skipped, columns=["path", "reason"]).to_csv(p, index=False))
        self.mark_complete(n_images=len(ids), n_skipped=len(skipped), **(stats or {}))


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


def _weights(v: tuple[str, bool]) -> str:
    """The weights a variant's forward pass needs: 'random-init' or the real ones ('none')."""
    return "random-init" if v[0] == "random-init" else "none"


def _model_info(lm, precision: str) -> dict:
    return {"spec": lm.spec, "arch": lm.arch, "source": lm.source, "patch_size": lm.patch_size,
            "grid": list(lm.grid), "num_prefix_tokens": lm.num_prefix_tokens,
            "data_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in lm.data_config.items()},
            "forward": forward_precision(next(lm.model.parameters()).device, precision)}


def _variant_counts(control: str, c: np.ndarray, ids: list[str], seed: int,
                    donor: np.ndarray | None) -> np.ndarray | None:
    """The counts (B, N) a count variant scores one batch with (None: no donor for these images)."""
    if control == "shuffle-keypoints":
        return shuffled_counts(c, ids, seed)
    if control == "donor-keypoints":
        return donor
    return c


def _chunk_metrics(base: AnalysisParams, lm, collector: MetricCollector, loader, theta_vs: list,
                   bar) -> tuple[list, np.ndarray, list, dict]:
    """One chunk's forward passes: (ids, counts (n, N), skipped, variant -> head-row frames);
    ``loader``: the chunk's (batch, skipped) items (``_run_group``'s loader over all its chunks).
    With donor-keypoints the chunk's batches are gathered first (the donors are drawn among all its
    decodable images, so they depend on the chunk only, not on the batch size); otherwise streamed.
    A chunk with one decodable image has no donor: its donor rows are NaN (``head_rows``)."""
    ids, counts, skipped, results = [], [], [], {v: [] for v in theta_vs}
    collector.attn_sum, collector.n_summed = None, 0
    donors = None
    if any(v[0] == "donor-keypoints" for v in theta_vs):
        loader = list(loader)
        good = [b for b, _ in loader if b is not None]
        if good:
            donors = donor_counts(np.concatenate([b.counts.numpy() for b in good]),
                                  [i for b in good for i in b.ids], base.seed)
    for batch, sk in loader:
        skipped += sk
        if batch is not None:
            c, at = batch.counts.numpy(), sum(map(len, counts))
            donor = donors[at:at + len(batch)] if donors is not None else None
            vc = {k: _variant_counts(k, c, batch.ids, base.seed, donor) for k in dict.fromkeys(v[0] for v in theta_vs)}
            # an image without a donor is scored with zero counts, then its rows are set to NaN
            out = batch_metrics(lm, collector, batch.tensors,
                                {v: (torch.from_numpy(vc[v[0]] if vc[v[0]] is not None else np.zeros_like(c)), v[1])
                                 for v in theta_vs}, base.precision)
            for v in theta_vs:
                results[v].append(head_rows(batch.ids, out[v], vc[v[0]]))
            ids += batch.ids
            counts.append(c)
        bar.update(len(sk) + (len(batch) if batch is not None else 0))
    counts = np.concatenate(counts) if counts else np.zeros((0, lm.num_patches), np.int32)
    return ids, counts, skipped, results


def _write_variant(r: RunDir, k: int, chunk: tuple, collector: MetricCollector, lm) -> None:
    """Chunk k of one variant: its head rows, or for mean-attention its share of the mean map."""
    ids, counts, skipped, results = chunk
    v = (r.params.control, r.params.exclude_self)
    if v[0] == "mean-attention":
        r.write_chunk(k, ids, counts, skipped, None)
        n_layers, n_p = len(lm.model.blocks), lm.num_patches
        s = collector.attn_sum.cpu().numpy() if collector.attn_sum is not None else \
            np.zeros((n_layers, lm.model.blocks[0].attn.num_heads, n_p, n_p))
        r.add_mean(k, s, collector.n_summed)
    else:
        rows = pd.concat(results[v], ignore_index=True) if results[v] else pd.DataFrame(columns=HEAD_COLS)
        r.write_chunk(k, ids, counts, skipped, rows)


def _run_group(base: AnalysisParams, lm, runs: dict, records: list, todo: list[int], cache: KeypointCache,
               desc: str, progress: bool, on_chunk) -> dict:
    """The variants ``runs`` that share ``lm``'s forward passes over chunks ``todo``; the throughput."""
    vs = list(runs)
    want_mean = any(v[0] == "mean-attention" for v in vs)
    collector = MetricCollector(len(lm.model.blocks), base.gamma, base.weighted, base.focus_kind,
                                accumulate_mean=want_mean)
    theta_vs = [v for v in vs if v[0] != "mean-attention"]
    size = base.chunk
    t0, done = time.perf_counter(), 0
    bar = tqdm(total=sum(min(size, len(records) - k * size) for k in todo), unit="img", desc=desc,
               disable=not progress, dynamic_ncols=True)
    parts = {k: records[k * size:(k + 1) * size] for k in todo}
    # one loader for every chunk to do (batches never span two): its worker decodes and runs SIFT
    # on the next chunk while this one is computed, instead of a new worker and a cold first batch per chunk
    loader = iter_batches([r for k in todo for r in parts[k]], lm.data_config, lm.grid, lm.patch_size,
                          batch_size=base.batch_size, sift=SiftParams(**base.sift), num_workers=base.num_workers,
                          cache=cache, progress=False, dedupe_keypoints=base.dedupe_keypoints,
                          chunks=[len(parts[k]) for k in todo])
    for k in todo:
        part = parts[k]
        chunk = _chunk_metrics(base, lm, collector, itertools.islice(loader, math.ceil(len(part) / base.batch_size)),
                               theta_vs, bar)
        for r in runs.values():
            if not r.chunk_done(k):
                _write_variant(r, k, chunk, collector, lm)
        done += len(part)
        if on_chunk is not None:
            on_chunk(k)
    bar.close()
    dt = time.perf_counter() - t0
    return {"images": done, "seconds": round(dt, 2), "images_per_s": round(done / dt, 3) if dt else None}


def _group_pass(base: AnalysisParams, lm, group: dict, records: list, chunks, cache: KeypointCache,
                progress: bool, on_chunk) -> dict | None:
    """Chunks ``chunks`` of the variants ``group`` sharing ``lm``: damaged parts dropped, then what is not
    done computed; the throughput (None: nothing to do)."""
    size, per_image = base.chunk, len(lm.model.blocks) * lm.model.blocks[0].attn.num_heads
    for r in group.values():
        r.drop_damaged(chunks, lambda k, r=r: r.chunk_fault(k, records[k * size:(k + 1) * size], per_image),
                       r.part)
    todo = [k for k in chunks if any(not r.chunk_done(k) for r in group.values())]
    if not todo:
        return None
    return _run_group(base, lm, group, records, todo, cache, f"analyze {base.model} [{_weights(next(iter(group)))}]",
                      progress, on_chunk)


def _finalize(r: RunDir, n: int, n_layers: int, stats: dict | None) -> None:
    """Rank 0, every chunk done: the variant's tables from its parts (mean-attention: from the mean map)."""
    missing = [k for k in range(n) if not r.chunk_done(k)]
    if missing:
        raise RuntimeError(f"{r.path}: chunks {missing} unfinished after the run")
    ids, counts, skipped, frames = r.read_chunks(n)
    if r.params.control == "mean-attention":
        heads = mean_attention_heads(r, ids, counts, n_layers)
    else:
        heads = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=HEAD_COLS)
    heads = heads[HEAD_COLS]
    if r.params.control == "donor-keypoints":     # images of a one-image chunk: no donor, NaN rows
        no_donor = heads.loc[(heads.n_key + heads.n_non) == 0, "image"].nunique()
        stats = {**(stats or {}), "n_no_donor": int(no_donor)}
    layers = layer_table(heads) if len(heads) else pd.DataFrame()
    stages = stage_fit_json(layers) if len(layers) else {"fitted": False, "reason": "no images analysed"}
    r.write_results(heads, layers, stages, ids, counts, skipped, stats)


def run_suite(base: AnalysisParams, variants: dict[tuple[str, bool], Path], *,
              progress: bool = True, rank: int = 0, world: int = 1,
              barrier=None, on_chunk=None) -> dict[tuple[str, bool], RunDir]:
    """Run (or resume) the variants {(control, exclude_self): folder} of ``base``, sharing forward
    passes; finished folders are only read. Rank 0 holds each open folder's lock; under torchrun this
    process does chunks k % world == rank; rank 0 checks every chunk after ``barrier()`` (recomputing a
    damaged one) and finalises. ``on_chunk(k)`` is called after each chunk this process computes."""
    records = resolve_images(base.images, base.limit)
    if not records:
        raise ValueError(f"no images found for {base.images!r}")
    n = n_chunks(len(records), base.chunk)
    mine = [k for k in range(n) if k % world == rank]
    runs = {v: RunDir(d, base.replace(control=v[0], exclude_self=v[1]), rank=rank) for v, d in variants.items()}
    todo = {v: r for v, r in runs.items() if not finished(r, base.device, base.precision)}
    if not todo:
        return runs
    with contextlib.ExitStack() as held:
        if rank == 0:               # the other ranks start once rank 0 holds every open folder
            for r in todo.values():
                held.enter_context(r.lock())
        Dist(rank, world, barrier).sync()
        todo = {v: r for v, r in todo.items() if not r.finished()}    # finished by a process that held it
        cache, stats, models = KeypointCache(), {}, {}
        groups = {w: {v: r for v, r in todo.items() if _weights(v) == w} for w in dict.fromkeys(map(_weights, todo))}
        for weights, group in groups.items():
            lm = models[weights] = load_model(base.model, control=weights, device=base.device, seed=base.seed,
                                              img_size=base.img_size)
            info = _model_info(lm, base.precision)
            for r in group.values():
                r.prepare(len(records), model=info)     # params.json once computing starts
                r.set_model_info(info)
            stats[weights] = _group_pass(base, lm, group, records, mine, cache, progress, on_chunk)
        if barrier is not None:
            barrier()
        if rank == 0:
            for weights, group in groups.items():
                again = _group_pass(base, models[weights], group, records, range(n), cache, progress, on_chunk)
                stats[weights] = stats[weights] or again
                for r in group.values():
                    _finalize(r, n, len(models[weights].model.blocks), {"throughput": stats[weights]})
    return runs


def analyze(params: AnalysisParams, out: str | Path, progress: bool = True, **kw) -> RunDir:
    """One variant (``params.control``, ``params.exclude_self``) into ``out``."""
    v = (params.control, params.exclude_self)
    return run_suite(params, {v: Path(out)}, progress=progress, **kw)[v]


def variant_dir(root: str | Path, params: AnalysisParams) -> Path:
    """results/<key>/ : where a parameter set's results live, so nothing is computed twice."""
    return Path(root) / f"{params.control}{'-xself' if params.exclude_self else ''}-{params.key()}"
