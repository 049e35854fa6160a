"""A run that fails after it started: one line for the user naming the field to change, and the same reason
on the failed MLflow run (a tag, and the head of its description); a model that cannot load fails before Ray."""

from __future__ import annotations

import json
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from ray.train import ControllerError, WorkerGroupError

from xling.api.errors import RunFailed, command, failure_reason
from xling.api.spec.base import SpecError
from xling.api.spec.training import ModelSpec
from xling.api.tags import DESCRIPTION, FAILURE, STATUS
from xling.trainer.driver import finish_run
from xling.trainer.model import load_model_files
from xling.trainer.tracking import start_run


def test_a_worker_out_of_memory_names_the_batch() -> None:
    err = WorkerGroupError(
        "rank 1 failed",
        {
            1: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
            2: RuntimeError("later"),
        },
    )
    reason = failure_reason(err)
    assert reason.startswith("spec.optimization.globalBatchSize: out of memory: lower it"), reason
    assert reason.endswith("OutOfMemoryError (rank 1): CUDA out of memory. Tried to allocate 2.00 GiB")


def test_a_model_that_does_not_load_on_a_worker_names_the_model() -> None:
    hub = OSError(
        "We couldn't connect to 'https://huggingface.co' to load the files,\nand couldn't find them"
    )
    reason = failure_reason(ControllerError(hub))
    assert reason.startswith("spec.model.name: the model did not load: OSError: We couldn't connect"), reason
    assert "\n" not in reason


def test_an_input_error_on_a_worker_reads_as_it_is() -> None:
    spec_error = SpecError(None, "no source has rows in fr", field="spec.data.languages")
    assert (
        failure_reason(WorkerGroupError("", {0: spec_error}))
        == "spec.data.languages: no source has rows in fr"
    )


def test_the_cli_prints_a_failed_run_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    def handler(_: Namespace) -> int:
        raise RunFailed("spec.model.name: the model did not load: OSError: gone") from OSError("gone")

    assert command(handler)(Namespace()) == 1
    out = capsys.readouterr()
    assert out.err == "error: spec.model.name: the model did not load: OSError: gone\n" and not out.out


def test_a_failed_run_records_its_reason_in_mlflow(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = start_run(uri, "exp", "run", {}, {})
    finish_run(uri, run_id, "FAILED", "spec.model.name: the model did not load: OSError: gone")
    run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == "FAILED" and run.data.tags[STATUS] == "failed"
    assert run.data.tags[FAILURE] == "spec.model.name: the model did not load: OSError: gone"
    assert run.data.tags[DESCRIPTION].startswith("**FAILED**: spec.model.name: the model did not load")


def test_the_driver_loads_the_model_config_before_ray(tmp_path: Path) -> None:
    """A directory with a config.json passes the preflight's look; the driver loads config and tokenizer as the
    workers will, and refuses an architecture this transformers does not know in one line, before Ray."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    with pytest.raises(SpecError) as err:
        load_model_files(str(tmp_path), ModelSpec(name=str(tmp_path)))
    assert str(err.value).startswith(f"spec.model.name: '{tmp_path}' cannot be loaded: "), err.value
    assert "no-such-architecture" in str(err.value) and "\n" not in str(err.value)


def test_a_worker_that_died_is_said_in_a_short_line_with_its_log() -> None:
    """A killed rank (the OOM killer on a CPU box) came back as 500 characters of Ray's worker repr."""
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError

    died = WorkerHealthCheckFailedError(
        "A worker health check failed. Worker info: Worker( actor=Actor(RayTrainWorker, 51cd), "
        "log_file_path='/tmp/ray/session_1/logs/train/ray-train-app-worker-51cd.log')",
        failure=RuntimeError("connection error code 2"),
    )
    reason = failure_reason(WorkerGroupError("", {0: died}))
    assert reason == ("the worker process (rank 0) died (WorkerHealthCheckFailedError): killed (out of memory?) "
                      "or crashed; its log: /tmp/ray/session_1/logs/train/ray-train-app-worker-51cd.log")  # fmt: skip


def test_ray_trains_failure_is_told_from_other_errors() -> None:
    """``xling run`` turns Ray Train's failure, and only it, into one line (run_experiment raises it as Ray
    does, for a sweep's trials and library callers)."""
    from xling.api.errors import training_failed

    assert training_failed(WorkerGroupError("", {0: RuntimeError("x")})) and training_failed(
        ControllerError(OSError())
    )
    assert not training_failed(ValueError("a bug")) and not training_failed(KeyError("x"))


def test_a_workers_input_error_reaches_the_driver_whole() -> None:
    """Ray pickles a worker's error: an InputError came back as a TypeError (``__init__`` called with its
    text alone), now with its type, text and fields, so failure_reason prints it as the user's to fix."""
    import pickle

    from xling.trainer.capacity.check import PlanError
    from xling.trainer.data.pairs import BadRowError

    for err in (
        BadRowError("pairs.jsonl:3", "empty query"),
        PlanError(None, "auto: cannot size the devices", field="distributed.deepspeed.stage"),
    ):
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is type(err) and str(back) == str(err) and vars(back) == vars(err)
        assert failure_reason(WorkerGroupError("failed", {0: back})) == str(err)
