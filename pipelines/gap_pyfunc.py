"""The band-gap ensemble as an MLflow pyfunc model (registered by ``semidisc train-gap``).

Load with ``mlflow.pyfunc.load_model("models:/semidisc-bandgap/<version>")``; ``predict`` takes a DataFrame with a
``formula`` column and returns :func:`materials.ml.bandgap.predict_gaps`'s columns.
"""

from __future__ import annotations

import mlflow.pyfunc
import pandas as pd

from materials.ml.bandgap import predict_gaps


class BandGapPyfunc(mlflow.pyfunc.PythonModel):
    """Wraps the ensemble file logged as the ``ensemble`` artifact."""

    def load_context(self, context) -> None:
        self.path = context.artifacts["ensemble"]

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        return pd.DataFrame(predict_gaps([str(f) for f in model_input["formula"]], model_path=self.path))
