"""End to end: `xling run manifests/samples/sweep-smoke.yaml` on real Ray Tune and a real MLflow store.

The sweep (2 alphas x 2 seeds) is interrupted with SIGINT once a trial has finished, then run again with
the same command: it must continue, keep the finished trials, and leave one parent run with four nested
child runs and the summary on the parent. The browser test reuses this sweep (``smoke_sweep``).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps

from tests.support import ROOT
from xling.api.tags import (
    ALPHA,
    BEST_POINT,
    DATA_FINGERPRINT,
    EXPERIMENT_KIND,
    FULL_POOL,
    GIT_COMMIT,
    MODEL,
    PARENT_RUN_ID,
    POINT,
    POINT_LABEL,
    ROLE,
    ROLE_SWEEP,
    ROLE_TRIAL,
    SAMPLING,
    SEED,
    SWEEP_RUN_ID,
    TRIAL,
    tag_is,
)

SPEC = ROOT / "manifests/samples/sweep-smoke.yaml"
pytestmark = pytest.mark.slow

PLOTS = ("metric_vs_alpha.png", "pareto.png", "heatmaps.png", "bias.png")
REPORT = ("summary.md", "summary.html", "summary.json", "points.csv")


@dataclass
class SmokeSweep:
    directory: Path
    uri: str
    first: str  # output of the interrupted run
    second: str  # output of the run that continued
    finished_before: dict[str, int]  # child run id -> end time, for trials finished before the interrupt


def _xling(*args: str, cwd: Path, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "XLING_CACHE": str(cwd / "cache")}
    return subprocess.Popen([sys.executable, "-m", "xling.trainer.cli", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)  # fmt: skip


def _finished_children(uri: str) -> dict[str, int]:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("sweep-smoke")
    if exp is None:
        return {}
    runs = client.search_runs(
        [exp.experiment_id], f"{tag_is(ROLE, ROLE_TRIAL)} and attributes.status = 'FINISHED'"
    )
    return {r.info.run_id: r.info.end_time for r in runs}


def run_smoke_sweep(directory: Path) -> SmokeSweep:
    """Run the sweep once per test session (the result is kept on disk for the other test module)."""
    done = directory / "done.json"
    uri = f"sqlite:///{directory}/mlflow.db"
    if done.is_file():
        return SmokeSweep(**{**json.loads(done.read_text()), "directory": directory})
    directory.mkdir(parents=True, exist_ok=True)
    _finished_children(uri)  # creates the store now: two processes creating its tables at once collide
    started = time.time()
    first = _xling("run", str(SPEC), "--tracking-uri", uri, cwd=directory, start_new_session=True)
    finished: dict[str, int] = {}
    while first.poll() is None and not finished and time.time() - started < 400:
        time.sleep(2)
        finished = _finished_children(uri)
    first.send_signal(signal.SIGINT)  # like Ctrl-C: Tune saves its state and stops the trials
    first_out = first.communicate(timeout=240)[0]
    finished = _finished_children(uri)
    second = _xling("run", str(SPEC), "--tracking-uri", uri, cwd=directory)
    second_out = second.communicate(timeout=480)[0]
    assert second.returncode == 0, second_out[-6000:]
    result = {"uri": uri, "first": first_out, "second": second_out, "finished_before": finished}
    done.write_text(json.dumps(result))
    return SmokeSweep(**result, directory=directory)


@pytest.fixture(scope="session")
def smoke_sweep(tmp_path_factory: pytest.TempPathFactory) -> SmokeSweep:
    return run_smoke_sweep(tmp_path_factory.getbasetemp() / "sweep-smoke")


def test_interrupted_sweep_continues_without_rerunning_finished_trials(smoke_sweep: SmokeSweep) -> None:
    from mlflow import MlflowClient

    assert "rerun to continue" in smoke_sweep.first, smoke_sweep.first[-4000:]
    before = smoke_sweep.finished_before
    assert 1 <= len(before) < 4, "the interrupt came after at least one and before all trials finished"
    assert "continuing" in smoke_sweep.second and "4 of 4 trials finished" in smoke_sweep.second
    # the console: a line per ended trial (counting on after the restart), worker lines under their trial's
    # label, and no Tune status table
    ended = [line for line in smoke_sweep.second.splitlines() if line.startswith("sweep: trial p")]
    assert ended and ended[-1].endswith("(4/4 finished, done)"), smoke_sweep.second[-4000:]
    assert re.search(
        r"^sweep: trial p\d-s\d finished: xquad_r/multi/map [\d.]+ \(1/4 finished, ETA ",
        smoke_sweep.first,
        re.M,
    )
    assert re.search(r"^\[p\d-s\d\] zero-shot: xquad-r$", smoke_sweep.first, re.M)
    assert "Trial status" not in smoke_sweep.first + smoke_sweep.second
    client = MlflowClient(smoke_sweep.uri)
    for run_id, end_time in before.items():
        run = client.get_run(run_id)
        assert run.info.end_time == end_time, f"trial {run.data.tags[TRIAL]} was run again"
        steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
        assert sorted(steps) == list(range(1, 7)), "each step logged once"


def test_one_parent_four_nested_children_with_tags_and_system_metrics(smoke_sweep: SmokeSweep) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(smoke_sweep.uri)
    exp = client.get_experiment_by_name("sweep-smoke")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get(ROLE) == ROLE_SWEEP]
    children = [r for r in runs if r.data.tags.get(ROLE) == ROLE_TRIAL]
    assert len(parents) == 1 and len(children) == 4 and len(runs) == 5
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert exp.tags.get(EXPERIMENT_KIND) == "custom_model_development"
    trials = {}
    for child in children:
        tags = child.data.tags
        assert child.info.status == "FINISHED"
        assert tags[PARENT_RUN_ID] == parent.info.run_id
        assert tags[SAMPLING] == "hybrid" and tags[MODEL] == "xling/tiny-random"
        assert tags[DATA_FINGERPRINT] == parent.data.tags[DATA_FINGERPRINT]
        assert tags[GIT_COMMIT]
        assert child.data.params["sampling.alpha"] == tags[ALPHA]
        assert any(k.startswith("system/") for k in child.data.metrics), "system metrics are on"
        trials[tags[TRIAL]] = (float(tags[ALPHA]), int(tags[SEED]))
    assert trials == {"p0-s0": (0.25, 0), "p0-s1": (0.25, 1), "p1-s0": (0.75, 0), "p1-s1": (0.75, 1)}
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "summary")}
    assert {f"summary/{name}" for name in PLOTS + REPORT} <= artifacts
    assert "best/xquad_r/multi/map" in parent.data.metrics
    assert parent.data.tags[BEST_POINT] in {"alpha=0.25", "alpha=0.75"}


def test_every_trial_logs_its_model_and_the_best_one_is_registered(smoke_sweep: SmokeSweep) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(smoke_sweep.uri)
    exp = client.get_experiment_by_name("sweep-smoke")
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.data.tags.get(ROLE) == ROLE_SWEEP)
    children = {r.info.run_id: r for r in runs if r is not parent}
    assert sorted(m.source_run_id for m in client.search_logged_models([exp.experiment_id])) == sorted(
        children
    )
    [version] = client.search_model_versions("name = 'sweep-smoke'")  # trials do not register themselves
    best = children[version.run_id]
    assert best.data.tags[POINT_LABEL] == parent.data.tags[BEST_POINT]
    rivals = [r for r in children.values() if r.data.tags[POINT_LABEL] == best.data.tags[POINT_LABEL]]
    metric = "xquad_r/multi/map"
    assert best.data.metrics[metric] == max(r.data.metrics[metric] for r in rivals), (
        "the best seed of the point"
    )
    assert version.tags[SWEEP_RUN_ID] == parent.info.run_id
    assert float(version.tags[metric]) == pytest.approx(best.data.metrics[metric], abs=1e-4)
    assert {d.dataset.name for d in client.get_run(best.info.run_id).inputs.dataset_inputs} == {
        "training-pairs",
        "xquad-r",
    }


def test_summary_statistics_match_a_reference_computation(smoke_sweep: SmokeSweep) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(smoke_sweep.uri)
    exp = client.get_experiment_by_name("sweep-smoke")
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.data.tags.get(ROLE) == ROLE_SWEEP)
    summary = json.loads(
        Path(
            client.download_artifacts(parent.info.run_id, "summary/summary.json", str(smoke_sweep.directory))
        ).read_text()
    )
    for point in summary["points"]:
        values = [r.data.metrics["xquad_r/multi/map"] for r in runs if r.info.run_id in point["runs"]]
        assert len(values) == 2
        got = point["metrics"]["xquad_r/multi/map"]
        low, high = sps.t.interval(0.95, 1, loc=np.mean(values), scale=sps.sem(values))
        assert got["mean"] == pytest.approx(np.mean(values))
        assert (got["low"], got["high"]) == pytest.approx((low, high))
    best = max(summary["points"], key=lambda p: p["metrics"]["xquad_r/multi/map"]["mean"])
    assert summary["best"] == best["index"]
    assert parent.data.metrics["best/xquad_r/multi/map"] == pytest.approx(
        best["metrics"]["xquad_r/multi/map"]["mean"]
    )
    settings = {c["setting"] for c in summary["comparisons"]}
    assert settings == {"multi", "mono", "cross", "rank_distance", "top10_own_share"}, summary["notes"]
    for c in summary["comparisons"]:
        assert c["low"] <= c["diff"] <= c["high"] and 0 < c["p_value"] <= 1 and c["p_holm"] >= c["p_value"]


def test_xling_results_prints_the_summary_on_the_parent(smoke_sweep: SmokeSweep) -> None:
    from mlflow import MlflowClient

    proc = _xling("results", str(SPEC), "--tracking-uri", smoke_sweep.uri, cwd=smoke_sweep.directory)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out
    client = MlflowClient(smoke_sweep.uri)
    exp = client.get_experiment_by_name("sweep-smoke")
    parent = client.search_runs([exp.experiment_id], tag_is(ROLE, ROLE_SWEEP))[0]
    stored = client.download_artifacts(parent.info.run_id, "summary/summary.md", str(smoke_sweep.directory))
    assert out == Path(stored).read_text()
    assert "| 0 | alpha=0.25 | 2 |" in out and "Paired bootstrap over paragraphs and seeds" in out


def test_full_pool_evaluates_each_points_best_seed_once(smoke_sweep: SmokeSweep) -> None:
    from mlflow import MlflowClient

    args = ("results", str(SPEC), "--tracking-uri", smoke_sweep.uri, "--full-pool")
    elsewhere = smoke_sweep.directory / "elsewhere"  # ./mlflow.db there is not the sweep's store
    elsewhere.mkdir(exist_ok=True)
    if not (elsewhere / "cache").exists():
        (elsewhere / "cache").symlink_to(
            smoke_sweep.directory / "cache"
        )  # the sweep's tiny model and embeddings
    out = _xling(*args, cwd=elsewhere).communicate(timeout=600)[0]
    assert "full pool: zero-shot" in out and out.count("full pool: alpha=") == 2, out[-4000:]
    table = out[out.index("### Full pool") :]
    assert "| zero-shot | - |" in table and "| alpha=0.25 |" in table and "| alpha=0.75 |" in table
    client = MlflowClient(smoke_sweep.uri)
    exp = client.get_experiment_by_name("sweep-smoke")
    done = client.search_runs([exp.experiment_id], tag_is(FULL_POOL, "evaluated"))
    assert len(done) == 2
    for run in done:
        best = max(
            client.search_runs([exp.experiment_id], tag_is(POINT, run.data.tags[POINT])),
            key=lambda r: r.data.metrics["xquad_r/multi/map"],
        )
        assert best.info.run_id == run.info.run_id, "the point's best seed by the objective"
        steps = [a.path for a in client.list_artifacts(run.info.run_id, "eval/xquad-r-full")]
        whole = json.loads(Path(client.download_artifacts(run.info.run_id, f"{steps[0]}/per_query.json",
                                                          str(smoke_sweep.directory))).read_text())  # fmt: skip
        assert len(whole["query_ids"]) == 4 * 1190, (
            "every question of the 4 languages, not the 4-paragraph slice"
        )
    again = _xling(*args, cwd=elsewhere).communicate(timeout=300)[0]
    assert "full pool:" not in again and again.count("| alpha=0.25 |") >= 2, "a rerun evaluates nothing"
