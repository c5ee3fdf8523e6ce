"""``make explore``: Voila serves notebooks/08_explorers.ipynb (outputs only) on localhost, behind a
random token (in the printed URL, as Jupyter does; ``--no-token`` only on a loopback host).

The options reach the notebook as ``VITSIFT_EXPLORE_*`` variables (Voila takes no papermill parameters).
"""
from __future__ import annotations

import argparse
import ipaddress
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from vitsift_core.paths import ROOT

NOTEBOOK = ROOT / "notebooks" / "08_explorers.ipynb"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def voila_command(notebook: Path, port: int, host: str = "127.0.0.1", token: str | None = None) -> list[str]:
    """Voila on ``notebook``: no browser, no code cells; with ``token`` it demands the token that
    :func:`explore_env` puts in JUPYTER_TOKEN (kept out of the command line, which others can read)."""
    voila = Path(sys.executable).with_name("voila")
    exe = [str(voila)] if voila.exists() else [sys.executable, "-m", "voila"]
    return exe + [str(notebook), f"--port={port}", "--no-browser", f"--Voila.ip={host}",
                  "--strip_sources=True", "--theme=light", "--show_tracebacks=True"] + \
        (["--Voila.auto_token=True"] if token else [])


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def explore_env(images: str | None = None, n: int | None = None, stage_images: int | None = None,
                model: str | None = None, base: dict | None = None, token: str | None = None) -> dict:
    """``base`` (default: this environment) with the page's ``VITSIFT_EXPLORE*`` variables and
    JUPYTER_TOKEN (``token``; none: removed)."""
    env = dict(os.environ if base is None else base)
    env["VITSIFT_EXPLORE"] = "1"
    for key in ("JUPYTER_TOKEN", "JUPYTER_TOKEN_FILE"):
        env.pop(key, None)
    if token:
        env["JUPYTER_TOKEN"] = token
    for key, val in (("VITSIFT_EXPLORE_IMAGES", images), ("VITSIFT_EXPLORE_N", n),
                     ("VITSIFT_EXPLORE_STAGE_IMAGES", stage_images), ("VITSIFT_EXPLORE_MODEL", model)):
        if val is not None:
            env[key] = str(val)
    return env


def wait_until_up(url: str, proc: subprocess.Popen | None = None, timeout: float = 120.0) -> bool:
    """Poll ``url`` until the server answers (any HTTP status); False on timeout or exit."""
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url.split("?")[0].rstrip("/") + "/api", timeout=5):
                return True
        except urllib.error.HTTPError:
            return True
        except OSError:
            time.sleep(0.3)
    return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vitsift_core.widgets.serve", description=__doc__)
    ap.add_argument("--port", type=int, default=0, help="0: a free port")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--notebook", default=str(NOTEBOOK))
    ap.add_argument("--images", help="image spec offered by the explorers (default: the notebook's)")
    ap.add_argument("--n", type=int, help="images in the picker")
    ap.add_argument("--stage-images", type=int, help="images of the stage explorer")
    ap.add_argument("--model", help="model spec (default: the notebook's, 'embedded')")
    ap.add_argument("--no-token", action="store_true", help="no token (a loopback --host only): any local "
                    "process can then use the page's kernel")
    a = ap.parse_args(argv)
    if a.no_token and not is_loopback(a.host):
        print(f"explore: error: --no-token with --host {a.host} would open the kernel to the network; "
              "serve it with the token (the default) or on 127.0.0.1", file=sys.stderr)
        return 2
    token = None if a.no_token else secrets.token_urlsafe(32)
    port = a.port or free_port(a.host)
    cmd = voila_command(Path(a.notebook), port, a.host, token)
    env = explore_env(a.images, a.n, a.stage_images, a.model, token=token)
    url = f"http://{a.host}:{port}/" + (f"?token={token}" if token else "")
    proc = subprocess.Popen(cmd, env=env, cwd=str(ROOT))

    def _stop(signum, frame):            # SIGTERM too, not only Ctrl-C: never leave Voila behind
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, _stop)
    try:
        if not wait_until_up(url, proc):
            print(f"explore: Voila did not start (exit code {proc.poll()}); command: {' '.join(cmd)}",
                  file=sys.stderr)
            proc.terminate()
            return 1
        print(f"\n  vitsift explorers: {url}\n  (the page runs the notebook first: the model needs a few "
              "seconds per image; Ctrl-C stops the server)\n", flush=True)
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        return 0


if __name__ == "__main__":
    sys.exit(main())
