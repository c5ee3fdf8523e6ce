"""``vitsift mask-eval``: accuracy under theta-ranked patch masking (Sec 5.1), resumable. Pass 1 scores
every image (patch scores, stage metrics, clean prediction), pass 2 classifies each masked input."""
from __future__ import annotations

import contextlib
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from vitsift_core.method import masking as MK
from vitsift_core.model.collectors import MetricCollector, PatchScoreCollector
from vitsift_core.model.infer import forward_precision, infer
from vitsift_core.experiments.classify import load_classifier
from vitsift_core.model.registry import load_model
from vitsift_core.data.batches import Skipped, iter_batches
from vitsift_core.data.keypoints import KeypointCache, SiftParams
from vitsift_core.data.sources import resolve_images
from vitsift_core.store import Dist, atomic_write, n_chunks, savez, write_json
from vitsift_core.experiments.analysis import (METRIC_COLS, check_forward, finished, head_rows, layer_table,
                                              recorded_forward, stage_fit_json)
from vitsift_core.experiments.probe import ProbeSettings, model_identity
from vitsift_core.experiments.maskeval_run import (  # noqa: F401 (mask_eval_dir: for callers)
    MASK_PART_DTYPES, MaskEvalParams, MaskEvalRun, load_scores, mask_eval_dir, sibling_mask_rows)
from vitsift_core.method import stats as S
from vitsift_core.model.masked import masked_features

PRED_COLS = ["image", "label", "target", "order", "mode", "ratio", "n_masked", "pred", "correct"]
ACC_COLS = ["order", "mode", "ratio", "n", "top1", "ci_low", "ci_high", "n_masked"]
PAIRED_COLS = ["order", "mode", "ratio", "n", "diff", "ci_low", "ci_high", "n_gain", "n_loss", "p_mcnemar"]


def wide_correct(pred: pd.DataFrame) -> pd.DataFrame:
    """predictions -> (images, (order, mode, ratio)) 0/1 correctness, columns sorted."""
    return pred.pivot_table(index="image", columns=["order", "mode", "ratio"], values="correct",
                            aggfunc="first").sort_index(axis=1)


def summarize(pred: pd.DataFrame, n_boot: int = 2000, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """predictions -> (accuracy table, paired masked-minus-clean table), bootstrap CIs over images."""
    if pred.empty:
        return pd.DataFrame(columns=ACC_COLS), pd.DataFrame(columns=PAIRED_COLS)
    wide = wide_correct(pred)
    n = len(wide)
    w = S.bootstrap_weights(n, n_boot, seed)
    c = wide.to_numpy(dtype=np.float64)
    mean, lo, hi = S.bootstrap_means(c, w)
    nm = pred.groupby(["order", "mode", "ratio"])["n_masked"].first()
    acc = pd.DataFrame([{"order": o, "mode": m, "ratio": r, "n": int(wide[(o, m, r)].notna().sum()),
                         "top1": 100 * mean[i], "ci_low": 100 * lo[i], "ci_high": 100 * hi[i],
                         "n_masked": int(nm[(o, m, r)])} for i, (o, m, r) in enumerate(wide.columns)])
    clean = pred[pred.ratio == 0].groupby("image")["correct"].first().reindex(wide.index).to_numpy(dtype=np.float64)
    stats = S.paired_bootstrap(c - clean[:, None], w)
    paired = pd.DataFrame([{"order": o, "mode": m, "ratio": r, "n": n, "diff": st["diff"], "ci_low": st["ci_low"],
                            "ci_high": st["ci_high"], "n_gain": st["gain"], "n_loss": st["loss"],
                            "p_mcnemar": st["p_mcnemar"]} for (o, m, r), st in zip(wide.columns, stats)],
                          columns=PAIRED_COLS)
    order_rank = {o: k for k, o in enumerate(MK.ORDERS)}
    key = lambda df: df.assign(_o=df.order.map(order_rank)).sort_values(["mode", "_o", "ratio"]).drop(columns="_o")
    return key(acc)[ACC_COLS].reset_index(drop=True), key(paired)[PAIRED_COLS].reset_index(drop=True)


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
    """What one ``run_mask_eval`` call's passes share."""

    p: MaskEvalParams
    run: MaskEvalRun
    records: list              # the images the classifier can score, in run order
    lm: object                 # scoring model (LoadedModel)
    clf: object                # classifier; clf.lm is lm when it is a probe on the same ViT
    cache: KeypointCache
    progress: bool

    @property
    def n_chunks(self) -> int:
        return n_chunks(len(self.records), self.p.chunk)

    @property
    def dev(self) -> torch.device:
        return next(self.lm.model.parameters()).device

    def chunk_records(self, k: int) -> list:
        return self.records[k * self.p.chunk:(k + 1) * self.p.chunk]

    def n_images(self, chunks) -> int:
        return sum(len(self.chunk_records(k)) for k in chunks)

    def batches(self, k: int):
        """(Batch or None, [Skipped]) of chunk k."""
        return iter_batches(self.chunk_records(k), self.lm.data_config, self.lm.grid, self.lm.patch_size,
                            batch_size=self.p.batch_size, sift=SiftParams(**self.p.sift),
                            num_workers=self.p.num_workers, cache=self.cache, progress=False)


def _score_chunk(c: _Call, k: int, col: PatchScoreCollector, captured: list[int], bar) -> dict:
    """Pass 1 on chunk k -> its score part: ids, labels, targets, counts (n, N), layer_scores
    (n, L_captured, N), clean_pred (n,), skipped (s, 2), and m_<metric> (n, L, H) for the stage fit."""
    lm, n_p = c.lm, c.lm.num_patches
    ids, labels, targets, skipped = [], [], [], []
    # every list starts with an empty array of its shape: a chunk of unreadable files still saves
    parts = {"counts": [np.zeros((0, n_p), np.int32)],
             "layer_scores": [np.zeros((0, len(captured), n_p), np.float32)],
             "clean_pred": [np.zeros(0, np.int64)]}
    metrics = {}
    if col.metrics is not None:
        shape = (0, len(lm.model.blocks), lm.model.blocks[0].attn.num_heads)
        metrics = {key: [np.zeros(shape, np.float32)] for key in METRIC_COLS}
    for batch, sk in c.batches(k):
        skipped += sk
        if batch is not None:
            col.start_batch(batch.counts)
            same = c.clf.lm is lm                 # the classifier's logits from the scoring forward
            logits = infer(lm, batch.tensors, collector=col, layers=[l - 1 for l in captured],
                           precision=c.p.precision, head=c.clf.logits if same else None)
            if not same:
                logits = infer(c.clf.lm, batch.tensors, precision=c.p.precision, head=c.clf.logits)
            sc, met = col.finish_batch()
            ids += batch.ids
            labels += [str(l) for l in batch.labels]
            targets += [c.clf.target(l) for l in batch.labels]
            parts["counts"].append(batch.counts.numpy().astype(np.int32))
            parts["layer_scores"].append(sc.numpy().astype(np.float32))
            parts["clean_pred"].append(logits.argmax(-1).cpu().numpy().astype(np.int64))
            for key in metrics:
                metrics[key].append(met[key].numpy().astype(np.float32))
        bar.update(len(sk) + (len(batch) if batch is not None else 0))
    return {"ids": np.asarray(ids, dtype=str), "labels": np.asarray(labels, dtype=str),
            "targets": np.asarray(targets, dtype=np.int64), **{key: np.concatenate(v) for key, v in parts.items()},
            "skipped": np.asarray([(s.path or s.id, s.reason) for s in skipped], dtype=str).reshape(-1, 2),
            **{f"m_{key}": np.concatenate(v) for key, v in metrics.items()}}


def _score_pass(c: _Call, mine: list[int], siblings: list[MaskEvalRun], captured: list[int],
                stage_metrics: bool) -> dict:
    """Pass 1 over this rank's unfinished chunks (copied from a sibling where one has it) -> timings."""
    p, run = c.p, c.run
    todo, reused = [], 0
    run.drop_damaged(mine, lambda k: run.score_fault(k, c.chunk_records(k)), run.score_file)
    for k in mine:
        if run.score_file(k).exists():
            continue
        src = next((r.score_file(k) for r in siblings if r.score_file(k).exists()
                    and r.score_fault(k, c.chunk_records(k)) is None), None)
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
        savez(run.score_file(k), **_score_chunk(c, k, col, captured, bar))
    bar.close()
    return {"score_chunks_reused": reused, "score_seconds": round(time.perf_counter() - t0, 2),
            "score_images": c.n_images(todo)}


def _mask_chunk(c: _Call, k: int, need: list[tuple], frames: list[pd.DataFrame], sc: dict, row_of: dict,
                scores: np.ndarray, donors: np.ndarray | None, cond_index: dict, bar) -> pd.DataFrame:
    """Pass 2 on chunk k: the (mode, order, ratio) conditions ``need`` computed, added to ``frames``
    (copied from a sibling), rows sorted by condition, then image. scores, donors: (n, N), rows as
    ``sc["ids"]`` (``row_of``: id -> row); donors None without a *_other order."""
    p, lm, model = c.p, c.lm, c.clf.lm.model
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
                return c.clf.logits(masked_features(model, xs, mode, idx_s, lm.grid, lm.patch_size))

            pred = infer(c.clf.lm, x, forward=logits, per_image=(idx,), precision=p.precision).argmax(-1)
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
    """Pass 2 over this rank's unfinished chunks (conditions a sibling has are copied) -> timings."""
    p, run = c.p, c.run
    conds = p.conditions()
    cond_index = {cond: i for i, cond in enumerate(conds)}
    run.drop_damaged(mine, lambda k: run.mask_fault(k, conds), run.mask_file)
    todo = [k for k in mine if not run.mask_file(k).exists()]
    reuse = {k: sibling_mask_rows(siblings, k, cond_index, run.chunk_ids(k)) for k in todo}
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
    atomic_write(run.path / "skipped.csv",
                 lambda f: pd.DataFrame(skipped, columns=["path", "reason"]).to_csv(f, index=False))
    clean_top1 = float((sc["clean_pred"] == sc["targets"]).mean() * 100) if len(sc["ids"]) else float("nan")
    run.mark_complete(n_images=int(len(sc["ids"])), n_skipped=len(skipped), clean_top1=clean_top1,
                      layers=choice["layers"], **stats)


def _load_models(p: MaskEvalParams, progress: bool, rank0_first):
    """(scoring model, classifier); a timm classifier must share the scoring model's input."""
    score_lm = load_model(p.model, device=p.device)
    probe = ProbeSettings(train_images=p.probe_train, per_class=p.probe_per_class,
                          weight_decay=p.probe_weight_decay, seed=p.seed)
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


def _require(run: MaskEvalRun, fault, n_chunks: int, what: str) -> None:
    """Every chunk's part present and sound after a pass; else an error (a rerun recomputes them)."""
    bad = {k: f for k in range(n_chunks) if (f := fault(k))}
    if bad:
        raise RuntimeError(f"{run.path}: {what} chunks {bad} missing or damaged after the {what} pass; "
                           "run the command again to recompute them")


def _open(run: MaskEvalRun, dist: Dist, progress: bool) -> tuple[_Call, list, str]:
    """(the call's shared state, images the classifier cannot score, the forward precision)."""
    p = run.params
    records = _records(p)
    lm, clf = _load_models(p, progress and dist.rank == 0, dist.rank0_first)
    forward = forward_precision(next(lm.model.parameters()).device, p.precision)
    check_forward(run, forward)
    if dist.rank == 0:
        run.prepare(len(records))       # params.json once computing starts: a failed start leaves none
        run.set_info(model={**model_identity(lm), "forward": forward},
                     classifier={**clf.identity(), "info": clf.info, "n_classes": len(clf.classes)})
    skipped_label = [Skipped(r.id, str(r.path or ""),
                             r.skip or f"label {r.label!r} is not a class of {clf.spec}")
                     for r in records if clf.target(r.label) is None]
    records = [r for r in records if clf.target(r.label) is not None]
    c = _Call(p, run, records, lm, clf, KeypointCache(), progress)
    return c, skipped_label, forward


def run_mask_eval(params: MaskEvalParams, out: str | Path, *, progress: bool = True,
                  rank: int = 0, world: int = 1, barrier=None) -> MaskEvalRun:
    """Run (or resume) mask-eval into ``out``. Under torchrun this process does chunks k % world ==
    rank of both passes; every rank chooses the same layer, rank 0 alone writes the tables."""
    t_start = time.perf_counter()
    run, dist = MaskEvalRun(out, params), Dist(rank, world, barrier)
    if finished(run, params.device, params.precision):
        return run                      # a finished folder is read, never rewritten
    with contextlib.ExitStack() as held:
        dist.rank0_first(lambda: held.enter_context(run.lock()) if rank == 0 else None)
        if not run.finished():          # finished by a process that held the lock before this one
            _passes(*_open(run, dist, progress), dist, t_start)
    return run


def _passes(c: _Call, skipped_label: list, forward: str, dist: Dist, t_start: float) -> None:
    """Both passes over this rank's chunks; rank 0 then writes the tables."""
    p, run, lm, rank, world = c.p, c.run, c.lm, dist.rank, dist.world
    mine = [k for k in range(c.n_chunks) if k % world == rank]
    n_layers = len(lm.model.blocks)
    spec = MK.parse_layers(p.layer, n_layers)
    captured = list(range(1, n_layers + 1)) if spec == "auto" else spec

    # runs beside this one differing only in orders / modes / ratios: their finished parts are copied
    siblings = run.score_siblings() if any(not f(k).exists() for k in mine
                                           for f in (run.score_file, run.mask_file)) else []
    siblings = [s for s in siblings if recorded_forward(s) == forward]

    stats = _score_pass(c, mine, siblings, captured, stage_metrics=spec == "auto")
    dist.sync()
    _require(run, lambda k: run.score_fault(k, c.chunk_records(k)), c.n_chunks, "score")
    sc = load_scores(run, c.n_chunks)
    choice = _choose_layers(p, captured, sc, n_layers)
    scores = MK.combine_layer_scores(sc["layer_scores"], choice["layers"], captured)
    if rank == 0:
        write_json(run.path / "layer.json", choice)
        savez(run.path / "scores.npz", ids=sc["ids"], labels=sc["labels"], counts=sc["counts"], scores=scores,
              layer_scores=sc["layer_scores"].astype(np.float16), captured=np.asarray(captured),
              layers=np.asarray(choice["layers"]))
    # donor maps (*_other orders) drawn over all scored images: every rank and resumed call agrees
    donors = MK.donor_scores(scores, sc["ids"], p.orders, p.seed)

    stats.update(_mask_pass(c, mine, siblings, sc, scores, donors))
    if world > 1:
        stats["world"] = world   # the timings above are rank 0's share
    dist.sync()
    if rank != 0:
        return
    _require(run, lambda k: run.mask_fault(k, p.conditions()), c.n_chunks, "mask")
    _finalize(c, sc, choice, skipped_label, {"seconds_this_call": round(time.perf_counter() - t_start, 2), **stats})
