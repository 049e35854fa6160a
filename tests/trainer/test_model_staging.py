"""A model that is on neither the hub nor the image (the built-in tiny model, a converted model, a local path)
exists only on the driver's disk. On a cluster the workers run on other nodes: the driver stages the model once
into the run's shared storage and each node loads a local copy of it (``model.stage_model``, ``Job``)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.support import ROOT

UID = "0f0d3a11-0000-4000-8000-00000000d15c"
TEXTS = [f"sentence {i} about {w}" for i, w in enumerate(["rivers", "cities", "music", "bread"] * 30)]


@pytest.mark.parametrize("bucket", [False, True], ids=["shared-path", "bucket-uri"])
def test_a_staged_model_loads_on_a_node_that_never_saw_it(tmp_path: Path, bucket: bool, capsys) -> None:
    from transformers import AutoConfig

    from xling.trainer.data.store import locate
    from xling.trainer.model import build_tiny_model, load_tokenizer, stage_model

    head = build_tiny_model(TEXTS, tmp_path / "head" / "tiny")
    root = f"file://{tmp_path}/bucket/models" if bucket else str(tmp_path / "pvc" / "models")
    location = stage_model(str(head), root, tmp_path / "head-cache")
    assert location is not None and location.uri.startswith(root)
    again = stage_model(str(head), root, tmp_path / "other-head-cache")
    assert again == location and "staged copy found" in capsys.readouterr().out, "staged once, by content"
    shutil.rmtree(head)  # a worker's node has no copy of the driver's disk
    local = locate(location, tmp_path / "node-cache")
    assert (local.parent == tmp_path / "node-cache") == bucket, "a bucket's model is copied to the node once"
    assert AutoConfig.from_pretrained(local).hidden_size == 32
    assert load_tokenizer(str(local))("sentence about rivers")["input_ids"]


def test_only_a_directory_on_this_machine_is_staged_and_only_for_workers_elsewhere(
    tmp_path: Path, monkeypatch
) -> None:
    from xling.api.spec.experiment import ExperimentSpec
    from xling.trainer.driver import stage
    from xling.trainer.model import build_tiny_model

    spec = ExperimentSpec.model_validate({
        "model": {"name": "some/hub-model"}, "outputDir": str(tmp_path / "runs"),
        "data": {"languages": ["en"], "sources": [{"type": "pairs", "path": "p"}]}, "sampling": {"strategy": "xx"},
    })  # fmt: skip
    model = str(build_tiny_model(TEXTS, tmp_path / "tiny"))
    monkeypatch.delenv("XLING_EXPERIMENT_UID", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert stage(model, spec) is None, "a local run's workers share the driver's disk"
    monkeypatch.setenv("XLING_EXPERIMENT_UID", UID)
    assert stage("some/hub-model", spec) is None, "every worker downloads a hub model itself"
    staged = stage(model, spec)
    assert staged is not None and staged.uri.startswith(str(tmp_path / "runs" / "models"))


@pytest.mark.slow
def test_workers_train_the_staged_model_when_the_drivers_copy_is_gone(tmp_path: Path) -> None:
    """The smoke run as the operator runs it, with the driver's built model deleted once staged: the workers
    must load it from the run's storage (before staging, they were given the driver's path)."""
    import ray
    from mlflow import MlflowClient

    import xling.trainer.run as run_module
    from xling.api.spec.loading import load_experiment
    from xling.trainer.driver import LOCAL_ENV, prepare_run

    def prepare_then_lose_the_drivers_copy(*args, **kwargs):
        run = prepare_run(*args, **kwargs)
        shutil.rmtree(run.model_path)  # what a worker on another node sees of the driver's disk
        return run

    exp = load_experiment(ROOT / "manifests/samples/smoke.yaml")
    exp.spec.optimization.max_steps, exp.spec.optimization.checkpoint_every = 2, 2
    exp.spec.evaluation = type(exp.spec.evaluation)(suites=[], atStart=False)  # no evaluation at all
    exp.spec.tracking.registered_model_name = None
    exp.spec.output_dir = str(tmp_path / "runs")  # the experiment's shared storage (s3:// or a pvc)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {**LOCAL_ENV, "XLING_CACHE": str(tmp_path / "driver-cache")}.items():
            mp.setenv(key, os.environ.get(key, value))
        mp.setenv("XLING_EXPERIMENT_UID", UID)  # what the operator sets on every Ray pod
        mp.setattr(run_module, "prepare_run", prepare_then_lose_the_drivers_copy)
        workers = {**LOCAL_ENV, "XLING_CACHE": str(tmp_path / "worker-cache")}
        ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": workers})
        try:
            result = run_module.run_experiment(exp, tracking_uri=uri)
        finally:
            ray.shutdown()
    assert MlflowClient(uri).get_run(result.run_id).info.status == "FINISHED"
    staged = list((tmp_path / "runs" / "models").iterdir())
    assert len(staged) == 1 and (staged[0] / "config.json").is_file()


@pytest.mark.slow
def test_mining_actors_on_other_nodes_encode_with_the_staged_model(tmp_path: Path) -> None:
    """``mine.workers > 1`` encodes on Ray actors, which a cluster places on worker nodes (the head has no Ray
    CPUs): they too load the staged copy, not the driver's path."""
    import ray

    import xling.trainer.model as model
    from tests.trainer.test_mining import tiny_experiment
    from xling.api.spec.loading import parse_experiment
    from xling.trainer.driver import prepare_data

    stage_model = model.stage_model

    def stage_then_lose_the_drivers_copy(path: str, root: str, cache: Path):
        staged = stage_model(path, root, cache)
        shutil.rmtree(path)  # what an actor on another node sees of the driver's disk
        return staged

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XLING_CACHE", str(tmp_path / "driver-cache"))
        mp.setenv("XLING_EXPERIMENT_UID", UID)  # what the operator sets on every Ray pod
        mp.setattr(model, "stage_model", stage_then_lose_the_drivers_copy)
        try:
            mined = prepare_data(parse_experiment(tiny_experiment(tmp_path, workers=2))).mined
        finally:
            ray.shutdown()
    assert mined["negatives"] > 0
    assert len(list((tmp_path / "runs" / "models").iterdir())) == 1
