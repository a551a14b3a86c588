"""Oracles: what evaluates a proposed candidate. One interface, three kinds.

* ``table``: labels looked up in a labelled CSV (benchmarking a campaign at no cost);
* ``mlip``: the MLIP screening values (E_form, E_hull) of a generated pool;
* ``dft``: GPAW DFT — the seam for the DFT engine (``materials/dft.py``, not built yet).

``evaluate`` runs each item as a Ray task and yields ``(pool_index, record)`` as results arrive, so the
campaign writes each label the moment it exists. A record holds ``status`` (``ok``/``failed``),
``failure_reason`` and ``labels`` (column -> float).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

import ray


class OracleError(ValueError):
    """The oracle cannot serve the campaign (e.g. the objective names a column it does not have)."""


class Oracle(Protocol):
    kind: str

    def label_columns(self) -> list[str]: ...

    def evaluate(self, indices: Sequence[int]) -> Iterator[tuple[int, dict[str, Any]]]: ...


def _to_float(value: Any) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return math.nan
    return out


@ray.remote(num_cpus=0.25)
def _lookup_label(row: Mapping[str, Any], columns: Sequence[str]) -> dict[str, Any]:
    labels = {c: _to_float(row.get(c)) for c in columns}
    missing = [c for c, v in labels.items() if not math.isfinite(v)]
    if missing:
        return {"status": "failed", "failure_reason": f"no numeric value for {', '.join(missing)}", "labels": labels}
    return {"status": "ok", "failure_reason": None, "labels": labels}


class RowOracle:
    """Labels from per-pool-row records (a labelled CSV for ``table``; screen results for ``mlip``).

    Args:
        kind: ``table`` or ``mlip`` (recorded with the results).
        rows: one mapping per pool row (column -> value), in pool order.
        columns: the label columns this campaign needs (checked against the rows' columns).
    """

    def __init__(self, kind: str, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]):
        self.kind = kind
        available = sorted({k for row in rows[:50] for k in row})
        missing = [c for c in columns if c not in available]
        if missing:
            raise OracleError(
                f"the objective names column(s) {', '.join(repr(c) for c in missing)} that the {kind} oracle "
                f"does not have; available columns: {', '.join(repr(c) for c in available)}"
            )
        self._rows = rows
        self._columns = list(columns)

    def label_columns(self) -> list[str]:
        return list(self._columns)

    def evaluate(self, indices: Sequence[int]) -> Iterator[tuple[int, dict[str, Any]]]:
        refs = {_lookup_label.remote(dict(self._rows[i]), self._columns): i for i in indices}
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            index = refs[done[0]]
            try:
                yield index, ray.get(done[0])
            except ray.exceptions.RayError as exc:
                yield index, {"status": "failed", "failure_reason": f"oracle task failed: {exc}", "labels": {}}


def dft_oracle_unavailable() -> OracleError:
    """The seam for the GPAW oracle: a clear message until materials/dft.py exists."""
    return OracleError(
        "oracle.kind: dft needs the GPAW DFT engine (materials/dft.py), which is not part of this version; "
        "use oracle.kind: table (a labelled CSV) or mlip (the screening values) for now"
    )
