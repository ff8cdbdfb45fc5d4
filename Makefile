# Two commands set everything up on a fresh machine with only Python:
#   make demo   -> venv + install + synth data -> train with tables over a memory budget (SSD + look-ahead)
#                  and the same model in memory -> compare -> evaluate the checkpoint
#   make test   -> venv + install + lint + type check + full test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.tierec-installed

.PHONY: demo test lint venv bench clean torchrec pyg

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# CPU wheel first: an unpinned torch would pull several GB of CUDA packages.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/tierec demo --out runs/demo

test: $(STAMP) lint
	$(BIN)/python -m pytest -q tests

# ruff (lint) and mypy (types) on src/, configured in pyproject.toml
lint: $(STAMP)
	$(BIN)/ruff check src
	$(BIN)/mypy

# Optional TorchRec baseline for benchmarks/ (see docs/benchmarks.md).
torchrec: $(STAMP)
	$(BIN)/python -m pip install -q fbgemm-gpu-cpu==1.8.0 tensordict "torchmetrics==1.0.3" tqdm pyre-extensions
	$(BIN)/python -m pip install -q --no-deps torchrec==1.8.0

# Optional PyTorch Geometric peer of benchmarks/bench_graph.py (LightGCN). torch-geometric declares no torch
# dependency; --no-deps keeps pip from touching the pinned torch, the few pure imports it needs come first.
pyg: $(STAMP)
	$(BIN)/python -m pip install -q xxhash psutil requests
	$(BIN)/python -m pip install -q --no-deps torch-geometric==2.8.1

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_embedding.py

clean:
	rm -rf runs .pytest_cache
