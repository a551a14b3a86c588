"""Campaign configuration: YAML -> validated pydantic models. A wrong key or value names itself.

Science parameters are the dataclasses of ``materials`` (their fields are the YAML keys); site settings
(Ray address, tracking URI, output folder) live in their own sections.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pymatgen.core import Element

from materials.dft.gpaw import DFTSettings
from materials.errors import InputError
from materials.potentials.calculators import ENVIRONMENTS, PotentialSpec
from materials.potentials.finetune import TrainSettings
from materials.potentials.relax import RelaxSettings
from materials.structures.candidates import prototype_names
from materials.structures.inputs import CheckSettings


class ConfigError(InputError):
    """The config file is missing, unparseable or invalid; the message names the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


_M = TypeVar("_M", bound=BaseModel)


class CandidateSettings(_Strict):
    """Prototype name -> allowed elements per site role, e.g. ``zincblende: [[Ga, In], [As, P]]``."""

    prototypes: dict[str, list[list[str]]] = Field(default_factory=dict)
    max_candidates: int | None = Field(default=None, ge=1)
    dedup: bool = True

    @field_validator("prototypes")
    @classmethod
    def _known_prototypes(cls, value: dict[str, list[list[str]]]) -> dict[str, list[list[str]]]:
        known = prototype_names()
        for name in value:
            if name not in known:
                raise ValueError(f"unknown prototype {name!r}; known: {', '.join(known)}")
        return value


class StabilitySettings(_Strict):
    """``stable_threshold``: largest signed E_hull (eV/atom) counted as stable. 0.1 by default: CHGNet places 47
    of 50 known ground states within 0.1 eV/atom of the MP hull, 35 within 0.05 (benchmarks/stability_accuracy.py).
    How energies reach the MP2020 scale is the potential's ``energy_convention`` (see materials.thermo.stability)."""

    stable_threshold: float = Field(default=0.1, ge=0.0, description="E_hull (eV/atom) counted as stable")
    element_offsets: bool = Field(
        default=False,
        description="subtract per-element offsets fitted on 50 known ground states (shipped for CHGNet 0.3.0, "
        "else fitted on a worker at the start): leave-one-element-out MAE 0.027 vs 0.043 eV/atom plain",
    )

    @model_validator(mode="before")
    @classmethod
    def _removed_scheme(cls, data: Any) -> Any:
        if isinstance(data, dict) and "scheme" in data:
            raise ValueError(
                "stability.scheme was removed: formation energies now follow the potential's energy convention "
                "(potential.energy_convention: mp2020 | uncorrected | self; the default suits CHGNet and MACE-MP); "
                "delete the scheme line"
            )
        return data


class RaySettings(_Strict):
    address: str | None = None
    num_cpus: int | None = Field(default=2, ge=1)
    num_workers: int = Field(default=2, ge=1)
    cpus_per_worker: float = Field(default=1.0, gt=0)
    gpus_per_worker: float = Field(default=0.0, ge=0)
    chunk_size: int = Field(default=2, ge=1)
    max_in_flight_per_worker: int = Field(default=2, ge=1)
    max_retries: int = Field(default=2, ge=0)
    object_store_memory: int | None = Field(default=300_000_000, gt=0)
    #: Python interpreter of each environment a potential may need (``sevennet``: SevenNet's venv); default
    #: ``$SEMIDISC_<NAME>_PYTHON``, else ``<repo>/.venv-<name>/bin/python`` (see :mod:`pipelines.environments`).
    environments: dict[str, str] = Field(default_factory=dict)

    @field_validator("environments")
    @classmethod
    def _known_environments(cls, value: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(value) - set(ENVIRONMENTS.values()))
        if unknown:
            raise ValueError(f"unknown environment(s) {unknown}; known: {sorted(set(ENVIRONMENTS.values()))}")
        return value


class TrackingSettings(_Strict):
    enabled: bool = True
    uri: str = "sqlite:///mlruns/mlflow.db"
    experiment: str = "semidisc-screen"


class ScreenConfig(_Strict):
    name: str = "screen"
    seed: int = Field(default=0, ge=0)
    candidates: CandidateSettings = Field(default_factory=CandidateSettings)
    checks: CheckSettings = Field(default_factory=CheckSettings)
    potential: PotentialSpec = Field(default_factory=PotentialSpec)
    relax: RelaxSettings = Field(default_factory=RelaxSettings)
    stability: StabilitySettings = Field(default_factory=StabilitySettings)
    ray: RaySettings = Field(default_factory=RaySettings)
    tracking: TrackingSettings = Field(default_factory=TrackingSettings)
    output_dir: str = "runs/screen"

    @model_validator(mode="after")
    def _offsets_need_mp_scale(self) -> ScreenConfig:
        if self.stability.element_offsets and self.potential.convention() == "self":
            raise ValueError(
                "stability.element_offsets: true needs a potential on MP's scale (energy_convention mp2020 or "
                "uncorrected); a 'self' potential takes its references from itself: set element_offsets: false"
            )
        return self

    @model_validator(mode="after")
    def _batched_needs_torch_model(self) -> ScreenConfig:
        if self.relax.batched and self.potential.name not in ("chgnet", "mace", "sevennet"):
            raise ValueError(
                f"relax.batched: true needs potential.name chgnet, mace or sevennet (got {self.potential.name!r}); "
                "set relax.batched: false"
            )
        if self.relax.batched and self.relax.batch_max_atoms is None and not self.potential.device.startswith("cuda"):
            raise ValueError(
                "relax.batch_max_atoms: null (estimate from GPU memory) needs potential.device: cuda; "
                "give a number of atoms per batch, e.g. 512"
            )
        return self

    def flat_params(self) -> dict[str, Any]:
        """Dotted-key parameters for MLflow (``relax.fmax`` ...)."""
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict) and value and not prefix.endswith("prototypes"):
                for key, sub in value.items():
                    walk(f"{prefix}.{key}" if prefix else str(key), sub)
            else:
                out[prefix] = value

        walk("", self.model_dump(mode="json"))
        return out


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid config"]
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"])
        lines.append(f"  {where}: {err['msg']} (got {err.get('input')!r})")
    return "\n".join(lines)


def validate_config(model: type[_M], data: dict[str, Any], source: str = "config") -> _M:
    """``model.model_validate(data)``, with :class:`ConfigError` naming ``source`` and each bad key."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from None


def load_yaml_config(model: type[_M], path: str | Path) -> _M:
    """Read a YAML file and validate it as ``model``; :class:`ConfigError` names the file and the bad key.
    Input paths in it are relative to the file (:func:`resolve_input_paths`)."""
    return validate_config(model, resolve_input_paths(_read_yaml(path), Path(path).parent, str(path)), str(path))


#: keys whose string values name input files: relative ones are read relative to the config file
INPUT_FILE_KEYS = frozenset({"csv", "structure_files", "train_file", "heldout_file"})
#: keys that hold a file only when the value looks like a path (else a name: ``medium-mpa-0``, ``0.3.0``)
MODEL_KEYS = frozenset({"model", "foundation_model"})
MODEL_SUFFIXES = (".model", ".pt", ".pth", ".tar", ".ckpt")


def _looks_like_model_file(value: str) -> bool:
    if ":/" in value:  # mlflow:/name/1, models:/..., s3://...
        return False
    return value.endswith(MODEL_SUFFIXES) or "/" in value or value.startswith(".")


def resolve_input_paths(data: dict[str, Any], base: Path, source: str) -> dict[str, Any]:
    """Rewrite relative input paths of a config (``pool.csv``, ``oracle.csv``, ``potential.model``, ``*_file``,
    ``structure_files``, ``foundation_model``) as paths relative to ``base``, the config file's folder, so a config
    works from any working folder and a copied config finds what lies next to it. Output folders and the MLflow
    store keep MLflow's convention (relative to where you run).

    Raises:
        ConfigError: a relative input path that is missing next to the config but exists relative to the working
            folder (the old convention): the message gives the path to write instead.
    """

    def fix(key: str, value: str, where: str) -> str:
        path = Path(value).expanduser()
        if path.is_absolute():
            return str(path)
        candidate = Path(os.path.normpath(base / path))
        if candidate.exists():
            return str(candidate)
        if path.exists():
            suggestion = os.path.relpath(path.resolve(), base.resolve())
            raise ConfigError(
                f"{source}: {where}: {value!r} is read relative to the config file's folder ({base}), where it "
                f"does not exist; it exists relative to the working folder: write {suggestion!r} (or an absolute path)"
            )
        return str(candidate) if key in INPUT_FILE_KEYS else value

    def walk(node: Any, where: str) -> Any:
        if isinstance(node, dict):
            out = {}
            for key, value in node.items():
                here = f"{where}.{key}" if where else str(key)
                if (
                    isinstance(value, str)
                    and value
                    and (key in INPUT_FILE_KEYS or (key in MODEL_KEYS and _looks_like_model_file(value)))
                ):
                    out[key] = fix(key, value, here)
                else:
                    out[key] = walk(value, here)
            return out
        if isinstance(node, list):
            return [walk(v, f"{where}[{i}]") for i, v in enumerate(node)]
        return node

    return walk(data, "")


def parse_config(data: dict[str, Any], source: str = "config") -> ScreenConfig:
    return validate_config(ScreenConfig, data, source)


def _read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found (see configs/ for examples)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (name, candidates, relax, ...)")
    return data


def load_config(path: str | Path) -> ScreenConfig:
    """Read and validate a YAML config. Raises :class:`ConfigError` naming the file and the bad key. Input paths
    in it are relative to the file (:func:`resolve_input_paths`)."""
    return load_yaml_config(ScreenConfig, path)


class PoolSettings(_Strict):
    """Where the candidate pool comes from: a CSV with a formula column, or (csv null) the candidates section
    screened with the MLIP first."""

    csv: str | None = None
    formula_column: str = "formula"
    id_column: str | None = None
    features: Literal["composition", "ordered", "both", "sites"] = Field(
        default="sites",
        description="formula features: composition statistics, site-ordered, both, or sites (composition statistics"
        " + the element written at each site, under a categorical kernel)",
    )
    oxidation: bool = Field(
        default=False,
        description=(
            "also describe each formula by its likely oxidation states (materials.ml.features.oxidation_features)"
        ),
    )


class ObjectiveSettings(_Strict):
    """A target window on one label, optionally gated by a stability label (``stable`` <= ``stable_max``).

    ``mode: scalar`` optimises one desirability (0 for a hit); ``pareto`` optimises the stability label and
    the distance to the window as two objectives (qLogNEHVI), and with ``supply_axis`` the production HHI of the
    formula as a third (known before evaluation: :mod:`materials.datasets.sustainability`).
    """

    target: str
    low: float = -math.inf
    high: float = math.inf
    stable: str | None = None
    stable_max: float | None = None
    target_scale: float = Field(default=1.0, gt=0)
    stable_scale: float = Field(default=0.1, gt=0)
    mode: Literal["scalar", "pareto"] = "scalar"
    supply_axis: bool = Field(
        default=False,
        description="pareto mode: the production HHI (known from the formula) as a third objective to minimise",
    )

    @model_validator(mode="after")
    def _consistent(self) -> ObjectiveSettings:
        if self.low > self.high:
            raise ValueError(f"objective window low={self.low} > high={self.high}")
        if (self.stable is None) != (self.stable_max is None):
            raise ValueError("objective.stable and objective.stable_max go together: give both or neither")
        if self.mode == "pareto" and self.stable is None:
            raise ValueError("objective.mode: pareto needs a stability label (objective.stable)")
        if self.supply_axis and self.mode != "pareto":
            raise ValueError("objective.supply_axis: true is a third Pareto axis: set objective.mode: pareto")
        return self


class ConstraintSettings(_Strict):
    """Supply-chain limits on the pool (:class:`materials.datasets.sustainability.SupplyConstraint`): candidates that
    break
    one are left out before any evaluation and listed, with the rule, in ``skipped_pool_rows.json``."""

    hhi_production_max: float | Literal["median"] | None = Field(
        default=None, description="largest production HHI (0-10,000), or 'median' of the pool; unknown HHI excluded"
    )
    exclude_elements: list[str] = Field(default_factory=list)
    exclude_toxic: bool = False

    @field_validator("hhi_production_max")
    @classmethod
    def _hhi_range(cls, value: float | str | None) -> float | str | None:
        if isinstance(value, float | int) and not 0 <= value <= 10_000:
            raise ValueError(f"{value} is outside the HHI scale 0-10,000")
        return value

    @field_validator("exclude_elements")
    @classmethod
    def _symbols(cls, value: list[str]) -> list[str]:
        bad = [s for s in value if not Element.is_valid_symbol(s)]
        if bad:
            raise ValueError(f"{bad} are not element symbols (e.g. Cd, Pb)")
        return value


#: Campaign presets: what ``preset: NAME`` fills in where the config is silent (the objective's column names stay the
#: pool's: give ``objective.target`` and ``objective.stable``).
CAMPAIGN_PRESETS: dict[str, dict[str, Any]] = {
    # single-junction PV absorber (gap window of materials.bo.optimize.photovoltaic), stable, supply risk below the
    # pool's median, no Cd or Pb
    "sustainable_absorber": {
        "objective": {"low": 1.1, "high": 1.8, "stable_max": 0.05},
        "constraints": {"hhi_production_max": "median", "exclude_elements": ["Cd", "Pb"]},
    },
}


class OptimizerSettings(_Strict):
    method: Literal["bo", "bo-hit", "greedy", "random"] = "bo"
    batch_size: int = Field(default=5, ge=1)
    n_init: int = Field(default=10, ge=1)
    init: Literal["diverse", "random"] = "diverse"
    budget: int = Field(default=100, ge=1, description="evaluations, initial design included")
    target_hits: int | None = Field(default=None, ge=1, description="stop once this many hits are found")
    surrogate: Literal["gp", "forest"] = Field(
        default="gp", description="bo-hit's surrogate: BoTorch GP, or a random forest per margin"
    )

    @model_validator(mode="after")
    def _budget_covers_init(self) -> OptimizerSettings:
        if self.surrogate == "forest" and self.method != "bo-hit":
            raise ValueError(f"optimizer.surrogate: forest needs optimizer.method: bo-hit (got {self.method!r})")
        if self.budget < self.n_init:
            raise ValueError(
                f"optimizer.budget={self.budget} is smaller than the initial design optimizer.n_init={self.n_init}; "
                "raise the budget or lower n_init"
            )
        return self


class OracleSettings(_Strict):
    """``table``: labels looked up in a CSV (default: the pool CSV), matched by row id or formula;
    ``mlip``: the screening values (E_form, E_hull); ``dft``: GPAW on each candidate's MLIP-relaxed structure
    (labels ``band_gap``, ``dft_e_form_per_atom``, ...; other columns from the screen, e.g. ``e_above_hull``)."""

    kind: Literal["table", "mlip", "dft"] = "table"
    csv: str | None = None
    relax: bool = Field(default=False, description="dft: relax with GPAW before the band gap (else MLIP geometry)")


class CampaignFinetuneSettings(_Strict):
    """``finetune:`` of a campaign with ``finetune_every: K`` (dft oracle only): every K BO iterations the DFT
    frames gathered so far train a MACE potential through ``semidisc finetune``'s machinery
    (:func:`pipelines.finetune_run.run_finetune`: train, evaluate on held-out frames, register).

    Attributes:
        train: mace-torch settings, as in a finetune config. ``train.foundation_model``: the first parent (a
            local ``.model`` or ``mlflow:/<name>/<version>``; null trains from scratch). ``train.scaling``
            defaults to ``std_scaling`` here: relaxed high-symmetry candidates have forces ~0 by symmetry.
        continue_from_previous: later fine-tunes start from the campaign's previous model (recorded as parent).
        heldout_fraction: part of the evaluated candidates whose frames are held out for evaluation, chosen by
            candidate (the steps of one relaxation never straddle the split), seeded by the campaign seed.
        min_train_frames: with fewer training frames the fine-tune is skipped and the reason recorded.
        e0s_values: eV/atom by element for ``train.e0s: elemental``; null: the DFT oracle's cached elemental
            references (same settings).
        compare: potentials evaluated on the same held-out frames; null: the campaign's screening potential.
        register_as: registry name; null: ``<campaign name>-mace``.
    """

    train: TrainSettings = Field(default_factory=lambda: TrainSettings(scaling="std_scaling"))
    continue_from_previous: bool = True
    heldout_fraction: float = Field(default=0.25, ge=0.0, lt=1.0)
    min_train_frames: int = Field(default=8, ge=2)
    e0s_values: dict[str, float] | None = None
    compare: list[PotentialSpec] | None = None
    register_as: str | None = None

    @field_validator("train", mode="before")
    @classmethod
    def _std_scaling_by_default(cls, value: Any) -> Any:
        if isinstance(value, dict) and "scaling" not in value:
            return {**value, "scaling": "std_scaling"}
        return value


class CampaignConfig(_Strict):
    name: str = "campaign"
    seed: int = Field(default=0, ge=0)
    pool: PoolSettings = Field(default_factory=PoolSettings)
    objective: ObjectiveSettings
    optimizer: OptimizerSettings = Field(default_factory=OptimizerSettings)
    oracle: OracleSettings = Field(default_factory=OracleSettings)
    candidates: CandidateSettings = Field(default_factory=CandidateSettings)
    checks: CheckSettings = Field(default_factory=CheckSettings)
    potential: PotentialSpec = Field(default_factory=PotentialSpec)
    relax: RelaxSettings = Field(default_factory=RelaxSettings)
    stability: StabilitySettings = Field(default_factory=StabilitySettings)
    dft: DFTSettings = Field(default_factory=DFTSettings)
    ray: RaySettings = Field(default_factory=RaySettings)
    tracking: TrackingSettings = Field(default_factory=lambda: TrackingSettings(experiment="semidisc-campaign"))
    output_dir: str = "runs/campaign"
    finetune_every: int | None = Field(
        default=None, ge=0, description="fine-tune MACE on the gathered DFT every K BO iterations (0/null: off)"
    )
    finetune: CampaignFinetuneSettings = Field(default_factory=CampaignFinetuneSettings)
    constraints: ConstraintSettings = Field(default_factory=ConstraintSettings)
    preset: Literal["sustainable_absorber"] | None = None

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not data.get("preset"):
            return data
        preset = CAMPAIGN_PRESETS.get(data["preset"])
        if preset is None:
            return data  # the Literal field names the allowed presets
        data = dict(data)
        for section, values in preset.items():
            given = dict(data.get(section) or {})
            data[section] = {**values, **given}  # what the config says wins
        return data

    @model_validator(mode="after")
    def _finetune_needs_dft(self) -> CampaignConfig:
        if self.finetune_every and self.oracle.kind != "dft":
            raise ValueError(
                f"finetune_every: {self.finetune_every} trains on the DFT frames the campaign computes, but "
                f"oracle.kind is {self.oracle.kind!r}: set oracle.kind: dft (a generated pool, pool.csv: null) "
                "or finetune_every: 0"
            )
        return self

    def screen_config(self) -> ScreenConfig:
        """The screen that builds a generated pool (same science sections)."""
        return ScreenConfig(
            name=f"{self.name}-screen",
            seed=self.seed,
            candidates=self.candidates,
            checks=self.checks,
            potential=self.potential,
            relax=self.relax,
            stability=self.stability,
            ray=self.ray,
            tracking=self.tracking,
            output_dir=str(Path(self.output_dir) / "screen"),
        )

    def flat_params(self) -> dict[str, Any]:
        """Dotted-key parameters for MLflow; the ``finetune.*`` section only when fine-tuning is on."""
        params = ScreenConfig.flat_params(self)
        if not self.finetune_every:
            params = {k: v for k, v in params.items() if not k.startswith("finetune.")}
        return params


def parse_campaign_config(data: dict[str, Any], source: str = "config") -> CampaignConfig:
    return validate_config(CampaignConfig, data, source)


def load_campaign_config(path: str | Path) -> CampaignConfig:
    """Read and validate a campaign YAML; :class:`ConfigError` names the file and the bad key. Input paths in it
    (``pool.csv``, ``oracle.csv``, model files) are relative to the file."""
    return load_yaml_config(CampaignConfig, path)
