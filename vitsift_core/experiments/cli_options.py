"""The command-line options every ``vitsift`` run command shares (imports nothing heavy: the parser
is built before torch is loaded, see ``vitsift_core.cli``)."""
from __future__ import annotations

from vitsift_core.options import DEFAULT_CHUNK, PRECISION_HELP, PRECISIONS


def add_run_options(p, runtime: bool = True, out_help: str = "output folder (re-running resumes)",
                    out_required: bool = True) -> None:
    """--batch-size, --num-workers, --chunk, --device, --precision (``runtime``), --quiet, --out."""
    if runtime:
        p.add_argument("--batch-size", type=int, default=32)
        p.add_argument("--num-workers", type=int, default=1, help="decoding/SIFT worker processes")
        p.add_argument("--chunk", type=int, default=DEFAULT_CHUNK,
                       help="images per resumable chunk (part of the identity)")
        p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
        p.add_argument("--precision", choices=PRECISIONS, default="auto", help=PRECISION_HELP)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--out", required=out_required, default=None, help=out_help)
