"""Classifiers for the masking experiment (Sec 5.1): a backbone plus a head, tokens (B, T, D) -> logits:
``embedded-probe`` (a linear probe on the CLS token) or a timm ImageNet-1k classifier (paper tier)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from timm.data import ImageNetInfo

from vitsift_core.experiments.probe import ProbeSettings, cls_features, model_identity, train_or_load_probe
from vitsift_core.model.registry import load_model

PROBE_SPECS = ("embedded-probe", "probe")


@dataclass
class Classifier:
    """``lm``: the ViT run on the (masked) input; ``head``: tokens (B, T, D) -> logits (B, C);
    ``classes``: the label (e.g. wnid) of each logit."""

    spec: str
    kind: str                     # 'probe' | 'timm'
    lm: object                    # models.LoadedModel
    head: Callable[[torch.Tensor], torch.Tensor]
    classes: list[str]
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        self._index = {c: i for i, c in enumerate(self.classes)}

    def target(self, label: str | None) -> int | None:
        """Index of ``label`` among the classes, None when it is not one of them."""
        return None if label is None else self._index.get(str(label))

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(tokens)

    def identity(self) -> dict:
        d = {"spec": self.spec, "kind": self.kind, "model": model_identity(self.lm)}
        if self.kind == "probe":
            d["probe"] = self.info.get("key")
        return d


def imagenet_classes() -> list[str]:
    """The 1000 ImageNet-1k wnids in timm's class-index order."""
    return list(ImageNetInfo("imagenet-1k").label_names())


def load_classifier(spec: str, model: str | None = None, *, device: str = "cpu", probe=None,
                    batch_size: int = 32, num_workers: int = 1, progress: bool = True,
                    backbone=None) -> Classifier:
    """The classifier named by ``spec``. ``model``: the probe's backbone spec; ``probe``: ProbeSettings;
    ``backbone``: an already loaded LoadedModel to reuse."""
    spec = str(spec).strip()
    if spec in PROBE_SPECS:
        lm = backbone if backbone is not None else load_model(model or "embedded", device=device)
        if getattr(lm.model, "cls_token", None) is None:
            raise ValueError(f"{lm.spec}: the probe reads the CLS token, and this model has none")
        pr = train_or_load_probe(lm, probe or ProbeSettings(), batch_size=batch_size,
                                 num_workers=num_workers, progress=progress)
        return Classifier(spec="embedded-probe", kind="probe", lm=lm,
                          head=lambda tok: pr.logits(cls_features(tok).float()),
                          classes=list(pr.classes), info=dict(pr.info))
    lm = backbone if backbone is not None and backbone.spec == spec else load_model(spec, device=device)
    n = int(getattr(lm.model, "num_classes", 0) or 0)
    if n != 1000:
        raise ValueError(f"classifier {spec!r} has {n} output classes; a timm classifier here must be an "
                         "ImageNet-1k model (1000 classes). For a headless backbone use 'embedded-probe'.")
    return Classifier(spec=spec, kind="timm", lm=lm, head=lambda tok: lm.model.forward_head(tok),
                      classes=imagenet_classes(), info={"label_space": "ImageNet-1k (1000 classes)"})
