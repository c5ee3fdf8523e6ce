# vitsift: `make help` lists the targets. Every target sets up what it needs itself.
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PROFILE ?= embedded
# pytest-xdist workers for `make test` (0: one process). Many tests wait on subprocesses (notebook
# kernels, torchrun, the benchmarks' children), so 2 workers help even on 2 cores.
TEST_WORKERS ?= 2
STAMP := $(VENV)/.vitsift-installed

# The project's data setting: VITSIFT_DATA, else a shared copy beside the checkout, else ./data.
ifeq ($(origin VITSIFT_DATA), undefined)
  ifneq ($(wildcard ../shared/datasets/imagenette2-160),)
    export VITSIFT_DATA := $(abspath ../shared/datasets)
  endif
endif

.PHONY: help setup test test-slow reproduce bench fingerprint explore clean-results
.DEFAULT_GOAL := help

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-14s %s\n", $$1, $$2}'
	@echo "  variables: PROFILE=$(PROFILE) (smoke|embedded|embedded-full|paper|zoo), VITSIFT_DATA=$(VITSIFT_DATA), TEST_WORKERS=$(TEST_WORKERS)"

setup: $(STAMP) ## create .venv and install the package with its dev extras (only when needed)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

test: $(STAMP) ## run the test suite, TEST_WORKERS processes, a test file at a time each (no network; Imagenette tests skip when VITSIFT_DATA is absent)
	HF_HUB_OFFLINE=1 $(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile

test-slow: $(STAMP) ## run the tests marked slow
	HF_HUB_OFFLINE=1 $(BIN)/pytest -m slow

bench: $(STAMP) ## time analysis (plain forward / analyze / AttentionExtract+NumPy, memory, and `vitsift analyze` end to end on 1,000 Imagenette val images; fp32 with glibc's allocator and again with freed memory kept (no page-fault churn), then bf16 forwards where the CPU has native bf16) and keypoints; embedded model, batch 32; reports/bench/*.json
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_analysis.py --model embedded --batch 32 --e2e-limit 1000
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_analysis.py --model embedded --batch 32 --no-memory --malloc steady
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_analysis.py --model embedded --batch 32 --precision bf16 --only-native-bf16
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_keypoints.py --model embedded --batch 32

.PHONY: keypoint-geometry
keypoint-geometry: $(STAMP) ## issue 16: what the half-pixel rule and --dedupe-keypoints change (200 Imagenette val images, embedded model, ~4 min on 2 cores); results/keypoint_geometry/*.csv
	HF_HUB_OFFLINE=1 nice -n 10 $(BIN)/python benchmarks/keypoint_geometry.py

fingerprint: $(STAMP) ## hash every output table of a fixed run set (needs Imagenette; ~15 min): proves a refactor changed no number; FP_WORK=folder
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/fingerprint.py --work $(or $(FP_WORK),reports/fingerprint)

reproduce: $(STAMP) ## run every notebook headless with params/$(PROFILE).yaml into reports/ (open reports/index.html)
	$(BIN)/python -m vitsift_core.reproduce --profile $(PROFILE)

explore: $(STAMP) ## serve the explorers (notebooks/08) as a Voila page on a free localhost port and print its address
	$(BIN)/python -m vitsift_core.widgets.serve $(if $(EXPLORE_IMAGES),--images '$(EXPLORE_IMAGES)')

clean-results: ## delete results/ and reports/ (computed results and executed notebooks)
	rm -rf results reports
