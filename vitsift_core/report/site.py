"""The report a reader opens: every executed notebook in ``reports/`` rendered to HTML (figures inline
as data URIs, so the folder can be read in a browser without Jupyter) plus ``reports/index.html``
that lists them with time, model and data.

The index is built from the executed notebooks themselves (papermill's metadata), not from the
last ``make reproduce`` call, so a partial rerun (``--notebook``) keeps the other notebooks listed.
"""
from __future__ import annotations

import html
import json
import time
from pathlib import Path

from vitsift_core.model.registry import display_name

HTML_DIR = "html"           # reports/html/NN_name.html, one page per executed notebook
_STYLE = ("body{font-family:system-ui,sans-serif;max-width:70em;margin:2em auto;padding:0 1em}"
          "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left}"
          "img.thumb{height:90px;margin:2px;border:1px solid #ddd}")


def executed_notebooks(reports: Path) -> list[Path]:
    """reports/NN_*.ipynb in order (papermill's outputs)."""
    return sorted(reports.glob("[0-9][0-9]_*.ipynb"))


def notebook_row(nb: Path) -> dict:
    """What the index says about one executed notebook: its parameters, duration and whether a
    cell failed (papermill records the exception)."""
    meta = json.loads(nb.read_text()).get("metadata", {}).get("papermill", {})
    params = meta.get("parameters", {}) or {}
    return {"notebook": nb.stem, "profile": params.get("profile", "-"),
            "seconds": meta.get("duration"), "failed": bool(meta.get("exception")),
            "model": display_name(params["model"]) if "model" in params else "-", "data": params.get("images", "-"),
            "end_time": meta.get("end_time", "")}


def render_notebook(nb: Path, out_dir: Path) -> Path:
    """One executed notebook -> ``out_dir/<stem>.html`` (JupyterLab's look, images inline)."""
    from nbconvert import HTMLExporter   # heavy (jinja, mistune): only when a report is written

    body, _ = HTMLExporter(template_name="lab", embed_images=True).from_filename(str(nb))
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{nb.stem}.html"
    out.write_text(body, encoding="utf-8")
    return out


def _figure_thumbs(reports: Path, stem: str) -> str:
    figs = sorted((reports / "figures").glob(f"{stem[:2]}_*.png")) if (reports / "figures").exists() else []
    return "".join(f'<a href="figures/{f.name}"><img class="thumb" src="figures/{f.name}" alt="{f.name}"></a>'
                   for f in figs)


def write_html_index(reports: Path, profile: dict) -> Path:
    """Render every executed notebook in ``reports`` and write ``reports/index.html`` linking them."""
    rows = []
    for nb in executed_notebooks(reports):
        render_notebook(nb, reports / HTML_DIR)
        r = notebook_row(nb)
        secs = "-" if r["seconds"] is None else f"{r['seconds']:.0f}"
        status = "FAILED" if r["failed"] else "ok"
        # a partial rerun keeps older notebooks listed: say when one ran under another profile
        prof = html.escape(str(r["profile"]))
        if r["profile"] != profile["name"]:
            prof = f"<strong>{prof}</strong> (not {html.escape(profile['name'])}: an earlier run)"
        rows.append(f'<tr><td><a href="{HTML_DIR}/{r["notebook"]}.html">{html.escape(r["notebook"])}</a></td>'
                    f"<td>{status}</td><td>{prof}</td><td>{secs}</td><td>{html.escape(str(r['model']))}</td>"
                    f"<td>{html.escape(str(r['data']))}</td><td>{_figure_thumbs(reports, r['notebook'])}</td></tr>")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>vitsift reports: {html.escape(profile['name'])}"
            f"</title><style>{_STYLE}</style></head><body>"
            f"<h1>vitsift reports: profile <code>{html.escape(profile['name'])}</code> (the latest run)</h1>"
            f"<p>{html.escape(profile.get('description', ''))}</p>"
            f"<p>Written {time.strftime('%Y-%m-%d %H:%M:%S %Z')}. Each notebook links to its executed copy, "
            "rendered with its figures inline.</p>"
            "<table id='notebooks'><tr><th>notebook</th><th>run</th><th>profile</th><th>seconds</th><th>model</th><th>data</th>"
            f"<th>figures</th></tr>{''.join(rows)}</table></body></html>\n")
    out = reports / "index.html"
    out.write_text(page, encoding="utf-8")
    return out
