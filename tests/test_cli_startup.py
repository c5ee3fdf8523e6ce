"""The command line's fixed cost: help and bad arguments answer without torch, timm or cv2, and a
command imports its own module, not the other commands' (vitsift_core/cli.py's docstring)."""
import json
import subprocess
import sys

HEAVY = ("torch", "timm", "cv2", "pandas")
# runs main(argv) in a fresh interpreter; prints its exit status and which heavy modules it loaded
SCRIPT = """
import json, sys
from vitsift_core.cli import main
try:
    rc = main(json.loads(sys.argv[1]))
except SystemExit as e:
    rc = e.code
mods = [m for m in {heavy!r} + ("vitsift_core.experiments.analysis", "vitsift_core.experiments.maskeval",
        "vitsift_core.experiments.mae_runs") if m in sys.modules]
print(json.dumps({{"rc": rc, "modules": mods}}))
"""


def run_main(*argv):
    p = subprocess.run([sys.executable, "-c", SCRIPT.format(heavy=HEAVY), json.dumps(argv)],
                       capture_output=True, text=True, timeout=300)
    return json.loads(p.stdout.strip().splitlines()[-1]), p.stderr


def test_help_and_bad_arguments_import_nothing_heavy():
    for argv, rc in [(["--help"], 0), ([], 2), (["bogus"], 2), (["analyze", "--help"], 0),
                     (["analyze", "--limit", "x", "--out", "o"], 2), (["suite", "--control", "none"], 2)]:
        out, err = run_main(*argv)
        assert out == {"rc": rc, "modules": []}, (argv, out, err)


def test_help_lists_every_command_with_its_line():
    out = subprocess.run([sys.executable, "-m", "vitsift_core.cli", "--help"], capture_output=True,
                         text=True, timeout=120).stdout
    for cmd in ("analyze", "suite", "mask-eval", "pretrain"):
        assert f"    {cmd} " in out
    assert "Sec 5.1" in out and "torchrun for DDP" in out


def test_a_command_imports_its_module_only(tmp_path):
    out, err = run_main("analyze", "--images", str(tmp_path / "missing"), "--out", str(tmp_path / "o"),
                        "--device", "cpu", "--quiet")
    assert out["rc"] == 2 and "error" in err, (out, err)
    assert "vitsift_core.experiments.analysis" in out["modules"] and "torch" in out["modules"]
    assert "vitsift_core.experiments.maskeval" not in out["modules"]
    assert "vitsift_core.experiments.mae_runs" not in out["modules"]


def test_the_command_exits_without_the_final_collections_and_keeps_its_status(tmp_path):
    # python -m vitsift_core.cli as the benchmarks and users run it: gc.freeze() before the exit
    # (cli.entry), seen from an atexit hook, which runs after it; the exit status is main's
    script = ("import atexit, gc, runpy, sys\n"
              "atexit.register(lambda: print('frozen', gc.get_freeze_count()))\n"
              "sys.argv = ['vitsift'] + sys.argv[1:]\n"
              "runpy.run_module('vitsift_core.cli', run_name='__main__')\n")
    p = subprocess.run([sys.executable, "-c", script, "analyze", "--images", str(tmp_path / "missing"),
                        "--out", str(tmp_path / "o"), "--device", "cpu", "--quiet"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "error" in p.stderr, (p.returncode, p.stderr)
    frozen = int(p.stdout.split("frozen")[-1])
    assert frozen > 100_000, p.stdout          # torch and timm's objects, not a handful


def test_the_installed_command_is_the_entry_that_freezes():
    import tomllib
    from pathlib import Path
    scripts = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["vitsift"] == "vitsift_core.cli:entry"
