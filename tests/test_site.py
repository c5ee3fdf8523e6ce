"""reports/index.html and the rendered notebooks (report.site): built from executed notebooks'
papermill metadata, figures inline as data URIs, failed notebooks marked; and opened in a real
browser (Debian's Chromium through Playwright; skipped with the reason where none can run)."""
from __future__ import annotations

import base64
import io
import os
from pathlib import Path

import nbformat
import pytest

from vitsift_core.model.embedded import NAME
from vitsift_core.report.site import notebook_row, write_html_index

CHROMIUM = os.environ.get("VITSIFT_CHROMIUM", "/usr/bin/chromium")


def _png(color=(200, 30, 30), size=(12, 8)) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _executed(path: Path, model="embedded", exception=None, png: bytes | None = None, profile="smoke") -> Path:
    """A notebook as papermill leaves it: parameters + duration in metadata, one figure output."""
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("fig")
    if png is not None:
        cell.outputs = [nbformat.v4.new_output("display_data", data={
            "image/png": base64.b64encode(png).decode(), "text/plain": "<Figure>"})]
    nb.cells = [nbformat.v4.new_markdown_cell("# A section"), cell]
    nb.metadata["papermill"] = {"parameters": {"profile": profile, "model": model, "images": "imagenette:val"},
                                "duration": 12.5, "exception": exception, "end_time": "2026-12-01T00:00:00"}
    path.write_text(nbformat.writes(nb))
    return path


def _reports(tmp_path: Path) -> Path:
    reports = tmp_path / "reports"
    (reports / "figures").mkdir(parents=True)
    _executed(reports / "02_sift_keypoints.ipynb", png=_png())
    _executed(reports / "05_stages.ipynb", model="vit_base_patch16_224.dino", exception=True)
    (reports / "figures" / "02_counts.png").write_bytes(_png((10, 200, 10)))
    return reports


def test_row_names_the_embedded_model_and_failure(tmp_path):
    reports = _reports(tmp_path)
    ok, bad = notebook_row(reports / "02_sift_keypoints.ipynb"), notebook_row(reports / "05_stages.ipynb")
    assert ok["model"] == NAME and not ok["failed"] and ok["seconds"] == 12.5
    assert bad["model"] == "vit_base_patch16_224.dino" and bad["failed"]


def test_index_links_every_executed_notebook_with_figures_inline(tmp_path):
    reports = _reports(tmp_path)
    page = write_html_index(reports, {"name": "smoke", "description": "test profile"}).read_text()
    assert 'href="html/02_sift_keypoints.html"' in page and 'href="html/05_stages.html"' in page
    assert page.count("FAILED") == 1 and NAME.replace("'", "&#x27;") in page
    assert 'src="figures/02_counts.png"' in page and "figures/05_" not in page
    rendered = (reports / "html" / "02_sift_keypoints.html").read_text()
    assert base64.b64encode(_png()).decode() in rendered     # the output figure, inline


def test_index_says_which_profile_each_notebook_ran_with(tmp_path):
    """A partial rerun under another profile keeps the older notebooks listed: each row names its own
    profile, and one that is not the index's is marked, not shown under the index's profile."""
    reports = _reports(tmp_path)
    _executed(reports / "09_zoo.ipynb", profile="zoo")
    assert notebook_row(reports / "09_zoo.ipynb")["profile"] == "zoo"
    page = write_html_index(reports, {"name": "zoo", "description": ""}).read_text()
    row = next(r for r in page.split("<tr>") if "02_sift_keypoints" in r)
    assert "smoke" in row and "not zoo" in row
    assert "not zoo" not in next(r for r in page.split("<tr>") if "09_zoo" in r)


@pytest.mark.skipif(not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)),
                    reason=f"no Chromium at {CHROMIUM} (.ci/run installs Debian's chromium; VITSIFT_CHROMIUM overrides)")
def test_browser_opens_index_and_a_notebook_with_its_figure(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is a project dependency: pip install -e .")
    reports = _reports(tmp_path)
    index = write_html_index(reports, {"name": "smoke", "description": ""})
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page()
        page.route("http*://**", lambda route: route.abort())   # CDN scripts (MathJax): offline here
        page.goto(index.as_uri(), wait_until="domcontentloaded")
        assert page.locator("#notebooks tr").count() == 3          # header + 2 notebooks
        assert page.eval_on_selector("img.thumb", "i => i.complete && i.naturalWidth") == 12
        page.click("text=02_sift_keypoints", no_wait_after=True)
        page.wait_for_url("**/html/02_sift_keypoints.html")
        page.wait_for_selector("img[src^='data:image/png']")
        width = page.eval_on_selector("img[src^='data:image/png']", "i => i.complete && i.naturalWidth")
        assert width == 12
        page.screenshot(path=str(tmp_path / "report.png"))
        browser.close()
