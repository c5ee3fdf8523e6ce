"""``vitsift mask-eval``: accuracy under theta-ranked patch masking (Sec 5.1), resumable like ``analyze``.

Two passes over the images, each in chunks of ``runs.CHUNK`` images:

1. **score pass** (once per image): one forward of the scoring model with attention captured
   gives every captured layer's patch scores s_i (head-mean theta_i), the per-layer metrics the
   stage fit needs (``layer='auto'``), and -- when the classifier runs on the same ViT -- the clean
   logits from the same forward. After the last chunk the score layer is chosen
   (:func:`masking.default_score_layer` on the stage fit of these very images for ``auto``).
2. **mask pass**: for every (mode, order, ratio > 0) one forward of the classifier on the masked
   input. Ratio 0 is the clean prediction of pass 1 for every order and mode (``drop`` with nothing
   dropped and ``fill`` with nothing filled are the plain forward; the tests check it).

A run directory holds::

    params.json          identity (every parameter that decides a number), runtime, versions,
                         the classifier (probe key and training facts) and the model
    parts/score-NNNNN.npz, parts/mask-NNNNN.parquet   finished chunks (resume skips them; score
                         chunks and masked conditions are copied from a run folder beside this
                         one that differs only in orders, modes or ratios, so adding an order
                         costs only its masked forwards)
    layer.json           the score layer(s) and why; the stage fit when 'auto'
    scores.npz           ids, counts (n, N), scores (n, N) of the chosen layer(s),
                         layer_scores (n, L_captured, N) float16, captured (1-based layers)
    predictions.parquet  image, label, target, order, mode, ratio, n_masked, pred, correct
    accuracy.parquet     order, mode, ratio, n, top1, ci_low, ci_high, n_masked  (top1 and CI in %)
    paired.parquet       order, mode, ratio, n, diff, ci_low, ci_high, n_gain, n_loss, p_mcnemar:
                         masked minus clean accuracy, paired per image (percentage points)
    skipped.csv          images left out and why (undecodable, label not a classifier class)
    run.json             complete flag, timings, clean top-1

Ratios are in percent of the N patches (M = ceil(r N) masked). CIs are percentile bootstraps over
images (``n_boot`` resamples, the same resamples for every condition, so paired differences are
resampled jointly); ``p_mcnemar`` is the exact two-sided McNemar test on the discordant images.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from vitsift_core.method import masking as MK
from vitsift_core.method import stats as S
from vitsift_core.model.masked import masked_features
from vitsift_core.model.capture import PatchScoreCollector, core_workers, forward_on_cores
from vitsift_core.data.keypoints import SiftParams
from vitsift_core.experiments.analysis import _atomic_write, _write_json, check_identity, versions

PRED_COLS = ["image", "label", "target", "order", "mode", "ratio", "n_masked", "pred", "correct"]
ACC_COLS = ["order", "mode", "ratio", "n", "top1", "ci_low", "ci_high", "n_masked"]
PAIRED_COLS = ["order", "mode", "ratio", "n", "diff", "ci_low", "ci_high", "n_gain", "n_loss", "p_mcnemar"]


def _chunk() -> int:
    from vitsift_core.experiments import analysis as runs
    return runs.CHUNK


@dataclass
class MaskEvalParams:
    """Everything that decides mask-eval's numbers, plus how to run it (``RUNTIME_KEYS``)."""

    classifier: str = "embedded-probe"
    model: str | None = None            # scoring ViT; None: the classifier's own (probe: 'embedded')
    images: str = "imagenette:val"
    limit: int | None = None
    ratios: list = field(default_factory=lambda: [0, 5, 10, 20, 30, 40])   # percent of patches
    orders: list = field(default_factory=lambda: list(MK.DEFAULT_ORDERS))
    modes: list = field(default_factory=lambda: ["fill"])
    layer: str = "auto"                 # 'auto' (DESIGN section 3), '7', '7-9', '5,7' (1-based)
    gamma: float = 1.0
    weighted: bool = True
    exclude_self: bool = False
    tiebreak: str = "random"
    seed: int = 0
    probe_train: str = "imagenette:train"
    probe_per_class: int | None = 100
    probe_weight_decay: float = 1e-3
    sift: dict = field(default_factory=lambda: dataclasses.asdict(SiftParams()))
    # how to run / summarise: not part of the identity
    batch_size: int = 32
    device: str = "auto"
    num_workers: int = 1
    n_boot: int = 2000

    RUNTIME_KEYS = ("batch_size", "device", "num_workers", "n_boot")

    def __post_init__(self):
        from vitsift_core.model.classify import PROBE_SPECS
        if self.model is None:
            self.model = "embedded" if self.classifier in PROBE_SPECS else self.classifier
        if self.classifier == "probe":
            self.classifier = "embedded-probe"
        self.ratios = sorted({float(r) if float(r) != int(float(r)) else int(float(r)) for r in self.ratios})
        for r in self.ratios:
            MK.n_masked_pct(r, 1)   # validates the range
        self.orders = list(dict.fromkeys(self.orders))
        self.modes = list(dict.fromkeys(self.modes))
        bad = [o for o in self.orders if o not in MK.ORDERS] + [m for m in self.modes if m not in MK.MODES]
        if bad or not self.orders or not self.modes:
            raise ValueError(f"orders must be among {MK.ORDERS} and modes among {MK.MODES} "
                             f"(non-empty); got orders={self.orders}, modes={self.modes}")
        if self.tiebreak not in MK.TIEBREAKS:
            raise ValueError(f"tiebreak must be one of {MK.TIEBREAKS}, got {self.tiebreak!r}")
        if not self.gamma > 0:
            raise ValueError(f"gamma must be > 0, got {self.gamma}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")
        if self.batch_size < 1 or self.n_boot < 1:
            raise ValueError("batch_size and n_boot must be >= 1")
        self.layer = str(self.layer)
        self.sift = dataclasses.asdict(SiftParams(**self.sift))

    def identity(self) -> dict:
        from vitsift_core.model.classify import PROBE_SPECS
        d = dataclasses.asdict(self)
        for k in self.RUNTIME_KEYS:
            d.pop(k)
        if self.classifier not in PROBE_SPECS:   # probe settings mean nothing for a timm head
            for k in ("probe_train", "probe_per_class", "probe_weight_decay"):
                d.pop(k)
        d["chunk"] = _chunk()
        return d

    def key(self) -> str:
        return hashlib.sha1(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:12]

    # what the masked forwards add; the score pass (scores, stage metrics, clean predictions)
    # depends on everything else only, so runs that differ in these share its parts
    MASK_ONLY_KEYS = ("orders", "modes", "ratios")

    def score_identity(self) -> dict:
        return self.without_mask_keys(self.identity())

    @classmethod
    def without_mask_keys(cls, identity: dict) -> dict:
        return {k: v for k, v in identity.items() if k not in cls.MASK_ONLY_KEYS}

    def replace(self, **kw) -> "MaskEvalParams":
        return dataclasses.replace(self, **kw)

    def conditions(self) -> list[tuple[str, str, float]]:
        """(mode, order, ratio) for every masked forward (ratio > 0)."""
        return [(m, o, r) for m in self.modes for o in self.orders for r in self.ratios if r > 0]


def mask_eval_dir(root: str | Path, params: MaskEvalParams) -> Path:
    """<root>/mask-eval-<key>/: where a parameter set's results live."""
    return Path(root) / f"mask-eval-{params.key()}"


# ----------------------------------------------------------------------------------- statistics
def wide_correct(pred: pd.DataFrame) -> pd.DataFrame:
    """predictions -> (images, (order, mode, ratio)) 0/1 correctness, columns sorted."""
    return pred.pivot_table(index="image", columns=["order", "mode", "ratio"], values="correct",
                            aggfunc="first").sort_index(axis=1)


def summarize(pred: pd.DataFrame, n_boot: int = 2000, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """predictions -> (accuracy table, paired masked-minus-clean table); see module doc."""
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


# ----------------------------------------------------------------------------------- the run
class MaskEvalRun:
    """A mask-eval output directory (see module doc)."""

    def __init__(self, path: str | Path, params: MaskEvalParams):
        self.path, self.params = Path(path), params
        self.parts = self.path / "parts"

    def prepare(self, n_images: int) -> None:
        self.parts.mkdir(parents=True, exist_ok=True)
        pj = self.path / "params.json"
        ident = self.params.identity()
        if check_identity(pj, ident, "mask-eval run"):
            return
        _write_json(pj, {"identity": ident, "key": self.params.key(),
                         "runtime": {k: getattr(self.params, k) for k in MaskEvalParams.RUNTIME_KEYS},
                         "n_images": n_images, "versions": versions(),
                         "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})

    def set_info(self, **info) -> None:
        pj = self.path / "params.json"
        d = json.loads(pj.read_text())
        if any(d.get(k) != v for k, v in info.items()):
            d.update(info)
            _write_json(pj, d)

    def score_file(self, k: int) -> Path:
        return self.parts / f"score-{k:05d}.npz"

    def mask_file(self, k: int) -> Path:
        return self.parts / f"mask-{k:05d}.parquet"

    def score_siblings(self) -> list["MaskEvalRun"]:
        """Other run folders beside this one whose score pass is this one's (same parameters but for
        orders, modes and ratios): their finished score chunks can be copied instead of recomputed."""
        mine = self.params.score_identity()
        out = []
        for pj in sorted(self.path.parent.glob("*/params.json")):
            if pj.parent.resolve() == self.path.resolve():
                continue
            try:
                ident = MaskEvalParams.without_mask_keys(json.loads(pj.read_text())["identity"])
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                continue          # not a mask-eval run (or a half-written one): not a source
            if ident == mine:
                out.append(MaskEvalRun(pj.parent, self.params))
        return out

    def is_complete(self) -> bool:
        rj = self.path / "run.json"
        return rj.exists() and json.loads(rj.read_text()).get("complete", False)

    # readers for notebooks
    def accuracy(self) -> pd.DataFrame:
        return pd.read_parquet(self.path / "accuracy.parquet")

    def paired(self) -> pd.DataFrame:
        return pd.read_parquet(self.path / "paired.parquet")

    def predictions(self) -> pd.DataFrame:
        return pd.read_parquet(self.path / "predictions.parquet")

    def scores(self) -> dict:
        with np.load(self.path / "scores.npz") as z:
            return {k: z[k] for k in z.files}

    def layer(self) -> dict:
        return json.loads((self.path / "layer.json").read_text())

    def info(self) -> dict:
        return {**json.loads((self.path / "params.json").read_text()), **json.loads((self.path / "run.json").read_text())}


MASK_PART_DTYPES = (("image", object), ("order", object), ("mode", object), ("ratio", float), ("n_masked", int),
                    ("pred", int))


def _sibling_mask_rows(siblings: list[MaskEvalRun], k: int, cond_index: dict) -> tuple[list[pd.DataFrame], set]:
    """Frames of rows from chunk k's finished mask parts in ``siblings`` for the conditions (mode,
    order, ratio) in ``cond_index``, each condition from the first sibling that has it; and the set
    of those conditions."""
    got, frames = set(), []
    for sib in siblings:
        f = sib.mask_file(k)
        if not f.exists():
            continue
        d = pd.read_parquet(f)
        keys = list(zip(d["mode"], d.order, d.ratio.astype(float)))
        take = np.asarray([c in cond_index and c not in got for c in keys], dtype=bool)
        if take.any():
            frames.append(d[take])
            got |= {c for c, t in zip(keys, take) if t}
    return frames, got


def _load_scores(run: MaskEvalRun, n_chunks: int) -> dict:
    keys = ("ids", "labels", "targets", "counts", "layer_scores", "clean_pred")
    out = {k: [] for k in keys}
    met: dict[str, list] = {}
    skipped: list[tuple] = []
    for k in range(n_chunks):
        with np.load(run.score_file(k)) as z:
            for key in keys:
                out[key].append(z[key])
            skipped += [tuple(r) for r in z["skipped"]]
            for key in z.files:
                if key.startswith("m_"):
                    met.setdefault(key[2:], []).append(z[key])
    res = {k: np.concatenate(v) for k, v in out.items()}
    res["metrics"] = {k: np.concatenate(v) for k, v in met.items()}
    res["skipped"] = skipped            # (path or id, reason) of the images the score pass left out
    return res


def _choose_layers(params: MaskEvalParams, captured: list[int], sc: dict, n_layers: int) -> dict:
    from vitsift_core.experiments.analysis import head_rows, layer_table, stage_fit_json

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
            _atomic_write(run.score_file(k), lambda f: shutil.copyfile(src, f))
            reused += 1
    t0 = time.perf_counter()
    bar = tqdm(total=c.n_images(todo), unit="img", desc=f"mask-eval scores [{c.lm.spec}]",
               disable=not c.progress or not todo, dynamic_ncols=True)
    metrics = MetricCollector(len(c.lm.model.blocks), p.gamma, p.weighted, "minmax") if stage_metrics else None
    col = PatchScoreCollector([l - 1 for l in captured], p.gamma, p.weighted, p.exclude_self, metrics)
    for k in todo:
        arrays = _score_chunk(c, k, col, captured, bar)
        # written last and whole: its presence marks the chunk finished
        _atomic_write(run.score_file(k), lambda f: np.savez(open(f, "wb"), **arrays))
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
                return c.clf.logits(masked_features(model, xs, mode, idx_s, lm.grid, lm.patch_size))

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
    reuse = {k: _sibling_mask_rows(siblings, k, cond_index) for k in todo}
    need = {k: [cond for cond in conds if cond not in reuse[k][1]] for k in todo}
    n_fwd = sum(len(c.chunk_records(k)) * len(need[k]) for k in todo)
    t0 = time.perf_counter()
    bar = tqdm(total=n_fwd, unit="fwd", desc=f"mask-eval {'+'.join(p.modes)} [{c.clf.spec}]",
               disable=not c.progress or not n_fwd, dynamic_ncols=True)
    row_of = {i: n for n, i in enumerate(sc["ids"])}
    for k in todo:
        df = _mask_chunk(c, k, need[k], reuse[k][0], sc, row_of, scores, donors, cond_index, bar)
        _atomic_write(run.mask_file(k), lambda f: df.to_parquet(f, index=False))
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
    _atomic_write(run.path / "predictions.parquet", lambda f: pred.to_parquet(f, index=False))
    if not zero:
        # the paired table needs clean predictions: add them for the summary only
        extra = clean.assign(order=p.orders[0], mode=p.modes[0], ratio=0.0, n_masked=0).merge(meta, on="image")
        extra["correct"] = extra["pred"] == extra["target"]
        acc, paired = summarize(pd.concat([pred, extra[PRED_COLS]], ignore_index=True), p.n_boot, p.seed)
        acc = acc[acc.ratio > 0]
    else:
        acc, paired = summarize(pred, p.n_boot, p.seed)
    paired = paired[paired.ratio > 0].reset_index(drop=True)
    _atomic_write(run.path / "accuracy.parquet", lambda f: acc.to_parquet(f, index=False))
    _atomic_write(run.path / "paired.parquet", lambda f: paired.to_parquet(f, index=False))
    skipped = [(s.path or s.id, s.reason) for s in skipped_label] + sc["skipped"]
    _atomic_write(run.path / "skipped.csv", lambda f: pd.DataFrame(skipped, columns=["path", "reason"]).to_csv(f, index=False))
    clean_top1 = float((sc["clean_pred"] == sc["targets"]).mean() * 100) if len(sc["ids"]) else float("nan")
    _write_json(run.path / "run.json", {"complete": True, "n_images": int(len(sc["ids"])), "n_skipped": len(skipped),
                                        "clean_top1": clean_top1, "layers": choice["layers"], **stats})


def _load_models(p: MaskEvalParams, progress: bool, rank0_first):
    """(scoring model, classifier). The probe's backbone is the scoring model; a timm classifier
    must share its input so that a patch means the same pixels in both."""
    from vitsift_core.model.classify import load_classifier
    from vitsift_core.model.registry import load_model
    from vitsift_core.experiments.probe import ProbeSettings

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

    from vitsift_core.data.sources import resolve_images
    from vitsift_core.data.keypoints import KeypointCache
    from vitsift_core.data.batches import Skipped
    from vitsift_core.experiments.probe import model_identity

    t_start = time.perf_counter()
    p = params
    records = resolve_images(p.images, p.limit)
    if not records:
        raise ValueError(f"no images found for {p.images!r}")
    if len(records) < 2 and any(o in MK.DONOR_ORDERS for o in p.orders):
        raise ValueError(f"orders {[o for o in p.orders if o in MK.DONOR_ORDERS]} mask by another image's "
                         f"score map and need at least 2 images; {p.images!r} has {len(records)}")
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
    c = _Call(p, run, records, _chunk(), lm, clf, SiftParams(**p.sift), KeypointCache(), progress)
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
    sc = _load_scores(run, c.n_chunks)
    choice = _choose_layers(p, captured, sc, n_layers)
    scores = MK.combine_layer_scores(sc["layer_scores"], choice["layers"], captured)
    if rank == 0:
        _write_json(run.path / "layer.json", choice)
        _atomic_write(run.path / "scores.npz", lambda f: np.savez(
            open(f, "wb"), ids=sc["ids"], labels=sc["labels"], counts=sc["counts"], scores=scores,
            layer_scores=sc["layer_scores"].astype(np.float16), captured=np.asarray(captured),
            layers=np.asarray(choice["layers"])))
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


# ----------------------------------------------------------------------------------- command line
def add_cli(sub) -> None:
    """The ``vitsift mask-eval`` subcommand (registered by ``vitsift_core.cli``)."""
    import argparse

    p = sub.add_parser("mask-eval", help="classification accuracy with patches masked by theta score "
                       "(Top/Bottom) and controls (Random, keypoint counts), Sec 5.1",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="scoring ViT ('embedded', timm name, ARCH@PATH); default: "
                   "the classifier's own ViT ('embedded' for the probe)")
    p.add_argument("--classifier", default="embedded-probe",
                   help="'embedded-probe' (linear probe on --model's CLS token), or an ImageNet-1k timm "
                        "classifier name / ARCH@PATH (e.g. vit_base_patch16_224.augreg2_in21k_ft_in1k)")
    p.add_argument("--images", default="imagenette:val", help="'imagenette:val' or a folder with one subfolder per wnid")
    p.add_argument("--limit", type=int, default=None, help="at most this many images (round-robin over classes)")
    p.add_argument("--ratios", default="0,5,10,20,30,40", help="mask ratios in percent of the patches")
    p.add_argument("--orders", default=",".join(MK.DEFAULT_ORDERS), help="comma list of " + "|".join(MK.ORDERS))
    p.add_argument("--mode", default="fill", help="fill | drop | fill,drop")
    p.add_argument("--layer", default="auto", help="score layer(s), 1-based: 'auto' (last Capture layer if the "
                   "stage fit holds, else the middle layer), '7', '7-9', '5,7'")
    p.add_argument("--gamma", type=float, default=1.0, help="detection line height (Eq. 2)")
    p.add_argument("--unweighted", action="store_true", help="unweighted theta_i (Eq. 3, left)")
    p.add_argument("--exclude-self", action="store_true", help="drop j = i from the attended set S_i")
    p.add_argument("--tiebreak", choices=MK.TIEBREAKS, default="random",
                   help="equal scores: seeded per-image permutation, or patch index")
    p.add_argument("--seed", type=int, default=0, help="random order, tie-break, bootstrap, probe init")
    p.add_argument("--probe-train", default="imagenette:train", help="probe training images (labelled)")
    p.add_argument("--probe-per-class", default="100", help="probe training images per class, or 'all'")
    p.add_argument("--probe-weight-decay", type=float, default=1e-3)
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples for the CIs")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-workers", type=int, default=1, help="decoding/SIFT worker processes")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--out", required=True, help="output folder (re-running resumes)")


def _csv(s: str) -> list[str]:
    return [x.strip() for x in str(s).split(",") if x.strip()]


def cli_main(a) -> int:
    per_class = None if str(a.probe_per_class).lower() in ("all", "none") else int(a.probe_per_class)
    params = MaskEvalParams(
        classifier=a.classifier, model=a.model, images=a.images, limit=a.limit,
        ratios=[float(r) for r in _csv(a.ratios)], orders=_csv(a.orders), modes=_csv(a.mode), layer=a.layer,
        gamma=a.gamma, weighted=not a.unweighted, exclude_self=a.exclude_self, tiebreak=a.tiebreak, seed=a.seed,
        probe_train=a.probe_train, probe_per_class=per_class, probe_weight_decay=a.probe_weight_decay,
        n_boot=a.n_boot, batch_size=a.batch_size, num_workers=a.num_workers, device=a.device)
    from vitsift_core.cli import _distributed, _rank_device
    rank, world, barrier = _distributed()
    params = _rank_device(params, world)
    run = run_mask_eval(params, a.out, progress=not a.quiet and rank == 0, rank=rank, world=world, barrier=barrier)
    if rank != 0:
        return 0
    info = json.loads((run.path / "run.json").read_text())
    acc = run.accuracy()
    print(f"wrote {run.path}: {info['n_images']} images ({info['n_skipped']} skipped), score layer(s) "
          f"{info['layers']} ({run.layer()['how']}), clean top-1 {info['clean_top1']:.1f}%")
    show = acc.assign(top1=acc.top1.round(1), ci=[f"[{l:.1f}, {h:.1f}]" for l, h in zip(acc.ci_low, acc.ci_high)])
    print(show[["mode", "order", "ratio", "n", "top1", "ci"]].to_string(index=False))
    return 0
