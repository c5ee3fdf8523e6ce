"""An analysis run folder (:class:`RunDir`): chunk parts, the mean-attention running sums (one file
per torchrun rank), the final tables and the complete flag."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from vitsift_core.store import Params, RunFolder, RunMismatch, atomic_write, read_json, savez, write_json


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


class RunDir(RunFolder):
    """One variant's output folder: its finished chunks and, for mean-attention, the running sums."""

    def __init__(self, path: Path, params: Params, rank: int = 0):
        super().__init__(path, params)
        self.rank = rank      # under torchrun each process keeps its own mean-attention sum

    def set_model_info(self, info: dict) -> None:
        """Record the loaded model; refuses to mix forward precisions (``info["forward"]``) in one run."""
        check_forward(self, info.get("forward"), "*.npz", default=None)
        self.set_info(model=info)

    def chunk_done(self, k: int) -> bool:
        if self.params.control == "mean-attention":
            return self.part(k).exists() and k in self._read_means()[2]
        return self.part(k).exists()

    # mean-attention: rank r keeps its running sum (and the chunks it includes) in its own file
    def _mean_file(self) -> Path:
        return self.path / ("mean_attention_sum.npz" if self.rank == 0 else
                            f"mean_attention_sum.rank{self.rank}.npz")

    def _read_means(self) -> tuple[np.ndarray | None, int, set[int]]:
        """(sum of attention (L, H, N, N) or None, images, chunks) over every rank's file."""
        total, count, chunks = None, 0, set()
        for f in sorted(self.path.glob("mean_attention_sum*.npz")):
            with np.load(f) as z:
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
        f = self._mean_file()
        if f.exists():
            with np.load(f) as z:
                total, count, chunks = z["sum"], int(z["n"]), list(z["chunks"])
            total = total + attn_sum
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
