"""Python environments for potentials that cannot share the main one.

SevenNet needs e3nn>=0.5 while mace-torch pins e3nn 0.4.4, so SevenNet lives in a second venv
(``make setup-sevennet`` builds ``.venv-sevennet``). The driver, the stores and MLflow stay in the main
environment; only the relaxation actors run in the other one, started by Ray with
``runtime_env={"py_executable": <its python>}``. What crosses between the two is plain data (work items with
structure dicts, settings dataclasses, result records), never a live model.

Where an environment's interpreter is: ``ray.environments.<name>`` in the config, else ``$SEMIDISC_<NAME>_PYTHON``,
else ``<repo>/.venv-<name>/bin/python``. On a cluster the same path must hold that venv on every node. Ray and
Python must be the same versions in both environments (Ray runs the main venv's worker script with the other
interpreter), which :func:`check_potential` verifies before any actor starts.

Run as ``python -m pipelines.environments '<PotentialSpec JSON>'`` (by :func:`check_potential`, in the other
environment) it loads the potential on the CPU and prints one JSON line: versions, weights hash, elements.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from materials.potentials.calculators import (
    PotentialError,
    PotentialSpec,
    load_potential,
    supported_elements,
    weights_hash,
)

#: The repository root (``materials/`` and ``pipelines/`` are importable from here in any environment).
REPO = Path(__file__).resolve().parent.parent
#: Seconds allowed for loading a potential in another environment (imports of torch and the model: ~10-30 s).
CHECK_TIMEOUT_S = 600


def environment_python(name: str, configured: Mapping[str, str] | None = None) -> Path:
    """The interpreter of environment ``name``: ``configured[name]`` (the config's ``ray.environments``), else
    ``$SEMIDISC_<NAME>_PYTHON``, else ``<repo>/.venv-<name>/bin/python``. The path may not exist (see
    :func:`check_potential`)."""
    if configured and configured.get(name):
        return Path(configured[name]).expanduser()
    from_env = os.environ.get(f"SEMIDISC_{name.upper()}_PYTHON")
    if from_env:
        return Path(from_env).expanduser()
    return REPO / f".venv-{name}" / "bin" / "python"


def actor_runtime_env(spec: PotentialSpec, configured: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """Ray ``runtime_env`` for the actors of ``spec``: None in the main environment, else the other environment's
    interpreter, with the repository on ``PYTHONPATH`` (so the project imports whatever the driver's cwd)."""
    name = spec.environment()
    if name is None:
        return None
    return {"py_executable": str(environment_python(name, configured)), "env_vars": {"PYTHONPATH": str(REPO)}}


def describe_loaded_potential(spec: PotentialSpec) -> dict[str, Any]:
    """Load ``spec`` on the CPU in this process and describe it: weights hash, trained elements, versions.

    Raises:
        PotentialError: the potential cannot be loaded here.
    """
    import ray

    cpu_spec = dataclasses.replace(spec, device="cpu")
    calculator = load_potential(cpu_spec)
    return {
        "weights_hash": weights_hash(cpu_spec),
        "elements": sorted(supported_elements(cpu_spec, calculator)),
        "ray": ray.__version__,
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "executable": sys.executable,
    }


def check_potential(spec: PotentialSpec, configured: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Load the potential once on the CPU, in the environment it runs in, before anything is written or any Ray
    work starts; return :func:`describe_loaded_potential`'s description (``weights_hash``, ``elements``).

    In the main environment this loads it in this process. For a potential with its own environment it runs
    ``python -m pipelines.environments`` there (~10-30 s) and checks that Ray and Python match this process's.

    Raises:
        PotentialError: the environment is not built, does not match, or cannot load the potential; the message
            says what to run.
    """
    name = spec.environment()
    if name is None:
        return describe_loaded_potential(spec)
    python = environment_python(name, configured)
    fix = f"run `make setup-{name}` (or point ray.environments.{name} or $SEMIDISC_{name.upper()}_PYTHON at its python)"
    if not python.is_file():
        raise PotentialError(
            f"potential.name={spec.name} runs in its own environment {name!r}, which is not built here "
            f"({python} does not exist): {fix}"
        )
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    try:
        proc = subprocess.run(
            [str(python), "-m", "pipelines.environments", json.dumps(dataclasses.asdict(spec))],
            capture_output=True,
            text=True,
            timeout=CHECK_TIMEOUT_S,
            env=env,
            cwd=REPO,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PotentialError(f"environment {name!r} ({python}) could not load potential {spec.label()}: {exc}") from exc
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise PotentialError(f"environment {name!r} ({python}) failed to start the potential check ({tail}): {fix}")
    info = json.loads(lines[-1])
    if "error" in info:
        raise PotentialError(f"{info['error']} (in environment {name!r}, {python})")
    import ray

    here = {"ray": ray.__version__, "python": f"{sys.version_info.major}.{sys.version_info.minor}"}
    mismatched = [f"{key} {info[key]} there vs {here[key]} here" for key in here if info.get(key) != here[key]]
    if mismatched:
        raise PotentialError(
            f"environment {name!r} ({python}) does not match this one ({'; '.join(mismatched)}): Ray actors need the "
            f"same Ray and Python in both; rebuild it: rm -rf {python.parent.parent} && make setup-{name}"
        )
    return info


def _main(argv: list[str]) -> int:
    """Entry point in the other environment: load the spec given as JSON, print one JSON line."""
    try:
        spec = PotentialSpec(**json.loads(argv[0]))
        info = describe_loaded_potential(spec)
    except PotentialError as exc:
        info = {"error": str(exc)}
    except Exception as exc:  # any failure to load is reported to the driver as one line
        info = {"error": f"potential {argv[0]} could not be loaded: {type(exc).__name__}: {exc}"}
    print(json.dumps(info), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
