# semidisc — `make demo` runs the quickstart screen, `make test` runs the test suite; both set up everything.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.semidisc-setup
# On a GPU machine install the CUDA torch first (see README) and run: make setup TORCH_SPEC=torch
TORCH_SPEC ?= torch==2.13.0
export OMP_NUM_THREADS ?= 1
export OPENBLAS_NUM_THREADS ?= 1
export MKL_NUM_THREADS ?= 1
export MLFLOW_DISABLE_TELEMETRY := true
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: setup demo test bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@if command -v apt-get >/dev/null && ! dpkg -s libxc-dev libopenblas-dev >/dev/null 2>&1; then \
		echo "installing GPAW's system libraries (libxc-dev libopenblas-dev)"; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q libxc-dev libopenblas-dev; fi
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip freeze | grep -i '^torch==' > $(VENV)/constraints.txt
	$(PY) -m pip install -q -c $(VENV)/constraints.txt -e ".[dev]"
	$(PY) -m pip install -q -c $(VENV)/constraints.txt gpaw-data
	CC=g++ $(PY) -m pip install -q -c $(VENV)/constraints.txt -e ".[dft]"
	$(PY) -m pip check
	touch $(STAMP)

demo: setup
	$(VENV)/bin/semidisc screen configs/quickstart.yaml --resume

test: setup
	$(PY) -m pytest -q -ra

bench: setup
	$(PY) benchmarks/screen_overhead.py
	$(PY) benchmarks/perf_record.py
	$(PY) benchmarks/stability_accuracy.py
	$(PY) benchmarks/bo_perovskites.py
	$(PY) benchmarks/dft_gaps.py
	$(PY) benchmarks/dft_magnetic.py --ecut 400 --kpoint-density 1.5
	$(PY) benchmarks/bandgap_accuracy.py
	$(PY) benchmarks/finetune_gain.py

lint: setup
	$(VENV)/bin/ruff check materials pipelines tests benchmarks scripts
	$(VENV)/bin/ruff format --check materials pipelines tests benchmarks scripts

clean:
	rm -rf runs .pytest_cache
