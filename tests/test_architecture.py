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
#: The only function-level imports of one materials/ module by another: each defers a heavy optional dependency
#: (the band-gap GNN needs torch-geometric; BO features without the gap model must not load it).
DEFERRED_IMPORTS_IN_MATERIALS = {("materials.ml.features", "materials.ml.bandgap")}
#: The domain subpackages of materials/ (each a folder with an __init__.py); only errors.py, composition.py and
#: serialise.py, which every domain uses, sit beside them.
MATERIALS_SUBPACKAGES = ("bo", "data", "datasets", "dft", "ml", "potentials", "structures", "thermo")


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


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def project_imports(path: Path) -> list[tuple[str, bool]]:
    """(imported project module, imported inside a function or class?) of every import of ``materials.*`` in the
    file. ``from materials.dft import gpaw`` names the module ``materials.dft.gpaw``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    nested: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            nested.update(id(child) for child in ast.walk(node) if child is not node)
    modules = set(project_modules("materials"))
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("materials")]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("materials"):
            dotted = [f"{node.module}.{a.name}" for a in node.names]
            names = [name if name in modules else node.module for name in dotted]
        found += [(name, id(node) in nested) for name in dict.fromkeys(names)]
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


def test_materials_is_domain_subpackages_without_import_cycles():
    """materials/ is split by domain; the modules import each other at module level only (so the dependencies
    are read at the top of each file) except where a heavy optional dependency is deferred, and the import graph
    between its modules has no cycle (deferred imports counted too)."""
    top_level = sorted(p.name for p in (ROOT / "materials").iterdir() if p.suffix == ".py")
    assert top_level == ["__init__.py", "composition.py", "errors.py", "serialise.py"], top_level
    folders = sorted(p.name for p in (ROOT / "materials").iterdir() if p.is_dir() and p.name != "__pycache__")
    assert folders == sorted(MATERIALS_SUBPACKAGES)
    assert all((ROOT / "materials" / name / "__init__.py").is_file() for name in folders)

    graph: dict[str, set[str]] = {}
    deferred = set()
    for path in sorted((ROOT / "materials").rglob("*.py")):
        me = module_name(path)
        for name, inside_function in project_imports(path):
            if name == me or name == "materials":
                continue
            graph.setdefault(me, set()).add(name)
            if inside_function:
                deferred.add((me, name))
    assert "materials.dft.gpaw" in graph["materials.potentials.finetune"]  # the scan resolves module imports
    assert "materials.composition" in graph["materials.thermo.stability"]
    assert deferred == DEFERRED_IMPORTS_IN_MATERIALS, sorted(deferred - DEFERRED_IMPORTS_IN_MATERIALS)

    def cycle_from(start: str) -> list[str] | None:
        stack = [(start, [start])]
        while stack:
            node, trail = stack.pop()
            for nxt in graph.get(node, ()):
                if nxt == start:
                    return [*trail, nxt]
                if nxt not in trail:
                    stack.append((nxt, [*trail, nxt]))
        return None

    cycles = [c for c in map(cycle_from, sorted(graph)) if c]
    assert not cycles, cycles[0]
