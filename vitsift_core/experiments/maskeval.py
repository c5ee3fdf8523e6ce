"""``vitsift mask-eval``: accuracy under theta-ranked patch masking (Sec 5.1), resumable like ``analyze``.

Pass 1 scores every image once (patch scores s_i of every captured layer, the stage metrics for
``layer='auto'``, the clean prediction); the score layer is then chosen. Pass 2 runs one classifier
forward per (mode, order, ratio > 0) on the masked input. README "Run folders" lists the files.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from vitsift_core.method import masking as MK
from vitsift_core.model.capture import PatchScoreCollector, core_workers, forward_on_cores
from vitsift_core.model.classify import load_classifier
from vitsift_core.model.registry import load_model
from vitsift_core.data.batches import Skipped
from vitsift_core.data.keypoints import KeypointCache, SiftParams
from vitsift_core.data.sources import resolve_images
from vitsift_core.store import atomic_write, savez, write_json
from vitsift_core.experiments.analysis import head_rows, layer_table, stage_fit_json
from vitsift_core.experiments.probe import ProbeSettings, model_identity
from vitsift_core.experiments.maskeval_run import (MASK_PART_DTYPES, MaskEvalParams, MaskEvalRun, load_scores,
                                                   mask_eval_dir, sibling_mask_rows)  # noqa: F401 (mask_eval_dir: for callers)

PRED_COLS = ["image", "label", "target", "order", "mode", "ratio", "n_masked", "pred", "correct"]
ACC_COLS = ["order", "mode", "ratio", "n", "top1", "ci_low", "ci_high", "n_masked"]
PAIRED_COLS = ["order", "mode", "ratio", "n", "diff", "ci_low", "ci_high", "n_gain", "n_loss", "p_mcnemar"]


# ----------------------------------------------------------------------------------- statistics
def bootstrap_weights(n: int, n_boot: int = 2000, seed: int = 0) -> np.ndarray:
    """(n_boot, n) float32 resample counts (each row sums to n): resample b of the images."""
    rng = np.random.default_rng(seed)
    w = np.empty((n_boot, n), dtype=np.float32)
    for b in range(n_boot):
        w[b] = np.bincount(rng.integers(0, n, n), minlength=n)
    return w


def bootstrap_means(values: np.ndarray, weights: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """values (n, K) per-image numbers -> (mean (K,), low (K,), high (K,)) percentile bootstrap."""
    v = np.asarray(values, dtype=np.float64).reshape(values.shape[0], -1)
    n = v.shape[0]
    boot = (weights.astype(np.float64) @ v) / n                     # (n_boot, K)
    a = (1 - level) / 2
    return v.mean(0), np.quantile(boot, a, axis=0), np.quantile(boot, 1 - a, axis=0)


def _mcnemar(gain: int, loss: int) -> float:
    from scipy.stats import binomtest
    return 1.0 if gain + loss == 0 else float(binomtest(min(gain, loss), gain + loss, 0.5).pvalue)


def _wide_correct(pred: pd.DataFrame) -> pd.DataFrame:
    """predictions -> (images, (order, mode, ratio)) 0/1 correctness, columns sorted."""
    return pred.pivot_table(index="image", columns=["order", "mode", "ratio"], values="correct",
                            aggfunc="first").sort_index(axis=1)


def _paired_stats(d: np.ndarray, weights: np.ndarray) -> list[dict]:
    """d (n images, K) per-image differences in {-1, 0, 1} -> per column: diff and its bootstrap CI
    (percentage points), images gained (d > 0) and lost (d < 0), exact McNemar p on those."""
    mean, lo, hi = bootstrap_means(d, weights)
    out = []
    for i in range(d.shape[1]):
        gain, loss = int((d[:, i] > 0).sum()), int((d[:, i] < 0).sum())
        out.append({"diff": 100 * mean[i], "ci_low": 100 * lo[i], "ci_high": 100 * hi[i],
                    "gain": gain, "loss": loss, "p_mcnemar": _mcnemar(gain, loss)})
    return out


def summarize(pred: pd.DataFrame, n_boot: int = 2000, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """predictions -> (accuracy table, paired masked-minus-clean table); see module doc."""
    if pred.empty:
        return pd.DataFrame(columns=ACC_COLS), pd.DataFrame(columns=PAIRED_COLS)
    wide = _wide_correct(pred)
    n = len(wide)
    w = bootstrap_weights(n, n_boot, seed)
    c = wide.to_numpy(dtype=np.float64)
    mean, lo, hi = bootstrap_means(c, w)
    nm = pred.groupby(["order", "mode", "ratio"])["n_masked"].first()
    acc = pd.DataFrame([{"order": o, "mode": m, "ratio": r, "n": int(wide[(o, m, r)].notna().sum()),
                         "top1": 100 * mean[i], "ci_low": 100 * lo[i], "ci_high": 100 * hi[i],
                         "n_masked": int(nm[(o, m, r)])} for i, (o, m, r) in enumerate(wide.columns)])
    clean = pred[pred.ratio == 0].groupby("image")["correct"].first().reindex(wide.index).to_numpy(dtype=np.float64)
    stats = _paired_stats(c - clean[:, None], w)
    paired = pd.DataFrame([{"order": o, "mode": m, "ratio": r, "n": n, "diff": st["diff"], "ci_low": st["ci_low"],
                            "ci_high": st["ci_high"], "n_gain": st["gain"], "n_loss": st["loss"],
                            "p_mcnemar": st["p_mcnemar"]} for (o, m, r), st in zip(wide.columns, stats)],
                          columns=PAIRED_COLS)
    order_rank = {o: k for k, o in enumerate(MK.ORDERS)}
    key = lambda df: df.assign(_o=df.order.map(order_rank)).sort_values(["mode", "_o", "ratio"]).drop(columns="_o")
    return key(acc)[ACC_COLS].reset_index(drop=True), key(paired)[PAIRED_COLS].reset_index(drop=True)


def ordering_check(acc: pd.DataFrame) -> pd.DataFrame:
    """Per mode and ratio > 0: does Top < Random < Bottom hold (point estimates), and do the CIs
    of neighbours overlap? Columns: mode, ratio, top, random, bottom, holds, separated."""
    rows = []
    for (mode, ratio), g in acc[acc.ratio > 0].groupby(["mode", "ratio"]):
        g = g.set_index("order")
        if not {"top", "random", "bottom"} <= set(g.index):
            continue
        t, r, b = (g.loc[o] for o in ("top", "random", "bottom"))
        rows.append({"mode": mode, "ratio": ratio, "top": t.top1, "random": r.top1, "bottom": b.top1,
                     "holds": bool(t.top1 < r.top1 < b.top1),
                     "separated": bool(t.ci_high < r.ci_low and r.ci_high < b.ci_low)})
    return pd.DataFrame(rows)


CONTRAST_COLS = ["mode", "ratio", "a", "b", "n", "diff", "ci_low", "ci_high", "n_a_only", "n_b_only", "p_mcnemar"]


def order_contrasts(pred: pd.DataFrame, pairs=(("top", "random"), ("random", "bottom")),
                    n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Paired per-image accuracy differences between two orders at the same mode and ratio > 0.

    Top < Random < Bottom is a claim about the same images masked three ways, so it is tested
    per image (more power than comparing three separate CIs): diff = accuracy(a) - accuracy(b) in
    percentage points, a percentile bootstrap CI over images (the resamples of :func:`summarize`),
    the images right only under a / only under b, and the exact McNemar p on those.
    Returns one row per (mode, ratio, pair) with columns ``CONTRAST_COLS``.
    """
    if pred.empty:
        return pd.DataFrame(columns=CONTRAST_COLS)
    wide = _wide_correct(pred).astype(np.float64)
    w = bootstrap_weights(len(wide), n_boot, seed)
    keys, cols = [], []
    for mode in dict.fromkeys(wide.columns.get_level_values(1)):
        for ratio in sorted({r for (_, m, r) in wide.columns if m == mode and r > 0}):
            for a, b in pairs:
                if (a, mode, ratio) in wide.columns and (b, mode, ratio) in wide.columns:
                    keys.append((mode, ratio, a, b))
                    cols.append(wide[(a, mode, ratio)].to_numpy() - wide[(b, mode, ratio)].to_numpy())
    if not keys:
        return pd.DataFrame(columns=CONTRAST_COLS)
    d = np.stack(cols, axis=1)                                             # (n images, K)
    if np.isnan(d).any():
        raise ValueError("order_contrasts: every image needs a prediction under both orders of a pair")
    rows = [{"mode": mode, "ratio": ratio, "a": a, "b": b, "n": len(d), "diff": st["diff"], "ci_low": st["ci_low"],
             "ci_high": st["ci_high"], "n_a_only": st["gain"], "n_b_only": st["loss"], "p_mcnemar": st["p_mcnemar"]}
            for (mode, ratio, a, b), st in zip(keys, _paired_stats(d, w))]
    return pd.DataFrame(rows, columns=CONTRAST_COLS)


def paired_ordering(contrasts: pd.DataFrame) -> pd.DataFrame:
    """From :func:`order_contrasts` (pairs top-random and random-bottom): per mode and ratio, the two
    differences and whether Top < Random and Random < Bottom hold with CIs excluding 0.
    Columns: mode, ratio, top_minus_random, tr_ci, random_minus_bottom, rb_ci, top_below_random,
    random_below_bottom, holds."""
    rows = []
    for (mode, ratio), g in contrasts.groupby(["mode", "ratio"], sort=False):
        g = g.set_index(["a", "b"])
        if ("top", "random") not in g.index or ("random", "bottom") not in g.index:
            continue
        tr, rb = g.loc[("top", "random")], g.loc[("random", "bottom")]
        rows.append({"mode": mode, "ratio": ratio, "top_minus_random": tr["diff"],
                     "tr_ci": f"[{tr.ci_low:.1f}, {tr.ci_high:.1f}]", "random_minus_bottom": rb["diff"],
                     "rb_ci": f"[{rb.ci_low:.1f}, {rb.ci_high:.1f}]", "top_below_random": bool(tr.ci_high < 0),
                     "random_below_bottom": bool(rb.ci_high < 0),
                     "holds": bool(tr.ci_high < 0 and rb.ci_high < 0)})
    return pd.DataFrame(rows)


CONTENT_SHAPE_PAIRS = (("top", "random"), ("top", "top_other"), ("top_other", "random"))


def content_vs_shape(contrasts: pd.DataFrame) -> pd.DataFrame:
    """Split Top's damage over Random into *content* and *shape and place*, per mode and ratio.

    Top − Random = (Top − top_other) + (top_other − Random), image by image (accuracy differences
    are linear), so from :func:`order_contrasts` with :data:`CONTENT_SHAPE_PAIRS`: ``content`` is
    Top − top_other (this image's own high-score patches against the same mask shape and place
    taken from another image), ``shape_place`` is top_other − Random (a Top-shaped, Top-placed
    mask that knows nothing of the image, against scattered patches). Differences in percentage
    points with their paired 95 % CIs; ``content_share`` = content / (Top − Random), NaN when
    Top − Random is 0.
    Columns: mode, ratio, top_minus_random, content, content_ci, shape_place, shape_place_ci,
    content_share.
    """
    rows = []
    for (mode, ratio), g in contrasts.groupby(["mode", "ratio"], sort=False):
        g = g.set_index(["a", "b"])
        if not all(pair in g.index for pair in CONTENT_SHAPE_PAIRS):
            continue
        tr, tt, orr = (g.loc[pair] for pair in CONTENT_SHAPE_PAIRS)
        rows.append({"mode": mode, "ratio": ratio, "top_minus_random": tr["diff"],
                     "content": tt["diff"], "content_ci": f"[{tt.ci_low:.1f}, {tt.ci_high:.1f}]",
                     "shape_place": orr["diff"], "shape_place_ci": f"[{orr.ci_low:.1f}, {orr.ci_high:.1f}]",
                     "content_share": tt["diff"] / tr["diff"] if tr["diff"] != 0 else float("nan")})
    return pd.DataFrame(rows)


def mask_shape(scores: dict, params: MaskEvalParams, grid: tuple[int, int]) -> pd.DataFrame:
    """How clumped each order's masks are and what they cover: for every order and ratio > 0 of
    ``params``, means over images of :func:`masking.mask_adjacency` (share of masked patches'
    neighbours also masked) and of the share of masked patches holding at least one keypoint.
    ``scores``: :meth:`MaskEvalRun.scores` (ids, scores (n, N), counts (n, N)); the masks are
    rebuilt exactly as the mask pass built them.
    Columns: order, ratio, n_masked, adjacency, keypoint_share."""
    ids = [str(i) for i in scores["ids"]]
    other = MK.donor_scores(scores["scores"], ids, params.orders, params.seed)
    has_kp = np.asarray(scores["counts"]) > 0                                   # (n, N)
    rows = []
    for order in params.orders:
        rank = MK.rank_patches(order, scores=scores["scores"], counts=scores["counts"], ids=ids,
                               seed=params.seed, tiebreak=params.tiebreak, other_scores=other)
        for r in params.ratios:
            if r > 0:
                idx = MK.mask_indices(rank, r)
                rows.append({"order": order, "ratio": float(r), "n_masked": idx.shape[1],
                             "adjacency": float(np.nanmean(MK.mask_adjacency(idx, grid))),
                             "keypoint_share": float(np.take_along_axis(has_kp, idx, 1).mean())})
    return pd.DataFrame(rows, columns=["order", "ratio", "n_masked", "adjacency", "keypoint_share"])


# ----------------------------------------------------------------------------------- the run
def _choose_layers(params: MaskEvalParams, captured: list[int], sc: dict, n_layers: int) -> dict:
    spec = MK.parse_layers(params.layer, n_layers)
    if spec != "auto":
        return {"layers": spec, "how": f"given: layer {params.layer}", "stage_fit": None, "captured": captured}
    if len(sc["ids"]):
        res = {k: torch.from_numpy(v) for k, v in sc["metrics"].items()}
        heads = head_rows(list(sc["ids"]), res, sc["counts"])
        fit = stage_fit_json(layer_table(heads))
    else:
        fit = {"fitted": False, "reason": "no images scored"}
    layers, why = MK.default_score_layer(fit, n_layers)
    return {"layers": layers, "how": f"auto: {why}", "stage_fit": fit, "captured": captured}


@dataclass
class _Call:
    """What one ``run_mask_eval`` call's passes share: parameters, images, models and caches."""

    p: MaskEvalParams
    run: MaskEvalRun
    records: list              # the images the classifier can score, in run order
    chunk: int                 # images per chunk
    lm: object                 # scoring model (LoadedModel)
    clf: object                # classifier; clf.lm is lm when it is a probe on the same ViT
    sift: SiftParams
    cache: object              # KeypointCache
    progress: bool

    @property
    def n_chunks(self) -> int:
        return (len(self.records) + self.chunk - 1) // self.chunk

    @property
    def dev(self) -> torch.device:
        return next(self.lm.model.parameters()).device

    def chunk_records(self, k: int) -> list:
        return self.records[k * self.chunk:(k + 1) * self.chunk]

    def n_images(self, chunks) -> int:
        return sum(len(self.chunk_records(k)) for k in chunks)

    def batches(self, k: int):
        """(Batch or None, [Skipped]) of chunk k: decoded, model input, per-patch keypoint counts."""
        from vitsift_core.data.batches import iter_batches
        return iter_batches(self.chunk_records(k), self.lm.data_config, self.lm.grid, self.lm.patch_size,
                            batch_size=self.p.batch_size, sift=self.sift, num_workers=self.p.num_workers,
                            cache=self.cache, progress=False)


def _score_chunk(c: _Call, k: int, col: PatchScoreCollector, captured: list[int], bar) -> dict:
    """Pass 1 on chunk k: the arrays of its score part (ids, labels, targets, counts (n, N),
    layer_scores (n, L_captured, N), clean_pred (n,), skipped (s, 2), and m_<metric> (n, L, H)
    when the stage fit needs them)."""
    from vitsift_core.model.capture import capture_attention

    lm, n_p = c.lm, c.lm.num_patches
    workers = core_workers(c.dev)
    acc = {"ids": [], "labels": [], "targets": [], "counts": [], "layer_scores": [], "clean_pred": []}
    met_acc: dict[str, list] = {}
    skipped = []
    for batch, sk in c.batches(k):
        skipped += sk
        if batch is not None:
            x = batch.tensors.to(c.dev)
            col.start_batch(batch.counts)
            with torch.inference_mode():
                # CPU: the batch split over the cores (attention.forward_on_cores), as in the mask pass
                with capture_attention(lm.model, lm.num_prefix_tokens, col, layers=[l - 1 for l in captured]):
                    tokens = forward_on_cores(lm.model.forward_features, x, workers)
                if c.clf.lm is not lm:
                    tokens = forward_on_cores(c.clf.lm.model.forward_features, x, workers)
                pred = c.clf.logits(tokens).argmax(-1).cpu().numpy()
            sc, met = col.finish_batch()
            acc["ids"] += batch.ids
            acc["labels"] += [str(l) for l in batch.labels]
            acc["targets"] += [c.clf.target(l) for l in batch.labels]
            acc["counts"].append(batch.counts.numpy().astype(np.int32))
            acc["layer_scores"].append(sc.numpy().astype(np.float32))
            acc["clean_pred"].append(pred.astype(np.int64))
            for key, v in (met or {}).items():
                met_acc.setdefault(key, []).append(v.numpy().astype(np.float32))
        bar.update(len(sk) + (len(batch) if batch is not None else 0))
    arrays = {
        "ids": np.asarray(acc["ids"], dtype=str), "labels": np.asarray(acc["labels"], dtype=str),
        "targets": np.asarray(acc["targets"], dtype=np.int64),
        "counts": np.concatenate(acc["counts"]) if acc["counts"] else np.zeros((0, n_p), np.int32),
        "layer_scores": np.concatenate(acc["layer_scores"]) if acc["layer_scores"] else
        np.zeros((0, len(captured), n_p), np.float32),
        "clean_pred": np.concatenate(acc["clean_pred"]) if acc["clean_pred"] else np.zeros(0, np.int64),
        "skipped": np.asarray([(s.path or s.id, s.reason) for s in skipped], dtype=str).reshape(-1, 2),
    }
    if col.metrics is not None:
        n_layers, h = len(lm.model.blocks), lm.model.blocks[0].attn.num_heads
        for key in ("theta_kk", "theta_kn", "theta_nk", "theta_nn", "theta_chance", "focus", "focus_norm"):
            arrays[f"m_{key}"] = np.concatenate(met_acc[key]) if key in met_acc else \
                np.zeros((0, n_layers, h), np.float32)
    return arrays


def _score_pass(c: _Call, mine: list[int], siblings: list[MaskEvalRun], captured: list[int],
                stage_metrics: bool) -> dict:
    """Pass 1 over this rank's unfinished chunks: copies a sibling's part where one exists,
    computes the rest. Returns its timings."""
    from tqdm.auto import tqdm

    from vitsift_core.model.capture import MetricCollector

    p, run = c.p, c.run
    todo, reused = [], 0
    for k in mine:
        if run.score_file(k).exists():
            continue
        src = next((r.score_file(k) for r in siblings if r.score_file(k).exists()), None)
        if src is None:
            todo.append(k)
        else:
            atomic_write(run.score_file(k), lambda f: shutil.copyfile(src, f))
            reused += 1
    t0 = time.perf_counter()
    bar = tqdm(total=c.n_images(todo), unit="img", desc=f"mask-eval scores [{c.lm.spec}]",
               disable=not c.progress or not todo, dynamic_ncols=True)
    metrics = MetricCollector(len(c.lm.model.blocks), p.gamma, p.weighted, "minmax") if stage_metrics else None
    col = PatchScoreCollector([l - 1 for l in captured], p.gamma, p.weighted, p.exclude_self, metrics)
    for k in todo:
        arrays = _score_chunk(c, k, col, captured, bar)
        # written last and whole: its presence marks the chunk finished
        savez(run.score_file(k), **arrays)
    bar.close()
    return {"score_chunks_reused": reused, "score_seconds": round(time.perf_counter() - t0, 2),
            "score_images": c.n_images(todo)}


def _mask_chunk(c: _Call, k: int, need: list[tuple], frames: list[pd.DataFrame], sc: dict, row_of: dict,
                scores: np.ndarray, donors: np.ndarray | None, cond_index: dict, bar) -> pd.DataFrame:
    """Pass 2 on chunk k: the conditions in ``need`` (mode, order, ratio) computed, added to
    ``frames`` (rows copied from a sibling), in one row order: condition, then image.

    scores: (n, N) of every scored image, rows as ``sc["ids"]`` (``row_of``: id -> row); donors:
    (n, N) the donor map of each row, or None without a *_other order."""
    p, lm, model = c.p, c.lm, c.clf.lm.model
    workers = core_workers(c.dev)
    frames = list(frames)
    for batch, _sk in (c.batches(k) if need else ()):
        if batch is None:
            continue
        rows = np.asarray([row_of[i] for i in batch.ids])
        x = batch.tensors.to(c.dev)
        other = donors[rows] if donors is not None else None
        ranked = {o: MK.rank_patches(o, scores=scores[rows], counts=sc["counts"][rows], ids=batch.ids,
                                     seed=p.seed, tiebreak=p.tiebreak, other_scores=other)
                  for o in dict.fromkeys(o for _, o, _ in need)}
        for mode, order, ratio in need:
            idx = MK.mask_indices(ranked[order], ratio)                     # (B, M)

            def logits(xs, idx_s, mode=mode):
                return c.clf.logits(MK.masked_features(model, xs, mode, idx_s, lm.grid, lm.patch_size))

            with torch.inference_mode():
                # CPU: the batch split over the cores, like the analysis (attention.forward_on_cores)
                pred = forward_on_cores(logits, x, workers, idx).argmax(-1)
            frames.append(pd.DataFrame({"image": batch.ids, "order": order, "mode": mode,
                                        "ratio": float(ratio), "n_masked": idx.shape[1],
                                        "pred": pred.cpu().numpy().astype(np.int64)}))
            bar.update(len(batch))
    pos = {r.id: i for i, r in enumerate(c.chunk_records(k))}
    df = pd.concat(frames, ignore_index=True) if frames else \
        pd.DataFrame({col: pd.Series(dtype=t) for col, t in MASK_PART_DTYPES})
    return df.assign(_c=[cond_index[(m, o, r)] for m, o, r in zip(df["mode"], df.order, df.ratio)],
                     _i=df.image.map(pos)).sort_values(["_c", "_i"], kind="stable") \
        .drop(columns=["_c", "_i"]).reset_index(drop=True)


def _mask_pass(c: _Call, mine: list[int], siblings: list[MaskEvalRun], sc: dict, scores: np.ndarray,
               donors: np.ndarray | None) -> dict:
    """Pass 2 over this rank's unfinished chunks: (mode, order, ratio) conditions a sibling has
    are copied, the others computed. Returns its timings."""
    from tqdm.auto import tqdm

    p, run = c.p, c.run
    conds = p.conditions()
    cond_index = {cond: i for i, cond in enumerate(conds)}
    todo = [k for k in mine if not run.mask_file(k).exists()]
    reuse = {k: sibling_mask_rows(siblings, k, cond_index) for k in todo}
    need = {k: [cond for cond in conds if cond not in reuse[k][1]] for k in todo}
    n_fwd = sum(len(c.chunk_records(k)) * len(need[k]) for k in todo)
    t0 = time.perf_counter()
    bar = tqdm(total=n_fwd, unit="fwd", desc=f"mask-eval {'+'.join(p.modes)} [{c.clf.spec}]",
               disable=not c.progress or not n_fwd, dynamic_ncols=True)
    row_of = {i: n for n, i in enumerate(sc["ids"])}
    for k in todo:
        df = _mask_chunk(c, k, need[k], reuse[k][0], sc, row_of, scores, donors, cond_index, bar)
        atomic_write(run.mask_file(k), lambda f: df.to_parquet(f, index=False))
    bar.close()
    return {"mask_seconds": round(time.perf_counter() - t0, 2), "mask_forwards": n_fwd,
            # (chunk, condition) pairs copied
            "mask_conditions_reused": sum(len(reuse[k][1]) for k in todo)}


def _finalize(c: _Call, sc: dict, choice: dict, skipped_label: list, stats: dict) -> None:
    """Rank 0, once every part exists: predictions (ratio 0 = clean, for every order and mode),
    accuracy and paired tables, skipped.csv, run.json."""
    p, run = c.p, c.run
    masked = pd.concat([pd.read_parquet(run.mask_file(k)) for k in range(c.n_chunks)], ignore_index=True) \
        if c.n_chunks else pd.DataFrame(columns=PRED_COLS)
    clean = pd.DataFrame({"image": sc["ids"], "pred": sc["clean_pred"]})
    zero = [r for r in p.ratios if r == 0]
    clean_rows = pd.concat([clean.assign(order=o, mode=m, ratio=0.0, n_masked=0)
                            for o in p.orders for m in p.modes for _ in zero], ignore_index=True) \
        if zero and len(clean) else clean.iloc[:0]
    pred = pd.concat([clean_rows, masked], ignore_index=True)
    meta = pd.DataFrame({"image": sc["ids"], "label": sc["labels"], "target": sc["targets"]})
    pred = pred.merge(meta, on="image", how="left")
    pred["correct"] = pred["pred"].to_numpy() == pred["target"].to_numpy()
    pred = pred[PRED_COLS]
    atomic_write(run.path / "predictions.parquet", lambda f: pred.to_parquet(f, index=False))
    if not zero:
        # the paired table needs clean predictions: add them for the summary only
        extra = clean.assign(order=p.orders[0], mode=p.modes[0], ratio=0.0, n_masked=0).merge(meta, on="image")
        extra["correct"] = extra["pred"] == extra["target"]
        acc, paired = summarize(pd.concat([pred, extra[PRED_COLS]], ignore_index=True), p.n_boot, p.seed)
        acc = acc[acc.ratio > 0]
    else:
        acc, paired = summarize(pred, p.n_boot, p.seed)
    paired = paired[paired.ratio > 0].reset_index(drop=True)
    atomic_write(run.path / "accuracy.parquet", lambda f: acc.to_parquet(f, index=False))
    atomic_write(run.path / "paired.parquet", lambda f: paired.to_parquet(f, index=False))
    skipped = [(s.path or s.id, s.reason) for s in skipped_label] + sc["skipped"]
    atomic_write(run.path / "skipped.csv", lambda f: pd.DataFrame(skipped, columns=["path", "reason"]).to_csv(f, index=False))
    clean_top1 = float((sc["clean_pred"] == sc["targets"]).mean() * 100) if len(sc["ids"]) else float("nan")
    run.mark_complete(n_images=int(len(sc["ids"])), n_skipped=len(skipped), clean_top1=clean_top1,
                      layers=choice["layers"], **stats)


def _load_models(p: MaskEvalParams, progress: bool, rank0_first):
    """(scoring model, classifier). The probe's backbone is the scoring model; a timm classifier
    must share its input so that a patch means the same pixels in both."""
    score_lm = load_model(p.model, device=p.device)
    probe = ProbeSettings(train_images=p.probe_train, per_class=p.probe_per_class,
                          weight_decay=p.probe_weight_decay, seed=p.seed)
    # rank 0 trains (or loads) the probe first; the other ranks then find it in the cache
    clf = rank0_first(lambda: load_classifier(p.classifier, p.model, device=p.device, probe=probe,
                                              batch_size=p.batch_size, num_workers=p.num_workers,
                                              progress=progress, backbone=score_lm))
    if clf.lm is not score_lm:
        a, b = score_lm, clf.lm
        keys = ("input_size", "mean", "std", "crop_pct", "crop_mode", "interpolation")
        if a.grid != b.grid or a.patch_size != b.patch_size or \
                {k: a.data_config.get(k) for k in keys} != {k: b.data_config.get(k) for k in keys}:
            raise ValueError(f"scoring model {a.spec!r} and classifier {b.spec!r} must share the input "
                             f"(grid {a.grid} vs {b.grid}, patch {a.patch_size} vs {b.patch_size}, "
                             "and the same data config) so that a patch means the same pixels in both")
    return score_lm, clf


def _records(p: MaskEvalParams) -> list:
    records = resolve_images(p.images, p.limit)
    if not records:
        raise ValueError(f"no images found for {p.images!r}")
    if len(records) < 2 and any(o in MK.DONOR_ORDERS for o in p.orders):
        raise ValueError(f"orders {[o for o in p.orders if o in MK.DONOR_ORDERS]} mask by another image's "
                         f"score map and need at least 2 images; {p.images!r} has {len(records)}")
    return records


def run_mask_eval(params: MaskEvalParams, out: str | Path, *, progress: bool = True,
                  rank: int = 0, world: int = 1, barrier=None) -> MaskEvalRun:
    """Run (or resume) mask-eval into ``out``; returns the :class:`MaskEvalRun`.

    With ``world > 1`` (torchrun) this process handles the chunks k with k % world == rank in both
    passes and writes only its own part files; ``barrier()`` separates the steps: rank 0 writes
    params.json and trains the probe (the others then load it from the cache), every rank reads
    all score parts and chooses the same layer (a deterministic function of them), and after pass
    2 rank 0 alone merges the parts into the tables -- the same files a single process writes.
    """
    def sync():
        if barrier is not None:
            barrier()

    def rank0_first(fn):
        """fn() on rank 0, then (after a barrier) on the others: rank 0 writes, they read."""
        if rank == 0:
            out = fn()
        sync()
        return out if rank == 0 else fn()

    def require(part_file, what: str) -> None:
        missing = [k for k in range(c.n_chunks) if not part_file(k).exists()]
        if missing:
            raise RuntimeError(f"{run.path}: {what} chunks {missing} unfinished after the {what} pass")

    t_start = time.perf_counter()
    p = params
    records = _records(p)
    run = MaskEvalRun(out, p)
    rank0_first(lambda: run.prepare(len(records)))   # the other ranks only check the identity
    lm, clf = _load_models(p, progress and rank == 0, rank0_first)
    if rank == 0:
        run.set_info(model=model_identity(lm), classifier={**clf.identity(), "info": clf.info,
                                                           "n_classes": len(clf.classes)})
    # labels the classifier cannot score are left out up front
    skipped_label = [Skipped(r.id, str(r.path or ""), f"label {r.label!r} is not a class of {clf.spec}")
                     for r in records if clf.target(r.label) is None]
    records = [r for r in records if clf.target(r.label) is not None]
    c = _Call(p, run, records, p.chunk, lm, clf, SiftParams(**p.sift), KeypointCache(), progress)
    mine = [k for k in range(c.n_chunks) if k % world == rank]
    n_layers = len(lm.model.blocks)
    spec = MK.parse_layers(p.layer, n_layers)
    captured = list(range(1, n_layers + 1)) if spec == "auto" else spec

    # a run beside this one that differs only in orders / modes / ratios: its finished score chunks
    # and masked conditions are copied (looked up once, only when something is left to do)
    siblings = run.score_siblings() if any(not f(k).exists() for k in mine
                                           for f in (run.score_file, run.mask_file)) else []

    # ---- pass 1: scores, stage metrics, clean predictions; then the score layer
    stats = _score_pass(c, mine, siblings, captured, stage_metrics=spec == "auto")
    sync()
    require(run.score_file, "score")
    sc = load_scores(run, c.n_chunks)
    choice = _choose_layers(p, captured, sc, n_layers)
    scores = MK.combine_layer_scores(sc["layer_scores"], choice["layers"], captured)
    if rank == 0:
        write_json(run.path / "layer.json", choice)
        savez(run.path / "scores.npz", ids=sc["ids"], labels=sc["labels"], counts=sc["counts"], scores=scores,
              layer_scores=sc["layer_scores"].astype(np.float16), captured=np.asarray(captured),
              layers=np.asarray(choice["layers"]))
    # the *_other orders mask by another image's map: donors drawn over all scored images, so every
    # rank and every resumed call agrees
    donors = MK.donor_scores(scores, sc["ids"], p.orders, p.seed)

    # ---- pass 2: masked forwards
    stats.update(_mask_pass(c, mine, siblings, sc, scores, donors))
    if world > 1:
        stats["world"] = world   # the timings above are rank 0's share
    sync()
    if rank != 0:
        return run
    require(run.mask_file, "mask")
    _finalize(c, sc, choice, skipped_label, {"seconds_this_call": round(time.perf_counter() - t_start, 2), **stats})
    return run
