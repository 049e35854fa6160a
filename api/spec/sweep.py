"""The sweep side of the spec: its schema and the logic that plans and checks trials against a base spec.

A trial's spec is the base :class:`~xling.api.spec.experiment.ExperimentSpec` with the swept fields and the
seed applied (:meth:`SweepSpec.trial_spec`); :meth:`SweepSpec.check` refuses a sweep before any work.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

from xling.api.metrics import BATCHES, LOSS, TRAIN, from_dotted, prefix_of, suite_prefix
from xling.api.spec.base import ClusterUnit, PositiveInt, Spec, SpecError, field_error

if TYPE_CHECKING:
    from xling.api.spec.experiment import ExperimentSpec


#: Search spaces of a sweep parameter, in the order they are checked.
SWEEP_SPACES = ("grid", "choice", "uniform", "loguniform")
#: Spec sections a sweep may vary per trial (the rest is loaded or set up once per sweep).
SWEEPABLE = ("sampling", "loss", "optimization", "model", "distributed")


class SweepParameter(Spec):
    """One swept spec field and its search space; exactly one of the four is set.

    ``grid`` values are all run (crossed with the other grids); ``choice``, ``uniform`` and
    ``loguniform`` are drawn ``sweep.numSamples`` times per grid point.
    """

    grid: list[Any] | None = Field(default=None, min_length=1, description="Every value is run.")
    choice: list[Any] | None = Field(default=None, min_length=1, description="One value drawn per sample.")
    uniform: Annotated[list[float], Field(min_length=2, max_length=2)] | None = Field(
        default=None, description="[low, high], drawn uniformly."
    )
    loguniform: Annotated[list[float], Field(min_length=2, max_length=2)] | None = Field(
        default=None, description="[low, high], both > 0, drawn uniformly in log space."
    )

    @model_validator(mode="after")
    def _one_space(self) -> SweepParameter:
        spaces = [k for k in SWEEP_SPACES if getattr(self, k) is not None]
        if len(spaces) != 1:
            raise ValueError(f"set exactly one of {', '.join(SWEEP_SPACES)} (got {spaces or 'none'})")
        bounds = self.uniform or self.loguniform
        if bounds is not None and not bounds[0] < bounds[1]:
            raise field_error(spaces[0], f"low must be below high, got {bounds}")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise field_error("loguniform", f"bounds must be > 0, got {self.loguniform}")
        return self

    @property
    def space(self) -> str:
        return next(k for k in SWEEP_SPACES if getattr(self, k) is not None)

    @property
    def is_random(self) -> bool:
        return self.space != "grid"


class SweepConstraint(Spec):
    """A condition a point must meet to be picked as best (infeasible points stay in the report)."""

    metric: str = Field(description="Flat metric name, e.g. xquad_r/bias/rank_distance or xquad_r/multi/map.")
    max: float | None = Field(default=None, description="The seed mean must be at most this.")
    min: float | None = Field(default=None, description="The seed mean must be at least this.")
    at_least_zero_shot: bool = Field(
        default=False,
        description="No language below its zero-shot value: every per-language metric "
        "(xquad_r/multi/map/<lang> for xquad_r/multi/map) must reach its step-0 value. Needs evaluation.atStart.",
    )

    @model_validator(mode="after")
    def _some_rule(self) -> SweepConstraint:
        if self.max is None and self.min is None and not self.at_least_zero_shot:
            raise ValueError("set max, min or atLeastZeroShot")
        return self


class AshaSpec(Spec):
    """ASHA early stopping on an intermediate metric; results arrive at each checkpoint
    (optimization.checkpointEvery), the only place the workers report to Ray."""

    metric: str = Field(default=LOSS, description="Reported at every checkpoint.")
    mode: Literal["max", "min"] = "min"
    grace_period: PositiveInt = Field(default=1, description="Training steps before a trial can be stopped.")
    reduction_factor: Annotated[float, Field(gt=1.0)] = 2.0


class SweepSpec(Spec):
    """A sweep: the spec above is the base; each trial overrides some fields and the seed.

    Trials are planned up front (grid points x numSamples draws x seeds, draws seeded by searchSeed), so
    every point runs with every seed and a restarted sweep plans the same trials.
    """

    parameters: dict[str, SweepParameter] = Field(
        default_factory=dict,
        description="Spec field as a dotted path (sampling.alpha, loss.temperature, sampling.languageWeighting, "
        "optimization.learningRate, sampling.strategy) -> its search space. Empty: the base spec, once per seed.",
    )
    points: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Explicit points (dotted path -> value), each crossed with the parameters' grids: designs a "
        "grid cannot express, e.g. the strategies and the hybrid alpha curve as one sweep in which every "
        "distinct spec runs once.",
    )
    num_samples: PositiveInt = Field(
        default=1, description="Draws of the choice/uniform/loguniform spaces per grid point."
    )
    search_seed: int = Field(default=0, description="Seeds those draws.")
    seeds: list[int] = Field(
        default_factory=lambda: [0],
        min_length=1,
        description="Every point runs once per seed (sampling.seed).",
    )
    metric: str = Field(
        default="xquad_r/multi/map", description="Objective: a flat metric of the final evaluation."
    )
    mode: Literal["max", "min"] = "max"
    max_concurrent_trials: PositiveInt | None = Field(
        default=None, description="Default: available GPUs / GPUs per trial (on CPU: CPUs / CPUs per trial)."
    )
    asha: AshaSpec | None = Field(default=None, description="Unset: every trial runs to the end.")
    register_best: bool = Field(
        default=False,
        description="Register the best point's best trial model under tracking.registeredModelName (trials never register).",
    )
    constraints: list[SweepConstraint] = Field(default_factory=list)
    bootstrap_samples: Annotated[int, Field(ge=100)] = Field(
        default=10_000, description="Resamples of the bootstrap between points (seeds, then questions)."
    )
    confidence: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.95
    trials_per_gpu: PositiveInt = Field(
        default=1,
        description="Trials that share one GPU at once, each asking Ray for 1/n of it: a small model (e5-small) "
        "leaves most of a GPU idle between its steps and in evaluation. Needs one worker with one GPU per trial.",
    )
    equivalence_margin: Annotated[float, Field(gt=0.0)] = Field(
        default=0.005,
        description="mAP: a claim that one arm 'matches or beats' another holds when the difference's interval "
        "lies above -margin (and excludes the alternative arm's gap). 0.005 is below the smallest gap the "
        "hybrid-batch paper reports as a difference (LaBSE mono, 0.0075), so a 'match' cannot hide one.",
    )
    bootstrap_unit: ClusterUnit = Field(
        default="paragraph",
        description="What the bootstrap resamples as one unit: questions share their paragraph's difficulty "
        "(XQuAD-R's 60-paragraph slice: paragraph resampling gave 1.2-1.5x the question-level standard "
        "errors), so a paragraph, with every question and translation on it, is the default.",
    )

    @model_validator(mode="after")
    def _seeds_and_samples(self) -> SweepSpec:
        if len(set(self.seeds)) != len(self.seeds):
            raise field_error("seeds", f"need distinct seeds, got {self.seeds}")
        if self.num_samples > 1 and not any(p.is_random for p in self.parameters.values()):
            raise field_error("numSamples", "more than 1 needs a choice, uniform or loguniform parameter")
        return self

    @property
    def grid_size(self) -> int:
        """Grid points: explicit points (or one, without) x the product of the parameters' grids."""
        grids = math.prod(len(p.grid) for p in self.parameters.values() if p.grid is not None)
        return max(len(self.points), 1) * grids

    @property
    def trial_count(self) -> int:
        """Trials the sweep runs: grid points x ``numSamples`` draws x seeds. The operator sizes the cluster by
        it before the trainer plans the trials themselves (``xling.trainer.sweep.trials``), which checks it."""
        return self.grid_size * self.num_samples * len(self.seeds)

    def trial_spec(self, base: ExperimentSpec, values: dict[str, Any], seed: int) -> ExperimentSpec:
        """The base spec with swept ``values`` (dotted path -> value) and ``seed`` applied, minus the sweep."""
        doc = base.model_dump(mode="json", exclude={"sweep"})
        for path, value in values.items():
            *parents, leaf = _field_path(base, path)
            node = doc
            for key in parents:
                node = node[key]
            node[leaf] = value
        doc["sampling"]["seed"] = seed
        try:
            return type(base).model_validate(doc)
        except ValidationError as err:
            raise SpecError(
                None,
                "; ".join(
                    ".".join(map(str, e["loc"]))
                    + ": " * bool(e["loc"])
                    + e["msg"].removeprefix("Value error, ")
                    for e in err.errors()
                ),
            ) from None

    def metric_fields(self) -> list[tuple[str, str]]:
        """Every metric name the sweep names, with the field that names it."""
        return (
            [("sweep.metric", self.metric)]
            + [(f"sweep.constraints[{i}].metric", c.metric) for i, c in enumerate(self.constraints)]
            + ([("sweep.asha.metric", self.asha.metric)] if self.asha else [])
        )

    def check(self, base: ExperimentSpec) -> None:
        """Fail before any work: unknown paths, values the spec rejects, metrics nothing will log."""
        for where, path in [(f"sweep.parameters.{p}", p) for p in self.parameters] + [
            (f"sweep.points[{i}].{p}", p) for i, point in enumerate(self.points) for p in point
        ]:
            names = _field_path(base, path)
            if names == ["sampling", "seed"]:
                raise field_error(where, "sweep sampling.seed through sweep.seeds")
            if names[0] not in SWEEPABLE or names in (["model", "name"], ["model", "revision"]):
                raise field_error(
                    where,
                    "not sweepable (data, weights and evaluation are loaded once per sweep); sweepable: "
                    f"fields of {', '.join(SWEEPABLE)} except model.name/revision",
                )
            if where.startswith("sweep.points") and path in self.parameters:
                raise field_error(where, "also in sweep.parameters (set a field in one of the two)")
        for path, param in self.parameters.items():
            for value in param.grid or param.choice or param.uniform or param.loguniform or ():
                try:
                    self.trial_spec(base, {path: value}, self.seeds[0])
                except ValueError as err:
                    raise field_error(f"sweep.parameters.{path}", f"value {value!r}: {err}") from None
        specs: dict[str, int] = {}
        for i, point in enumerate(self.points):
            try:
                doc = self.trial_spec(base, point, self.seeds[0]).model_dump_json()
            except ValueError as err:
                raise field_error(f"sweep.points[{i}]", str(err)) from None
            if doc in specs:
                raise field_error(
                    f"sweep.points[{i}]", f"the same spec as sweep.points[{specs[doc]}] (it would run twice)"
                )
            specs[doc] = i
        prefixes = {suite_prefix(suite.name) for suite in base.evaluation.suites} | {TRAIN, BATCHES}
        for where, metric in self.metric_fields():
            if (new := from_dotted(metric)) is not None:
                raise field_error(
                    where,
                    f"{metric!r} is the old dotted spelling: metric names are '/'-separated, write {new!r}",
                )
            if prefix_of(metric) not in prefixes:
                raise field_error(
                    where, f"{metric!r} is not logged: its prefix is none of {sorted(prefixes)}"
                )
        if any(c.at_least_zero_shot for c in self.constraints) and not base.evaluation.at_start:
            raise field_error(
                "sweep.constraints", "atLeastZeroShot needs evaluation.atStart (the zero-shot scores)"
            )
        if self.asha is not None and not base.optimization.checkpoint_every:
            raise field_error(
                "sweep.asha", "needs optimization.checkpointEvery > 0 (trials report at checkpoints)"
            )
        dist = base.distributed
        if self.trials_per_gpu > 1 and (dist.num_workers, dist.gpus_per_worker) != (1, 1):
            raise field_error(
                "sweep.trialsPerGpu",
                f"shares one GPU between trials: needs distributed.numWorkers 1 and gpusPerWorker 1, not "
                f"{dist.num_workers} and {dist.gpus_per_worker}",
            )


def _field_path(model: BaseModel, path: str) -> list[str]:
    """Python field names along a dotted path written in camelCase or snake_case; the end must be a value."""
    names, node = [], model
    for i, part in enumerate(path.split(".")):
        where = ".".join(path.split(".")[: i + 1])
        if not isinstance(node, BaseModel):
            parent = ".".join(path.split(".")[:i])
            why = (
                "is unset in the base spec (set it to sweep its fields)" if node is None else "has no fields"
            )
            raise field_error(f"sweep.parameters.{path}", f"{parent} {why}")
        name = next((n for n in type(node).model_fields if part in (n, to_camel(n))), None)
        if name is None:
            raise field_error(f"sweep.parameters.{path}", f"{where} is not a spec field")
        names.append(name)
        node = getattr(node, name)
    if isinstance(node, BaseModel | list | dict):
        raise field_error(f"sweep.parameters.{path}", "not a single value (sweep one of its fields)")
    return names
