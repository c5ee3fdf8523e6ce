"""Linear probe on a frozen backbone's CLS token, the embedded tier's classifier (Sec 5.1): features
cached per chunk, the fit under ``cache_dir()/probes/<features key>/``."""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from vitsift_core.method.linear import fit_logistic
from vitsift_core.model.embedded import embedded_weights
from vitsift_core.paths import cache_dir
from vitsift_core.data.batches import iter_batches
from vitsift_core.data.keypoints import KeypointCache
from vitsift_core.data.sources import resolve_images
from vitsift_core.store import DEFAULT_CHUNK, atomic_write, key_of, savez, write_text

FEATURE_FORMAT = "cls-v1"


@dataclass
class ProbeSettings:
    """What decides a probe's weights."""

    train_images: str = "imagenette:train"
    per_class: int | None = 100        # training images per class (None: all)
    weight_decay: float = 1e-3         # L2 on the standardised-feature weights (mean CE + wd * |W|^2)
    max_iter: int = 500                # L-BFGS iterations
    seed: int = 0

    def __post_init__(self):
        if self.per_class is not None and self.per_class < 1:
            raise ValueError(f"per_class must be >= 1 or None, got {self.per_class}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")


@dataclass
class Probe:
    """A trained probe: ``logits = features @ weight.T + bias`` over ``classes`` (labels, e.g. wnids)."""

    weight: torch.Tensor   # (C, D)
    bias: torch.Tensor     # (C,)
    classes: list[str]
    info: dict             # training facts: images per class, train accuracy, loss, seconds, key

    def logits(self, feats: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(feats.device, feats.dtype)
        return feats @ w.T + self.bias.to(feats.device, feats.dtype)


def cls_features(tokens: torch.Tensor) -> torch.Tensor:
    """The probe's input: the CLS token of ``forward_features`` output (B, T, D) -> (B, D)."""
    return tokens[:, 0]


def model_identity(lm) -> dict:
    """What identifies a LoadedModel's weights, for cache keys."""
    ident = {"spec": lm.spec, "arch": lm.arch, "source": lm.source,
             "input_size": list(lm.data_config["input_size"]),
             "mean": list(lm.data_config["mean"]), "std": list(lm.data_config["std"]),
             "crop_pct": lm.data_config.get("crop_pct"), "interpolation": lm.data_config.get("interpolation")}
    if lm.source == "embedded":
        ident["weights"] = embedded_weights().name       # carries the ONNX hash + conversion version
    elif lm.source.startswith("checkpoint:"):
        st = Path(lm.source.split(":", 1)[1]).stat()
        ident["weights"] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return ident


def probe_paths(lm, settings: ProbeSettings, root: Path | None = None) -> tuple[Path, Path]:
    """(weights, json) files of the probe for backbone ``lm`` and ``settings``."""
    feat_key = key_of({"format": FEATURE_FORMAT, "model": model_identity(lm), "images": settings.train_images,
                       "chunk": DEFAULT_CHUNK})
    folder = Path(root or cache_dir() / "probes") / feat_key
    probe_key = key_of({"features": feat_key, **asdict(settings)})
    return folder / f"probe-{probe_key}.safetensors", folder / f"probe-{probe_key}.json"


def _records(settings: ProbeSettings):
    recs = resolve_images(settings.train_images, by_class=True)   # per-class subsets are prefixes
    classes = sorted({r.label for r in recs if r.label is not None})
    if not classes:
        raise ValueError(f"probe training images {settings.train_images!r} carry no labels "
                         "(use imagenette:train or a folder with one subfolder per class)")
    return (recs if settings.per_class is None else recs[:settings.per_class * len(classes)]), classes


def extract_features(lm, records, folder: Path, *, batch_size: int = 32, num_workers: int = 1,
                     progress: bool = True, chunk: int = DEFAULT_CHUNK) -> tuple[list[str], list[str], np.ndarray]:
    """(ids, labels, CLS features (n, D) float32) of ``records``, cached in ``folder/parts`` per chunk;
    a chunk file is reused when it holds every id of its chunk."""
    parts = Path(folder) / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    chunks = [records[s:s + chunk] for s in range(0, len(records), chunk)]

    def load(k):
        """Chunk k's (ids, labels, feats) when its file holds every id of the chunk, else None."""
        f = parts / f"{k:05d}.npz"
        if not f.exists():
            return None
        with np.load(f) as z:
            got, seen = (list(z["ids"]), list(z["labels"]), z["feats"]), set(z["seen"])
        return got if {r.id for r in chunks[k]} <= seen else None

    todo = [k for k in range(len(chunks)) if load(k) is None]
    dev = next(lm.model.parameters()).device
    bar = tqdm(total=sum(len(chunks[k]) for k in todo), unit="img", desc=f"probe features ({lm.spec})",
               disable=not progress or not todo, dynamic_ncols=True)
    cache = KeypointCache()
    for k in todo:
        ids, labels, feats = [], [], []
        for batch, skipped in iter_batches(chunks[k], lm.data_config, lm.grid, lm.patch_size,
                                           batch_size=batch_size, num_workers=num_workers, cache=cache,
                                           progress=False):
            if batch is not None:
                with torch.inference_mode():
                    f = cls_features(lm.model.forward_features(batch.tensors.to(dev)))
                ids += batch.ids
                labels += [str(x) for x in batch.labels]
                feats.append(f.float().cpu().numpy())
            bar.update(len(skipped) + (len(batch) if batch is not None else 0))
        d = feats[0].shape[1] if feats else 0
        savez(parts / f"{k:05d}.npz", ids=np.asarray(ids, dtype=str), labels=np.asarray(labels, dtype=str),
              feats=np.concatenate(feats) if feats else np.zeros((0, d), np.float32),
              seen=np.asarray([r.id for r in chunks[k]], dtype=str))
    bar.close()
    want = {r.id for r in records}
    rows = [row for k in range(len(chunks)) for row in zip(*load(k)) if row[0] in want]
    if not rows:
        return [], [], np.zeros((0, 0), np.float32)
    ids, labels, feats = zip(*rows)
    return list(ids), list(labels), np.stack(feats).astype(np.float32)


def fit_linear(feats: np.ndarray, y: np.ndarray, n_classes: int, weight_decay: float = 1e-3,
               max_iter: int = 500, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """:func:`linear.fit_logistic`, standardisation folded in -> (weight (C, D), bias (C,), info)."""
    x = torch.from_numpy(np.asarray(feats, dtype=np.float64))
    t = torch.from_numpy(np.asarray(y, dtype=np.int64))
    w, b, mu, sd = fit_logistic(x, t, n_classes, weight_decay, max_iter, init_std=0.01, seed=seed)
    z = (x - mu) / sd
    with torch.no_grad():
        loss = float(torch.nn.functional.cross_entropy(z @ w.T + b, t) + weight_decay * (w ** 2).sum())
        acc = float(((z @ w.T + b).argmax(1) == t).double().mean())
        weight = (w / sd).float()
        bias = (b - (w * (mu / sd)).sum(1)).float()
    return weight.detach(), bias.detach(), {"train_loss": loss, "train_top1": acc}


def train_or_load_probe(lm, settings: ProbeSettings = ProbeSettings(), *, batch_size: int = 32,
                        num_workers: int = 1, progress: bool = True, root: Path | None = None) -> Probe:
    """The probe for backbone ``lm`` and ``settings``: from the cache, else trained and cached."""
    records, classes = _records(settings)
    wfile, jfile = probe_paths(lm, settings, root)
    folder = wfile.parent
    if wfile.exists() and jfile.exists():
        info = json.loads(jfile.read_text())
        sd = load_file(str(wfile))
        return Probe(sd["weight"], sd["bias"], info["classes"], info)
    t0 = time.perf_counter()
    ids, labels, feats = extract_features(lm, records, folder, batch_size=batch_size, num_workers=num_workers,
                                          progress=progress)
    if len(ids) == 0:
        raise ValueError(f"no usable training images for the probe in {settings.train_images!r}")
    t_feat = time.perf_counter() - t0
    index = {c: i for i, c in enumerate(classes)}
    y = np.asarray([index[lab] for lab in labels])
    feat_key, probe_key = folder.name, jfile.stem.removeprefix("probe-")
    weight, bias, fit = fit_linear(feats, y, len(classes), settings.weight_decay, settings.max_iter, settings.seed)
    per_class = {c: int((y == i).sum()) for i, c in enumerate(classes)}
    info = {"key": probe_key, "features_key": feat_key, "classes": classes, "settings": asdict(settings),
            "model": model_identity(lm), "n_train": len(ids), "per_class": per_class,
            "feature": "CLS token of forward_features (final layer norm), backbone frozen",
            "feature_seconds": round(t_feat, 1), "fit_seconds": round(time.perf_counter() - t0 - t_feat, 1), **fit}
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(wfile, lambda p: save_file({"weight": weight.contiguous(), "bias": bias.contiguous()}, str(p)))
    write_text(jfile, json.dumps(info, indent=2))
    return Probe(weight, bias, classes, info)
