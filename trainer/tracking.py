"""MLflow: where runs, per-step metrics, results and the trained model live.

The driver opens the run and logs params; rank 0 of the workers logs metrics through ``StepLogger``,
batched into one ``log_batch`` call per step. After a resume, steps already in MLflow are not logged
again: with deterministic batches their values are the same, so each step appears exactly once.

The final checkpoint's sentence-transformers directory is logged as a pyfunc model (``log_model``) and,
with ``tracking.registeredModelName``, registered: by the run, or by a sweep for its best trial
(``register_run_model``).
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from xling.api.contracts import DEFAULT_TRACKING_URI
from xling.api.env import EXPERIMENT_UID_ENV
from xling.api.errors import InputError
from xling.api.metrics import LOSS
from xling.api.spec.experiment import ExperimentSpec
from xling.api.tags import ALPHA, K8S_UID, RUN_ID, SAMPLING, STATUS, tag_is
from xling.trainer.sentence_transformers_dir import embedding_dimension, headline_metrics


def resolve_tracking_uri(uri: str | None) -> str:
    """Default: ``$MLFLOW_TRACKING_URI``, else ``contracts.DEFAULT_TRACKING_URI`` (./mlflow.db); relative
    sqlite paths become absolute so Ray workers in other CWDs agree."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
        uri = prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested spec -> flat MLflow params (``sampling.alpha``)."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = str(v)[:6000]
    return out


#: Spec sections only the operator reads: parameters of a run on a cluster, not of a local one.
CLUSTER_ONLY = ("cluster", "storage", "deadlines", "suspend", "ttl_seconds_after_finished")


def run_params(spec: ExperimentSpec) -> dict[str, str]:
    """The MLflow parameters of one run: the spec's fields that apply to it (no cluster fields for a local
    run, none the sampling strategy ignores, no unset ones), flattened (``sampling.alpha``)."""
    local = not os.environ.get(EXPERIMENT_UID_ENV)
    doc = spec.model_dump(mode="json", exclude_none=True, exclude={"sweep", *(CLUSTER_ONLY if local else ())})
    sampling, strategy = doc["sampling"], spec.sampling.strategy
    ignored = {"alpha": strategy != "hybrid", "language_weighting": strategy in ("xy", "mixed"),
               "pair_weighting": strategy in ("xx", "mixed"),
               "language_temperature": "size" not in (spec.sampling.language_weighting, spec.sampling.pair_weighting)}  # fmt: skip
    for key in [k for k, drop in ignored.items() if drop]:
        sampling.pop(key, None)
    if not spec.loss.grad_cache.enabled:
        doc["loss"]["grad_cache"] = {"enabled": False}
    return flatten(doc)


def sampling_tags(spec: ExperimentSpec) -> dict[str, str]:
    """The batch strategy and alpha of a run that trains (a single run, a sweep's trial), to filter runs by."""
    return {SAMPLING: spec.sampling.strategy, ALPHA: str(spec.sampling.alpha)}


def git_commit(short: bool = True) -> str:
    try:
        args = ["git", "rev-parse", *(["--short"] if short else []), "HEAD"]
        return subprocess.run(
            args, capture_output=True, text=True, timeout=5, check=True, cwd=Path(__file__).resolve().parent
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def source_tags(experiment: str) -> dict[str, str]:
    """MLflow's own fields for the run page's Source and Git commit, beside the xling tags. (The UI shows a
    source name's last path segment: no paths in it.)"""
    tags = {"mlflow.source.name": f"xling run {experiment}",
            "mlflow.source.type": "JOB" if os.environ.get(EXPERIMENT_UID_ENV) else "LOCAL"}  # fmt: skip
    if (commit := git_commit(short=False)) != "unknown":
        tags["mlflow.source.git.commit"] = commit
    return tags


def log_dataset(client: Any, run_id: str, name: str, digest: str, sources: list[str], context: str) -> None:
    """One MLflow dataset input of the run (the run page's Datasets): ``digest`` is xling's data fingerprint,
    the source its paths or hub names."""
    import json

    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import IntegrityError

    source = json.dumps({"uri": ", ".join(sources)})
    dataset = Dataset(name=name, digest=digest, source_type="local", source=source)
    tags = [InputTag("mlflow.data.context", context)]
    for attempt in range(3):
        try:
            client.log_inputs(run_id, datasets=[DatasetInput(dataset, tags=tags)])
            return
        except MlflowException as err:
            # Sweep trials side by side log the same suite: MLflow looks the dataset up, then inserts it, so
            # another run's insert in between fails this one on the unique key. The dataset exists now, and
            # the next try only links it to this run.
            if not isinstance(err.__cause__, IntegrityError) or attempt == 2:
                raise


def start_run(
    tracking_uri: str, experiment: str, run_name: str, params: dict[str, str], tags: dict[str, str]
) -> str:
    """Create an MLflow run (artifacts beside a sqlite store) and return its id."""
    from mlflow import MlflowClient
    from mlflow.entities import Param, RunTag

    client = MlflowClient(tracking_uri)
    if uid := os.environ.get(EXPERIMENT_UID_ENV):  # set by the operator: links runs to the resource
        tags = {**tags, K8S_UID: uid}
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        location = None
        if tracking_uri.startswith("sqlite:///"):
            location = Path(tracking_uri.removeprefix("sqlite:///")).parent.joinpath("mlruns").as_uri()
        exp_id = client.create_experiment(experiment, artifact_location=location)
    else:
        exp_id = exp.experiment_id
    if (
        uid and "'" not in run_name and (again := _run_of(client, exp_id, uid, run_name))
    ):  # the experiment runs again: same run
        client.update_run(again, status="RUNNING")
        client.log_batch(again, tags=[RunTag(STATUS, "running")])
        return again
    run = client.create_run(exp_id, run_name=run_name, tags=tags)
    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=items[i : i + 100])
    client.log_batch(run.info.run_id, tags=[RunTag(STATUS, "running")])
    return run.info.run_id


def _run_of(client: Any, exp_id: str, uid: str, run_name: str) -> str | None:
    """The run an operator-launched experiment (uid) made before under this name (a resumed RayJob)."""
    found = client.search_runs(
        [exp_id], f"{tag_is(K8S_UID, uid)} and attributes.run_name = '{run_name}'", max_results=1
    )
    return found[0].info.run_id if found else None


class StepLogger:
    """Batched per-step metrics for rank 0; a no-op on other ranks."""

    def __init__(self, tracking_uri: str | None, run_id: str | None, active: bool):
        self.active = bool(active and tracking_uri and run_id)
        self.run_id = run_id
        self.last_logged = -1
        if self.active:
            from mlflow import MlflowClient

            self.client = MlflowClient(tracking_uri)
            history = self.client.get_metric_history(run_id, LOSS)
            self.last_logged = max((m.step for m in history), default=-1)

    def log(self, step: int, metrics: dict[str, float], force: bool = False) -> None:
        if not self.active or (step <= self.last_logged and not force):
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)
        self.last_logged = max(self.last_logged, step)

    def log_dict(self, data: dict[str, Any], path: str) -> None:
        if self.active:
            self.client.log_dict(self.run_id, data, path)


# ----------------------------------------------------------------------------- the trained model in MLflow

#: The pyfunc wrapper MLflow copies into the logged model (imports nothing from xling).
PYFUNC_CODE = Path(__file__).with_name("mlflow_pyfunc.py")


def model_signature(directory: Path) -> Any:
    """Texts in, one float32 vector each out; ``kind`` (query/passage) picks prompt and length."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    dim = embedding_dimension(directory)
    return ModelSignature(
        inputs=Schema([ColSpec("string", "text")]),
        outputs=Schema([TensorSpec(np.dtype("float32"), (-1, dim))]),
        params=ParamSchema([ParamSpec("kind", "string", "query")]),
    )


def log_model(
    directory: Path, spec: ExperimentSpec, *, tracking_uri: str, run_id: str, metrics: Mapping[str, float]
) -> Any:
    """Log the exported directory to the run as an MLflow (pyfunc) model; with
    ``tracking.registeredModelName``, register it as a new version tagged with the headline metrics."""
    import mlflow
    import torch
    import transformers
    from mlflow.models import Model

    mlflow.set_tracking_uri(tracking_uri)  # Model.log reads the global URI and experiment
    mlflow.set_experiment(experiment_id=mlflow.MlflowClient(tracking_uri).get_run(run_id).info.experiment_id)
    name = spec.tracking.registered_model_name
    m = spec.model
    info = Model.log(
        artifact_path=None,
        name="model",
        flavor=mlflow.pyfunc,
        run_id=run_id,
        python_model=str(PYFUNC_CODE),
        artifacts={"sentence_transformer": str(directory)},
        signature=model_signature(directory),
        pip_requirements=[
            "sentence-transformers>=6",
            f"torch=={torch.__version__.split('+')[0]}",
            f"transformers=={transformers.__version__}",
        ],  # fmt: skip
        metadata={
            "base_model": m.name,
            "pooling": m.pooling,
            "normalize": m.normalize,
            "query_prefix": m.query_prefix,
            "passage_prefix": m.passage_prefix,
            "max_query_length": m.max_query_length,
            "max_passage_length": m.max_passage_length,
        },  # fmt: skip
        registered_model_name=name,
    )
    if name:
        tag_version(
            tracking_uri, name, str(info.registered_model_version), version_tags(run_id, spec, metrics)
        )
    return info


def version_tags(run_id: str, spec: ExperimentSpec, metrics: Mapping[str, float]) -> dict[str, str]:
    """A registry version's tags: the run it came from and its headline metrics."""
    return {RUN_ID: run_id, **{k: f"{v:.4f}" for k, v in headline_metrics(spec, metrics).items()}}


def register_run_model(tracking_uri: str, name: str, run_id: str, tags: Mapping[str, str]) -> str:
    """Register the model logged by ``run_id`` as a new version of ``name`` (once: a rerun finds the version
    it registered before); returns the version."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    if done := client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"):
        return str(done[0].version)
    experiment = client.get_run(run_id).info.experiment_id
    found = [m for m in client.search_logged_models([experiment]) if m.source_run_id == run_id]
    if not found:
        raise InputError(None, f"run {run_id} logged no model to register")
    mlflow.set_tracking_uri(tracking_uri)
    version = str(mlflow.register_model(f"models:/{found[0].model_id}", name).version)
    tag_version(tracking_uri, name, version, tags)
    return version


def tag_version(tracking_uri: str, name: str, version: str, tags: Mapping[str, str]) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
