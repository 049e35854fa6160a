"""Which trials a sweep runs: every point (grid x ``numSamples`` draws) with every seed.

Trials are planned here, not by Tune's search algorithms: grid points x ``numSamples`` draws (seeded) x
seeds, so every point gets every seed and a rerun plans the very same trials, under the same names. The
plan's digest tells a continued sweep whether it was planned from the same spec.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import random
from dataclasses import asdict, dataclass
from typing import Any

from xling.api.errors import sweep_point
from xling.api.spec.experiment import ExperimentSpec, RetrievalExperiment
from xling.api.spec.sweep import SweepParameter

#: What a trial's result depends on: a restored sweep must have been planned from the same values.
_PLANNED_FIELDS = {"model", "data", "sampling", "loss", "optimization", "distributed", "evaluation"}


@dataclass(frozen=True)
class Point:
    """One configuration: swept path -> value, and a short label for tables and plots."""

    label: str
    values: dict[str, Any]


@dataclass(frozen=True)
class Trial:
    """One (point, seed); ``name`` is stable and names the Tune trial and the MLflow child run."""

    name: str
    point: int
    seed: int


@dataclass(frozen=True)
class SweepPlan:
    """The sweep's points and trials; the digest tells whether a stored sweep was planned alike."""

    points: list[Point]
    trials: list[Trial]
    digest: str

    def to_json(self, exp: RetrievalExperiment) -> dict[str, Any]:
        """What ``summarize_sweep`` reads from the parent run: the sweep as run, its points and trials."""
        return {
            "digest": self.digest,
            "sweep": exp.spec.sweep.model_dump(mode="json", by_alias=True),
            "points": [asdict(p) for p in self.points],
            "trials": [asdict(t) for t in self.trials],
            "experiment": exp.model_dump(mode="json", by_alias=True, exclude_none=True),
        }


def _draw(param: SweepParameter, rng: random.Random) -> Any:
    if param.choice is not None:
        return rng.choice(param.choice)
    if param.uniform is not None:
        return rng.uniform(*param.uniform)
    if param.loguniform is not None:
        low, high = param.loguniform
        return math.exp(rng.uniform(math.log(low), math.log(high)))
    raise ValueError("a grid is enumerated, not drawn")


def _label(values: dict[str, Any]) -> str:
    """``alpha=0.25, learningRate=0.001``: the last path segment unless two parameters share it."""
    leaves = [path.rsplit(".", 1)[-1] for path in values]
    names = [leaf if leaves.count(leaf) == 1 else path for leaf, path in zip(leaves, values, strict=True)]
    shown = [f"{v:.4g}" if isinstance(v, float) else str(v) for v in values.values()]
    return ", ".join(f"{n}={v}" for n, v in zip(names, shown, strict=True)) or "base"


def plan_sweep(exp: RetrievalExperiment) -> SweepPlan:
    """Every trial of the sweep, validated against the spec before anything starts."""
    spec, sweep = exp.spec, exp.spec.sweep
    if sweep is None:
        raise ValueError("spec.sweep: not set")
    sweep.check(spec)
    grid = {path: p.grid for path, p in sweep.parameters.items() if p.grid is not None}
    rng = random.Random(sweep.search_seed)
    points = []
    for explicit, combo in itertools.product(sweep.points or [{}], itertools.product(*grid.values())):
        fixed = dict(zip(grid, combo, strict=True))
        for _ in range(sweep.num_samples):
            drawn = {
                path: fixed[path] if path in fixed else _draw(p, rng) for path, p in sweep.parameters.items()
            }
            values = {**explicit, **drawn}
            points.append(Point(_label(values), values))
    for point in points:  # combinations can break cross-field rules that single values keep
        with sweep_point(point.label):
            sweep.trial_spec(spec, point.values, sweep.seeds[0])
    width = len(str(len(points) - 1))
    trials = [Trial(f"p{i:0{width}d}-s{seed}", i, seed) for i in range(len(points)) for seed in sweep.seeds]
    if len(trials) != sweep.trial_count:  # the operator sized the cluster for trial_count trials
        raise RuntimeError(f"planned {len(trials)} trials, SweepSpec.trial_count says {sweep.trial_count}")
    # What the file says (not defaults, which may grow with new spec fields) and the resulting trials.
    basis = {"spec": spec.model_dump(mode="json", include=_PLANNED_FIELDS, exclude_unset=True),
             "points": [asdict(p) for p in points], "trials": [asdict(t) for t in trials]}  # fmt: skip
    digest = hashlib.sha256(json.dumps(basis, sort_keys=True).encode()).hexdigest()[:16]
    return SweepPlan(points, trials, digest)


def point_specs(exp: RetrievalExperiment, plan: SweepPlan) -> list[tuple[str, ExperimentSpec]]:
    """Each point's label and spec (its first seed's: the seed changes no size), what the fit and batch
    checks take (``preflight.check``, ``driver.prepare_run``)."""
    sweep = exp.spec.sweep
    assert sweep is not None, "a sweep's plan"
    return [(p.label, sweep.trial_spec(exp.spec, p.values, sweep.seeds[0])) for p in plan.points]
