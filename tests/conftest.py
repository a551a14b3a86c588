"""Shared fixtures: one thread everywhere (2-core machines), real CHGNet, the committed tiny MACE model."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"

import shutil  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

DATA = Path(__file__).parent / "data"
TINY_MACE = DATA / "tiny_mace.model"


@pytest.fixture(scope="session")
def chgnet_calc():
    from materials.potentials.calculators import load_potential

    return load_potential("chgnet")


@pytest.fixture(scope="session")
def reference_table():
    from materials.thermo.stability import HullTable

    return HullTable.load()


@pytest.fixture
def tiny_mace_path() -> Path:
    assert TINY_MACE.is_file(), "tests/data/tiny_mace.model missing: run scripts/train_tiny_mace.py"
    return TINY_MACE


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory) -> Callable[[Path], str]:
    """``mlflow_uri(path)`` puts an empty MLflow SQLite store at ``path`` and returns its ``sqlite:///`` URI.

    The store is created once per session by MLflow itself (its schema migrations take ~4 s on this machine) and
    copied: a test that runs a screen or campaign opens a real, current-schema MLflow database without paying the
    migrations again. Tests of a first run against no database (the CLI, notebooks, ``make demo``) still create
    theirs."""
    import mlflow

    template = tmp_path_factory.mktemp("mlflow_template") / "mlflow.db"
    mlflow.MlflowClient(tracking_uri=f"sqlite:///{template}").search_experiments()

    def make(path: Path) -> str:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(template, path)
        return f"sqlite:///{path}"

    return make


def pytest_sessionfinish(session, exitstatus):
    """Stop a Ray that a test left running while the interpreter is still whole. Otherwise Ray's own atexit
    shutdown runs during interpreter teardown, where its C++ threads can crash the process after every test
    passed (seen once on this machine: SIGSEGV in libstdc++, exit code 139)."""
    import sys

    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()
