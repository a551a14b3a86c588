"""One way to turn a record into JSON-ready data and back.

A record is a flat dataclass (:class:`RelaxResult`, :class:`DFTResult`, :class:`Candidate`, :class:`ReferenceRow`,
:class:`Prediction`, ...) whose fields are numbers, text, lists and dicts of those, and at most one pymatgen
``Structure`` in a field named ``structure`` (stored with the Structure's own ``as_dict``). Subclassing
:class:`Record` gives it ``as_dict``/``from_dict`` that round-trip through ``json.dumps``/``json.loads``, and a
``from_dict`` that names the missing keys instead of a ``TypeError`` from the constructor.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import MISSING, fields
from typing import Any, TypeVar

from pymatgen.core import Structure

from materials.errors import InputError

R = TypeVar("R", bound="Record")


class Record:
    """``as_dict``/``from_dict`` for a flat record dataclass (see the module docstring)."""

    def as_dict(self) -> dict[str, Any]:
        """The fields as a dict: containers copied one level deep (the record stays unaliased), ``structure`` as
        the Structure's ``as_dict()``."""
        out = {}
        for f in fields(self):  # not dataclasses.asdict: it deep-copies a Structure field too
            value = getattr(self, f.name)
            if isinstance(value, Structure):
                value = value.as_dict()
            elif isinstance(value, list | dict):
                value = copy.deepcopy(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls: type[R], data: Mapping[str, Any]) -> R:
        """Inverse of :meth:`as_dict`.

        Raises:
            InputError: a field without a default is missing (naming the keys missing and found) or a key is not
                a field of the record.
        """
        known = {f.name: f for f in fields(cls)}
        required = [n for n, f in known.items() if f.default is MISSING and f.default_factory is MISSING]
        missing = [n for n in required if n not in data]
        unknown = sorted(set(data) - set(known))
        if missing or unknown:
            problems = [f"missing key(s) {missing}"] if missing else []
            problems += [f"unknown key(s) {unknown}"] if unknown else []
            raise InputError(
                f"{cls.__name__}.from_dict: {'; '.join(problems)}; got keys {sorted(data)}. "
                f"Pass a dict produced by {cls.__name__}.as_dict()."
            )
        values = dict(data)
        if isinstance(values.get("structure"), Mapping):
            values["structure"] = Structure.from_dict(values["structure"])
        return cls(**values)
