"""Spec validation: bad files are rejected before any work, with messages naming the field path."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from tests.support import ROOT
from xling.api.spec.base import SpecError
from xling.api.spec.loading import load_experiment, parse_experiment

SAMPLES = sorted((ROOT / "manifests" / "samples").glob("*.yaml"))


def base() -> dict:
    return yaml.safe_load((ROOT / "manifests/samples/smoke.yaml").read_text())


def rejected(doc: dict) -> str:
    with pytest.raises(SpecError) as err:
        parse_experiment(doc, "exp.yaml")
    return str(err.value)


@pytest.mark.parametrize("path", SAMPLES, ids=[p.name for p in SAMPLES])
def test_samples_are_valid(path: Path) -> None:
    exp = load_experiment(path)
    assert exp.kind == "RetrievalExperiment"


def test_relative_data_paths_resolve_against_the_file() -> None:
    exp = load_experiment(ROOT / "manifests/samples/smoke.yaml")
    assert Path(exp.spec.data.sources[0].path).is_absolute()


def test_field_names_other_parts_rely_on() -> None:
    exp = parse_experiment(base())
    assert exp.spec.model.name and exp.spec.sampling.strategy == "hybrid" and exp.spec.sampling.alpha == 0.5


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        (("sampling", "alpha"), 1.5, "spec.sampling.alpha"),
        (("sampling", "alpha"), -0.1, "spec.sampling.alpha"),
        (("sampling", "strategy"), "random", "spec.sampling.strategy"),
        (("optimization", "maxSteps"), "many", "spec.optimization.maxSteps"),
        (("optimization", "globalBatchSize"), 0, "spec.optimization.globalBatchSize"),
        (("model", "pooling"), "max", "spec.model.pooling"),
        (("model", "colour"), "blue", "spec.model.colour"),
        (("loss", "temperature"), 0, "spec.loss.temperature"),
    ],
)
def test_bad_values_name_the_field(path: tuple[str, ...], value: object, expected: str) -> None:
    doc = base()
    node = doc["spec"]
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    msg = rejected(doc)
    assert expected in msg and "exp.yaml" in msg


def test_a_cross_field_check_names_its_field_once() -> None:
    """A validator of a section names the field inside it: spec.tracking.trackingUri, not tracking twice."""
    doc = base()
    doc["spec"]["tracking"] = {
        **doc["spec"].get("tracking", {}),
        "trackingUri": "https://u:pw@mlflow.example",
    }
    msg = rejected(doc)
    assert "spec.tracking.trackingUri" in msg and "tracking.tracking." not in msg


def test_unknown_top_level_field() -> None:
    doc = base()
    doc["spec"]["extra"] = 1
    assert "spec.extra" in rejected(doc)


def test_xy_needs_two_languages() -> None:
    doc = base()
    doc["spec"]["data"]["languages"] = ["en"]
    doc["spec"]["sampling"]["strategy"] = "xy"
    assert "sampling.strategy" in rejected(doc)


def test_xx_with_one_language_is_fine() -> None:
    doc = base()
    doc["spec"]["data"]["languages"] = ["en"]
    doc["spec"]["sampling"]["strategy"] = "xx"
    doc["spec"]["evaluation"]["suites"][0]["languages"] = ["en"]
    parse_experiment(doc)


def test_batch_smaller_than_workers() -> None:
    doc = base()
    doc["spec"]["optimization"]["globalBatchSize"] = 2
    doc["spec"]["distributed"]["numWorkers"] = 4
    assert "globalBatchSize" in rejected(doc)


def test_evaluation_language_missing_from_data() -> None:
    doc = base()
    doc["spec"]["evaluation"]["suites"][0]["languages"] = ["en", "fr"]
    msg = rejected(doc)
    assert "evaluation.suites[0].languages" in msg and "fr" in msg


def test_every_error_is_reported_at_once() -> None:
    doc = copy.deepcopy(base())
    doc["spec"]["sampling"]["alpha"] = 2
    doc["spec"]["model"]["pooling"] = "max"
    msg = rejected(doc)
    assert "spec.sampling.alpha" in msg and "spec.model.pooling" in msg


def test_wrong_kind_and_bad_yaml(tmp_path: Path) -> None:
    doc = base()
    doc["kind"] = "Pod"
    assert "kind" in rejected(doc)
    bad = tmp_path / "bad.yaml"
    bad.write_text("spec: [unclosed\n")
    with pytest.raises(SpecError, match=r"bad.yaml:2: not valid YAML: expected ',' or '\]'"):  # one line
        load_experiment(bad)
    with pytest.raises(SpecError, match="cannot read"):
        load_experiment(tmp_path / "missing.yaml")


def test_learning_curve_steps_are_evenly_spaced_and_need_the_start() -> None:
    from xling.api.spec.training import EvaluationSpec

    assert EvaluationSpec(at_start=True, curve_points=5).curve_steps(40) == [10, 20, 30]
    assert EvaluationSpec(at_start=True, curve_points=4).curve_steps(40) == [13, 27]
    assert EvaluationSpec(at_start=True, curve_points=50).curve_steps(10) == list(range(1, 10))
    assert EvaluationSpec().curve_steps(40) == []
    for bad in ({"curvePoints": 4}, {"atStart": True, "curvePoints": 2}):
        with pytest.raises(ValueError, match="curvePoints: a curve needs atStart: true and at least 3"):
            EvaluationSpec.model_validate(bad)
