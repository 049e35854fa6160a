"""What a driver hands every Ray Train worker: one frozen :class:`Job`, the whole of ``train_loop_config``.

Ray Train passes a dict, so the drivers send ``{"job": job}`` and the worker reads that one key
(:func:`job_of`); everything a rank needs is a typed field here, not a string key of a dict.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from xling.api.contracts import staged_model_cache_dir
from xling.api.spec.experiment import ExperimentSpec
from xling.trainer.data.store import DataLocation, locate

#: The one key of ``train_loop_config``.
JOB_KEY = "job"


@dataclass(frozen=True)
class TrackedRun:
    """The MLflow run the workers log into: rank 0 logs its metrics, model and evaluations there."""

    uri: str
    id: str


@dataclass(frozen=True)
class Job:
    """One training run as its workers see it. Without ``run`` (tests, benchmarks) nothing is logged."""

    spec: ExperimentSpec
    data: DataLocation  # where the prepared corpus is; every rank memory-maps it
    model_path: str  # the resolved model: a local directory or a hub name
    model_fingerprint: str = ""  # names the zero-shot embeddings in the evaluation cache
    name: str | None = None  # the experiment's name (the model card's title)
    run: TrackedRun | None = None
    staged_model: DataLocation | None = None  # the model's copy in the run's storage (``model.stage_model``)
    #: a sweep trial's label (``p0-s1``): its console lines carry it; None in a single run
    trial: str | None = None

    @property
    def run_id(self) -> str | None:
        return self.run.id if self.run else None

    def local_model_path(self) -> str:
        return local_model_path(self.model_path, self.staged_model)

    def train_loop_config(self) -> dict[str, Job]:
        """The dict Ray Train's ``train_loop_config`` must be."""
        return {JOB_KEY: self}


def local_model_path(model_path: str, staged: DataLocation | None) -> str:
    """What a worker or mining actor loads: a node-local copy of the staged model (the driver's disk is not
    this node's), else ``model_path`` (a hub name, or a local run's directory)."""
    return str(locate(staged, staged_model_cache_dir())) if staged else model_path


def job_of(config: dict[str, Any]) -> Job:
    """The job in a ``train_loop_config`` (what :meth:`Job.train_loop_config` made)."""
    return config[JOB_KEY]
