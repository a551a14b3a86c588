"""semidisc's science library: pure functions over pymatgen/ASE objects and small dataclasses.

Nothing here imports Ray or MLflow or keeps global state; orchestration lives in ``pipelines``.
"""

__version__ = "0.1.0"
