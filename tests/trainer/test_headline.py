"""A single run's headline from MLflow: the zero-shot -> trained table that ends ``xling run``, heads the
run's description (the top of its MLflow page) and answers ``xling results`` for a run that is not a sweep."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric

from xling.api.tags import DESCRIPTION
from xling.trainer.cli import main
from xling.trainer.headline import describe, headline
from xling.trainer.tracking import start_run

#: Logged as a smoke run logs them: step 0 is the zero-shot evaluation, step 8 the final one.
LOGGED = {"xquad_r/multi/map": (0.2148, 0.2215), "xquad_r/multi/r10": (0.2945, 0.2987),
          "xquad_r/bias/rank_distance": (38.4, 38.0), "xquad_r/mono/map": (0.4, 0.4211)}  # fmt: skip


@pytest.fixture
def smoke_run(tmp_path: Path) -> tuple[str, str]:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = start_run(uri, "smoke", "smoke", {}, {})
    client = MlflowClient(uri)
    client.log_batch(run_id, metrics=[Metric(k, v, 0, step) for k, values in LOGGED.items()
                                      for step, v in zip((0, 8), values, strict=True)])  # fmt: skip
    client.log_metric(run_id, "train/loss", 2.8, step=8)
    return uri, run_id


def test_the_description_heads_with_the_headline_and_the_before_after_table(
    smoke_run: tuple[str, str],
) -> None:
    uri, run_id = smoke_run
    client = MlflowClient(uri)
    rows, step = headline(client, run_id)
    assert step == 8 and [r.label for r in rows][:2] == ["multilingual pool mAP", "multilingual R@10"]
    text = describe(client, run_id, "smoke: xling/tiny-random, hybrid batches")
    assert client.get_run(run_id).data.tags[DESCRIPTION] == text
    lines = text.splitlines()
    assert lines[0] == "**xquad_r multilingual pool mAP 0.2148 → 0.2215 (+0.0067) from zero-shot to trained**"
    assert "| | zero-shot | trained (step 8) | change |" in lines
    assert "| xquad_r language bias: rank distance (lower is better) | 38.4000 | 38.0000 | -0.4000 |" in lines


def test_the_centering_baseline_is_a_column_beside_the_zero_shot_numbers(smoke_run: tuple[str, str]) -> None:
    """It was a second block of rows with empty trained and change cells: 14 lines of a smoke run's console
    where 8 say it all."""
    uri, run_id = smoke_run
    client = MlflowClient(uri)
    client.log_batch(run_id, metrics=[Metric("xquad_r_centered/multi/map", 0.2244, 0, 0),
                                      Metric("xquad_r_centered/mono/map", 0.4556, 0, 0)])  # fmt: skip
    lines = describe(client, run_id, "smoke").splitlines()
    assert "| | zero-shot | zero-shot, centered | trained (step 8) | change |" in lines
    assert "|---|---|---|---|---|" in lines
    assert "| xquad_r multilingual pool mAP | 0.2148 | 0.2244 | 0.2215 | +0.0067 |" in lines
    assert "| xquad_r multilingual R@10 | 0.2945 |  | 0.2987 | +0.0042 |" in lines
    assert not any(line.startswith("| xquad_r_centered") for line in lines)
    assert lines[0].startswith("**xquad_r multilingual pool mAP 0.2148 → 0.2215"), (
        "the headline stays uncentered"
    )


def test_results_on_a_single_run_shows_its_headline(
    smoke_run: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """It said "no sweep named 'smoke' (give the parent run id?)" and exited 2."""
    uri, run_id = smoke_run
    assert main(["results", "smoke", "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert out.startswith(
        f"'smoke' is a single run ({run_id}), not a sweep; xquad_r multilingual pool mAP 0.2148"
    )
    assert "| xquad_r multilingual pool mAP | 0.2148 | 0.2215 | +0.0067 |" in out
    assert main(["results", "nothing-of-that-name", "--tracking-uri", uri]) == 2


def test_a_local_runs_parameters_are_those_that_apply(monkeypatch: pytest.MonkeyPatch) -> None:
    """85 parameters became 46 for the smoke run: no cluster-only field on a local run, none the strategy
    ignores, no unset one."""
    import yaml

    from tests.support import ROOT
    from xling.api.env import EXPERIMENT_UID_ENV
    from xling.api.spec.loading import parse_experiment
    from xling.trainer.tracking import run_params

    monkeypatch.delenv(EXPERIMENT_UID_ENV, raising=False)
    doc = yaml.safe_load((ROOT / "manifests" / "samples" / "smoke.yaml").read_text())
    params = run_params(parse_experiment(doc).spec)
    assert params["sampling.alpha"] == "0.5" and params["sampling.strategy"] == "hybrid"
    assert not [k for k in params if k.split(".")[0] in ("cluster", "storage", "deadlines", "sweep")]
    assert "loss.grad_cache.chunk_size" not in params and "sampling.language_temperature" not in params
    doc["spec"]["sampling"] = {"strategy": "xx"}
    assert "sampling.alpha" not in run_params(parse_experiment(doc).spec)
    monkeypatch.setenv(EXPERIMENT_UID_ENV, "uid-1")  # on a cluster, the cluster's fields apply
    assert "cluster.image_pull_policy" in run_params(parse_experiment(doc).spec)
