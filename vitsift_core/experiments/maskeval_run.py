"""mask-eval's parameters (:class:`MaskEvalParams`) and run folder (:class:`MaskEvalRun`): score and mask
parts per chunk, copied from a sibling folder that differs only in orders, modes or ratios."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from vitsift_core.method import masking as MK
from vitsift_core.model.infer import PRECISIONS
from vitsift_core.data.keypoints import CountsIdentity, SiftParams
from vitsift_core.experiments.classify import PROBE_SPECS
from vitsift_core.store import (DEFAULT_CHUNK, Params, RunFolder, at_least_one, ids_of_chunk, in_range, load_npz,
                                load_parquet, read_json)


@dataclass
class MaskEvalParams(CountsIdentity, Params):
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
    chunk: int = DEFAULT_CHUNK          # images per resumable chunk (both passes)
    # how to run / summarise: not part of the identity
    batch_size: int = 32
    device: str = "auto"
    num_workers: int = 1
    n_boot: int = 2000
    precision: str = "auto"             # infer.PRECISIONS; recorded as model.forward, never mixed in a run

    RUNTIME_KEYS = ("batch_size", "device", "num_workers", "n_boot", "precision")

    def __post_init__(self):
        if self.model is None:
            self.model = "embedded" if self.classifier in PROBE_SPECS else self.classifier
        if self.classifier == "probe":
            self.classifier = "embedded-probe"
        if not self.ratios:
            raise ValueError("ratios must list at least one mask ratio in [0, 100) percent")
        for r in self.ratios:
            in_range("ratios", r, 0, 100)
        self.ratios = sorted({float(r) if float(r) != int(float(r)) else int(float(r)) for r in self.ratios})
        self.orders = list(dict.fromkeys(self.orders))
        self.modes = list(dict.fromkeys(self.modes))
        bad = [o for o in self.orders if o not in MK.ORDERS] + [m for m in self.modes if m not in MK.MODES]
        if bad or not self.orders or not self.modes:
            raise ValueError(f"orders must be among {MK.ORDERS} and modes among {MK.MODES} "
                             f"(non-empty); got orders={self.orders}, modes={self.modes}")
        if self.tiebreak not in MK.TIEBREAKS:
            raise ValueError(f"tiebreak must be one of {MK.TIEBREAKS}, got {self.tiebreak!r}")
        in_range("gamma", self.gamma, 0, lo_open=True)
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        at_least_one(limit=self.limit, batch_size=self.batch_size, n_boot=self.n_boot, chunk=self.chunk,
                     probe_per_class=self.probe_per_class)
        in_range("num_workers", self.num_workers, 0, integer=True)
        in_range("probe_weight_decay", self.probe_weight_decay, 0)
        self.layer = str(self.layer)
        MK.parse_layers(self.layer)     # its syntax; the range once the model is known
        self.sift = dataclasses.asdict(SiftParams(**self.sift))
        in_range("contrast_threshold", self.sift["contrast_threshold"], 0)

    def _identity(self, d: dict) -> dict:
        if self.classifier not in PROBE_SPECS:   # probe settings mean nothing for a timm head
            for k in ("probe_train", "probe_per_class", "probe_weight_decay"):
                d.pop(k)
        return super()._identity(d)             # the scores use counts: the keypoint rule

    # only the masked forwards depend on these: runs differing in them share the score parts
    MASK_ONLY_KEYS = ("orders", "modes", "ratios")

    def score_identity(self) -> dict:
        return self.without_mask_keys(self.identity())

    @classmethod
    def without_mask_keys(cls, identity: dict) -> dict:
        return {k: v for k, v in identity.items() if k not in cls.MASK_ONLY_KEYS}

    def conditions(self) -> list[tuple[str, str, float]]:
        """(mode, order, ratio) for every masked forward (ratio > 0)."""
        return [(m, o, r) for m in self.modes for o in self.orders for r in self.ratios if r > 0]


def mask_eval_dir(root: str | Path, params: MaskEvalParams) -> Path:
    """<root>/mask-eval-<key>/: where a parameter set's results live."""
    return Path(root) / f"mask-eval-{params.key()}"


class MaskEvalRun(RunFolder):
    """A mask-eval output folder: score parts, mask parts, the tables."""

    what = "mask-eval run"
    outputs = ("predictions.parquet", "accuracy.parquet", "paired.parquet", "scores.npz", "layer.json",
               "skipped.csv")

    def score_file(self, k: int) -> Path:
        return self.part(k, "score-")

    def mask_file(self, k: int) -> Path:
        return self.part(k, "mask-", "parquet")

    def score_fault(self, k: int, records: list) -> str | None:
        """What is wrong with score part k (None: nothing): readable, every array one row per image of
        ``records`` (chunk k's, less the skipped)."""
        if not self.score_file(k).exists():
            return "missing"
        z = load_npz(self.score_file(k))
        if z is None or not {*SCORE_KEYS, "skipped"} <= set(z):
            return "unreadable .npz"
        ids = [str(i) for i in z["ids"]]
        if not ids_of_chunk(ids, len(z["skipped"]), records) or any(len(v) != len(ids) for key, v in z.items()
                                                                   if key != "skipped"):
            return "its .npz holds other images"
        return None

    def chunk_ids(self, k: int) -> list[str]:
        """The images score part k holds."""
        return [str(i) for i in load_npz(self.score_file(k), ("ids",))["ids"]]

    def mask_fault(self, k: int, conds: list[tuple]) -> str | None:
        """What is wrong with mask part k (None: nothing): readable, one row per condition and image of
        score part k, by condition, then image."""
        if not self.mask_file(k).exists():
            return "missing"
        df = load_parquet(self.mask_file(k))
        if df is None or not {"image", "mode", "order", "ratio"} <= set(df):
            return "unreadable .parquet"
        if not rows_are(df, self.chunk_ids(k), conds):
            return f".parquet holds {len(df)} rows, not those of its images x {len(conds)} conditions"
        return None

    def score_siblings(self) -> list["MaskEvalRun"]:
        """Run folders beside this one with the same score pass (all but orders, modes, ratios)."""
        return [MaskEvalRun(d, self.params) for d in self.siblings(MaskEvalParams.without_mask_keys)]

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
        return read_json(self.path / "layer.json")

    def info(self) -> dict:
        return {**read_json(self.params_json), **read_json(self.path / "run.json")}


SCORE_KEYS = ("ids", "labels", "targets", "counts", "layer_scores", "clean_pred")


def rows_are(df: pd.DataFrame, ids: list[str], conds: list[tuple]) -> bool:
    """True if ``df`` holds one row per (mode, order, ratio) in ``conds`` and image in ``ids``, in that order."""
    return df["image"].tolist() == ids * len(conds) and \
        list(zip(df["mode"], df.order, df.ratio.astype(float))) == [(m, o, float(r)) for m, o, r in conds
                                                                    for _ in ids]


MASK_PART_DTYPES = (("image", object), ("order", object), ("mode", object), ("ratio", float), ("n_masked", int),
                    ("pred", int))


def sibling_mask_rows(siblings: list[MaskEvalRun], k: int, cond_index: dict,
                      ids: list[str]) -> tuple[list[pd.DataFrame], set]:
    """(frames, conditions): chunk k's rows of the (mode, order, ratio) conditions in ``cond_index``
    found in ``siblings``, each from the first readable sibling whose rows of it are the images ``ids``."""
    got, frames = set(), []
    for sib in siblings:
        d = load_parquet(sib.mask_file(k))
        if d is None or not {"image", "mode", "order", "ratio"} <= set(d):
            continue
        keys = list(zip(d["mode"], d.order, d.ratio.astype(float)))
        whole = {c for c in set(keys) if rows_are(d[[x == c for x in keys]], ids, [c])}
        take = np.asarray([c in cond_index and c not in got and c in whole for c in keys], dtype=bool)
        if take.any():
            frames.append(d[take])
            got |= {c for c, t in zip(keys, take) if t}
    return frames, got


def load_scores(run: MaskEvalRun, n_chunks: int) -> dict:
    keys = SCORE_KEYS
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
    res["skipped"] = skipped            # (path or id, reason)
    return res
