"""``xling results SWEEP --full-pool``: each point's best seed, and the zero-shot model, on the whole suite.

A sweep evaluates every trial on the same slice of its suite (``maxParagraphs``), which is what makes
18 trials affordable; the reader's answer should also hold on the full pool, so the best seed of each
point (by the sweep's objective) is evaluated once more on all of it. The numbers go into MLflow, under
the suite name ``<suite>-full``: into the trial's own run, and zero-shot into the sweep's parent run. So
``xling results`` shows them from MLflow alone, and a rerun evaluates only what is not there yet.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from xling.api.errors import InputError
from xling.api.metrics import flat_name
from xling.api.tags import FULL_POOL
from xling.trainer.sweep.claims import roles
from xling.trainer.sweep.summary import FULL_SUFFIX, SweepSummary, full_prefix

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from xling.api.spec.experiment import ExperimentSpec, RetrievalExperiment
    from xling.trainer.evaluation.protocol import TextEncoder
    from xling.trainer.sweep.summary import PointSummary


def best_trials(s: SweepSummary) -> list[tuple[PointSummary, str]]:
    """(point, run id of its best seed by the sweep's objective) for every point whose seeds all finished
    (before that, its best seed is not known yet: a mid-sweep call leaves the point for a later one)."""
    sign = 1 if s.sweep.mode == "max" else -1
    named = roles(s.points)  # the arms the paper's claims compare first, hybrid leading: the rest may wait
    rank = {
        index: i for i, index in enumerate(named[r] for r in ("hybrid", "xy", "xx", "mixed") if r in named)
    }
    out = []
    for p in sorted(s.points, key=lambda p: rank.get(p.index, len(rank))):
        scored = [t for t in p.trials if s.sweep.metric in t.metrics]
        if len(scored) == len(s.sweep.seeds):
            out.append((p, max(scored, key=lambda t: sign * t.metrics[s.sweep.metric]).run_id))
    return out


def _logged_model_dir(client: MlflowClient, run_id: str, into: Path) -> Path:
    """The sentence-transformers directory of the model the trial logged (its final checkpoint)."""
    import mlflow

    experiment = client.get_run(run_id).info.experiment_id
    found = [m for m in client.search_logged_models([experiment]) if m.source_run_id == run_id]
    if not found:
        raise InputError(None, f"run {run_id} logged no model (did the trial finish?)")
    mlflow.set_tracking_uri(client.tracking_uri)  # models:/ URIs are resolved through the global tracking URI
    local = mlflow.artifacts.download_artifacts(f"models:/{found[0].model_id}", dst_path=str(into))
    dirs = sorted(Path(local).glob("artifacts/*/modules.json"))  # pyfunc artifacts keep the source dir's name
    if not dirs:
        raise InputError(f"run {run_id}", "its logged model holds no sentence-transformers directory")
    return dirs[0].parent


def _evaluate_into(
    client: MlflowClient, run_id: str, step: int, spec: ExperimentSpec, suite_name: str, encoder: TextEncoder
) -> None:
    from xling.api.contracts import embedding_cache_dir
    from xling.trainer.evaluation.api import evaluate_suite, load_suite
    from xling.trainer.evaluation.report import format_table, log_to_mlflow

    suite = next(x for x in spec.evaluation.suites if x.name == suite_name)
    whole = suite.model_copy(update={"max_paragraphs": None, "max_queries": None})
    results = evaluate_suite(load_suite(whole), encoder, index=spec.evaluation.index,
                             cache_dir=embedding_cache_dir(spec.evaluation.cache_dir))  # fmt: skip
    print(format_table(results), flush=True)
    log_to_mlflow(dataclasses.replace(results, suite=suite_name + FULL_SUFFIX), client, run_id, step=step)


def evaluate_full_pool(client: MlflowClient, s: SweepSummary, exp: RetrievalExperiment) -> int:
    """Evaluate what is missing (zero-shot on the parent run, each point's best seed on its run); returns
    how many evaluations ran."""
    import torch

    from xling.trainer.driver import prepare_data, resolve_model
    from xling.trainer.model import encoder_for
    from xling.trainer.sentence_transformers_dir import read_sentence_transformers

    spec = exp.spec
    torch.set_num_threads(os.cpu_count() or 1)
    suite_name = s.prefix.replace("_", "-")
    done_key = flat_name(full_prefix(s.prefix), "multi.map")
    ran = 0
    if done_key not in client.get_run(s.parent_run_id).data.metrics:
        print(f"full pool: zero-shot {spec.model.name}", flush=True)
        # as the sweep resolved it (the tiny test model is built from the data)
        model_path = resolve_model(spec, prepare_data(exp))
        encoder = encoder_for(model_path, spec.model, spec.evaluation.batch_size)
        _evaluate_into(client, s.parent_run_id, 0, spec, suite_name, encoder)
        ran += 1
    for point, run_id in best_trials(s):
        if done_key in client.get_run(run_id).data.metrics:
            continue
        print(f"full pool: {point.label}, run {run_id}", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            backbone, model_spec = read_sentence_transformers(_logged_model_dir(client, run_id, Path(tmp)))
            encoder = encoder_for(backbone, model_spec, spec.evaluation.batch_size)
            _evaluate_into(client, run_id, spec.optimization.max_steps, spec, suite_name, encoder)
        client.set_tag(run_id, FULL_POOL, "evaluated")
        ran += 1
    return ran
