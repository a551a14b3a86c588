"""A Bayesian-optimisation campaign: pool -> initial design -> (fit, propose q, evaluate on Ray, update)*.

State lives in ``<out>/campaign.sqlite``: each proposal is written before it is evaluated and each label as it
arrives, so an interrupted campaign resumed with ``--resume`` evaluates what was proposed and then continues
with exactly the proposals an uninterrupted run would make (proposals are deterministic in the seed, the
iteration and the data).

With the dft oracle, every calculation's DFT frames are kept (``<out>/dft/frames``, and all of them in
``<out>/dft_frames.xyz`` at the end); with ``finetune_every: K`` a MACE potential is fine-tuned on them every K
BO iterations and registered (:mod:`pipelines.campaign_finetune`), each outcome recorded in the store.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from materials.bo.optimize import (
    AcquisitionSettings,
    WindowObjective,
    initial_design,
    label_arrays,
    method_targets,
    propose_batch,
)
from materials.datasets.records import read_csv_rows as read_rows
from materials.datasets.sustainability import (
    SUSTAINABILITY_COLUMNS,
    SupplyConstraint,
    median_hhi_production,
    sustainability_descriptors,
    sustainability_rows,
)
from materials.errors import InputError, RunError
from materials.ml.features import featurize_formulas, site_element_columns
from materials.potentials.finetune import read_frames, write_frames
from materials.serialise import Record
from pipelines.campaign_finetune import finetune_on_campaign_data, finetune_parent
from pipelines.config import CampaignConfig, ConstraintSettings
from pipelines.oracles import DFTOracle, OracleError, RowOracle
from pipelines.store import SQLiteStore


class CampaignError(InputError):
    """The campaign cannot start or resume; the message says why and what to do."""


class CampaignFailed(RunError):
    """The campaign started but cannot go on (every evaluation failed); the message says where the reasons are."""


@dataclass
class Pool:
    """The candidates a campaign chooses from: ids, formulas, features (n, d), and the source rows."""

    ids: list[str]
    formulas: list[str]
    features: np.ndarray
    feature_names: list[str]
    rows: list[dict[str, Any]]
    skipped: list[dict[str, str]] = field(default_factory=list)


def read_csv_rows(path: str | Path) -> list[dict[str, str]]:
    """Rows of a pool or label CSV file (``.csv`` or ``.csv.gz``, with or without a byte-order mark) as dicts."""
    path = Path(path)
    if not path.is_file():
        raise CampaignError(f"pool file {path} not found")
    return read_rows(path)


def pool_from_rows(
    rows: Sequence[Mapping[str, Any]],
    formula_column: str,
    id_column: str | None,
    source: str,
    feature_set: str = "both",
    oxidation: bool = False,
) -> Pool:
    """Featurise a pool's formulas (``feature_set`` of :func:`materials.ml.features.featurize_formulas`); rows whose
    formula does not parse are skipped with the reason."""
    if not rows:
        raise CampaignError(f"{source}: the pool is empty")
    columns = list(rows[0])
    if formula_column not in columns:
        raise CampaignError(f"{source}: no formula column {formula_column!r}; columns: {', '.join(map(repr, columns))}")
    if id_column is not None and id_column not in columns:
        raise CampaignError(f"{source}: no id column {id_column!r}; columns: {', '.join(map(repr, columns))}")
    ids = [str(r[id_column]) if id_column else f"row{i}" for i, r in enumerate(rows)]
    if len(set(ids)) != len(ids):
        raise CampaignError(f"{source}: ids in column {id_column!r} are not unique")
    formulas = [str(r[formula_column] or "") for r in rows]
    features, names, failed, ok_index = featurize_formulas(formulas, feature_set, oxidation=oxidation)
    skipped = [{"id": ids[i], "formula": formulas[i], "reason": reason} for i, reason in sorted(failed.items())]
    keep = [int(i) for i in ok_index]
    return Pool(
        ids=[ids[i] for i in keep],
        formulas=[formulas[i] for i in keep],
        features=features,
        feature_names=names,
        rows=[dict(rows[i]) for i in keep],
        skipped=skipped,
    )


@dataclass
class Evaluation(Record):
    """One evaluated candidate of a campaign, stored the moment it arrives (``campaign.sqlite``) and written to
    ``evaluations.csv``.

    Attributes:
        pool_index: row of the candidate in the pool.
        iteration: 0 for the initial design, then the BO iteration that proposed it.
        id, formula: the candidate's.
        status: ``ok`` or ``failed``.
        failure_reason: why it failed (None when ok).
        labels: the oracle's values (column -> value, in the oracle's units: eV, eV/atom).
        objective: desirability of the labels (higher is better; None when failed).
        hit: inside the target window and stable enough.
    """

    pool_index: int
    iteration: int
    id: str
    formula: str
    status: str
    failure_reason: str | None = None
    labels: dict[str, Any] = field(default_factory=dict)
    objective: float | None = None
    hit: bool = False


class CampaignStore(SQLiteStore):
    """SQLite state of one campaign: proposals per iteration, evaluations as they arrive, fine-tunes, meta."""

    SCHEMA = """
        CREATE TABLE IF NOT EXISTS iterations (iteration INTEGER PRIMARY KEY, kind TEXT, proposal TEXT);
        CREATE TABLE IF NOT EXISTS evaluations (pool_index INTEGER PRIMARY KEY, iteration INTEGER, id TEXT,
            formula TEXT, status TEXT, failure_reason TEXT, labels TEXT, objective TEXT, hit INTEGER);
        CREATE TABLE IF NOT EXISTS finetunes (iteration INTEGER PRIMARY KEY, status TEXT, record TEXT);
        """

    def add_iteration(self, iteration: int, kind: str, proposal: dict[str, Any]) -> None:
        self._db.execute("INSERT INTO iterations VALUES (?, ?, ?)", (iteration, kind, json.dumps(proposal)))
        self._db.commit()

    def iterations(self) -> list[tuple[int, str, dict[str, Any]]]:
        rows = self._db.execute("SELECT iteration, kind, proposal FROM iterations ORDER BY iteration")
        return [(it, kind, json.loads(p)) for it, kind, p in rows]

    def add_evaluation(self, record: Evaluation) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO evaluations VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                record.pool_index,
                record.iteration,
                record.id,
                record.formula,
                record.status,
                record.failure_reason,
                json.dumps(record.labels),
                json.dumps(record.objective),
                int(record.hit),
            ),
        )
        self._db.commit()

    def add_finetune(self, record: dict[str, Any]) -> None:
        """One fine-tune's outcome (see :func:`pipelines.campaign_finetune.finetune_on_campaign_data`)."""
        self._db.execute(
            "INSERT OR REPLACE INTO finetunes VALUES (?, ?, ?)",
            (record["iteration"], record["status"], json.dumps(record)),
        )
        self._db.commit()

    def finetunes(self) -> list[dict[str, Any]]:
        """Fine-tune records by iteration."""
        return [json.loads(r[0]) for r in self._db.execute("SELECT record FROM finetunes ORDER BY iteration")]

    def evaluations(self) -> list[Evaluation]:
        """Every stored evaluation (the caller restores the proposal order from :meth:`iterations`)."""
        names = [f.name for f in fields(Evaluation)]
        out = []
        for row in self._db.execute(f"SELECT {', '.join(names)} FROM evaluations"):
            rec = dict(zip(names, row, strict=True))
            rec["labels"] = json.loads(rec["labels"])
            rec["objective"] = json.loads(rec["objective"])
            rec["hit"] = bool(rec["hit"])
            out.append(Evaluation(**rec))
        return out


def objective_from_config(config: CampaignConfig) -> WindowObjective:
    o = config.objective
    return WindowObjective(
        target=o.target,
        low=o.low,
        high=o.high,
        stable=o.stable,
        stable_max=o.stable_max,
        target_scale=o.target_scale,
        stable_scale=o.stable_scale,
    )


def campaign_fingerprint(config: CampaignConfig) -> str:
    """Hash of the settings that decide the proposals. Fine-tuning does not change them: it may be switched on
    or retuned for a resumed campaign (each model records its own settings)."""
    exclude = {"ray", "tracking", "output_dir", "name", "finetune", "finetune_every"}
    science = config.model_dump(mode="json", exclude=exclude)
    # settings added later count only when set, so campaigns started before they existed still resume
    added_later = (
        ("pool", "oxidation", False),
        ("optimizer", "surrogate", "gp"),
        ("dft", "magnetic_order", "lowest"),
        ("dft", "hubbard_u", "mp"),
        ("dft", "mp2020", True),
        ("dft", "u_corrections", "gpaw"),
        ("objective", "supply_axis", False),
    )
    for section, key, default in added_later:
        if science.get(section, {}).get(key) == default:
            science[section].pop(key)
    if science.get("constraints") == ConstraintSettings().model_dump(mode="json"):
        science.pop("constraints")
    if science.get("preset") is None:
        science.pop("preset", None)
    if config.oracle.kind != "dft" and science.get("dft", {}).get("spinpol") is None:
        # the automatic spin rule (default since magnetism came in) matters to the DFT oracle only
        science["dft"]["spinpol"] = False
    return hashlib.sha256(json.dumps(science, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class CampaignSummary:
    out_dir: Path
    n_pool: int
    n_skipped: int
    n_evaluated: int
    n_failed: int
    n_hits: int
    iterations: int
    evaluations_to_target: int | None
    hits: list[dict[str, Any]]
    trace: list[int]
    mlflow_run_id: str | None
    seconds: float
    finetunes: list[dict[str, Any]] = field(default_factory=list)


def apply_constraints(pool: Pool, settings: ConstraintSettings) -> Pool:
    """The pool without the candidates ``settings`` excludes
    (:class:`materials.datasets.sustainability.SupplyConstraint`);
    each excluded one moves to ``pool.skipped`` with the rule it breaks. ``hhi_production_max: median`` is the
    median over the pool as given."""
    limit = settings.hhi_production_max
    if limit == "median":
        limit = median_hhi_production(pool.formulas)
    constraint = SupplyConstraint(limit, tuple(settings.exclude_elements), settings.exclude_toxic)
    if not constraint.active:
        return pool
    reasons = [constraint.violation(f) for f in pool.formulas]
    keep = [i for i, reason in enumerate(reasons) if reason is None]
    skipped = [
        {"id": pool.ids[i], "formula": pool.formulas[i], "reason": f"constraints: {reason}"}
        for i, reason in enumerate(reasons)
        if reason is not None
    ]
    if not keep:
        raise CampaignError(f"constraints exclude every candidate of the pool (first: {skipped[0]['reason']})")
    return Pool(
        ids=[pool.ids[i] for i in keep],
        formulas=[pool.formulas[i] for i in keep],
        features=pool.features[keep],
        feature_names=pool.feature_names,
        rows=[pool.rows[i] for i in keep],
        skipped=pool.skipped + skipped,
    )


def with_supply_risk_column(pool: Pool) -> Pool:
    """The pool with one more feature column, ``hhi_production`` (0-10,000, :mod:`materials.datasets.sustainability`),
    the
    third Pareto axis of ``objective.supply_axis``. A formula whose HHI is unknown gets 10,000, the most
    concentrated supply possible: unknown risk is not rewarded (``constraints.hhi_production_max`` excludes such
    rows instead)."""
    hhi = [sustainability_descriptors(f).hhi_production for f in pool.formulas]
    column = np.array([10_000.0 if v is None else v for v in hhi])[:, None]
    return replace(
        pool, features=np.hstack([pool.features, column]), feature_names=[*pool.feature_names, "hhi_production"]
    )


def build_pool_and_oracle(config: CampaignConfig, out: Path):
    """The pool (CSV or a screened generated pool, less what ``constraints`` excludes) and the oracle that labels
    it."""
    o = config.objective
    columns = [o.target] + ([o.stable] if o.stable else [])
    if config.pool.csv:
        if config.oracle.kind == "dft":
            raise CampaignError("oracle.kind: dft needs structures: use a generated pool (pool.csv: null)")
        rows = read_csv_rows(config.pool.csv)
        pool = pool_from_rows(
            rows,
            config.pool.formula_column,
            config.pool.id_column,
            config.pool.csv,
            config.pool.features,
            config.pool.oxidation,
        )
        pool = apply_constraints(pool, config.constraints)
        if config.oracle.kind == "mlip":
            raise CampaignError("oracle.kind: mlip labels a generated pool; with pool.csv use oracle.kind: table")
        label_rows = pool.rows
        if config.oracle.csv and Path(config.oracle.csv) != Path(config.pool.csv):
            label_rows = _labels_by_formula(read_csv_rows(config.oracle.csv), config.pool.formula_column, pool)
        return pool, RowOracle("table", label_rows, columns)
    from pipelines.screen import run_screen

    if config.oracle.kind == "table":
        if not config.oracle.csv:
            raise CampaignError("oracle.kind: table with a generated pool needs oracle.csv (labels by formula)")
    summary = run_screen(config.screen_config(), out_dir=out / "screen", resume=True, progress=False)
    rows = [r for r in read_csv_rows(summary.out_dir / "results.csv") if r["status"] == "ok"]
    pool = pool_from_rows(
        rows, "formula", "id", str(summary.out_dir / "results.csv"), config.pool.features, config.pool.oxidation
    )
    pool = apply_constraints(pool, config.constraints)
    if config.oracle.kind == "table":
        label_rows = _labels_by_formula(read_csv_rows(config.oracle.csv), config.pool.formula_column, pool)
        return pool, RowOracle("table", label_rows, columns)
    if config.oracle.kind == "dft":
        files = [str(summary.out_dir / "structures" / f"{pid}.cif") for pid in pool.ids]
        oracle = DFTOracle(pool.rows, files, columns, config.dft, config.oracle.relax, out / "dft")
        return pool, oracle
    return pool, RowOracle("mlip", pool.rows, columns)


def _labels_by_formula(rows: list[dict[str, str]], formula_column: str, pool: Pool) -> list[dict[str, Any]]:
    from pymatgen.core import Composition

    by_formula: dict[str, dict[str, str]] = {}
    for row in rows:
        try:
            by_formula.setdefault(Composition(row[formula_column]).reduced_formula, row)
        except Exception:  # an unparseable label row cannot match any pool formula; it is simply not used
            continue
    return [by_formula.get(Composition(f).reduced_formula, {}) for f in pool.formulas]


def _trace_plot(trace: Sequence[int], random_rate: float | None, path: Path, title: str) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
    n = np.arange(1, len(trace) + 1)
    ax.step(n, trace, where="post", label="this campaign")
    if random_rate is not None:
        ax.plot(n, n * random_rate, "k--", label="random search (expected)")
    ax.set_xlabel("evaluations")
    ax.set_ylabel("hits found")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def run_campaign(config: CampaignConfig, out_dir: str | Path | None = None, resume: bool = False) -> CampaignSummary:
    """Run or resume a campaign; see the module docstring and :class:`Campaign`. Returns its summary."""
    campaign = Campaign.open(config, out_dir, resume=resume)
    status = None  # FINISHED once finish() returned, else FAILED
    try:
        campaign.resume()
        while campaign.step():
            pass
        return campaign.finish()
    except OracleError as exc:
        raise CampaignError(str(exc)) from None
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (pipelines.interrupts): what is stored stays
        status = "KILLED"
        raise
    finally:
        campaign.close(status)


class Campaign:
    """One campaign's state between its steps: the pool, the oracle, the store, the MLflow run, and what has been
    evaluated (``order``: pool indices in evaluation order; ``done``: pool index -> evaluation record).

    ``Campaign.open(config, out_dir, resume)`` checks the folder and starts Ray and the MLflow run; ``resume()``
    finishes an iteration a stopped run left half evaluated (or evaluates the initial design of a new campaign);
    each ``step()`` proposes, evaluates and records one BO iteration, returning False once the budget or the hit
    target is reached; ``finish()`` writes evaluations.csv, the trace plot and the final metrics and returns the
    :class:`CampaignSummary`; ``close(status)`` always ends the run. Every evaluation is stored as it arrives, so
    a campaign stopped anywhere resumes from the store.
    """

    def __init__(
        self,
        config: CampaignConfig,
        out: Path,
        store: CampaignStore,
        csv_pool: tuple[Pool, Any] | None,
        started: float,
    ):
        self.config = config
        self.out = out
        self.store = store
        self.objective = objective_from_config(config)
        self.tracker = None
        self.started_ray = False
        self._started = started
        self._csv_pool = csv_pool
        self.pool: Pool
        self.oracle: Any
        self.order: list[int] = []
        self.done: dict[int, dict[str, Any]] = {}
        self.iteration = 0
        self._acquisition: AcquisitionSettings | None = None
        self._finished = False

    @classmethod
    def open(cls, config: CampaignConfig, out_dir: str | Path | None = None, resume: bool = False) -> Campaign:
        """Check the output folder against the config (a different campaign there, or this one without
        ``resume``, is refused before anything runs), then start Ray (a generated pool: its screen and the DFT
        oracle run there), build the pool and open the MLflow run.

        Raises:
            CampaignError: bad pool, folder holding another campaign, or too few usable rows.
        """
        from pipelines.tracking import redact

        started = time.perf_counter()
        out = Path(out_dir or config.output_dir)
        # a CSV pool is read and checked before anything is written (a generated pool needs Ray: it is screened later)
        try:
            csv_pool = build_pool_and_oracle(config, out) if config.pool.csv else None
        except OracleError as exc:
            raise CampaignError(str(exc)) from None
        out.mkdir(parents=True, exist_ok=True)
        fingerprint = campaign_fingerprint(config)
        store = CampaignStore(out / "campaign.sqlite")
        previous = store.get_meta("fingerprint")
        if previous is not None and previous != fingerprint:
            if store.iterations():
                store.close()
                raise CampaignError(f"{out} holds a campaign with different settings; use another --out")
            store.set_meta("mlflow_run_id", None)  # an earlier start that evaluated nothing: reuse the folder
        if previous is not None and not resume and store.iterations():
            store.close()
            raise CampaignError(
                f"{out} already holds this campaign; pass --resume to continue it or choose another --out"
            )
        store.set_meta("fingerprint", fingerprint)
        (out / "config.yaml").write_text(yaml.safe_dump(redact(config.model_dump(mode="json")), sort_keys=False))
        campaign = cls(config, out, store, csv_pool, started)
        try:
            campaign._start()
        except BaseException as exc:
            campaign.close("FAILED")
            if isinstance(exc, OracleError):
                raise CampaignError(str(exc)) from None
            raise
        return campaign

    def _start(self) -> None:
        from pipelines.execution import init_ray
        from pipelines.tracking import Tracker, git_commit

        config, opt = self.config, self.config.optimizer
        # Ray runs the simulations: the screen of a generated pool and the DFT oracle; a CSV pool labelled from a
        # table needs none, and starting Ray for it cost ~6 s plus worker start-ups
        if not config.pool.csv:
            self.started_ray = init_ray(config.ray)
        self.pool, self.oracle = self._csv_pool or build_pool_and_oracle(config, self.out)
        if len(self.pool.ids) < opt.n_init:
            raise CampaignError(
                f"the pool has {len(self.pool.ids)} usable rows, fewer than optimizer.n_init={opt.n_init}"
            )
        self.tracker = Tracker(config.tracking, run_name=config.name, run_id=self.store.get_meta("mlflow_run_id"))
        self.store.set_meta("mlflow_run_id", self.tracker.run_id)
        self.tracker.log_params(config.flat_params())
        self.tracker.set_tags(
            {
                "git_commit": git_commit(),
                "oracle": self.oracle.kind,
                "method": opt.method,
                "objective_mode": config.objective.mode,
                "n_pool": len(self.pool.ids),
                "n_skipped": len(self.pool.skipped),
            }
        )
        if self.pool.skipped:
            self.tracker.log_dict(self.pool.skipped, "skipped_pool_rows.json")
            (self.out / "skipped_pool_rows.json").write_text(json.dumps(self.pool.skipped, indent=1))
        self.done = {rec.pool_index: rec for rec in self.store.evaluations()}
        self.order = [i for _, _, proposal in self.store.iterations() for i in proposal["indices"]]

    @property
    def method(self) -> str:
        opt = self.config.optimizer
        return "bo-pareto" if (opt.method == "bo" and self.config.objective.mode == "pareto") else opt.method

    def n_hits(self) -> int:
        return sum(1 for i in self.order if self.done[i].hit)

    def evaluate(self, indices: Sequence[int], iteration: int) -> None:
        """Evaluate the candidates not evaluated yet, storing each record as it arrives."""
        todo = [i for i in indices if i not in self.done]
        for index, outcome in self.oracle.evaluate(todo):
            labels = outcome.labels
            rec = Evaluation(
                pool_index=index,
                iteration=iteration,
                id=self.pool.ids[index],
                formula=self.pool.formulas[index],
                status=outcome.status,
                failure_reason=outcome.failure_reason,
                labels=labels,
                objective=self.objective.desirability(labels) if outcome.ok else None,
                hit=bool(outcome.ok and self.objective.is_hit(labels)),
            )
            self.store.add_evaluation(rec)
            self.done[index] = rec

    def maybe_finetune(self, iteration: int) -> None:
        """Fine-tune after every ``finetune_every``-th BO iteration unless an earlier run did it successfully
        (a failed one is retried when its iteration is resumed, e.g. after fixing the finetune settings)."""
        every = self.config.finetune_every
        if not every or iteration < 1 or iteration % every or not isinstance(self.oracle, DFTOracle):
            return
        if any(r["iteration"] == iteration and r["status"] == "ok" for r in self.store.finetunes()):
            return
        frames = gathered_frames(self.oracle, self.order)
        elements = sorted({s for _, fs in frames for f in fs for s in f.get_chemical_symbols()})
        parent = finetune_parent(self.config, self.store.finetunes(), elements)
        record = finetune_on_campaign_data(self.config, iteration, frames, parent, self.oracle.reference_dir, self.out)
        self.store.add_finetune(record)
        _log_finetune(self.tracker, self.config, record)

    def resume(self) -> None:
        """Finish an iteration that was proposed but not fully evaluated when the last run stopped; a new
        campaign evaluates its initial design here."""
        opt = self.config.optimizer
        iterations = self.store.iterations()
        if iterations:
            last_it, _, last_prop = iterations[-1]
            self.evaluate(last_prop["indices"], last_it)
            self.maybe_finetune(last_it)
        self.iteration = len(iterations)
        if self.iteration == 0:
            design = initial_design(self.pool.features, opt.n_init, seed=self.config.seed, method=opt.init)
            indices = [int(i) for i in design]
            self.store.add_iteration(0, "initial", {"indices": indices})
            self.order.extend(indices)
            self.evaluate(indices, 0)
            _log_iteration(self.tracker, 0, "initial", {"indices": indices}, self.order, self.done, self.pool)
            self.iteration = 1
        acquisition = AcquisitionSettings(
            categorical_columns=tuple(site_element_columns(self.pool.feature_names)), surrogate=opt.surrogate
        )
        if self.config.objective.supply_axis:
            self.pool = with_supply_risk_column(self.pool)
            acquisition = replace(acquisition, known_objectives=(self.pool.features.shape[1] - 1,))
        self._acquisition = acquisition

    def step(self) -> bool:
        """Propose, evaluate and record one BO iteration. False (nothing done) once the budget is spent, the hit
        target is reached or the pool is exhausted.

        Raises:
            CampaignFailed: every evaluation so far failed (nothing to fit a surrogate to).
        """
        if self._acquisition is None:
            raise RuntimeError("Campaign.step() before Campaign.resume()")
        opt, order, done = self.config.optimizer, self.order, self.done
        if len(order) >= opt.budget or (opt.target_hits is not None and self.n_hits() >= opt.target_hits):
            return False
        ok_idx = [i for i in order if done[i].status == "ok"]
        failed_idx = [i for i in order if done[i].status != "ok"]
        if not ok_idx:
            raise CampaignFailed("every evaluation so far failed: see evaluations.csv for the reasons")
        method = self.method
        y = method_targets(method, self.objective, label_arrays([done[i].labels for i in ok_idx], self.objective))
        if failed_idx:
            # a failed candidate is never proposed again and counts as the worst candidate observed so far
            worst = int(np.argmin([done[i].objective for i in ok_idx]))
            y = np.concatenate([y, np.repeat(y[worst : worst + 1], len(failed_idx), axis=0)])
        q = min(opt.batch_size, opt.budget - len(order), len(self.pool.ids) - len(order))
        if q <= 0:
            return False
        proposal = propose_batch(
            self.pool.features,
            evaluated=ok_idx + failed_idx,
            y=y,
            q=q,
            method=method,
            seed=self.config.seed * 100_003 + self.iteration,
            objective=self.objective,
            settings=self._acquisition,
        )
        prop = proposal.as_dict()
        self.store.add_iteration(self.iteration, method, prop)
        order.extend(int(i) for i in proposal.indices)
        self.evaluate([int(i) for i in proposal.indices], self.iteration)
        _log_iteration(self.tracker, self.iteration, method, prop, order, done, self.pool)
        self.maybe_finetune(self.iteration)
        self.iteration += 1
        return True

    def finish(self) -> CampaignSummary:
        """Write evaluations.csv (and dft_frames.xyz for a DFT oracle), the trace plot and the final metrics;
        return the summary."""
        opt, order, done, out = self.config.optimizer, self.order, self.done, self.out
        trace, hits_so_far = [], 0
        for i in order:
            hits_so_far += int(done[i].hit)
            trace.append(hits_so_far)
        to_target = None
        if opt.target_hits is not None and hits_so_far >= opt.target_hits:
            to_target = trace.index(opt.target_hits) + 1
        random_rate = (
            _pool_hit_rate(self.oracle, self.objective, self.pool) if isinstance(self.oracle, RowOracle) else None
        )
        _write_results(out / "evaluations.csv", order, done, self.oracle.label_columns())
        if isinstance(self.oracle, DFTOracle):
            frames = [f for _, fs in gathered_frames(self.oracle, order) for f in fs]
            if frames:
                write_frames(frames, out / "dft_frames.xyz")
        plot = _trace_plot(trace, random_rate, out / "bo_trace.png", f"{self.config.name}: {opt.method}")
        self.tracker.log_artifact(out / "evaluations.csv")
        self.tracker.log_artifact(plot)
        self.tracker.log_artifact(out / "config.yaml")
        n_failed = sum(1 for i in order if done[i].status != "ok")
        self.tracker.log_metrics(
            {
                "n_evaluated": len(order),
                "n_hits": hits_so_far,
                "n_failed": n_failed,
                "evaluations_to_target": to_target or -1,
            }
        )
        hits = [{"id": done[i].id, "formula": done[i].formula, **done[i].labels} for i in order if done[i].hit]
        self._finished = True
        return CampaignSummary(
            out,
            len(self.pool.ids),
            len(self.pool.skipped),
            len(order),
            n_failed,
            hits_so_far,
            self.iteration,
            to_target,
            hits,
            trace,
            self.tracker.run_id,
            time.perf_counter() - self._started,
            self.store.finetunes(),
        )

    def close(self, status: str | None = None) -> None:
        """End the MLflow run with ``status`` (default: FINISHED after :meth:`finish`, else FAILED), close the
        store, stop the Ray this campaign started."""
        import ray

        if self.tracker is not None:
            self.tracker.end(status or ("FINISHED" if self._finished else "FAILED"))
            self.tracker = None
        self.store.close()
        if self.started_ray:
            ray.shutdown()
            self.started_ray = False


def _pool_hit_rate(oracle: RowOracle, objective: WindowObjective, pool: Pool) -> float | None:
    """Fraction of hits in the whole pool when every label is known (table/mlip): random search's rate."""
    columns = oracle.label_columns()
    hits = 0
    for row in oracle.rows:
        try:
            labels = {c: float(row[c]) for c in columns}
        except (KeyError, TypeError, ValueError):
            continue
        hits += int(objective.is_hit(labels))
    return hits / len(pool.ids) if pool.ids else None


def gathered_frames(oracle: DFTOracle, order: Sequence[int]) -> list[tuple[str, list]]:
    """``(candidate id, DFT frames)`` of the evaluated candidates, in evaluation order (failed ones included
    when a relaxation left finished steps)."""
    return [
        (oracle.candidate_id(i), read_frames(oracle.frames_path(i))) for i in order if oracle.frames_path(i).is_file()
    ]


def _log_finetune(tracker, config: CampaignConfig, record: dict[str, Any]) -> None:
    """The fine-tune in the campaign's run (metrics at step = iteration, latest model as a tag) and, once
    registered, the campaign on the model version."""
    iteration = record["iteration"]
    heldout = (record["metrics"].get("finetuned") or {}).get("heldout") or {}
    metrics = {"finetune_ok": float(record["status"] == "ok"), "finetune_n_train": record["n_train"]}
    metrics.update({f"finetune_heldout_{k}": v for k, v in heldout.items() if v is not None and k != "n_frames"})
    tracker.log_metrics(metrics, step=iteration)
    if record["status"] != "ok":
        tracker.set_tags({f"finetune_iter{iteration:03d}_failed": record["reason"][:4000]})
        print(f"  fine-tune after iteration {iteration} failed: {record['reason']}", flush=True)
        return
    model = record["registry_uri"] or record["model_path"]
    tracker.set_tags({"finetune_latest_model": model, f"finetune_iter{iteration:03d}_model": model})
    print(f"  fine-tune after iteration {iteration}: {model} ({record['n_train']} training frames)", flush=True)
    if record["registry_uri"]:
        from pipelines.registry import parse_registry_uri, set_model_version_tags

        name, version = parse_registry_uri(record["registry_uri"])
        tags = {"campaign": config.name, "campaign_run_id": tracker.run_id, "campaign_iteration": iteration}
        set_model_version_tags(config.tracking.uri, name, version, tags)


def _log_iteration(tracker, iteration, kind, proposal, order, done, pool) -> None:
    new = proposal["indices"]
    ok_values = [done[i].objective for i in order if done[i].status == "ok"]
    metrics = {
        "n_evaluated": len(order),
        "hits": sum(1 for i in order if done[i].hit),
        "best_so_far": max(ok_values) if ok_values else math.nan,
        "batch_hits": sum(1 for i in new if done[i].hit),
    }
    acq = proposal.get("acquisition_values") or []
    if acq:
        metrics["acquisition_max"] = max(acq)
        metrics["acquisition_mean"] = float(np.mean(acq))
    for key, value in (proposal.get("model_info") or {}).items():
        if isinstance(value, int | float) and math.isfinite(value):
            metrics[f"gp_{key}"] = value
    labels = [
        {
            "id": done[i].id,
            "formula": done[i].formula,
            "status": done[i].status,
            "labels": done[i].labels,
            "hit": done[i].hit,
        }
        for i in new
    ]
    tracker.log_metrics({"hits": metrics["hits"], "n_evaluated": len(order)}, step=iteration)
    tracker.log_child_run(
        f"iteration-{iteration:03d}",
        params={"iteration": iteration, "kind": kind, "proposals": ",".join(pool.ids[i] for i in new)},
        metrics={k: v for k, v in metrics.items() if math.isfinite(v)},
        documents={"proposal.json": proposal, "labels.json": labels},
    )


def _write_results(path: Path, order: Sequence[int], done: Mapping[int, Evaluation], columns: Sequence[str]) -> None:
    """evaluations.csv: one row per evaluation in order, the oracle's labels, objective and hit, then the formula's
    supply-chain columns (:data:`materials.datasets.sustainability.SUSTAINABILITY_COLUMNS`)."""
    supply = sustainability_rows([done[i].formula for i in order])
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            [
                "order",
                "iteration",
                "id",
                "formula",
                "status",
                "failure_reason",
                *columns,
                "objective",
                "hit",
                *SUSTAINABILITY_COLUMNS,
            ]
        )
        for n, (i, extra) in enumerate(zip(order, supply, strict=True), 1):
            rec = done[i]
            objective = "" if rec.objective is None else rec.objective
            writer.writerow(
                [
                    n,
                    rec.iteration,
                    rec.id,
                    rec.formula,
                    rec.status,
                    rec.failure_reason or "",
                    *(rec.labels.get(c, "") for c in columns),
                    objective,
                    int(rec.hit),
                    *("" if v is None else v for v in extra.values()),
                ]
            )
