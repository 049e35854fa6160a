"""A sweep run the way the cluster runs it: the operator sets the experiment's uid on every Ray pod, and the
RayJob's driver runs ``xling run`` on the sweep. Each trial must still be its own Ray Train run, in its own
folder, starting from step 0 (not from the checkpoint of the trial before it), with its own result.

Real Ray Tune, Ray Train and MLflow (sqlite); the smoke sample's tiny model, 2 points, 1 seed, one trial at a
time (so the second trial starts when the first one's snapshot is already on disk).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support import ROOT
from xling.api.tags import ROLE, ROLE_TRIAL, TRIAL, tag_is

UID = "5a1e0c4d-0000-4000-8000-0000000beef0"
STEPS = 4


def _sweep(tmp: Path):
    from xling.api.spec.loading import load_experiment, parse_experiment

    doc = load_experiment(ROOT / "manifests/samples/smoke.yaml").model_dump(
        mode="json", by_alias=True, exclude_none=True
    )
    doc["metadata"]["name"] = "cluster-sweep"
    spec = doc["spec"]
    spec["optimization"].update(maxSteps=STEPS, checkpointEvery=2)
    spec["distributed"].update(cpusPerWorker=0.5)
    spec["evaluation"].update(atStart=False)  # no zero-shot, so no centering baseline and no curve
    for baseline in ("centering", "curvePoints"):
        spec["evaluation"].pop(baseline, None)
    spec["evaluation"]["suites"][0].update(maxParagraphs=2)
    spec["tracking"] = {}
    spec["outputDir"] = str(tmp / "runs")  # the experiment's shared storage (s3:// or a pvc on a cluster)
    spec["sweep"] = {"parameters": {"sampling.alpha": {"grid": [0.0, 1.0]}}, "seeds": [0],
                     "metric": "xquad_r/multi/map", "maxConcurrentTrials": 1}  # fmt: skip
    return parse_experiment(doc, "cluster-sweep.yaml")


@pytest.mark.slow
def test_sweep_trials_under_the_operator_are_separate_runs(tmp_path: Path) -> None:
    import ray
    from mlflow import MlflowClient

    from xling.trainer.driver import LOCAL_ENV
    from xling.trainer.sweep.tune import run_sweep

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {**LOCAL_ENV, "XLING_CACHE": str(tmp_path / "cache")}.items():
            mp.setenv(key, os.environ.get(key, value))
        mp.setenv("XLING_EXPERIMENT_UID", UID)  # what the operator sets on every Ray pod
        ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": dict(LOCAL_ENV)})
        try:
            run_sweep(_sweep(tmp_path), tracking_uri=uri)
        finally:
            ray.shutdown()

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("cluster-sweep")
    trials = client.search_runs([exp.experiment_id], tag_is(ROLE, ROLE_TRIAL))
    assert sorted(r.data.tags[TRIAL] for r in trials) == ["p0-s0", "p1-s0"]
    losses = {}
    for run in trials:
        name = run.data.tags[TRIAL]
        resumed = client.get_metric_history(run.info.run_id, "train/resumed_at_step")
        assert not resumed, f"trial {name} resumed from a checkpoint at step {resumed[0].value:g}"
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss"))
        assert [step for step, _ in history] == list(range(1, STEPS + 1)), f"trial {name} trained {history}"
        losses[name] = [loss for _, loss in history]
    assert losses["p0-s0"] != losses["p1-s0"], "X-Y-only and X-X-only trials trained on the same batches"
    # Ray Train's run folders: one per trial, each with its own checkpoints, named by the experiment's uid.
    folders = [p.name for p in (tmp_path / "runs" / "ray").iterdir() if any(p.glob("checkpoint_*"))]
    assert sorted(folders) == [f"cluster-sweep-{UID[:8]}-p0-s0", f"cluster-sweep-{UID[:8]}-p1-s0"], folders


def test_train_run_names_per_trial_survive_a_restart(monkeypatch) -> None:
    """Under the operator a trial's Train run is named by the experiment and the trial, not by its MLflow
    run (a restarted RayJob whose sweep parent run was lost opens new ones), so it finds its own checkpoint."""
    from xling.trainer.driver import train_run_name

    monkeypatch.setenv("XLING_EXPERIMENT_UID", UID)
    first, again = (train_run_name("sweep", run_id, "p1-s0") for run_id in ("run-a", "run-b"))
    assert first == again == f"sweep-{UID[:8]}-p1-s0"
    assert train_run_name("sweep", "run-a", "p0-s0") != first
    assert train_run_name("one", "run-a") == train_run_name("one", "run-b") == f"one-{UID[:8]}"
