"""The checkpoint layout has one owner: what the training loop writes, ``xling export`` reads back as written."""

from __future__ import annotations

import ast
import json
from pathlib import Path

from tests.support import ROOT
from xling.api.spec.experiment import ExperimentSpec
from xling.trainer import checkpoint_layout as layout
from xling.trainer.data.store import DataLocation
from xling.trainer.job import Job, TrackedRun

SPEC = ExperimentSpec.model_validate({
    "model": {"name": "xling/tiny-random"},
    "data": {"languages": ["en"], "sources": [{"type": "pairs", "path": "p.jsonl"}]},
    "sampling": {"strategy": "xx"},
})  # fmt: skip


def test_a_jobs_record_reads_back_as_written(tmp_path: Path) -> None:
    job = Job(
        SPEC, DataLocation("/data", "fp"), "/models/base", name="demo", run=TrackedRun("sqlite:///m.db", "r1")
    )
    metrics = {"xquad_r/multi/map": 0.5, "step": 60, "note": "not a number"}
    layout.write_checkpoint_meta(tmp_path, layout.job_meta(job), metrics)
    meta = layout.read_checkpoint_meta(tmp_path)
    assert meta == layout.CheckpointMeta(SPEC.model_dump(mode="json"), "/models/base", "demo", "r1",
                                         {"xquad_r/multi/map": 0.5, "step": 60})  # fmt: skip
    assert ExperimentSpec.model_validate(meta.spec) == SPEC
    assert set(json.loads((tmp_path / "xling.json").read_text())) == {
        "spec",
        "model_path",
        "name",
        "run_id",
        "metrics",
    }


def test_a_record_without_a_run_or_a_name(tmp_path: Path) -> None:
    """Tests and benchmarks train without MLflow: null fields read back as absent, not as the string."""
    layout.write_checkpoint_meta(tmp_path, {"spec": {}, "model_path": "m"}, {})
    assert layout.read_checkpoint_meta(tmp_path) == layout.CheckpointMeta({}, "m")


def test_results_and_trainer_state_read_back(tmp_path: Path) -> None:
    assert layout.read_results(tmp_path) == "", "a checkpoint without tables"
    layout.write_results(tmp_path, "| xquad-r | 0.5 |\n")
    assert layout.read_results(tmp_path) == "| xquad-r | 0.5 |\n"
    layout.write_trainer_state(tmp_path, {"step": 3, "composition": {"kinds": {"xx": 3}}})
    assert layout.read_trainer_state(tmp_path) == {"step": 3, "composition": {"kinds": {"xx": 3}}}


def test_no_other_module_spells_a_checkpoint_file_name() -> None:
    """The file names are string constants of the layout module only, so a rename cannot miss a reader.
    (The folder names, ``model`` and ``deepspeed``, are also ordinary words: not checked.)"""
    names = {layout.META, layout.RESULTS, layout.TRAINER_STATE, layout.ENGINE}
    spelled = [
        f"{path.relative_to(ROOT)}:{node.lineno} {node.value!r}"
        for path in sorted((ROOT / "trainer").rglob("*.py"))
        if path.name != "checkpoint_layout.py"
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Constant) and node.value in names
    ]
    assert not spelled, spelled
