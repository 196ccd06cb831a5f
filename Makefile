# Two commands from a fresh clone: `make demo` (set up, then run the main job on CPU) and `make test`.
# Set-up makes .venv; on a machine without an NVIDIA GPU it installs the CPU build of torch (never a CUDA build).
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= 2.13.0
STAMP  := $(VENV)/.installed

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): setup.py pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=23" "setuptools>=69" wheel
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	  echo "NVIDIA GPU found: installing the default (CUDA) torch build"; \
	  $(PY) -m pip install -q "torch>=2.4"; \
	else \
	  echo "no GPU: installing the CPU build of torch $(TORCH)"; \
	  $(PY) -m pip install -q "torch==$(TORCH)+cpu" 2>/dev/null || \
	  $(PY) -m pip install -q "torch==$(TORCH)" --index-url https://download.pytorch.org/whl/cpu; \
	fi
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps nemo-automodel==0.7.0 einops
	touch $(STAMP)

demo: setup
	$(VENV)/bin/alphagrpo demo --out runs/demo

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) -m bench.kernels --quick
	$(PY) -m bench.verifier --quick

clean:
	rm -rf $(VENV) runs .pytest_cache
