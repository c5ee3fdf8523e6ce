"""Models side by side (notebook 09, issue 19): each model's layer curves on a relative depth axis,
its claims and stage fit, and the claims table with one column per model. Models of different depth
are compared at the same relative depth (layer - 1) / (L - 1): 0 = first block, 1 = last block.
"""
from __future__ import annotations

from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from vitsift_core.experiments.study import PARTS, layer_curves, layers
from vitsift_core.experiments.zoo import ZooRun
from vitsift_core.method.stages import zscore
from vitsift_core.report.claims import claims
from vitsift_core.report.figures import PALETTE, shade_stages

UNAVAILABLE = "weights unavailable: "
OBJECTIVE_COLORS = {"supervised": PALETTE[0], "MAE": PALETTE[1], "DINO": PALETTE[2], "DINOv2": PALETTE[3],
                    "CLIP": PALETTE[4]}
LINESTYLES = ("-", "--", ":", "-.")
SEMANTIC = PARTS["donor-keypoints"][0]      # layer_curves' column: KK(real) - KK(donor keypoints)


def relative_depth(layer, n_layers: int) -> np.ndarray:
    """1-based layers (any shape) of a model with ``n_layers`` blocks -> (layer - 1) / (L - 1) in
    [0, 1]; a one-block model sits at 0."""
    layer = np.asarray(layer, dtype=np.float64)
    if n_layers < 1 or (layer < 1).any() or (layer > n_layers).any():
        raise ValueError(f"layers must lie in 1..{n_layers}, got {layer.min()}..{layer.max()}")
    return (layer - 1) / (n_layers - 1) if n_layers > 1 else np.zeros_like(layer)


@dataclass
class ZooTables:
    """What notebook 09 shows. curves: one row per (model, layer) with ``study.layer_curves``'
    columns plus model, objective, n_layers, depth; per_model: label -> (claims table, info);
    status: one row per model (available or 'weights unavailable: <reason>')."""

    curves: pd.DataFrame
    per_model: dict[str, tuple[pd.DataFrame, dict]]
    status: pd.DataFrame
    labels: list[str]


def model_curves(zr: ZooRun) -> pd.DataFrame:
    """One available model's per-layer curves with its label, objective and relative depth."""
    cur = layer_curves(zr.runs)
    n = int(cur.layer.max())
    return cur.assign(model=zr.model.label, objective=zr.model.objective, n_layers=n,
                      depth=relative_depth(cur.layer, n))


def status_row(zr: ZooRun, info: dict | None) -> dict:
    """A model's line in the status table: what ran, or why it did not."""
    m = zr.model
    row = {"model": m.label, "spec": m.spec, "objective": m.objective,
           "img_size": m.img_size if m.img_size is not None else "model's own", "note": m.note}
    if not zr.available:
        return {**row, "status": UNAVAILABLE + zr.reason, "n_images": 0, "n_layers": 0}
    skipped = "; ".join(f"{c} control skipped: {why}" for c, why in zr.skipped_controls.items())
    return {**row, "status": "ok" + (f" ({skipped})" if skipped else ""), "n_images": info["n_images"],
            "n_layers": len(layers(zr.runs[("none", False)]))}


def collect(zoo_runs: list[ZooRun], n_boot: int = 1000, seed: int = 0) -> ZooTables:
    """Claims (``report.claims.claims``) and curves of every available model; a status row for all."""
    curves, per_model, status = [], {}, []
    for zr in zoo_runs:
        info = None
        if zr.available:
            table, info = claims(zr.runs, n_boot=n_boot, seed=seed)
            per_model[zr.model.label] = (table, info)
            curves.append(model_curves(zr))
        status.append(status_row(zr, info))
    cur = pd.concat(curves, ignore_index=True) if curves else \
        pd.DataFrame(columns=["model", "objective", "n_layers", "layer", "depth"])      # no model ran
    return ZooTables(cur, per_model, pd.DataFrame(status), [zr.model.label for zr in zoo_runs])


def claim_cell(row: pd.Series) -> str:
    """One claims-table row as one cell: value, CI and whether it holds."""
    ci = "" if row.ci95 == "n/a" else f" {row.ci95}"
    return f"{row.value:.4f}{ci} {'holds' if row.holds == 'yes' else 'fails'}"


def wide_claims(tables: ZooTables) -> pd.DataFrame:
    """The claims with one column per model (in ``tables.labels`` order): a first 'status' row (images
    counted, or 'weights unavailable: <reason>'), then each (section, claim) any model has, its cell
    :func:`claim_cell` or '-' where that model has no such row."""
    status = tables.status.set_index("model")
    first = {"section": "-", "claim": "status"}
    for label in tables.labels:
        s = status.loc[label]
        first[label] = s.status if s.status.startswith(UNAVAILABLE) else f"ok, {s.n_images} images"
    keys: list[tuple[str, str]] = []
    cells: dict[tuple[str, str], dict[str, str]] = {}
    for label, (table, _) in tables.per_model.items():
        for _, r in table.iterrows():
            k = (r.section, r.claim)
            if k not in cells:
                keys.append(k)
                cells[k] = {}
            cells[k][label] = claim_cell(r)
    rows = [first] + [{"section": s, "claim": c, **{lab: cells[(s, c)].get(lab, "-") for lab in tables.labels}}
                      for s, c in keys]
    return pd.DataFrame(rows, columns=["section", "claim", *tables.labels])


def stage_table(tables: ZooTables) -> pd.DataFrame:
    """Per model: the 3-segment fit's boundaries (layers and relative depth), whether the paper's
    shape tests pass (and which fail), and the bootstrap shares; unavailable models say why."""
    rows = []
    for _, s in tables.status.iterrows():
        row = {"model": s.model, "objective": s.objective, "n_layers": s.n_layers}
        if s.model not in tables.per_model:
            rows.append({**row, "stages": s.status})
            continue
        info = tables.per_model[s.model][1].get("stage")
        if not info:
            rows.append({**row, "stages": f"no fit ({s.n_layers} layers or undefined curves)"})
            continue
        fit, n = info["fit"], int(s.n_layers)
        depth = ", ".join(f"{relative_depth(a, n):.2f}-{relative_depth(b, n):.2f}" for a, b in fit["segments"])
        rows.append({**row, "stages": info["summary"], "relative_depth": depth,
                     "shape_tests_pass": "yes" if fit["holds"] else "no",
                     "failed_tests": ", ".join(fit["failed"]) or "-",
                     "bootstrap_same_boundaries": round(info["bootstrap_same_boundaries"], 3),
                     "bootstrap_shape_tests_pass": round(info["bootstrap_shape_tests_pass"], 3)})
    return pd.DataFrame(rows)


def _styles(curves: pd.DataFrame) -> dict[str, tuple]:
    """model -> (colour by objective, line style by rank within its objective)."""
    out, seen = {}, {}
    for model, obj in curves[["model", "objective"]].drop_duplicates().itertuples(index=False):
        k = seen[obj] = seen.get(obj, -1) + 1
        out[model] = (OBJECTIVE_COLORS.get(obj, "0.3"), LINESTYLES[k % len(LINESTYLES)])
    return out


DEPTH_PANELS = ((f"{SEMANTIC}_gap", "semantic part of KK - NK\n(KK-NK)(real) - (KK-NK)(donor keypoints)"),
                (SEMANTIC, "semantic part of KK\nKK(real) - KK(donor keypoints)"),
                ("gap", "KK - NK (real)"),
                ("focus_norm", "focus index / log N\n(0 = one patch, 1 = uniform)"))


def depth_figure(curves: pd.DataFrame, title: str = "") -> plt.Figure:
    """One panel per :data:`DEPTH_PANELS` column over relative depth, one line per model (colour:
    objective). A model without the donor control has no line in the semantic panels."""
    fig, axes = plt.subplots(1, len(DEPTH_PANELS), figsize=(4.2 * len(DEPTH_PANELS), 4.2), sharex=True)
    styles = _styles(curves)
    for ax, (col, label) in zip(axes, DEPTH_PANELS):
        if col != "focus_norm":
            ax.axhline(0, color="black", lw=0.8)
        for model, g in curves.groupby("model", sort=False):
            if col in g and g[col].notna().any():
                color, ls = styles[model]
                ax.plot(g.depth, g[col], color=color, ls=ls, lw=1.8, marker="o", ms=2.5, label=model)
        ax.set_xlabel("relative depth (layer - 1) / (L - 1)")
        ax.set_title(label, fontsize=9)
    if len(curves):
        axes[0].legend(fontsize=6, loc="best")
    fig.suptitle(title)
    return fig


def stage_figure(tables: ZooTables, title: str = "") -> plt.Figure:
    """Per available model: the z-scored KK - chance and focus curves the stage fit uses, over
    relative depth, its segments shaded and named only when the shape tests pass."""
    models = [m for m in tables.labels if m in tables.per_model]
    n = max(len(models), 1)
    cols = min(n, 4)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, model in zip(axes.flat, models):
        g = tables.curves[tables.curves.model == model]
        L = int(g.n_layers.iloc[0])
        ax.plot(g.layer, zscore(g.kk_minus_chance), color=PALETTE[0], lw=1.8, label="KK - chance (z)")
        ax.plot(g.layer, zscore(g.focus), color=PALETTE[5], lw=1.8, label="focus (z)")
        st = tables.per_model[model][1].get("stage")
        if st:
            shade_stages(ax, st["fit"]["segments"], st["fit"]["names"])
        ticks = np.unique(np.round(np.linspace(1, L, 5)).astype(int))
        ax.set_xticks(ticks, [f"{relative_depth(t, L):.2f}" for t in ticks])
        ax.set_xlabel(f"relative depth ({L} layers)")
        verdict = "no fit" if not st else ("shape tests pass" if st["fit"]["holds"] else "shape tests fail")
        ax.set_title(f"{model}\n{verdict}", fontsize=8, pad=16)   # pad: room for the segment names
    for ax in list(axes.flat)[len(models):]:
        ax.axis("off")
    if models:
        axes.flat[0].legend(fontsize=7)
    fig.suptitle(title)
    return fig
