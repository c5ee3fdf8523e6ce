"""What the run options may take (precisions, controls, the chunk size), in a module that imports
nothing: ``vitsift --help`` and a bad argument are answered without loading torch, timm or cv2.

The modules that act on these values (model.infer, store, experiments.analysis) import them from here.
"""
from __future__ import annotations

import os

PRECISIONS = ("auto", "fp32", "bf16")
PRECISION_HELP = ("forward pass: auto = bf16 autocast on CUDA, fp32 on CPU; bf16 on a CPU with "
                  "AVX512-BF16/AMX is about 2x faster (metrics stay float32; a folder keeps one)")

DEFAULT_CHUNK = 64      # images per resumable chunk; part of a run's identity ("chunk")

# donor-keypoints: each image's own maps scored with another image's counts (a seeded derangement
# within each chunk's decodable images); like shuffle-keypoints it shares the real forward passes
CONTROLS = ("none", "shuffle-keypoints", "random-init", "mean-attention", "donor-keypoints")


def env_switch(name: str, default: str = "on") -> str:
    """A VITSIFT_* switch: ``default`` when unset, "on" for 1/true/yes/on, "off" for 0/false/no/off
    ("auto" too where it is the default); ValueError for anything else."""
    env = os.environ.get(name, "").strip().lower()
    if env in ("", default):
        return default
    if env in ("1", "true", "yes", "on"):
        return "on"
    if env in ("0", "false", "no", "off"):
        return "off"
    raise ValueError(f"{name} must be {'0, 1 or auto' if default == 'auto' else '0 or 1'}, got {env!r}")
