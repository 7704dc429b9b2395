# `make test` and `make demo` set up everything they need in .venv and are safe to run twice.
# torch is pinned to the 2.13.0 CPU build where the venv has no torch yet: a bare `pip install torch`
# would pull the CUDA build with several GB of packages. megatron-core is installed without extras
# (its extras pull CUDA-only packages).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test test-gpu demo venv clean

venv: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q megatron-core==0.16.1
	$(PY) -m pip install -q -e '.[test,tensorboard]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

# The GPU tests (tests_gpu/, not collected by `make test`); without a CUDA GPU they stop with exit status 3.
# In NVIDIA's containers use the container's Python (its CUDA torch, TE, Apex) instead of .venv:
# `make test-gpu GPU_PYTHON=python3`, with megatron-core and this package importable by it.
test-gpu: $(if $(GPU_PYTHON),,$(STAMP))
	$(or $(GPU_PYTHON),$(PY)) -m pytest -q tests_gpu

demo: $(STAMP)
	$(VENV)/bin/megatron-prm demo --output-dir runs/demo

clean:
	rm -rf runs .pytest_cache
