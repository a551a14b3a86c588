"""The layering rules of the package, checked over every module (not one example each)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: What the science library must never import, at module level or inside a function.
FORBIDDEN_IN_MATERIALS = ("ray", "mlflow", "pipelines")


def project_modules(package: str) -> list[str]:
    return sorted(
        ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for path in (ROOT / package).rglob("*.py")
    )


def imported_names(path: Path) -> list[tuple[int, str]]:
    """(line, top-level package) of every import statement in the file, function-level ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
    return found


def test_materials_never_imports_ray_mlflow_or_pipelines():
    """materials/ is the science library: orchestration (Ray), tracking (MLflow) and pipelines/ call it, never
    the reverse. Read from the source, so a lazy import inside a function counts too."""
    offenders = [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for path in sorted((ROOT / "materials").rglob("*.py"))
        for line, name in imported_names(path)
        if name in FORBIDDEN_IN_MATERIALS
    ]
    assert not offenders, offenders
    assert len(project_modules("materials")) >= 15  # the scan saw the package


@pytest.mark.slow
def test_every_module_imports_on_its_own():
    """Each module of materials/ and pipelines/ imports first in a clean set of project modules: an import cycle
    (A imports B imports A at module level) fails here whichever module a user happens to import first."""
    modules = project_modules("materials") + project_modules("pipelines")
    code = (
        "import importlib, sys\n"
        f"failed = []\nfor name in {modules!r}:\n"
        "    for loaded in [m for m in sys.modules if m.split('.')[0] in ('materials', 'pipelines')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as exc:\n"
        "        failed.append(f'{name}: {type(exc).__name__}: {exc}')\n"
        "print('\\n'.join(failed))\n"
        "sys.exit(1 if failed else 0)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr[-2000:]
