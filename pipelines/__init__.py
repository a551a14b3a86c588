"""semidisc orchestration: configs, CLI, Ray execution, MLflow tracking, the result store and resume.

From Python or Jupyter:

    from pipelines.api import screen, load_results, predict_gaps

(from :mod:`pipelines.api`, not re-exported here: ``pipelines.screen`` is the screen's module, so a
``pipelines.screen`` function would be shadowed by it as soon as that module is imported.)
"""
