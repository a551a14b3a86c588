"""Records are serialised one way (materials.serialise.Record): JSON round trips and named errors; the campaign's
Evaluation too."""

from __future__ import annotations

import json

import pytest
from ase.build import bulk
from pymatgen.io.ase import AseAtomsAdaptor

from materials.datasets.records import ReferenceRow
from materials.datasets.validation import Prediction
from materials.dft.gpaw import DFTResult
from materials.errors import InputError
from materials.potentials.relax import RelaxResult
from materials.serialise import Record
from materials.structures.candidates import Candidate
from pipelines.campaign import Evaluation

GAAS = AseAtomsAdaptor.get_structure(bulk("GaAs", "zincblende", a=5.65))


@pytest.mark.parametrize(
    "record",
    [
        RelaxResult("a", "GaAs", "ok", n_atoms=2, energy_per_atom=-4.1, stress=[0.1] * 6, structure=GAAS),
        RelaxResult("b", "GaAs", "failed", failure_reason="blew up"),
        DFTResult("c", "GaAs", "ok", "relax", hubbard_u={"Ni": 6.2}, notes=["x"], kpts=[7, 7, 7], structure=GAAS),
        Candidate("d", "GaAs", "zincblende", "generated", GAAS),
        ReferenceRow("e", "GaAs", 1.52, 0.01, "experiment", "doi:x", "mp-2534", GAAS, -0.35),
        Prediction("f", "GaAs", 1.4),
        Evaluation(3, 1, "g", "SrTiO3", "ok", labels={"gap pbe": 1.6, "e_hull": 0.0}, objective=0.9, hit=True),
    ],
    ids=lambda r: type(r).__name__,
)
def test_records_round_trip_through_json(record):
    assert isinstance(record, Record)
    data = record.as_dict()
    back = type(record).from_dict(json.loads(json.dumps(data)))
    assert json.dumps(back.as_dict(), sort_keys=True) == json.dumps(data, sort_keys=True)  # NaN included
    if getattr(record, "structure", None) is not None:
        assert back.structure == record.structure
    # the dict does not alias the record's lists
    for name, value in data.items():
        if isinstance(value, list | dict):
            assert value is not getattr(record, name)


def test_from_dict_names_missing_and_unknown_keys():
    good = RelaxResult("a", "GaAs", "ok").as_dict()
    with pytest.raises(InputError, match=r"RelaxResult\.from_dict: missing key\(s\) \['status'\]"):
        RelaxResult.from_dict({k: v for k, v in good.items() if k != "status"})
    with pytest.raises(InputError, match=r"unknown key\(s\) \['colour'\]"):
        RelaxResult.from_dict({**good, "colour": "red"})
