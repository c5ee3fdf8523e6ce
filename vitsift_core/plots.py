"""Figure conventions shared by every notebook: palette, labels, where figures go.

Colour-blind-safe palette (seaborn 'colorblind', i.e. Okabe-Ito-like); every figure is saved
as PNG and SVG under ``reports/figures/`` by :func:`save_figure`, and tables under
``reports/tables/`` by :func:`save_table`.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from .paths import reports_dir

PALETTE = sns.color_palette("colorblind")
#: one colour per series name, stable across notebooks
COLORS = {
    "KK": PALETTE[0], "NK": PALETTE[1], "chance": "0.35", "shuffle-keypoints": PALETTE[2],
    "random-init": PALETTE[7], "mean-attention": PALETTE[4], "semantic": PALETTE[3],
    "focus": PALETTE[0], "top": PALETTE[3], "bottom": PALETTE[2], "random": "0.35",
    "keypoints": PALETTE[4], "guided": PALETTE[2],
}
STAGE_COLORS = (PALETTE[9], PALETTE[8], PALETTE[6])


def style() -> None:
    """Readable defaults for notebook and saved figures."""
    sns.set_theme(context="notebook", style="whitegrid", palette=PALETTE)
    matplotlib.rcParams.update({"figure.dpi": 110, "savefig.dpi": 150, "savefig.bbox": "tight",
                                "axes.titlesize": 11, "axes.labelsize": 10, "legend.fontsize": 8})


def save_figure(fig: plt.Figure, name: str, folder: Path | None = None) -> list[Path]:
    """Write ``name``.png and ``name``.svg to reports/figures/ (or ``folder``); returns the paths."""
    d = Path(folder) if folder is not None else reports_dir() / "figures"
    d.mkdir(parents=True, exist_ok=True)
    out = []
    for ext in ("png", "svg"):
        p = d / f"{name}.{ext}"
        fig.savefig(p)
        out.append(p)
    return out


def save_table(df: pd.DataFrame, name: str, folder: Path | None = None) -> list[Path]:
    """Write ``name``.csv and ``name``.md to reports/tables/ (or ``folder``)."""
    d = Path(folder) if folder is not None else reports_dir() / "tables"
    d.mkdir(parents=True, exist_ok=True)
    csv, md = d / f"{name}.csv", d / f"{name}.md"
    df.to_csv(csv, index=False)
    md.write_text(df.to_markdown(index=False) if _has_tabulate() else df.to_string(index=False))
    return [csv, md]


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
        return True
    except ImportError:
        return False
