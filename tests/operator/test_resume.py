"""Suspend, preemption or a lost head: the operator's RayJob runs ``xling run`` again from the start, with the
same experiment uid. The second run must find the first one's checkpoint (one Ray Train run name per uid) and
log into the same MLflow run (tagged with the uid), continuing from the last checkpoint instead of step 0.

Real Ray, real MLflow (sqlite): run 1 is killed mid-run with no failures to spare (what deleting the cluster
does to a driver), run 2 is the same experiment again.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tests.support import ROOT
from tests.trainer.test_faults import CHECKPOINT_EVERY, KILL_BEFORE, STEPS, experiment, history, store

pytestmark = pytest.mark.slow
UID = "7d3c9a51-0000-4000-8000-00000000cafe"


def test_start_run_reuses_the_run_of_the_same_experiment_uid(tmp_path: Path, monkeypatch) -> None:
    from mlflow import MlflowClient

    from xling.trainer.tracking import start_run

    uri = store(tmp_path)
    monkeypatch.setenv("XLING_EXPERIMENT_UID", UID)
    first = start_run(uri, "exp", "exp", {"a": "1"}, {})
    MlflowClient(uri).set_terminated(first, "FAILED")
    assert start_run(uri, "exp", "exp", {"a": "1"}, {}) == first
    run = MlflowClient(uri).get_run(first)
    assert run.info.status == "RUNNING" and run.data.tags["xling.k8s.uid"] == UID
    assert start_run(uri, "exp", "other-trial", {"a": "1"}, {}) != first  # another run of that experiment
    monkeypatch.setenv("XLING_EXPERIMENT_UID", "another-uid")
    assert start_run(uri, "exp", "exp", {"a": "1"}, {}) != first  # a re-created experiment starts afresh


def _run(tmp: Path, kill: str | None) -> Any:
    import ray

    from xling.trainer.driver import LOCAL_ENV
    from xling.trainer.run import run_experiment

    env = {
        **LOCAL_ENV,
        "TORCH_EXTENSIONS_DIR": str(ROOT / ".cache" / "torch_extensions"),
    }
    if kill:
        env["XLING_FAULT_KILL"] = kill
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env})
    try:
        exp = experiment("resumed", max_failures=0)
        exp.spec.output_dir = str(tmp / "runs")  # the experiment's shared storage (s3:// on a cluster)
        return run_experiment(exp, tracking_uri=store(tmp))
    finally:
        ray.shutdown()


def test_an_experiment_that_runs_again_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from xling.trainer.driver import LOCAL_ENV

    with pytest.MonkeyPatch.context() as mp:
        for key, value in {**LOCAL_ENV, "XLING_CACHE": str(tmp_path / "cache")}.items():
            mp.setenv(key, os.environ.get(key, value))
        mp.setenv("XLING_EXPERIMENT_UID", UID)  # what the operator sets on every Ray pod
        with pytest.raises(Exception):  # noqa: B017,PT011 - the kill surfaces as Ray Train's error
            _run(tmp_path, f"{KILL_BEFORE}:0")
        (first,) = MlflowClient(store(tmp_path)).search_runs(
            [MlflowClient(store(tmp_path)).get_experiment_by_name("resumed").experiment_id]
        )
        result = _run(tmp_path, None)
    assert result.run_id == first.info.run_id, "the same MLflow run continues"
    steps = history(tmp_path, result.run_id)
    last_checkpoint = KILL_BEFORE // CHECKPOINT_EVERY * CHECKPOINT_EVERY
    assert (last_checkpoint, float(last_checkpoint)) in steps["train/resumed_at_step"], "not from step 0"
    assert [s for s, _ in steps["train/loss"]] == list(range(1, STEPS + 1)), "each step exactly once"
    assert MlflowClient(store(tmp_path)).get_run(result.run_id).info.status == "FINISHED"


def test_only_runs_of_built_in_names_go_offline(monkeypatch) -> None:
    from xling.api.spec.experiment import ExperimentSpec
    from xling.trainer.driver import hub_free, local_env

    base = {
        "data": {"languages": ["en"], "sources": [{"type": "pairs", "path": "p"}]},
        "sampling": {"strategy": "xx"},
    }
    built_in = ExperimentSpec.model_validate({**base, "model": {"name": "xling/tiny-random"}})
    hub = ExperimentSpec.model_validate({**base, "model": {"name": "intfloat/multilingual-e5-large"}})
    assert hub_free(built_in) and not hub_free(hub)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert "HF_HUB_OFFLINE" not in local_env(hub)  # neither set here nor shipped to any run's workers
    assert local_env(built_in)["HF_HUB_OFFLINE"] == "1"
