"""MLflow tracking: one run per screen (params = the config, metrics, artifacts, tags). Telemetry off.

Default store: ``sqlite:///mlruns/mlflow.db`` (the file store is deprecated in MLflow 3 and raises).

Credentials never reach MLflow: every param, tag and logged document goes through :func:`redact` (a
``user:password@`` in a URI, or a ``token=``/``password=``-like query parameter, becomes ``***``), and the
``config.yaml`` written beside results (and logged) is dumped through :func:`redact` as well.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

from pipelines.config import TrackingSettings

REDACTED = "***"
# scheme://userinfo@ : the whole userinfo (user, user:password or a bare token) goes
_URI_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/?#\s]+)@")
# ?token=... &password=... ;api_key=... : query (or matrix) parameters whose name says they carry a secret
_SECRET_QUERY_PARAM = re.compile(
    r"(?P<key>[?&;][A-Za-z0-9_.\-]*(?:token|passw(?:or)?d|pwd|secret|api[_-]?key|access[_-]?key|auth"
    r"|credential|signature|sig)[A-Za-z0-9_.\-]*=)(?P<value>[^&;#\s]*)",
    re.IGNORECASE,
)


def redact_uri(text: str) -> str:
    """``text`` with credentials in any URI it contains replaced by ``***``: the userinfo part
    (``http://alice:s3cret@host:5000`` -> ``http://***@host:5000``) and the values of secret-looking query
    parameters (``?token=abc`` -> ``?token=***``; names containing token, password, passwd, pwd, secret,
    api_key, access_key, auth, credential, signature or sig). Anything else is returned unchanged."""
    text = _URI_USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", text)
    return _SECRET_QUERY_PARAM.sub(lambda m: f"{m['key']}{REDACTED}", text)


def redact(data: Any) -> Any:
    """``data`` (a string, or dicts/lists/tuples of them, e.g. a dumped config) with :func:`redact_uri` applied
    to every string value; other values unchanged. Returns a copy."""
    if isinstance(data, str):
        return redact_uri(data)
    if isinstance(data, dict):
        return {key: redact(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return type(data)(redact(value) for value in data)
    return data


def git_commit() -> str:
    """The repository's HEAD commit, or ``unknown`` outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def git_modified_files() -> list[str] | None:
    """Tracked files with uncommitted changes (a result saved from such a tree is not exactly ``git_commit()``'s);
    None outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return [line[3:] for line in out.stdout.splitlines()]


def _ensure_sqlite_parent(uri: str) -> None:
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)


class Tracker:
    """A thin wrapper over one MLflow run; all methods are no-ops when tracking is disabled.

    ``run_id`` resumes an existing run (a resumed screen keeps logging into the run it started). ``nested``
    starts the run as a child of the active one (e.g. a fine-tune inside a campaign); ``end`` then returns to
    the parent.
    """

    def __init__(self, settings: TrackingSettings, run_name: str, run_id: str | None = None, nested: bool = False):
        self.enabled = settings.enabled
        self.run_id: str | None = None
        if not self.enabled:
            return
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        import mlflow

        self._mlflow = mlflow
        _ensure_sqlite_parent(settings.uri)
        mlflow.set_tracking_uri(settings.uri)
        if settings.uri.startswith("sqlite:///") and mlflow.get_experiment_by_name(settings.experiment) is None:
            # artifacts beside the database, not in the current working directory
            root = Path(settings.uri[len("sqlite:///") :]).resolve().parent / "artifacts"
            mlflow.create_experiment(settings.experiment, artifact_location=root.as_uri())
        mlflow.set_experiment(settings.experiment)
        run = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name, nested=nested)
        self.run_id = run.info.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        if self.enabled:
            clean = {k: ("null" if v is None else redact_uri(str(v))[:6000]) for k, v in params.items()}
            existing = self._mlflow.get_run(self.run_id).data.params
            self._mlflow.log_params({k: v for k, v in clean.items() if k not in existing})

    def set_tags(self, tags: dict[str, Any]) -> None:
        if self.enabled:
            self._mlflow.set_tags({k: redact_uri(str(v)) for k, v in tags.items()})

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.enabled:
            self._mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.enabled:
            self._mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def log_artifacts(self, folder: str | Path, artifact_path: str | None = None) -> None:
        if self.enabled and Path(folder).is_dir() and any(Path(folder).iterdir()):
            self._mlflow.log_artifacts(str(folder), artifact_path=artifact_path)

    def log_dict(self, data: Any, artifact_file: str) -> None:
        if self.enabled:
            self._mlflow.log_dict(redact(data), artifact_file)

    def log_child_run(
        self,
        name: str,
        params: dict[str, Any],
        metrics: dict[str, float],
        documents: dict[str, Any] | None = None,
    ) -> str | None:
        """A nested run under this one (e.g. one campaign iteration); returns its id."""
        if not self.enabled:
            return None
        with self._mlflow.start_run(run_name=name, nested=True) as child:
            self._mlflow.log_params({k: redact_uri(str(v))[:6000] for k, v in params.items()})
            self._mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
            for artifact_file, data in (documents or {}).items():
                self._mlflow.log_dict(redact(data), artifact_file)
        return child.info.run_id

    def end(self, status: str = "FINISHED") -> None:
        if self.enabled and self._mlflow.active_run() is not None:
            self._mlflow.end_run(status=status)
