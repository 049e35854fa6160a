"""Sweeps without Ray: the spec, the trial plan, and the report rebuilt from a real MLflow store."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest

from tests.support import ROOT
from xling.api.metrics import is_headline
from xling.api.spec.base import SpecError
from xling.api.spec.loading import load_experiment, parse_experiment
from xling.api.spec.sweep import SweepSpec
from xling.api.tags import BEST_POINT, DATA_FINGERPRINT, GIT_COMMIT, MODEL, SWEEP, TRIAL, tag_is
from xling.trainer.stats import DiffCI, mean_ci
from xling.trainer.sweep.plots import pareto_front, primary_parameter
from xling.trainer.sweep.report import publish, to_json, write_report
from xling.trainer.sweep.summary import parse_per_query, per_language_keys, summarize_sweep
from xling.trainer.sweep.tables import markdown
from xling.trainer.sweep.trials import SweepPlan, plan_sweep
from xling.trainer.sweep.tune import TrialContext, _child_run, _parent_run, default_concurrency

SAMPLES = ROOT / "manifests/samples"
LANGS = ("ar", "de", "en", "es")


def experiment(sweep: dict, **spec_changes: object):
    """The smoke sample with a sweep (and other spec fields) replaced."""
    exp = load_experiment(SAMPLES / "smoke.yaml")
    doc = exp.model_dump(mode="json", by_alias=True, exclude_none=True)
    doc["spec"].update(spec_changes, sweep=sweep)
    return parse_experiment(doc, "test.yaml")


# ----------------------------------------------------------------------------- spec


@pytest.mark.parametrize(
    ("param", "message"),
    [
        ({"grid": [1], "choice": [2]}, "exactly one of"),
        ({}, "exactly one of"),
        ({"uniform": [2, 1]}, "low must be below high"),
        ({"loguniform": [0, 1]}, "bounds must be > 0"),
        ({"grid": []}, "at least 1 item"),
    ],
)
def test_a_parameter_has_exactly_one_valid_space(param: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SweepSpec.model_validate({"parameters": {"sampling.alpha": param}})


def test_sweep_level_rules() -> None:
    with pytest.raises(ValueError, match="distinct seeds"):
        SweepSpec.model_validate({"seeds": [1, 1]})
    with pytest.raises(ValueError, match="numSamples"):
        SweepSpec.model_validate({"numSamples": 3, "parameters": {"sampling.alpha": {"grid": [0.5]}}})
    assert SweepSpec().seeds == [0] and SweepSpec().parameters == {}  # the operator builds a default one


@pytest.mark.parametrize(
    ("sweep", "changes", "message"),
    [
        ({"parameters": {"sampling.alfa": {"grid": [0.5]}}}, {}, "sampling.alfa is not a spec field"),
        ({"parameters": {"sampling.alpha": {"grid": [0.5, 1.5]}}}, {}, "value 1.5: sampling.alpha: Input should be less"),
        ({"parameters": {"sampling.strategy": {"choice": ["xx", "yy"]}}}, {}, "value 'yy'"),
        ({"parameters": {"sampling": {"grid": [1]}}}, {}, "not a single value"),
        ({"parameters": {"sampling.seed": {"grid": [1, 2]}}}, {}, "through sweep.seeds"),
        ({"parameters": {"model.name": {"grid": ["x"]}}}, {}, "not sweepable"),
        ({"parameters": {"data.skipBadRows": {"grid": [True]}}}, {}, "not sweepable"),
        ({"parameters": {"distributed.deepspeed.stage": {"grid": [1]}}}, {}, "unset in the base spec"),
        ({"metric": "miracl/ndcg10"}, {}, "sweep.metric: 'miracl/ndcg10' is not logged"),
        ({"metric": "train/loss", "mode": "min", "constraints": [{"metric": "xquad_r/multi/map", "max": 1}]},
         {"evaluation": {"suites": []}}, "sweep.constraints\\[0\\].metric"),
        ({"constraints": [{"metric": "xquad_r/multi/map", "atLeastZeroShot": True}]},
         {"evaluation": {"atStart": False, "suites": [{"name": "xquad-r", "path": "x"}]}}, "needs evaluation.atStart"),
        ({"asha": {}}, {"optimization": {"maxSteps": 8, "checkpointEvery": 0}}, "needs optimization.checkpointEvery"),
        # names before the '/' spelling: each field says so, with the new name
        ({"metric": "xquad_r.multi.map"}, {}, "sweep.metric: 'xquad_r.multi.map' is the old dotted spelling.*'xquad_r/multi/map'"),
        ({"constraints": [{"metric": "xquad_r.multi.de.map", "max": 1}]}, {},
         "sweep.constraints\\[0\\].metric: .*old dotted spelling.*'xquad_r/multi/map/de'"),
        ({"asha": {"metric": "train.loss"}}, {"optimization": {"maxSteps": 8, "checkpointEvery": 4}},
         "sweep.asha.metric: .*old dotted spelling.*'train/loss'"),
    ],
)  # fmt: skip
def test_check_names_the_offending_field_before_any_work(sweep: dict, changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):  # the spec itself, or the plan, refuses it
        plan_sweep(experiment(sweep, **changes))


def test_a_combination_that_breaks_a_cross_field_rule_is_caught_by_the_plan() -> None:
    sweep = {
        "parameters": {"optimization.warmupSteps": {"grid": [5]}, "optimization.maxSteps": {"grid": [4, 8]}}
    }
    with pytest.raises(ValueError, match="warmupSteps=5, maxSteps=4: optimization.warmupSteps"):
        plan_sweep(experiment(sweep))


def test_paths_in_camel_or_snake_case_reach_the_trial_spec() -> None:
    sweep = {"parameters": {"optimization.learningRate": {"grid": [0.01]}, "loss.temperature": {"grid": [0.1]},
                            "sampling.language_weighting": {"grid": ["size"]}}, "seeds": [7]}  # fmt: skip
    exp = experiment(sweep)
    plan = plan_sweep(exp)
    spec = exp.spec.sweep.trial_spec(exp.spec, plan.points[0].values, 7)
    assert spec.optimization.learning_rate == 0.01 and spec.loss.temperature == 0.1
    assert spec.sampling.language_weighting == "size" and spec.sampling.seed == 7 and spec.sweep is None
    assert plan.points[0].label == "learningRate=0.01, temperature=0.1, language_weighting=size"


# ----------------------------------------------------------------------------- plan


def test_grid_points_cross_seeds_with_stable_names() -> None:
    exp = experiment({"parameters": {"sampling.alpha": {"grid": [0.0, 0.5, 1.0]}}, "seeds": [3, 4]})
    plan = plan_sweep(exp)
    assert [p.label for p in plan.points] == ["alpha=0", "alpha=0.5", "alpha=1"]
    assert [(t.name, t.point, t.seed) for t in plan.trials] == [
        ("p0-s3", 0, 3), ("p0-s4", 0, 4), ("p1-s3", 1, 3), ("p1-s4", 1, 4), ("p2-s3", 2, 3), ("p2-s4", 2, 4),
    ]  # fmt: skip
    assert (
        plan_sweep(experiment({"parameters": {"sampling.alpha": {"grid": [0.0, 0.5, 1.0]}}, "seeds": [3, 4]}))
        == plan
    )
    wider = experiment({"parameters": {"sampling.alpha": {"grid": [0.0, 0.5, 1.0, 0.25]}}, "seeds": [3, 4]})
    assert plan_sweep(wider).digest != plan.digest, "a changed sweep is not restored into the old one"


def test_random_spaces_are_drawn_per_grid_point_reproducibly() -> None:
    sweep = {"parameters": {"sampling.strategy": {"grid": ["xx", "hybrid"]},
                            "optimization.learningRate": {"loguniform": [1e-5, 1e-3]},
                            "loss.temperature": {"uniform": [0.02, 0.1]},
                            "sampling.languageWeighting": {"choice": ["uniform", "size"]}},
             "numSamples": 3, "searchSeed": 11, "seeds": [0, 1]}  # fmt: skip
    plan = plan_sweep(experiment(sweep))
    assert len(plan.points) == 6 and len(plan.trials) == 12
    assert [p.values["sampling.strategy"] for p in plan.points] == ["xx"] * 3 + ["hybrid"] * 3
    for p in plan.points:
        assert 1e-5 <= p.values["optimization.learningRate"] <= 1e-3
        assert 0.02 <= p.values["loss.temperature"] <= 0.1
    assert len({p.values["optimization.learningRate"] for p in plan.points}) == 6
    assert plan_sweep(experiment(sweep)) == plan
    assert plan_sweep(experiment({**sweep, "searchSeed": 12})).points != plan.points


def test_default_concurrency_from_gpus_or_cpus() -> None:
    spec = experiment({}).spec
    assert default_concurrency({"CPU": 2.0}, [spec]) == 1  # 0.5 trial + 1 worker CPU
    spec.distributed.cpus_per_worker = 0.5
    assert default_concurrency({"CPU": 2.0}, [spec]) == 2
    spec.distributed.gpus_per_worker, spec.distributed.num_workers = 2, 2
    spec.optimization.global_batch_size = 16
    assert default_concurrency({"CPU": 64.0, "GPU": 8.0}, [spec]) == 2
    assert default_concurrency({"CPU": 64.0, "GPU": 2.0}, [spec]) == 1


def test_trials_share_one_gpu_with_a_fraction_each() -> None:
    """research-gpu-1.yaml: e5-small leaves most of an H200 idle, so four trials share it (a quarter each)."""
    from xling.trainer.driver import worker_resources

    exp = load_experiment(SAMPLES / "research-gpu-1.yaml")
    dist, sweep = exp.spec.distributed, exp.spec.sweep
    assert sweep.trials_per_gpu == 4 and default_concurrency({"CPU": 16.0, "GPU": 1.0}, [exp.spec], 4) == 4
    assert worker_resources(dist, 1 / sweep.trials_per_gpu) == {"CPU": dist.cpus_per_worker, "GPU": 0.25}
    assert worker_resources(dist) == {"CPU": dist.cpus_per_worker, "GPU": 1}
    assert worker_resources(experiment({}).spec.distributed, 0.25) == {"CPU": 1.0}, "no GPU: none asked for"
    with pytest.raises(
        SpecError, match="sweep.trialsPerGpu: shares one GPU between trials: needs distributed"
    ):
        experiment({"trialsPerGpu": 2})  # the smoke sample trains on CPU


@pytest.mark.parametrize(
    "sweep",
    [
        {"parameters": {"sampling.alpha": {"grid": [0.0, 0.5, 1.0]}}, "seeds": [3, 4]},
        {"parameters": {"sampling.strategy": {"grid": ["xx", "hybrid"]}, "loss.temperature": {"uniform": [0.02, 0.1]},
                        "sampling.alpha": {"grid": [0.0, 1.0]}}, "numSamples": 3, "seeds": [0, 1, 2]},
        {"points": [{"sampling.strategy": "xx"}, {"sampling.strategy": "hybrid", "sampling.alpha": 0.25}],
         "parameters": {"loss.temperature": {"grid": [0.05, 0.1]}}, "seeds": [7]},
    ],
)  # fmt: skip
def test_trial_count_is_the_number_of_trials_planned(sweep: dict) -> None:
    """The operator sizes the cluster by ``SweepSpec.trial_count`` before the trainer plans the trials."""
    exp = experiment(sweep)
    assert exp.spec.sweep.trial_count == len(plan_sweep(exp).trials)


@pytest.mark.parametrize(
    ("name", "points", "trials"), [("sweep-smoke", 2, 4), ("research", 4, 8), ("research-gpu-1", 4, 20)]
)
def test_sample_sweeps_plan(name: str, points: int, trials: int) -> None:
    exp = load_experiment(SAMPLES / f"{name}.yaml")
    plan = plan_sweep(exp)
    assert (len(plan.points), len(plan.trials)) == (points, trials)
    assert exp.spec.sweep.trial_count == trials, "the operator sizes the cluster for the same plan"


def test_research_sweep_runs_every_strategy_with_the_baselines_and_the_new_inference() -> None:
    exp = load_experiment(SAMPLES / "research.yaml")
    plan = plan_sweep(exp)
    specs = [exp.spec.sweep.trial_spec(exp.spec, p.values, 0) for p in plan.points]
    assert [(s.sampling.strategy, s.sampling.xx_share) for s in specs] == [
        ("xx", 1.0), ("xy", 0.0), ("mixed", None), ("hybrid", 0.5),
    ]  # fmt: skip
    assert plan.points[3].label == "strategy=hybrid, alpha=0.5"
    assert {s.model.name for s in specs} == {"xling/multilingual-e5-small"}
    assert default_concurrency({"CPU": 2.0}, specs) == 2, "two 1-core trials at once on 2 cores"
    assert {s.sampling.alpha_schedule for s in specs} == {"exact"}
    ev, sweep = exp.spec.evaluation, exp.spec.sweep
    assert ev.curve_steps(exp.spec.optimization.max_steps) == [32, 64] and ev.centering is not None
    assert (sweep.bootstrap_unit, sweep.equivalence_margin) == ("paragraph", 0.005)
    assert len(sweep.seeds) >= 2, "seed intervals need two seeds at least"


def test_explicit_points_cross_the_parameter_grids() -> None:
    sweep = {"points": [{"sampling.strategy": "xx"}, {"sampling.strategy": "hybrid", "sampling.alpha": 0.25}],
             "parameters": {"loss.temperature": {"grid": [0.05, 0.1]}}, "seeds": [0]}  # fmt: skip
    plan = plan_sweep(experiment(sweep))
    assert [p.label for p in plan.points] == [
        "strategy=xx, temperature=0.05", "strategy=xx, temperature=0.1",
        "strategy=hybrid, alpha=0.25, temperature=0.05", "strategy=hybrid, alpha=0.25, temperature=0.1",
    ]  # fmt: skip
    assert SweepSpec.model_validate(sweep).grid_size == 4


@pytest.mark.parametrize(
    ("points", "parameters", "message"),
    [
        ([{"sampling.strategy": "xx"}, {"sampling.strategy": "xx"}], {}, "points\\[1\\]: the same spec as sweep.points\\[0\\]"),
        ([{"sampling.alpha": 0.5}], {"sampling.alpha": {"grid": [0.1]}}, "points\\[0\\].sampling.alpha: also in sweep.parameters"),
        ([{"sampling.seed": 3}], {}, "points\\[0\\].sampling.seed: sweep sampling.seed through sweep.seeds"),
        ([{"data.skipBadRows": True}], {}, "points\\[0\\].data.skipBadRows: not sweepable"),
        ([{"sampling.strategy": "zz"}], {}, "points\\[0\\]: sampling.strategy: Input should be"),
    ],
)  # fmt: skip
def test_bad_points_are_refused_with_their_index(points: list, parameters: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        plan_sweep(experiment({"points": points, "parameters": parameters}))


# ----------------------------------------------------------------------------- report from MLflow


#: Per-query difficulty of the fake test set (4 languages x 25 questions), the same in every trial.
BASE_AP = np.random.default_rng(99).uniform(0.1, 0.8, (100, 4))


def _per_query(shift: float, rng: np.random.Generator) -> dict:
    """4 languages x 25 questions; ``shift`` raises every AP of a configuration, ``rng`` adds run noise."""
    n = 25
    language = np.repeat(np.arange(4), n)
    block = np.clip(BASE_AP + shift + rng.normal(0, 0.02, (4 * n, 4)), 0, 1)
    return {"languages": list(LANGS), "query_ids": [f"{LANGS[i]}:q{k}" for i in range(4) for k in range(n)],
            "language": language.tolist(), "multi_ap": np.clip(block.mean(axis=1), 0, 1).tolist(),
            "block_ap": block.tolist()}  # fmt: skip


@pytest.fixture(scope="module")
def fake_sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, SweepPlan]:
    """A finished two-point sweep logged through the driver's own functions, without training."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    tmp = tmp_path_factory.mktemp("fake-sweep")
    uri = f"sqlite:///{tmp}/mlflow.db"
    sweep = {"parameters": {"sampling.alpha": {"grid": [0.25, 0.75]}}, "seeds": [0, 1, 2], "bootstrapSamples": 500,
             "constraints": [{"metric": "xquad_r/bias/rank_distance", "max": 30},
                             {"metric": "xquad_r/multi/map", "atLeastZeroShot": True}]}  # fmt: skip
    exp = experiment(sweep)
    plan = plan_sweep(exp)
    tags = {SWEEP: "fake", MODEL: "m", DATA_FINGERPRINT: "d", GIT_COMMIT: "c"}
    parent = _parent_run(exp, plan, uri, "fake", tags, None)
    ctx = TrialContext(exp, plan, uri, "fake", parent, {}, "model", tags)
    client = MlflowClient(uri)
    rng = np.random.default_rng(0)
    for trial in plan.trials:
        run_id, finished = _child_run(
            ctx, trial, exp.spec.sweep.trial_spec(exp.spec, plan.points[trial.point].values, trial.seed)
        )
        assert finished is None
        good = trial.point == 1  # alpha=0.75: better mAP, but more bias than the constraint allows
        final = {"xquad_r/multi/map": 0.3 + 0.1 * good + 0.01 * trial.seed, "xquad_r/mono/map": 0.5,
                 "xquad_r/cross/map": 0.2 + 0.01 * trial.seed, "xquad_r/bias/rank_distance": 20.0 + 20 * good}  # fmt: skip
        final |= {f"xquad_r/multi/map/{lang}": final["xquad_r/multi/map"] for lang in LANGS}
        final |= {
            f"xquad_r/mono/map/{a}" if a == b else f"xquad_r/cross/map/{a}_{b}": 0.5
            for a in LANGS
            for b in LANGS
        }
        final |= {
            f"xquad_r/bias/{m}/{lang}": 0.3 for lang in LANGS for m in ("rank_distance", "top10_own_share")
        }
        zero = {"xquad_r/multi/map": 0.25, **{f"xquad_r/multi/map/{lang}": 0.25 for lang in LANGS}}
        zero["xquad_r/multi/map/de"] = 0.35  # alpha=0.25 falls below zero-shot in German
        metrics = [Metric(k, v, 0, 0) for k, v in zero.items()] + [
            Metric(k, v, 1, 6) for k, v in final.items()
        ]
        client.log_batch(run_id, metrics=metrics)
        client.log_dict(run_id, _per_query(0.05 * good, rng), "eval/xquad-r/step-6/per_query.json")
        client.set_terminated(run_id, "FINISHED")
    return uri, parent, plan


def test_summary_statistics_constraints_and_comparisons(fake_sweep: tuple[str, str, SweepPlan]) -> None:
    from mlflow import MlflowClient

    uri, parent, plan = fake_sweep
    s = summarize_sweep(MlflowClient(uri), parent)
    assert s.planned == s.finished == 6 and [p.label for p in s.points] == ["alpha=0.25", "alpha=0.75"]
    ci = s.points[0].stats["xquad_r/multi/map"]
    ref = mean_ci([0.30, 0.31, 0.32])
    assert (ci.mean, ci.low, ci.high, ci.n) == pytest.approx((ref.mean, ref.low, ref.high, 3))
    assert s.points[1].violations == ["xquad_r/bias/rank_distance 40 > 30"]
    assert s.points[0].violations == ["de: xquad_r/multi/map/de 0.31 below zero-shot 0.35"]
    assert s.best is None and any("No point meets every constraint" in n for n in s.notes)
    assert s.zero_shot["xquad_r/multi/map"] == 0.25
    assert {c.setting for c in s.comparisons} == {"multi", "mono", "cross"}
    multi = next(c for c in s.comparisons if c.setting == "multi")
    assert (multi.a, multi.b) == (0, 1) and multi.test.diff < 0 and multi.test.n == 100
    assert multi.test.questions == 25, "the 4 translations of a question are resampled together"
    assert s.bootstrap_unit == "question" and any(
        "Bootstrap over questions, not paragraphs" in n for n in s.notes
    )
    assert multi.test.seeds == (3, 3) and multi.test.over_seeds.high < 0 and multi.test.low < multi.test.diff
    assert multi.test.p_value < 1e-6, "a clear shift in every run is significant"


def test_best_point_and_report_files(fake_sweep: tuple[str, str, SweepPlan], tmp_path: Path) -> None:
    from mlflow import MlflowClient

    uri, parent, _ = fake_sweep
    client = MlflowClient(uri)
    s = summarize_sweep(client, parent)
    s.sweep.constraints = s.sweep.constraints[:1]  # keep only the rank-distance bound
    for p in s.points:
        p.violations = [v for v in p.violations if "zero-shot" not in v]
    s.best = 0
    files = {p.name for p in write_report(s, tmp_path)}
    assert files == {"summary.md", "summary.html", "summary.json", "points.csv", "metric_vs_alpha.png",
                     "pareto.png", "heatmaps.png", "bias.png"}  # fmt: skip
    md = (tmp_path / "summary.md").read_text()
    assert "| 0 | alpha=0.25 | 3 | 0.3100 ± 0.0248 |" in md and "| best |" in md and "| - | zero-shot |" in md
    html = (tmp_path / "summary.html").read_text()
    assert html.count("data:image/png;base64,") == 4 and "Paired bootstrap over questions and seeds" in html
    assert "| multi | alpha=0.25 | alpha=0.75 | 3/3 | -0.0" in md
    data = json.loads((tmp_path / "summary.json").read_text())
    assert data["best"] == 0 and data["points"][1]["feasible"] is False
    assert data["comparisons"][0]["questions"] == 25 and data["comparisons"][0]["over_seeds"]["df"] > 0
    publish(client, s)
    run = client.get_run(parent)
    assert run.data.metrics["best/xquad_r/multi/map"] == pytest.approx(0.31)
    assert run.data.tags[BEST_POINT] == "alpha=0.25"
    assert {a.path for a in client.list_artifacts(parent, "summary")} >= {
        "summary/summary.md",
        "summary/pareto.png",
    }


def test_undefined_intervals_are_null_in_json_and_a_dash_in_tables(
    fake_sweep: tuple[str, str, SweepPlan],
) -> None:
    from mlflow import MlflowClient

    uri, parent, _ = fake_sweep
    s = summarize_sweep(MlflowClient(uri), parent)
    one_seed = DiffCI(0.01, math.nan, math.nan, math.nan)
    s.comparisons[0].test = dataclasses.replace(s.comparisons[0].test, over_seeds=one_seed, df=math.inf)
    text = json.dumps(to_json(s), allow_nan=False)  # strict JSON: no NaN, no Infinity
    first = json.loads(text)["comparisons"][0]
    assert first["df"] is None
    assert first["over_seeds"] == {"diff": 0.01, "low": None, "high": None, "df": None}
    row = next(line for line in markdown(s).splitlines() if line.startswith("| multi | alpha=0.25 |"))
    assert row.endswith("| - |"), row


def test_restarted_trial_reuses_its_child_run(fake_sweep: tuple[str, str, SweepPlan]) -> None:
    from mlflow import MlflowClient

    uri, parent, plan = fake_sweep
    client = MlflowClient(uri)
    exp_id = client.get_run(parent).info.experiment_id
    runs = client.search_runs([exp_id], tag_is(TRIAL, "p0-s0"))
    exp = experiment({"parameters": {"sampling.alpha": {"grid": [0.25, 0.75]}}, "seeds": [0, 1, 2]})
    ctx = TrialContext(exp, plan, uri, "fake", parent, {}, "model", {})
    run_id, finished = _child_run(ctx, plan.trials[0], exp.spec)
    assert run_id == runs[0].info.run_id and finished["xquad_r/multi/map"] == pytest.approx(0.30)


def test_xling_results_cli(
    fake_sweep: tuple[str, str, SweepPlan], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from mlflow import MlflowClient

    from xling.trainer.cli import main

    uri, parent, _ = fake_sweep
    assert main(["results", "fake", "--tracking-uri", uri, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(markdown(summarize_sweep(MlflowClient(uri), parent)))
    assert "Sweep 'fake': 6 of 6 trials finished" in out and (tmp_path / "pareto.png").is_file()
    assert main(["results", parent, "--tracking-uri", uri]) == 0
    assert main(["results", "nope", "--tracking-uri", uri]) == 2
    assert "no sweep named 'nope'" in capsys.readouterr().err


def test_a_stored_sweep_continues_only_with_the_same_trials(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    uri, tags = f"sqlite:///{tmp_path}/mlflow.db", {SWEEP: "smoke"}
    exp = experiment({"parameters": {"sampling.alpha": {"grid": [0.25]}}})
    with pytest.raises(ValueError, match="its parent run is not in"):
        _parent_run(exp, plan_sweep(exp), uri, "x", tags, "runs/ray/smoke")
    parent = _parent_run(exp, plan_sweep(exp), uri, "x", tags, None)
    # Same trials, another objective: the same parent, and the summary follows the new spec.
    again = experiment({"parameters": {"sampling.alpha": {"grid": [0.25]}}, "metric": "xquad_r/mono/map"})
    assert _parent_run(again, plan_sweep(again), uri, "x", tags, "runs/ray/smoke") == parent
    plan = MlflowClient(uri).download_artifacts(parent, "sweep/plan.json", str(tmp_path))
    assert json.loads(Path(plan).read_text())["sweep"]["metric"] == "xquad_r/mono/map"
    other = experiment({"parameters": {"sampling.alpha": {"grid": [0.5]}}})
    with pytest.raises(ValueError, match="planned from a different spec"):
        _parent_run(other, plan_sweep(other), uri, "x", tags, "runs/ray/smoke")


def test_an_interrupted_trial_without_its_model_is_not_settled_as_finished(tmp_path: Path) -> None:
    """The CI failure: SIGINT landed after a trial's final evaluation but before its model was logged;
    the sweep closed the run as FINISHED, the rerun skipped it, and the sweep had a trial without a model."""
    from types import SimpleNamespace

    from mlflow import MlflowClient
    from mlflow.entities import LoggedModelStatus

    from xling.trainer.sweep.tune import _settle_children

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    exp = experiment({"parameters": {"sampling.alpha": {"grid": [0.25]}}, "seeds": [0, 1, 2]})
    plan = plan_sweep(exp)
    tags = {SWEEP: "s", MODEL: "m", DATA_FINGERPRINT: "d", GIT_COMMIT: "c"}
    parent = _parent_run(exp, plan, uri, "x", tags, None)
    ctx = TrialContext(exp, plan, uri, "x", parent, {}, "model", tags)
    client = MlflowClient(uri)
    last = exp.spec.optimization.max_steps
    runs = {}
    for trial, (final_metric, model) in zip(
        plan.trials, [(True, True), (True, False), (False, True)], strict=True
    ):
        run_id, _ = _child_run(ctx, trial, ctx.spec(trial.point, trial.seed))
        if final_metric:
            client.log_metric(run_id, exp.spec.sweep.metric, 0.5, step=last)
        if model:
            logged = client.create_logged_model(
                client.get_run(run_id).info.experiment_id, source_run_id=run_id
            )
            client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
        runs[trial.name] = run_id
    _settle_children(client, ctx, [SimpleNamespace(error=None, config={"trial": {"name": t}}) for t in runs])
    status = {t: client.get_run(r).info.status for t, r in runs.items()}
    assert list(status.values()) == ["FINISHED", "KILLED", "KILLED"], status
    rerun, finished = _child_run(ctx, plan.trials[1], ctx.spec(0, plan.trials[1].seed))
    assert rerun == runs[plan.trials[1].name] and finished is None, "the trial without a model trains again"


# ----------------------------------------------------------------------------- pieces


def test_per_query_settings_from_the_evaluation_file() -> None:
    doc = {"languages": ["ar", "de"], "query_ids": ["ar:1", "ar:2", "de:1"], "language": [0, 0, 1],
           "multi_ap": [0.5, 0.25, 1.0], "block_ap": [[1.0, 0.5], [0.5, None], [0.25, 1.0]]}  # fmt: skip
    pq = parse_per_query(doc)
    assert pq.ap["mono"].tolist() == [1.0, 0.5, 1.0]
    assert pq.ap["cross"][0] == 0.5 and math.isnan(pq.ap["cross"][1]) and pq.ap["cross"][2] == 0.25
    assert pq.ap["multi"].tolist() == [0.5, 0.25, 1.0]
    assert pq.question_ids == ["1", "2", "1"], "ar:1 and de:1 are one question"
    with pytest.raises(ValueError, match=r"per_query.json: query_ids: 'q7' is not <lang>:<question id>"):
        _ = parse_per_query({**doc, "query_ids": ["ar:1", "q7", "de:1"]}).question_ids


def test_metric_names() -> None:
    assert is_headline("xquad_r/multi/map") and is_headline("train/loss")
    assert not is_headline("xquad_r/multi/map/ar") and not is_headline("system/cpu_utilization_percentage")
    keys = {"xquad_r/multi/map/ar", "xquad_r/multi/map/de", "xquad_r/multi/map", "xquad_r/mono/map/ar"}
    assert per_language_keys("xquad_r/multi/map", keys) == {
        "ar": "xquad_r/multi/map/ar",
        "de": "xquad_r/multi/map/de",
    }


def test_pareto_front_lower_x_higher_y() -> None:
    points = [(10.0, 0.5), (20.0, 0.6), (15.0, 0.4), (10.0, 0.45), (30.0, 0.6)]
    assert pareto_front(points) == [0, 1]


def test_primary_parameter_prefers_alpha_then_categories(
    fake_sweep: tuple[str, str, SweepPlan], tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    uri, parent, _ = fake_sweep
    s = summarize_sweep(MlflowClient(uri), parent)
    assert primary_parameter(s) == "sampling.alpha"
    s.sweep.parameters = {"sampling.strategy": s.sweep.parameters["sampling.alpha"]}
    for p, strategy in zip(s.points, ("xx", "xy"), strict=True):
        p.values = {"sampling.strategy": strategy}
    assert primary_parameter(s) == "sampling.strategy"
    assert "metric_vs_strategy.png" in {p.name for p in write_report(s, tmp_path)}


def test_sweep_smoke_sample_validates() -> None:
    exp = load_experiment(SAMPLES / "sweep-smoke.yaml")
    assert exp.spec.sweep.seeds == [0, 1] and exp.spec.sweep.parameters["sampling.alpha"].grid == [0.25, 0.75]
    doc = exp.model_dump(mode="json", by_alias=True, exclude_none=True)
    doc["spec"]["sweep"]["seeds"] = []
    with pytest.raises(SpecError, match="spec.sweep.seeds"):
        parse_experiment(doc)


# ----------------------------------------------------------------------------- the research layout


@pytest.fixture(scope="module")
def strategy_sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A finished sweep with the research points: hybrid clearly best and least biased, X-X and X-Y tied,
    mixed clearly worst; per-query AP and rank distance as the evaluation logs them."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    uri = f"sqlite:///{tmp_path_factory.mktemp('strategy-sweep')}/mlflow.db"
    points = [{"sampling.strategy": "xx"}, {"sampling.strategy": "xy"}, {"sampling.strategy": "mixed"},
              {"sampling.strategy": "hybrid", "sampling.alpha": 0.5}]  # fmt: skip
    evaluation = experiment({}).spec.evaluation.model_dump(mode="json", by_alias=True, exclude_none=True)
    evaluation["centering"] = {"path": "ntrex", "sentences": 120, "firstLine": 1000}
    evaluation["suites"].append({"name": "ntrex-r", "path": "ntrex", "firstLine": 1200})  # a held-out suite
    exp = experiment({"points": points, "seeds": [0, 1, 2], "bootstrapSamples": 500}, evaluation=evaluation)
    plan = plan_sweep(exp)
    tags = {
        SWEEP: "strategies",
        MODEL: "m",
        DATA_FINGERPRINT: "d",
        GIT_COMMIT: "c",
    }
    parent = _parent_run(exp, plan, uri, "strategies", tags, None)
    ctx = TrialContext(exp, plan, uri, "strategies", parent, {}, "model", tags)
    client, rng = MlflowClient(uri), np.random.default_rng(1)
    shift = {0: 0.0, 1: 0.0, 2: -0.1, 3: 0.1}
    for trial in plan.trials:
        spec = exp.spec.sweep.trial_spec(exp.spec, plan.points[trial.point].values, trial.seed)
        run_id, _ = _child_run(ctx, trial, spec)
        doc = _per_query(shift[trial.point], rng)
        doc["rank_distance"] = (50 - 200 * shift[trial.point] + rng.normal(0, 1, 100)).tolist()
        doc["top10_own_share"] = [0.5] * 100
        doc["paragraph"] = [k // 5 for _ in LANGS for k in range(25)]  # five questions on each paragraph
        d = shift[trial.point] + 0.002 * trial.seed
        final = {
            f"xquad_r/{k}": 0.4 + d
            for k in ("multi/map", "mono/map", "cross/map", "mono/r1", "cross/r1", "multi/r10")
        }
        final |= {"xquad_r/bias/rank_distance": 50 - 200 * d, "xquad_r/bias/top10_own_share": 0.5}
        final |= {
            f"xquad_r/{s}/{m}/{lang}": 0.4 + d
            for lang in LANGS
            for s, m in (("multi", "map"), ("mono", "map"))
        }
        final |= {f"xquad_r/bias/rank_distance/{lang}": 50 - 200 * d for lang in LANGS}
        zero = {k: 0.3 for k in final if "map" in k.split("/")}
        # the centering baseline: between X-X/X-Y and hybrid on AP, no better than any on rank distance
        zero |= {"xquad_r_centered/multi/map": 0.45, "xquad_r_centered/bias/rank_distance": 60.0}
        zero |= {"ntrex_r/multi/map": 0.2, "ntrex_r_centered/multi/map": 0.25}
        final |= {"ntrex_r/multi/map": 0.3 + d, "ntrex_r/bias/rank_distance": 500 - 100 * d}
        # a learning curve (evaluation.curvePoints 3): the arms part by step 3
        middle = {"xquad_r/multi/map": 0.35 + d / 2, "xquad_r/bias/rank_distance": 55 - 100 * d}
        client.log_batch(run_id, metrics=[Metric(k, v, 0, 0) for k, v in zero.items()]
                         + [Metric(k, v, 0, 3) for k, v in middle.items()]
                         + [Metric(k, v, 1, 6) for k, v in final.items()])  # fmt: skip
        client.log_dict(run_id, doc, "eval/xquad-r/step-6/per_query.json")
        base = _per_query(0.05, np.random.default_rng(5))
        base |= {"rank_distance": [60.0] * 100, "top10_own_share": [0.5] * 100, "paragraph": doc["paragraph"]}
        client.log_dict(run_id, base, "eval/xquad-r-centered/step-0/per_query.json")
        client.set_terminated(run_id, "FINISHED")
    return uri, parent


def test_claims_are_judged_from_the_clustered_comparisons(strategy_sweep: tuple[str, str]) -> None:
    from mlflow import MlflowClient

    from xling.trainer.sweep.claims import claims_table, roles

    s = summarize_sweep(MlflowClient(strategy_sweep[0]), strategy_sweep[1])
    assert roles(s.points) == {"xx": 0, "xy": 1, "mixed": 2, "hybrid": 3}
    assert [p.xx_share for p in s.points] == [1.0, 0.0, None, 0.5]
    assert {c.setting for c in s.comparisons} >= {"rank_distance", "top10_own_share"}
    assert s.bootstrap_unit == "paragraph" and {c.test.questions for c in s.comparisons} == {5}
    verdicts = {row[0]: (row[1], row[3]) for row in claims_table(s).rows}
    assert verdicts["Hybrid is best on multilingual mAP"] == ("reproduced", "-")
    assert verdicts["Hybrid has the lowest language bias (rank distance)"][0] == "reproduced"
    assert (
        verdicts["LAReQA: mixed (languages mixed within a batch) is below X-X-mono on multilingual mAP"][0]
        == "reproduced"
    )
    mono, scale = verdicts["X-X-mono beats X-Y on monolingual mAP"]
    assert mono == "not separable at this scale" and ("seeds per arm" in scale or "more questions" in scale)
    centering = "beats language-mean centering (multi mAP and rank distance)"
    assert verdicts[f"Hybrid {centering}"][0] == "reproduced"
    assert verdicts[f"X-X-mono {centering}"][0] == "not reproduced: centering is better"
    assert verdicts[f"Mixed {centering}"][0] == "not reproduced: centering is better"


def test_learning_curves_over_seeds_in_the_report(strategy_sweep: tuple[str, str], tmp_path: Path) -> None:
    from mlflow import MlflowClient

    s = summarize_sweep(MlflowClient(strategy_sweep[0]), strategy_sweep[1])
    hybrid = s.points[3].curves["xquad_r/multi/map"]
    assert [step for step, _ in hybrid] == [0, 3, 6]
    assert hybrid[1][1].mean == pytest.approx(0.35 + (0.1 + 0.002) / 2) and hybrid[1][1].n == 3
    assert "xquad_r/bias/rank_distance" not in s.points[3].curves, "two evaluations (3, 6) are no curve"
    assert "learning_curves.png" in {p.name for p in write_report(s, tmp_path)}
    md = markdown(s)
    assert "### Learning curves" in md and "| strategy=hybrid, alpha=0.5 | 3 | 0.4010 ± " in md


def test_the_report_shows_the_centering_row_and_tests_every_point_against_it(
    strategy_sweep: tuple[str, str],
) -> None:
    from mlflow import MlflowClient

    s = summarize_sweep(MlflowClient(strategy_sweep[0]), strategy_sweep[1])
    assert s.centered["xquad_r/multi/map"] == 0.45 and "xquad_r_centered/multi/map" not in s.points[0].stats
    assert s.centering_source == "NTREX-128 lines 1001-1120 (120 per language)"
    multi = {c.a: c for c in s.against_centering if c.setting == "multi"}
    assert set(multi) == {0, 1, 2, 3} and multi[3].test.seeds == (3, 1), "the baseline is one evaluation"
    assert multi[3].test.low > 0 > multi[0].test.high and multi[2].test.diff == pytest.approx(-0.15, abs=0.01)
    md = markdown(s)
    assert "| - | zero-shot + language-mean centering | - | 0.4500 |" in md
    assert "Against language-mean centering (means: NTREX-128 lines 1001-1120" in md
    assert "| multi | strategy=hybrid, alpha=0.5 | +0.05" in md and "| beats centering |" in md
    assert to_json(s)["centering"]["metrics"]["xquad_r/multi/map"] == 0.45


def test_a_held_out_suite_gets_its_own_table_with_both_baselines(strategy_sweep: tuple[str, str]) -> None:
    from mlflow import MlflowClient

    s = summarize_sweep(MlflowClient(strategy_sweep[0]), strategy_sweep[1])
    assert s.held_out == ["ntrex_r"] and s.zero_shot["ntrex_r/multi/map"] == 0.2
    assert s.centered["ntrex_r/multi/map"] == 0.25 and "ntrex_r_centered/multi/map" not in s.points[0].stats
    md = markdown(s)
    assert "### Held-out suite ntrex_r: mean ± 95% t-interval half-width over seeds" in md
    assert "| zero-shot | 0.2000 | - |" in md and "| zero-shot + language-mean centering | 0.2500 | - |" in md
    assert "| strategy=hybrid, alpha=0.5 | 0.4020 ± " in md


def test_research_report_has_the_alpha_curve_the_languages_and_the_full_pool(
    strategy_sweep: tuple[str, str], tmp_path: Path
) -> None:
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    uri, parent = strategy_sweep
    client = MlflowClient(uri)
    s = summarize_sweep(client, parent)
    assert s.best == 3 and "alpha_curve.png" in {p.name for p in write_report(s, tmp_path)}
    md = markdown(s)
    assert "By language: best point (strategy=hybrid, alpha=0.5) against zero-shot" in md
    assert "| de | 0.3000 | 0.5020 ± " in md, "zero-shot, then the best point's seed mean"
    assert "Full pool" not in md
    best_xx = max((t for t in s.points[0].trials), key=lambda t: t.metrics["xquad_r/multi/map"])
    client.log_batch(best_xx.run_id, metrics=[Metric("xquad_r_full/multi/map", 0.33, 0, 6)])
    client.log_batch(parent, metrics=[Metric("xquad_r_full/multi/map", 0.30, 0, 0)])
    s = summarize_sweep(client, parent)
    assert s.points[0].full.run_id == best_xx.run_id and s.zero_shot_full == {"xquad_r_full/multi/map": 0.30}
    rows = [
        line
        for line in markdown(s).splitlines()
        if line.startswith(("| zero-shot | - | 0.3000", "| strategy=xx | 2 | 0.3300"))
    ]
    assert len(rows) == 2, markdown(s)


def test_full_pool_waits_until_every_seed_of_a_point_finished(strategy_sweep: tuple[str, str]) -> None:
    from mlflow import MlflowClient

    from xling.trainer.sweep.full_pool import best_trials

    s = summarize_sweep(MlflowClient(strategy_sweep[0]), strategy_sweep[1])
    chosen = {p.index: run for p, run in best_trials(s)}
    assert list(chosen) == [3, 1, 0, 2], (
        "the arms the claims compare, hybrid first: a stopped call has the main one"
    )
    assert chosen[3] == max(s.points[3].trials, key=lambda t: t.metrics["xquad_r/multi/map"]).run_id
    s.points[0].trials = s.points[0].trials[:2]  # seed 2 still running: its best seed is not known yet
    assert 0 not in {p.index for p, _ in best_trials(s)}


def test_only_hybrid_at_alpha_one_half_is_the_papers_hybrid() -> None:
    from xling.trainer.sweep.claims import roles
    from xling.trainer.sweep.summary import PointSummary

    def point(i: int, strategy: str, share: float | None) -> PointSummary:
        return PointSummary(i, f"p{i}", {}, [object()], {}, [], strategy, share)  # type: ignore[list-item]

    points = [point(0, "hybrid", 0.25), point(1, "xx", 1.0), point(2, "hybrid", 0.5), point(3, "xy", 0.0)]
    assert roles(points) == {"xx": 1, "hybrid": 2, "xy": 3}, "alpha 0.25 is on the curve, not the paper's arm"


def test_full_pool_needs_the_sweeps_file(
    fake_sweep: tuple[str, str, SweepPlan], capsys: pytest.CaptureFixture
) -> None:
    from xling.trainer.cli import main

    uri, _, _ = fake_sweep
    assert main(["results", "fake", "--tracking-uri", uri, "--full-pool"]) == 2
    assert "--full-pool: give the sweep's YAML file" in capsys.readouterr().err
