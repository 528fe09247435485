# idc_lightning: `make demo` then `make test`. Everything runs from the repo's own .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision first, pinned to the builds the project is tested with; override for another CUDA/CPU build.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test test-fast lint bench gpu-wheels clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

demo: install
	$(PY) -m idc_lightning.train +experiment=demo

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(VENV)/bin/ruff check .

bench: install
	$(PY) -m idc_lightning.bench

# Wheels of what the lent, offline GPU machine lacks (listed in idc_lightning/bench/preflight.py), for its Python
# 3.12 on x86_64 Linux; benchmarks/gpu.sh installs from this folder with pip --no-index. Carry it with the command.
GPU_WHEELS ?= .gpu-wheels
gpu-wheels: install
	rm -rf $(GPU_WHEELS)
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		--platform any -d $(GPU_WHEELS) $$($(PY) -m idc_lightning.bench.preflight --print-specs)
	du -sh $(GPU_WHEELS)

clean:
	rm -rf outputs/*/ multirun .pytest_cache .ruff_cache
