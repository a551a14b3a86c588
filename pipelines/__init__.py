"""semidisc orchestration: configs, CLI, Ray execution, MLflow tracking, the result store and resume."""
