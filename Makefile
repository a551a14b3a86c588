# semidisc — `make demo` runs the quickstart screen, `make test` runs the test suite; both set up everything
# (`make test` also builds SevenNet's venv, .venv-sevennet, which its tests use).
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

# SevenNet needs e3nn>=0.5, mace-torch pins e3nn 0.4.4: SevenNet gets a venv of its own (built on request,
# `make setup-sevennet`; `make test` builds it too). Its Ray actors run there (runtime_env py_executable); the
# packages both venvs share are pinned to the main venv's versions (Ray and Python must match exactly).
SEVENNET_VENV ?= .venv-sevennet
SEVENNET_STAMP := $(SEVENNET_VENV)/.semidisc-setup
SEVENNET_SHARED := torch|ray|pymatgen|pymatgen-core|ase|numpy|scipy|pydantic|pydantic-core|torch-sim-atomistic|pyyaml|tqdm|smact

.PHONY: setup setup-sevennet demo test test-fast lint lock bench clean

setup: $(STAMP)

# requirements.lock: the exact versions of everything but torch (pip freeze of a working venv; `make lock` after a
# dependency change). CC=g++: GPAW's C++ sources do not build with cc.
$(STAMP): pyproject.toml Makefile requirements.lock
	@if command -v apt-get >/dev/null && ! dpkg -s libxc-dev libopenblas-dev >/dev/null 2>&1; then \
		echo "installing GPAW's system libraries (libxc-dev libopenblas-dev)"; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q libxc-dev libopenblas-dev; fi
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip freeze | grep -i '^torch==' > $(VENV)/constraints.txt
	CC=g++ $(PY) -m pip install -q -c $(VENV)/constraints.txt -r requirements.lock
	$(PY) -m pip install -q --no-deps -e ".[dev,dft]"
	$(PY) -m pip check
	touch $(STAMP)

# Re-resolve from pyproject.toml (newest versions it allows) and write requirements.lock from the result.
lock:
	rm -rf $(VENV)-lock && python3 -m venv $(VENV)-lock
	$(VENV)-lock/bin/python -m pip install -q --upgrade pip
	$(VENV)-lock/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(VENV)-lock/bin/python -m pip freeze | grep -i '^torch==' > $(VENV)-lock/constraints.txt
	CC=g++ $(VENV)-lock/bin/python -m pip install -q -c $(VENV)-lock/constraints.txt -e ".[dev,dft]"
	{ sed -n '1,2p' requirements.lock; $(VENV)-lock/bin/python -m pip freeze --exclude-editable | grep -viE '^torch=='; } > requirements.lock.new
	mv requirements.lock.new requirements.lock && rm -rf $(VENV)-lock

setup-sevennet: $(SEVENNET_STAMP)

$(SEVENNET_STAMP): $(STAMP) requirements-sevennet.txt
	test -x $(SEVENNET_VENV)/bin/python || python3 -m venv $(SEVENNET_VENV)
	$(SEVENNET_VENV)/bin/python -m pip install -q --upgrade pip
	$(PY) -m pip freeze | grep -iE '^($(SEVENNET_SHARED))==' > $(SEVENNET_VENV)/constraints.txt
	$(SEVENNET_VENV)/bin/python -m pip install -q "$$(grep -i '^torch==' $(SEVENNET_VENV)/constraints.txt)"
	$(SEVENNET_VENV)/bin/python -m pip install -q -c $(SEVENNET_VENV)/constraints.txt -r requirements-sevennet.txt
	$(SEVENNET_VENV)/bin/python -m pip install -q --no-deps -e .
	$(SEVENNET_VENV)/bin/python -m pip check | { ! grep -viE '^semidisc |^No broken'; }  # the project's own deps (mace, chgnet, ...) are not meant to be here
	$(SEVENNET_VENV)/bin/python -c "import sevenn, materials.potentials.calculators; print('sevennet venv ready: sevenn', sevenn.__version__)"
	touch $(SEVENNET_STAMP)

demo: setup
	$(VENV)/bin/semidisc screen configs/quickstart.yaml --resume

# CI runs `make test`: lint first (seconds), then the whole suite (~25 min of pytest on 2 cores).
test: setup setup-sevennet lint
	$(PY) -m pytest -q -ra --durations=15

# The edit-test loop: everything not marked slow (no end-to-end Ray/MLflow runs, no notebooks).
test-fast: setup
	$(PY) -m pytest -q -ra -m "not slow" --durations=10

bench: setup setup-sevennet
	$(PY) benchmarks/screen_overhead.py
	$(PY) benchmarks/screen_row_transport.py --save benchmarks/results/screen_row_transport.json
	$(PY) benchmarks/perf_record.py
	$(PY) benchmarks/stability_accuracy.py
	$(PY) benchmarks/bo_perovskites.py
	$(PY) benchmarks/bo_sustainable.py --save benchmarks/results/bo_sustainable.json
	$(PY) benchmarks/dft_gaps.py
	$(PY) benchmarks/dft_magnetic.py --fit-u --ecut 400 --kpoint-density 1.5 --out runs/bench/dft_u_fit
	$(PY) benchmarks/dft_magnetic.py --ecut 400 --kpoint-density 1.5 --out runs/bench/dft_magnetic
	$(PY) benchmarks/bandgap_accuracy.py
	$(PY) benchmarks/finetune_gain.py
	$(PY) benchmarks/potential_comparison.py --save benchmarks/results/potential_comparison.json

lint: setup
	$(VENV)/bin/ruff check materials pipelines tests benchmarks scripts
	$(VENV)/bin/ruff format --check materials pipelines tests benchmarks scripts

clean:
	rm -rf runs .pytest_cache
