"""The MLflow calls of ``xling.trainer.tracking`` against a real SQLite store."""

from __future__ import annotations

import threading
from pathlib import Path


def test_runs_side_by_side_log_one_dataset_without_failing(tmp_path: Path) -> None:
    """Sweep trials evaluate the same suite at the same time: each logs it as a dataset input. MLflow looks the
    dataset up, then inserts it, so a concurrent insert broke the unique key and failed a trial (seen in the
    sweep e2e test). Six runs at once, five rounds: every run gets the dataset, none fails."""
    from mlflow import MlflowClient

    from xling.trainer.tracking import log_dataset

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    experiment = client.create_experiment("race")
    errors: list[BaseException] = []
    for round_ in range(5):
        runs = [client.create_run(experiment).info.run_id for _ in range(6)]
        start = threading.Barrier(len(runs))

        def log(run_id: str, digest: str = f"digest-{round_}", start: threading.Barrier = start) -> None:
            start.wait()
            try:
                log_dataset(MlflowClient(uri), run_id, "xquad-r", digest, ["data/xquad-r"], "evaluation")
            except Exception as err:  # collected, asserted below
                errors.append(err)

        threads = [threading.Thread(target=log, args=(run_id,)) for run_id in runs]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors[0]
        for run_id in runs:
            inputs = client.get_run(run_id).inputs.dataset_inputs
            assert [d.dataset.digest for d in inputs] == [f"digest-{round_}"]
