"""``xling run`` of a spec without ``sweep``: validate, load data, open the MLflow run, then train on Ray Train.

Everything that can fail cheaply (spec, data rows, model name) fails before Ray starts (``driver``).
"""

from __future__ import annotations

import time
from pathlib import Path

from xling.api.spec.experiment import RetrievalExperiment
from xling.api.tags import DATA_FINGERPRINT
from xling.trainer.checkpoint_layout import MODEL_DIR
from xling.trainer.console import phase
from xling.trainer.driver import RunResult, fit, log_training_data, prepare_run
from xling.trainer.headline import describe
from xling.trainer.sentence_transformers_dir import CARD_FILE
from xling.trainer.tracking import run_params, sampling_tags, start_run


def run_experiment(
    exp: RetrievalExperiment, tracking_uri: str | None = None, skip_bad_rows: bool = False
) -> RunResult:
    """One training run in its own MLflow run; a spec with ``sweep`` is ``xling.trainer.sweep.tune.run_sweep``'s."""
    if exp.spec.sweep is not None:
        raise ValueError(
            "spec.sweep: a sweep runs through xling.trainer.sweep.tune.run_sweep, not run_experiment"
        )
    started = time.time()
    with phase("prepare", "the training data (built once, then reused) and the model"):
        run = prepare_run(exp, tracking_uri, skip_bad_rows)  # a run that cannot fit is refused first
    exp, spec, uri, prepared = run.exp, run.exp.spec, run.tracking_uri, run.prepared
    tags = {**sampling_tags(spec), **run.tags}
    experiment_name = exp.mlflow_experiment_name
    run_id = start_run(
        uri, experiment_name, spec.tracking.run_name or exp.metadata.name, run_params(spec), tags
    )
    log_training_data(uri, run_id, spec, tags[DATA_FINGERPRINT], prepared.mined)
    print(f"mlflow: {uri} experiment={experiment_name!r} run_id={run_id}", flush=True)

    workers = f"{spec.distributed.num_workers} worker(s)"
    with phase(
        "train",
        f"Ray and {workers}: zero-shot evaluation, {spec.optimization.max_steps} steps, evaluation, export",
    ):
        result = fit(
            exp, prepared.location, run.model_path, uri, run_id, run.env, staged_model=run.staged_model
        )
    metrics = dict(result.metrics or {})
    ckpt = result.checkpoint.path if result.checkpoint else None
    headline = curate_run(uri, run_id, exp, ckpt)  # the full tables: the log, results.txt, MLflow
    seconds = time.time() - started
    print(f"\n{one_screen(headline)}\ncheckpoint: {ckpt}\nmlflow run: {run_id} ({uri})\n"
          f"open it: {ui_command(uri, run_id)}\ntook {seconds:.0f}s", flush=True)  # fmt: skip
    return RunResult(run_id, metrics, ckpt, seconds)


def curate_run(uri: str, run_id: str, exp: RetrievalExperiment, checkpoint: str | None) -> str:
    """What a reader of the MLflow run needs beside the metrics: a description with the headline and the
    zero-shot -> trained table (returned, for the console), the spec as run, and the model card."""
    import yaml
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    spec = exp.spec
    alpha = f" (alpha {spec.sampling.alpha})" if spec.sampling.strategy == "hybrid" else ""
    what = (f"{exp.metadata.name}: {spec.model.name}, {spec.sampling.strategy} batches{alpha}, "
            f"{spec.optimization.max_steps} steps of {spec.optimization.global_batch_size} pairs in "
            f"{', '.join(spec.data.languages)}")  # fmt: skip
    text = describe(client, run_id, what)
    client.log_text(run_id, yaml.safe_dump(exp.model_dump(by_alias=True, mode="json", exclude_none=True),
                                           sort_keys=False), "spec.yaml")  # fmt: skip
    card = Path(checkpoint or "/nonexistent") / MODEL_DIR / CARD_FILE
    if card.is_file():
        client.log_artifact(run_id, str(card), "model_card")
    return text


def one_screen(description: str) -> str:
    """The run's description for the console: its Markdown paragraphs without the blank lines between."""
    return "\n".join(line for line in description.splitlines() if line.strip())


def ui_command(uri: str, run_id: str) -> str:
    """How to look at the run: the MLflow UI on a local store, or the server's run page."""
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/#/runs/{run_id}"
    return f"mlflow ui --backend-store-uri {uri}  (then http://127.0.0.1:5000/#/runs/{run_id})"
