"""``xling run`` for a spec with ``sweep``: one Ray Tune trial per (point, seed), each a Ray Train run.

Tune V2 pattern: the trainable is a plain function that builds and fits a ``TorchTrainer`` (``driver.fit``)
and relays the workers' reports to Tune through ``TuneReportCallback``, so ASHA sees them. The trial
function takes half a CPU; Train's V2 controller takes none.

Trials are planned by ``trials``, not by Tune's search algorithms, so a rerun plans the very same trials.
Their names are stable throughout, which makes a restarted sweep continue where it stopped: Tune's experiment
(``<outputDir>/ray/<metadata.name>``) is restored, so finished trials are not rerun; an interrupted
trial finds its MLflow child run by trial name, and with it its Train run and last checkpoint.

MLflow: one parent run per sweep (found again by its sweep name and plan digest when continuing), one
nested child run per trial with system metrics on; the parent gets the summary (``summary``, ``report``);
the tags that tie them together are named in ``tags``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xling.api.errors import InputError
from xling.api.metrics import is_headline
from xling.api.spec.experiment import ExperimentSpec, RetrievalExperiment
from xling.api.tags import (
    DATA_FINGERPRINT,
    EXPERIMENT_KIND,
    PARENT_RUN_ID,
    PLAN_DIGEST,
    POINT,
    POINT_LABEL,
    POINT_VALUES,
    ROLE,
    ROLE_SWEEP,
    ROLE_TRIAL,
    SAMPLING,
    SEED,
    STATUS,
    SWEEP,
    SWEEP_RUN_ID,
    TRIAL,
    TRIALS,
    children_of,
    parents_of_sweep,
    tag_is,
)
from xling.trainer.driver import (
    RunResult,
    finish_run,
    fit,
    init_ray,
    log_training_data,
    prepare_run,
    storage_path,
)
from xling.trainer.sweep.progress import SweepProgress, tune_callback
from xling.trainer.sweep.report import publish
from xling.trainer.sweep.summary import summarize_sweep
from xling.trainer.sweep.tables import markdown
from xling.trainer.sweep.trials import SweepPlan, Trial, plan_sweep, point_specs
from xling.trainer.tracking import flatten, register_run_model, sampling_tags, start_run, version_tags

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from xling.trainer.data import DataLocation

#: CPUs of the Tune function trainable: it only waits on Train (but a 0-CPU trial cannot be scheduled).
TRIAL_CPUS = 0.5
#: Seconds between system-metric samples of a trial (MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides).
SYSTEM_METRICS_INTERVAL_S = 5.0


@dataclass(frozen=True)
class TrialContext:
    """What every trial needs from the driver (sent once through the object store)."""

    exp: RetrievalExperiment
    plan: SweepPlan
    tracking_uri: str
    experiment_name: str
    parent_run_id: str
    env: dict[str, str]
    model_path: str
    tags: dict[str, str]
    mined: dict | None = None  # mined hard negatives' counts, logged to every trial
    staged_model: DataLocation | None = None  # the model in the run's storage (``driver.stage``)

    def spec(self, point: int, seed: int) -> ExperimentSpec:
        spec = self.exp.spec.sweep.trial_spec(self.exp.spec, self.plan.points[point].values, seed)
        # Trials log their model; only the sweep's best is registered.
        tracking = spec.tracking.model_copy(update={"registered_model_name": None})
        return spec.model_copy(update={"tracking": tracking})

    def experiment(self, trial: Trial) -> RetrievalExperiment:
        return self.exp.model_copy(update={"spec": self.spec(trial.point, trial.seed)})


def _child_run(ctx: TrialContext, trial: Trial, spec: ExperimentSpec) -> tuple[str, dict[str, float] | None]:
    """The trial's nested MLflow run, and its metrics when it already finished.

    A restarted sweep reopens the run of a trial it retries. A trial whose run finished is not trained
    again, even when the interruption came before Tune recorded the trial as done.
    """
    from mlflow import MlflowClient

    client = MlflowClient(ctx.tracking_uri)
    parent = client.get_run(ctx.parent_run_id)
    found = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"{children_of(ctx.parent_run_id)} and {tag_is(TRIAL, trial.name)}",
        max_results=1,
    )
    if found and found[0].info.status == "FINISHED":
        return found[0].info.run_id, found[0].data.metrics
    if found:
        client.update_run(found[0].info.run_id, status="RUNNING")
        client.set_tag(found[0].info.run_id, STATUS, "running")
        return found[0].info.run_id, None
    point = ctx.plan.points[trial.point]
    tags = {**ctx.tags, PARENT_RUN_ID: ctx.parent_run_id, ROLE: ROLE_TRIAL, TRIAL: trial.name,
            POINT: str(trial.point), POINT_LABEL: point.label, POINT_VALUES: json.dumps(point.values),
            SEED: str(trial.seed), **sampling_tags(spec)}  # fmt: skip
    params = flatten(spec.model_dump(mode="json"))
    run_id = start_run(
        ctx.tracking_uri, ctx.experiment_name, f"{point.label} seed={trial.seed}", params, tags
    )
    log_training_data(ctx.tracking_uri, run_id, spec, ctx.tags[DATA_FINGERPRINT], ctx.mined)
    return run_id, None


def run_trial(config: dict[str, Any], ctx: TrialContext, data: DataLocation) -> None:
    """The Tune function trainable: one Ray Train run for one (point, seed)."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    trial = Trial(**config["trial"])
    exp = ctx.experiment(trial)
    run_id, finished = _child_run(ctx, trial, exp.spec)
    if finished is not None:
        tune.report({**{k: v for k, v in finished.items() if is_headline(k)}, "mlflow_run_id": run_id})
        return
    monitor = SystemMetricsMonitor(
        run_id,
        sampling_interval=SYSTEM_METRICS_INTERVAL_S,
        resume_logging=True,
        tracking_uri=ctx.tracking_uri,
    )
    monitor.start()
    try:
        share = 1 / ctx.exp.spec.sweep.trials_per_gpu if ctx.exp.spec.sweep else 1.0
        result = fit(
            exp, data, ctx.model_path, ctx.tracking_uri, run_id, ctx.env, [TuneReportCallback()], trial.name,
            ctx.staged_model, share,
        )  # fmt: skip
    finally:
        monitor.finish()
    tune.report({**result.metrics, "mlflow_run_id": run_id})


def _trial_name(trial: Any) -> str:
    return trial.config["trial"]["name"]


def _parent_run(
    exp: RetrievalExperiment,
    plan: SweepPlan,
    uri: str,
    experiment_name: str,
    tags: dict[str, str],
    stored: str | None,
) -> str:
    """The sweep's parent run: when continuing the Tune experiment at ``stored``, the newest parent of this
    sweep (it must have been planned identically), else a new one. Its ``sweep/plan.json`` is (re)written from
    this spec: objective, constraints and bootstrap settings may change between runs of a sweep, trials not."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    if stored is not None:
        experiment = client.get_experiment_by_name(experiment_name)
        found = experiment and client.search_runs(
            [experiment.experiment_id],
            filter_string=parents_of_sweep(exp.metadata.name),
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if not found:
            raise InputError(
                stored, f"a sweep to continue, but its parent run is not in {uri} (other tracking URI?)"
            )
        run_id = found[0].info.run_id
        if found[0].data.tags.get(PLAN_DIGEST) != plan.digest:
            raise InputError(
                stored,
                "a sweep planned from a different spec is stored here; delete it or change metadata.name",
            )
        client.update_run(run_id, status="RUNNING")
        client.set_tag(run_id, STATUS, "running")
    else:
        parent_tags = {**tags, ROLE: ROLE_SWEEP, TRIALS: str(len(plan.trials)), PLAN_DIGEST: plan.digest,
                       SAMPLING: exp.spec.sampling.strategy}  # fmt: skip
        run_name = exp.spec.tracking.run_name or exp.metadata.name
        run_id = start_run(
            uri, experiment_name, run_name, flatten(exp.spec.model_dump(mode="json")), parent_tags
        )
        experiment = client.get_experiment(client.get_run(run_id).info.experiment_id)
        if EXPERIMENT_KIND not in experiment.tags:  # else MLflow 3's UI opens on its GenAI overview
            client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND, "custom_model_development")
    client.log_dict(run_id, plan.to_json(exp), "sweep/plan.json")
    return run_id


def default_concurrency(
    resources: dict[str, float], specs: list[ExperimentSpec], trials_per_gpu: int = 1
) -> int:
    """Trials that fit at once: GPUs / GPUs per trial (times sweep.trialsPerGpu), or on CPU-only runs CPUs /
    CPUs per trial."""
    gpus = max(s.distributed.num_workers * s.distributed.gpus_per_worker for s in specs)
    if gpus:
        return max(1, int(resources.get("GPU", 0) // gpus) * trials_per_gpu)
    cpus = TRIAL_CPUS + max(s.distributed.num_workers * s.distributed.cpus_per_worker for s in specs)
    return max(1, int(resources.get("CPU", 1) // cpus))


def _settle_children(client: MlflowClient, ctx: TrialContext, grid: Any) -> None:
    """Close the child runs that Tune ended before their trial function could: ASHA stopped them (right
    after the final report the trial did finish: its objective is logged at the last step and its model
    before that report), or an interruption did. A run counts as finished only with both: an interruption
    between the final evaluation and the end of the model's upload leaves a run that must train again,
    or the rerun would skip it and the sweep would have a trial without a model. Runs of trials that
    raised stay FAILED."""
    from mlflow.entities import LoggedModelStatus, RunStatus

    errored = {r.config["trial"]["name"] for r in grid if r.error is not None}
    parent = client.get_run(ctx.parent_run_id)
    experiment = parent.info.experiment_id
    metric = ctx.exp.spec.sweep.metric
    ready = {
        m.source_run_id
        for m in client.search_logged_models([experiment])
        if m.status == LoggedModelStatus.READY
    }
    for run in client.search_runs(
        [experiment],
        filter_string=f"{children_of(ctx.parent_run_id)} and attributes.status != 'FINISHED'",
    ):
        if run.data.tags[TRIAL] in errored:
            continue
        max_steps = int(run.data.params.get("optimization.max_steps", -1))
        done = run.info.run_id in ready and any(
            m.step == max_steps for m in client.get_metric_history(run.info.run_id, metric)
        )
        client.set_tag(run.info.run_id, STATUS, "finished" if done else "stopped")
        client.set_terminated(
            run.info.run_id, RunStatus.to_string(RunStatus.FINISHED if done else RunStatus.KILLED)
        )


def run_sweep(
    exp: RetrievalExperiment, tracking_uri: str | None = None, skip_bad_rows: bool = False
) -> RunResult:
    """Plan, train every trial on Ray Tune (continuing a stored sweep), then summarize on the parent run."""
    from mlflow import MlflowClient
    from ray import tune

    started = time.time()
    plan = plan_sweep(exp)  # every error in the sweep surfaces before data, model or Ray
    if exp.spec.sweep.register_best and not exp.spec.tracking.registered_model_name:
        raise InputError(None, "needs spec.tracking.registeredModelName", field="spec.sweep.registerBest")
    if "://" not in exp.spec.output_dir:  # trials run in Tune's trial directories
        output_dir = str(Path(exp.spec.output_dir).resolve())
        exp = exp.model_copy(update={"spec": exp.spec.model_copy(update={"output_dir": output_dir})})
    run = prepare_run(exp, tracking_uri, skip_bad_rows, point_specs(exp, plan))  # once for every trial
    exp, prepared, uri = run.exp, run.prepared, run.tracking_uri
    experiment_name = exp.mlflow_experiment_name
    storage = storage_path(exp.spec.output_dir)
    tags = {SWEEP: exp.metadata.name, **run.tags}
    tune_path = f"{storage}/{exp.metadata.name}"
    stored = tune_path if tune.Tuner.can_restore(tune_path) else None  # a stopped run to continue
    parent = _parent_run(exp, plan, uri, experiment_name, tags, stored)
    ctx = TrialContext(exp, plan, uri, experiment_name, parent, run.env, run.model_path, tags, prepared.mined,
                       run.staged_model)  # fmt: skip
    print(f"mlflow: {uri} experiment={experiment_name!r} sweep parent run_id={parent}", flush=True)

    grid = _tune(ctx, prepared.location, storage, stored)
    client = MlflowClient(uri)
    _settle_children(client, ctx, grid)
    summary = summarize_sweep(client, parent)
    publish(client, summary)
    print("\n" + markdown(summary), flush=True)
    errors = [r.error for r in grid if r.error is not None]
    if exp.spec.sweep.asha is None:  # every trial must finish; MLflow's finished children are the record
        interrupted = summary.finished + len(errors) < len(plan.trials)
    else:  # ASHA's stops are terminations, not interruptions
        interrupted = grid.num_terminated + grid.num_errors < len(plan.trials)
    status = "FAILED" if errors else ("KILLED" if interrupted else "FINISHED")
    if status == "FINISHED":  # an interrupted sweep's best is provisional
        register_best(uri, summary, exp.spec)
    finish_run(uri, parent, status)
    seconds = time.time() - started
    print(f"mlflow sweep run: {parent} ({uri})\ntook {seconds:.0f}s", flush=True)
    if errors:
        # Errored trials are retried on restore (resume_errored): an interrupt can also surface as errors.
        raise RuntimeError(
            f"{len(errors)} of {len(plan.trials)} trials failed (first: {errors[0]}); "
            "rerun to continue: finished trials are kept, failed ones are retried"
        )
    if status == "KILLED":
        raise RuntimeError(
            f"sweep stopped with {summary.finished} of {len(plan.trials)} trials; rerun to continue"
        )
    best = summary.points[summary.best] if summary.best is not None else None
    metrics = {k: c.mean for k, c in best.stats.items()} if best else {}
    return RunResult(parent, metrics, None, seconds)


def register_best(uri: str, summary: Any, spec: ExperimentSpec) -> str | None:
    """With ``sweep.registerBest``: the best point's best seed's model as a new registry version, tagged with
    that trial's summary metrics and the sweep it won."""
    name = spec.tracking.registered_model_name
    if not (spec.sweep.register_best and name) or summary.best is None:
        return None
    point, sign = summary.points[summary.best], 1 if spec.sweep.mode == "max" else -1
    trial = max(point.trials, key=lambda t: sign * t.metrics.get(spec.sweep.metric, -sign * math.inf))
    tags = {**version_tags(trial.run_id, spec, trial.metrics), SWEEP_RUN_ID: summary.parent_run_id,
            POINT_LABEL: point.label}  # fmt: skip
    version = register_run_model(uri, name, trial.run_id, tags)
    print(f"registered {name} version {version}: best point {point.label}, seed {trial.seed}", flush=True)
    return version


def _tune(ctx: TrialContext, data: DataLocation, storage: str, stored: str | None) -> Any:
    """Run the Tune experiment, or continue the one ``stored`` there; returns its ResultGrid."""
    import ray
    from ray import tune

    sweep = ctx.exp.spec.sweep
    specs = [ctx.spec(i, sweep.seeds[0]) for i in range(len(ctx.plan.points))]
    init_ray(ctx.env, any(s.distributed.gpus_per_worker for s in specs))
    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx, data=data), {"cpu": TRIAL_CPUS})
    if stored is not None:  # its RunConfig, the progress callback included, comes back with it
        print(f"sweep: continuing {stored} (finished trials are kept)", flush=True)
        return tune.Tuner.restore(stored, trainable, resume_errored=True).fit()
    scheduler = None
    if sweep.asha is not None:
        from ray.tune.schedulers import ASHAScheduler

        a = sweep.asha
        max_t = max(s.optimization.max_steps for s in specs)
        scheduler = ASHAScheduler(time_attr="step", metric=a.metric, mode=a.mode, max_t=max_t,
                                  grace_period=a.grace_period, reduction_factor=a.reduction_factor)  # fmt: skip
    concurrency = sweep.max_concurrent_trials or default_concurrency(
        ray.cluster_resources(), specs, sweep.trials_per_gpu
    )
    print(f"sweep: {len(ctx.plan.trials)} trials ({len(ctx.plan.points)} points x {len(sweep.seeds)} seeds), "
          f"{concurrency} at a time", flush=True)  # fmt: skip
    tuner = tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search([asdict(t) for t in ctx.plan.trials])},
        tune_config=tune.TuneConfig(
            max_concurrent_trials=concurrency,
            scheduler=scheduler,
            trial_name_creator=_trial_name,
            trial_dirname_creator=_trial_name,
        ),
        run_config=tune.RunConfig(
            name=ctx.exp.metadata.name,
            storage_path=storage,
            verbose=0,
            callbacks=[tune_callback(SweepProgress(len(ctx.plan.trials), sweep.metric), _trial_name)],
        ),
    )
    return tuner.fit()
