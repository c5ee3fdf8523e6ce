"""The explorers page in a real browser: Voila serves notebooks/08_explorers.ipynb on a free
localhost port, Debian's Chromium (``/usr/bin/chromium``, installed by ``.ci/run``) is driven by
Playwright (``executable_path``, headless, no browser download), and the test clicks a patch, moves
the layer slider and checks that the overlay image and the theta readout change. Screenshots go to
``reports/browser/`` (explorer.png: the attention explorer; page.png: the top of the page).

Skipped, with the reason, only where no browser can be run: Playwright not installed, or no
Chromium binary (``VITSIFT_CHROMIUM`` overrides the path). The page offers one bundled photo (the
stage explorer fits over it alone), so the embedded model runs once (under a minute in all here).
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from vitsift_core.paths import reports_dir

CHROMIUM = os.environ.get("VITSIFT_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
PAGE_TIMEOUT_MS = 420_000       # the notebook runs before the page shows: model load + 1 image, loaded CPU


def _skip_reason() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError as e:
        return f"Python package playwright is not installed ({e}); it is a project dependency: pip install -e ."
    if not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)):
        return (f"no Chromium at {CHROMIUM}: .ci/run installs Debian's chromium with apt-get, which failed or "
                "was not run here (set VITSIFT_CHROMIUM to another Chromium binary)")
    try:
        import voila  # noqa: F401
    except ImportError as e:
        return f"voila is not installed ({e}); it is a project dependency: pip install -e ."
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))


@pytest.fixture(scope="module")
def voila_url(tmp_path_factory):
    from vitsift_core.widgets.serve import NOTEBOOK, explore_env, free_port, voila_command, wait_until_up

    port = free_port()
    log = tmp_path_factory.mktemp("voila") / "voila.log"
    env = explore_env(images="samples", n=1, stage_images=1, model="embedded")
    env["HF_HUB_OFFLINE"] = "1"
    with open(log, "w") as fh:
        proc = subprocess.Popen(voila_command(NOTEBOOK, port), env=env, stdout=fh, stderr=subprocess.STDOUT,
                                cwd=str(NOTEBOOK.parent.parent))
    try:
        url = f"http://127.0.0.1:{port}/"
        if not wait_until_up(url, proc, timeout=120):
            pytest.fail(f"Voila did not start (exit {proc.poll()}):\n{log.read_text()[-3000:]}")
        yield url, log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _numbers(text: str) -> list[str]:
    return re.findall(r"\d+\.\d{4}", text)


@pytest.mark.timeout(600)
def test_explorer_page_click_and_layer_slider(voila_url):
    from playwright.sync_api import sync_playwright

    url, log = voila_url
    out = reports_dir() / "browser"
    out.mkdir(parents=True, exist_ok=True)
    errors: list[str] = []
    with sync_playwright() as p, tempfile.TemporaryDirectory() as profile:
        ctx = p.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True, args=FLAGS,
                                                   viewport={"width": 1400, "height": 1000})
        try:
            page = ctx.new_page()
            page.on("pageerror", lambda e: errors.append(str(e)))
            t0 = time.monotonic()
            page.goto(url, timeout=PAGE_TIMEOUT_MS, wait_until="domcontentloaded")
            overlay = page.locator(".vitsift-attention-explorer img.vitsift-overlay")
            try:
                overlay.wait_for(state="visible", timeout=PAGE_TIMEOUT_MS)
                page.wait_for_function("() => (document.querySelector('.vitsift-readout') || {}).innerText"
                                       "?.includes('theta_i')", timeout=60_000)
            except Exception:
                page.screenshot(path=str(out / "failed.png"))
                raise AssertionError(f"explorer widgets never appeared; page text:\n{page.inner_text('body')[:2000]}"
                                     f"\nVoila log:\n{log.read_text()[-3000:]}")
            t_page = time.monotonic() - t0
            body = page.inner_text("body")
            assert "Traceback" not in body, body[:3000]
            readout = page.locator(".vitsift-attention-explorer .vitsift-readout")
            r0, src0, shot0 = readout.inner_text(), overlay.get_attribute("src"), overlay.screenshot()
            assert src0 and src0.startswith("blob:") and "query patch" in r0

            # click the patch in row 1, column 1 of the 16x16 grid (the PNG is shown 448 px wide)
            box = overlay.bounding_box()
            cell = box["width"] / 16
            t1 = time.monotonic()
            overlay.click(position={"x": 1.5 * cell, "y": 1.5 * cell})
            page.wait_for_function("r => document.querySelector('.vitsift-attention-explorer .vitsift-readout')"
                                   ".innerText !== r", arg=r0, timeout=30_000)
            t_click = time.monotonic() - t1
            r1 = readout.inner_text()
            assert "query patch 17 " in r1, r1
            page.wait_for_function("s => document.querySelector('.vitsift-attention-explorer img.vitsift-overlay')"
                                   ".src !== s", arg=src0, timeout=30_000)
            src1, shot1 = overlay.get_attribute("src"), overlay.screenshot()
            assert shot1 != shot0, "the overlay pixels did not change after the click"
            assert _numbers(r1) != _numbers(r0), (r0, r1)

            # move the layer slider one step with the keyboard (as a user would with the handle)
            handle = page.locator(".vitsift-attention-explorer .vitsift-layer .noUi-handle")
            layer0 = int(float(handle.get_attribute("aria-valuenow")))
            handle.focus()
            t2 = time.monotonic()
            page.keyboard.press("ArrowRight")
            page.wait_for_function("r => document.querySelector('.vitsift-attention-explorer .vitsift-readout')"
                                   ".innerText !== r", arg=r1, timeout=30_000)
            t_layer = time.monotonic() - t2
            r2 = readout.inner_text()
            assert f"layer {layer0 + 1}," in r2, r2
            page.wait_for_function("s => document.querySelector('.vitsift-attention-explorer img.vitsift-overlay')"
                                   ".src !== s", arg=src1, timeout=30_000)
            shot2 = overlay.screenshot()
            assert shot2 != shot1, "the overlay pixels did not change after the layer moved"
            theta1 = page.locator(".vitsift-attention-explorer .vitsift-theta").inner_text()
            assert _numbers(r2) != _numbers(r1), (r1, r2)
            page.wait_for_timeout(300)              # let the curves image land before the screenshot
            page.locator(".vitsift-attention-explorer").screenshot(path=str(out / "explorer.png"))
            page.screenshot(path=str(out / "page.png"))
            print(f"\nbrowser: page ready {t_page:.1f} s; click -> readout {1000 * t_click:.0f} ms; "
                  f"layer key -> readout {1000 * t_layer:.0f} ms; theta_i now {theta1}; "
                  f"screenshots in {out}")
        finally:
            ctx.close()
    assert not errors, f"JavaScript errors on the page: {errors}"
