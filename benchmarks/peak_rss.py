"""``python peak_rss.py OUT -m MODULE ARGS...``: run MODULE as ``python -m`` would, then write this
process's own peak RSS in bytes (``VmHWM``) to OUT (Linux; elsewhere nothing is written).

Why not ``os.wait4``'s ``ru_maxrss`` of the child: Linux carries the peak of the forked copy of the
parent across ``exec`` into the child's maxrss, so a child of a large benchmark process reports at
least the parent's size (3.2 GB instead of 1.4 GB for ``vitsift analyze`` inside ``make bench``).
"""
import runpy
import sys
from pathlib import Path


def vm_hwm_bytes() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def main() -> int:
    out, flag, module, *rest = sys.argv[1:]
    if flag != "-m":
        raise SystemExit("usage: peak_rss.py OUT -m MODULE [ARGS...]")
    sys.argv = [module, *rest]
    code = 0
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        hwm = vm_hwm_bytes()
        if hwm is not None:
            Path(out).write_text(str(hwm))
    return code


if __name__ == "__main__":
    sys.exit(main())
