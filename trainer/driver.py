"""What both drivers share (``run``: one training run, ``sweep``: a Ray Tune sweep of them): one sequence
before the first worker (:func:`prepare_run`: the local environment, the fit check, data, model, tracking URI and
tags of their MLflow runs), Ray, the storage, fitting one ``TorchTrainer`` and closing its MLflow run.

Everything that can fail cheaply (spec, memory plan, data rows, model name) fails in :func:`prepare_run`,
before MLflow is opened or Ray starts.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xling.api.contracts import default_cache_dir, prepared_cache_dir, staged_model_cache_dir
from xling.api.env import CACHE_ENV, EXPERIMENT_UID_ENV
from xling.api.errors import InputError, failure_reason, sweep_point
from xling.api.metrics import DATA, join
from xling.api.spec.base import TINY_MODEL, is_xling_model
from xling.api.spec.experiment import ExperimentSpec, RetrievalExperiment
from xling.api.spec.training import DistributedSpec
from xling.api.tags import (
    BAD_ROWS_SKIPPED,
    DATA_FINGERPRINT,
    DESCRIPTION,
    FAILURE,
    GIT_COMMIT,
    MINED_NEGATIVES,
    MODEL,
    STATUS,
)
from xling.trainer.console import detail
from xling.trainer.data import BadRowError, DataLocation, EvalGuard, Prepared, prepare_corpus
from xling.trainer.data.prepare import file_stats, held_out, source_name
from xling.trainer.preflight import missing_languages
from xling.trainer.tracking import git_commit, log_dataset, resolve_tracking_uri, source_tags

if TYPE_CHECKING:
    from xling.trainer.data.index import CorpusIndex

#: Environment every local run needs on a CPU box; kept if already set, and shipped to the workers.
LOCAL_ENV = {
    "DS_ACCELERATOR": "cpu",  # DeepSpeed on CPU (gloo); not set on a GPU node
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # node IP, workers, MASTER_ADDR and dashboard on loopback
    "RAY_AUTH_MODE": "disabled",  # else Ray writes an auth token under ~/.ray and warns
    "PYTHONWARNINGS": "ignore::FutureWarning",  # torch warns of deprecated collectives on every ZeRO step
    "HF_HUB_OFFLINE": "1",  # only for specs that need no hub (hub_free)
    "TOKENIZERS_PARALLELISM": "false",  # else tokenizers warns (and turns itself off) when Ray forks after use
    "RAY_TRAIN_V2_ENABLED": "1",  # the Train V2 API (callbacks, fit raising a failed run's error)
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",  # else every print of a worker reaches the console twice
}


@dataclass
class RunResult:
    """What a driver returns: its MLflow run (a sweep's parent run), final metrics, last checkpoint."""

    run_id: str
    metrics: dict[str, Any]
    checkpoint_path: str | None
    seconds: float


def hub_free(spec: ExperimentSpec) -> bool:
    """Built-in model and no hub dataset: only then may a run go offline (HF_HUB_OFFLINE=1)."""
    return is_xling_model(spec.model.name) and not any(s.type == "hf" for s in spec.data.sources)


def local_env(spec: ExperimentSpec) -> dict[str, str]:
    """Set the CPU-box defaults unless the caller set them (no DS_ACCELERATOR=cpu on a GPU node); offline
    only for runs that need no hub (:func:`hub_free`: otherwise hub models and datasets must load). Returns
    the workers' environment: these, and the driver's cache directory."""
    for key, value in LOCAL_ENV.items():
        if key == "HF_HUB_OFFLINE" and not hub_free(spec):
            continue
        if key != "DS_ACCELERATOR" or not _has_gpu():
            os.environ.setdefault(key, value)
    # The workers' working directory is Ray's, not the driver's: they must be told where the caches are.
    return {
        **{k: os.environ[k] for k in LOCAL_ENV if k in os.environ},
        CACHE_ENV: str(default_cache_dir().resolve()),
    }


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_model(spec: ExperimentSpec, prepared: Prepared) -> str:
    """The model's local path, checked to load (``model.load_model_files``): the spec's model name is
    resolved here once, and only this path travels on (the tiny test model is built from the corpus)."""
    from xling.trainer.model import load_model_files, resolve_model_path

    path = resolve_model_path(spec.model.name, tiny_texts(spec.model.name, prepared))
    load_model_files(path, spec.model)
    return path


def tiny_texts(model: str, prepared: Prepared) -> list[str] | None:
    """What the built-in tiny test model trains its tokenizer on: the corpus's first texts."""
    if model != TINY_MODEL:
        return None
    return [p.query or p.passage or "" for g in prepared.corpus.materialize(3000).groups for p in g.values()]


def prepare_data(exp: RetrievalExperiment) -> Prepared:
    """The prepared corpus of the spec (``xling data prepare``): built once per preparation key, in the run's
    storage, and reused by every later run and sweep trial."""
    spec = exp.spec
    try:
        prepared = prepare_corpus(
            spec.data, data_root(spec.output_dir), eval_guard(spec), cache=prepared_cache_dir()
        )
    except BadRowError as err:
        raise InputError(
            err.source, f"{err.reason}; rerun with --skip-bad-rows to skip and count such rows"
        ) from None
    report, corpus = prepared.report, prepared.corpus
    missing_languages(spec, corpus.index.present())
    if report.total:
        print(f"skipped {report.total} bad rows: {dict(report.skipped)}")  # stdout: the console shows it
        for example in report.examples[:3]:
            print(f"  e.g. {example}")
    how = "reusing the prepared corpus" if prepared.reused else "prepared"
    print(f"data: {how} {prepared.location.uri} (fingerprint {corpus.fingerprint()})", flush=True)
    if spec.data.drop_eval_overlap:  # none dropped: a detail, for the log
        dropped = corpus.meta["dropped_overlap"]
        (print if dropped else detail)(
            f"data: dropped {dropped} training groups that overlap the evaluation data"
        )
    for i, source in enumerate(spec.data.sources):
        if split := held_out(source):
            print(f"data: {source_name(i, source)}: {split.summary()}")
    if spec.data.hard_negatives and (mine := spec.data.hard_negatives.mine):
        from xling.trainer.mining import mine_prepared

        if mine.workers > 1:  # its encoders are Ray actors, started as the run's workers will be
            init_ray(local_env(spec), spec.distributed.gpus_per_worker > 0)
        texts = tiny_texts(spec.data.hard_negatives.mine.model or spec.model.name, prepared)
        prepared = mine_prepared(prepared, spec, texts, model_root(spec))
    return prepared


def skipping_bad_rows(exp: RetrievalExperiment, skip: bool) -> RetrievalExperiment:
    """``exp`` with ``data.skipBadRows`` on when ``--skip-bad-rows`` asks for it (a copy: the caller's spec is
    left as it was); ``exp`` itself otherwise."""
    if not skip:
        return exp
    spec = exp.spec
    data = spec.data.model_copy(update={"skip_bad_rows": True})
    return exp.model_copy(update={"spec": spec.model_copy(update={"data": data})})


def data_root(output_dir: str) -> str:
    """Where prepared corpora live: beside Ray Train's storage, so a cluster run's are in its bucket or PVC."""
    return storage_path(output_dir).removesuffix("/ray") + "/data"


def model_root(spec: ExperimentSpec) -> str | None:
    """Where a model on this machine's disk is staged (beside the prepared corpora) when the workers run
    elsewhere: under the operator (it sets the experiment's uid on every Ray pod) or joined to a Ray cluster.
    None when they share this machine's disk (a local run)."""
    if not (os.environ.get(EXPERIMENT_UID_ENV) or os.environ.get("RAY_ADDRESS")):
        return None
    return storage_path(spec.output_dir).removesuffix("/ray") + "/models"


def stage(model_path: str, spec: ExperimentSpec) -> DataLocation | None:
    """The model of ``model_path`` staged once to the run's shared storage when the workers run elsewhere and
    it is a directory on this machine (the way Kubeflow Trainer's model initializer fills a shared volume
    before the trainer starts); None when the workers can load ``model_path`` themselves."""
    if (root := model_root(spec)) is None:
        return None
    from xling.trainer.model import stage_model

    return stage_model(model_path, root, staged_model_cache_dir())


def check_batches(index: CorpusIndex, spec: ExperimentSpec) -> None:
    """Refuse a sampling setup the data cannot fill (no X-X language with a full batch, too few X-Y
    groups) now, rather than after Ray started and a worker reached that batch."""
    from xling.trainer.sampling import build_sampler

    build_sampler(index, spec.optimization.global_batch_size, spec.sampling, spec.optimization.max_steps)


def eval_guard(spec: ExperimentSpec) -> EvalGuard | None:
    """Never train on evaluation text: the full suites, not just the evaluated slice (MIRACL aside), and
    the sentences the centering baseline takes its means from (it must see no training text either)."""
    suites = [s.model_copy(update={"max_paragraphs": None, "max_queries": None, "languages": None})
              for s in spec.evaluation.suites if s.name != "miracl"]  # fmt: skip
    centering = spec.evaluation.centering
    if not suites:
        return None

    def texts() -> list[str]:
        from xling.trainer.data.builders import ntrex_sentences
        from xling.trainer.evaluation.api import load_suite

        out: list[str] = []
        for suite_spec in suites:
            loaded = load_suite(suite_spec)
            for data in loaded.data.values():
                out += data.candidate_texts + data.query_texts
            if centering is not None:
                lines = range(centering.first_line, centering.first_line + centering.sentences)
                out += [
                    t for ts in ntrex_sentences(centering.path, loaded.languages, lines).values() for t in ts
                ]
        return out

    key = [(s.name, s.path, file_stats(s.path)) for s in suites]
    if centering is not None:
        key.append(("centering", centering.path, [centering.first_line, centering.sentences]))
    return EvalGuard(json.dumps(key, sort_keys=True), texts)


@dataclass(frozen=True)
class PreparedRun:
    """What a driver holds once everything that can fail cheaply was checked and data and model are ready,
    before it opens its MLflow run(s): what :func:`prepare_run` returns, and all the drivers take from it."""

    exp: RetrievalExperiment  # as it runs: a copy with ``data.skipBadRows`` when asked for
    env: dict[str, str]  # the workers' environment (:func:`local_env`)
    prepared: Prepared
    model_path: str  # the resolved model (:func:`resolve_model`)
    tracking_uri: str
    tags: dict[str, str]  # of every MLflow run the driver opens; a driver adds its own
    staged_model: DataLocation | None = None  # where the workers load the model from (:func:`stage`)


def prepare_run(
    exp: RetrievalExperiment,
    tracking_uri: str | None,
    skip_bad_rows: bool,
    points: Sequence[tuple[str, ExperimentSpec]] = (),
) -> PreparedRun:
    """Everything before the first worker, in one order for both drivers: the local environment; the fit
    check of every spec that will run (``capacity.check.check_fits``: the run's, or each sweep point's, ``points``
    being (label, trial spec) pairs); the data (:func:`prepare_data`) and whether each spec's batches can be
    filled from it; the model (:func:`resolve_model`, :func:`stage`); where and under which tags to track.
    A spec that cannot fit is refused before any data is read, MLflow is opened or Ray started; an error of
    one sweep point names it."""
    from xling.trainer.capacity.check import check_each_fits

    env = local_env(exp.spec)
    check_each_fits(exp, points)
    runs = list(points) or [(None, exp.spec)]
    exp = skipping_bad_rows(exp, skip_bad_rows)
    prepared = prepare_data(exp)
    for label, spec in runs:
        with sweep_point(label):
            check_batches(prepared.corpus.index, spec)
    model_path = resolve_model(exp.spec, prepared)
    staged_model = stage(model_path, exp.spec)
    corpus = prepared.corpus
    print(f"data: {corpus.num_pairs()} pairs in {len(corpus)} groups, languages {corpus.sizes()}", flush=True)
    uri = resolve_tracking_uri(tracking_uri or exp.spec.tracking.tracking_uri)
    tags = {MODEL: exp.spec.model.name, DATA_FINGERPRINT: corpus.fingerprint(), GIT_COMMIT: git_commit(),
            BAD_ROWS_SKIPPED: str(prepared.report.total), **source_tags(exp.metadata.name)}  # fmt: skip
    return PreparedRun(exp, env, prepared, model_path, uri, tags, staged_model)


def log_training_data(
    uri: str, run_id: str, spec: ExperimentSpec, fingerprint: str, mined: dict | None
) -> None:
    """The training pairs as the run's MLflow dataset (digest = the corpus fingerprint, source = the sources),
    what an MLQA hold-out took out of them (``data/held_out/*``), and with mined hard negatives, how many were
    mined and what each false-negative rule removed."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient(uri)
    sources = [s.path for s in spec.data.sources]
    log_dataset(client, run_id, "training-pairs", fingerprint, sources, "training")
    for source in spec.data.sources:
        if split := held_out(source):
            client.log_batch(run_id, metrics=[Metric(join(DATA, "held_out", k), float(v), int(time.time() * 1000), 0)
                                              for k, v in split.counts().items()])  # fmt: skip
    if mined is not None:
        counts = {"negatives": mined["negatives"], "with_negatives": mined["with_negatives"], "passages": mined["passages"],
                  **{join("removed", rule): n for rule, n in mined["removed"].items()}}  # fmt: skip
        client.log_batch(run_id, metrics=[Metric(join(DATA, "mined", k), float(v), int(time.time() * 1000), 0)
                                          for k, v in counts.items()])  # fmt: skip
        client.set_tag(run_id, MINED_NEGATIVES, mined["key"])


def worker_resources(dist: DistributedSpec, gpu_share: float = 1.0) -> dict[str, float]:
    """What each Ray Train worker asks for; ``gpu_share`` < 1: sweep trials that share a GPU."""
    gpus = dist.gpus_per_worker * gpu_share
    return {"CPU": dist.cpus_per_worker, **({"GPU": gpus} if gpus else {})}


def fit(
    exp: RetrievalExperiment, data: DataLocation, model_path: str, uri: str, run_id: str, env: dict,
    callbacks: list | None = None, trial: str | None = None, staged_model: DataLocation | None = None,
    gpu_share: float = 1.0,
) -> Any:  # fmt: skip
    """Train one run on Ray Train and close its MLflow run as FINISHED, or FAILED before re-raising.
    ``callbacks`` (Train V2 UserCallbacks) let a sweep trial relay reports; ``trial`` names that trial;
    ``staged_model`` is where the workers load the model from (:func:`stage`); ``gpu_share`` is the GPU
    fraction each worker asks for (trials sharing a GPU)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from xling.trainer.job import Job, TrackedRun
    from xling.trainer.model import model_fingerprint
    from xling.trainer.train_loop import train_loop_per_worker

    spec = exp.spec  # stage: auto is resolved on the workers, which see their GPUs (train_loop.Trainer)
    dist = spec.distributed
    use_gpu = dist.gpus_per_worker > 0
    init_ray(env, use_gpu)
    resources = worker_resources(dist, gpu_share)
    storage = storage_path(spec.output_dir)
    job = Job(spec, data, model_path, model_fingerprint(model_path), exp.metadata.name, TrackedRun(uri, run_id),
              staged_model, trial)  # fmt: skip
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=job.train_loop_config(),
        scaling_config=ScalingConfig(
            num_workers=dist.num_workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(
            name=train_run_name(exp.metadata.name, run_id, trial),
            storage_path=storage,
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=dist.max_failures),
            callbacks=callbacks,
        ),
    )
    try:
        result = trainer.fit()  # Train V2 raises a failed run's error (numWorkers >= 1: never local mode)
    except Exception as err:  # an interrupt leaves the run open, to be continued
        finish_run(uri, run_id, "FAILED", failure_reason(err))
        raise  # Ray's error for callers (a sweep's trial); ``xling run`` says it in one line
    finish_run(uri, run_id, "FINISHED")
    return result


def train_run_name(name: str, run_id: str, trial: str | None = None) -> str:
    """The Ray Train run name, and so its folder in the storage. Under the operator it is fixed by the
    experiment's uid, so a suspended, preempted or head-lost experiment that runs again finds its checkpoints
    and resumes; locally it is per MLflow run. A sweep trial adds its stable name (``p0-s1``): otherwise every
    trial of the experiment would be one Train run, each resuming from the snapshot of the one before."""
    uid = os.environ.get(EXPERIMENT_UID_ENV)
    base = f"{name}-{uid[:8]}" if uid else f"{name}-{run_id[:8]}"
    return f"{base}-{trial}" if trial else base


def init_ray(env: dict[str, str], use_gpu: bool) -> None:
    """Join the cluster in RAY_ADDRESS (a RayJob's driver), else start a local Ray on this machine."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env={"env_vars": env})
    else:
        ray.init(runtime_env={"env_vars": env}, num_cpus=None if use_gpu else os.cpu_count())


def storage_path(output_dir: str) -> str:
    """Ray Train storage: a URI (s3://, gs://) as it is, a local path made absolute."""
    if "://" in output_dir:
        return output_dir.rstrip("/") + "/ray"
    return str(Path(output_dir).resolve() / "ray")


def finish_run(uri: str, run_id: str, status: str, reason: str | None = None) -> None:
    """End an MLflow run with ``status`` (FINISHED, FAILED, KILLED), and ``xling.status`` to match; a failed
    run's ``reason`` goes to ``xling.failure`` and heads its description (the run page's first line)."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    client.set_tag(run_id, STATUS, status.lower())
    if reason is not None:
        note = client.get_run(run_id).data.tags.get(DESCRIPTION, "")
        client.set_tag(run_id, FAILURE, reason)
        client.set_tag(run_id, DESCRIPTION, f"**{status}**: {reason}\n\n{note}".strip())
    client.set_terminated(run_id, status)
