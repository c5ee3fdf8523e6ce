#!/usr/bin/env bash
# One prepared check for a CUDA machine; finishes within 5 minutes, needs no weights and no data.
# Prints, for random-init ViT-B/16 and ViT-L/16 at batch 64: the analysis path's throughput over
# the plain forward (b/a, bf16 autocast forward, float32 metrics), peak memory, and MAE
# pre-training steps/s (when vitsift_core.model.mae exists). Writes reports/bench/gpu_check.json.
#
#   bash benchmarks/gpu_check.sh                  # on the GPU box, from anywhere
#   bash benchmarks/gpu_check.sh --cpu-tiny       # the same code on CPU with a tiny model (seconds)
#   PY=/path/to/python bash benchmarks/gpu_check.sh   # another interpreter (default: .venv, else python3)
#
# What to expect of the metric reductions on CUDA (issue 17): they run where the maps are. theta is
# one comparison mask and one matmul per count variant; focus is the min-max shift, one
# torch.special.xlogy kernel (the CPU path's NumPy log is not used on a GPU) and row sums. Per-slice
# results stay on the GPU until MetricCollector.finish_batch / PatchScoreCollector.finish_batch
# make one host copy per batch: no .cpu()/.item()/.numpy() per layer, so the capture never waits on
# the device (the keypoint counts go up once per batch and variant, non_blocking). To confirm on the
# box: torch.cuda.set_sync_debug_mode("warn") around one batch of (b) warns once, at finish_batch's
# .cpu(), not per layer. b/a is then the unfused attention plus those few kernels per layer: expect
# it a little under the forward alone with fused attention off, not a host-bound fraction of it.
# Not yet run on a GPU (issue 17's sessions had none).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ -z "${PY:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"   # random-init models: nothing to download
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
# 290 s for the Python part, so the whole script stays under 5 minutes
exec timeout -k 10 290 "$PY" benchmarks/gpu_check.py "$@"
