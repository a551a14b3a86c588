"""Executes every notebook in notebooks/ top to bottom (smoke size) and checks the screens they ran.

The kernel is the interpreter running pytest (the venv's python): the ``python3`` spec is resolved from
ipykernel's built-in spec only, so a ``python3`` kernelspec registered elsewhere (user or system Jupyter
folders) cannot substitute another interpreter; the test checks ``sys.executable`` inside the kernel.
"""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402
from jupyter_client.manager import AsyncKernelManager  # noqa: E402

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
#: Notebooks that must leave a finished screen (a results.csv) in their work folder.
SCREENING_NOTEBOOKS = {"01_quickstart.ipynb"}
STABLE_EHULL = 0.05  # eV/atom
_PROBE = "import sys as _s; print('KERNEL_PYTHON=' + _s.executable)"


def _kernel_python(nb) -> str | None:
    for output in nb.cells[0].get("outputs", []):
        for line in output.get("text", "").splitlines():
            if line.startswith("KERNEL_PYTHON="):
                return line.split("=", 1)[1]
    return None


def _read_results(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_notebooks_found():
    assert NOTEBOOKS, f"no notebooks in {NOTEBOOK_DIR}"


def test_committed_notebooks_have_no_outputs():
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
        assert not dirty, f"{path.name}: clear the outputs of cells {dirty} before committing"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    workdir = tmp_path / "work"
    monkeypatch.setenv("SEMIDISC_NOTEBOOK_N", "6")
    monkeypatch.setenv("SEMIDISC_NOTEBOOK_WORKDIR", str(workdir))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # always a local Ray instance

    nb = nbformat.read(path, as_version=4)
    nb.cells.insert(0, nbformat.v4.new_code_cell(_PROBE))
    # kernel_dirs=[]: only ipykernel's own spec, whose argv is [sys.executable, "-m", "ipykernel_launcher", ...]
    km = AsyncKernelManager(kernel_name="python3", kernel_spec_manager=KernelSpecManager(kernel_dirs=[]))
    client = nbclient.NotebookClient(
        nb, km=km, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError naming the cell on any error

    kernel_python = _kernel_python(nb)
    assert kernel_python is not None, "the kernel did not report its interpreter"
    assert Path(kernel_python).resolve() == Path(sys.executable).resolve(), (
        f"notebook ran under {kernel_python}, not the test interpreter {sys.executable}"
    )

    # screen output folders (results.csv beside results.sqlite; MLflow's artifact copies are not counted)
    results = sorted(p for p in tmp_path.rglob("results.csv") if p.with_name("results.sqlite").is_file())
    if path.name in SCREENING_NOTEBOOKS:
        assert results, f"{path.name} left no results.csv under {tmp_path}"
    for csv_path in results:
        rows = _read_results(csv_path)
        assert rows, f"{csv_path} is empty"
        failed = [(r["id"], r["failure_reason"]) for r in rows if r["status"] != "ok"]
        assert not failed, f"failed items in {csv_path}: {failed}"
        ehull = [float(r["e_above_hull"]) for r in rows if r["e_above_hull"] not in ("", None)]
        assert ehull and all(math.isfinite(e) for e in ehull), f"{csv_path}: missing E_hull values"
        assert min(ehull) <= STABLE_EHULL, f"{csv_path}: no structure within {STABLE_EHULL} eV/atom of the hull"
        if path.name in SCREENING_NOTEBOOKS:
            assert len(rows) == 6, f"{csv_path}: {len(rows)} rows, expected SEMIDISC_NOTEBOOK_N=6"
