"""What one xling checkpoint directory holds: the file names, and ``xling.json`` (what ``xling export`` needs).

The training loop writes a checkpoint, the engines save and load their parts of it, the driver prints its
results and ``xling export`` reads any of them back; all of them name the files through this module, so the
layout is written down once. Pure standard library: nothing here needs torch.

    xling.json             the job: spec, model trained from, name, MLflow run id, the metrics (rank 0)
    results.txt            the evaluation tables the run printed (rank 0)
    trainer_state.json     step and batch composition (rank 0); rng.<rank>.pt: each rank's RNG state
    engine.pt              plain PyTorch: model, optimizer and scheduler state (rank 0)
    deepspeed/state/       DeepSpeed: every rank's ZeRO shard
    model/                 the final checkpoint only: the sentence-transformers directory with its card
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from xling.trainer.job import Job

META = "xling.json"
RESULTS = "results.txt"
TRAINER_STATE = "trainer_state.json"
ENGINE = "engine.pt"
#: DeepSpeed's checkpoint folder and the tag it saves under.
DEEPSPEED_DIR, DEEPSPEED_TAG = "deepspeed", "state"
#: The final checkpoint's exported model.
MODEL_DIR = "model"


def rng_file(rank: int) -> str:
    """One rank's RNG state: dropout streams differ by rank, so each rank writes its own."""
    return f"rng.{rank}.pt"


@dataclass(frozen=True)
class CheckpointMeta:
    """``xling.json``: what a checkpoint records of its job beside the weights."""

    spec: dict[str, Any]  # ExperimentSpec.model_dump(mode="json")
    model_path: str  # config and tokenizer of the model trained from
    name: str | None = None  # the model card's title
    run_id: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)


def job_meta(job: Job) -> dict[str, Any]:
    """What every checkpoint records of its job (JSON, no data location)."""
    return {"spec": job.spec.model_dump(mode="json"), "model_path": job.model_path, "name": job.name,
            "run_id": job.run_id}  # fmt: skip


def write_checkpoint_meta(directory: Path, config: Mapping[str, Any], metrics: Mapping[str, Any]) -> None:
    """``xling.json`` from the job's fields in ``config`` and the numeric ``metrics``."""
    meta = {f.name: config.get(f.name) for f in fields(CheckpointMeta) if f.name != "metrics"}
    meta["metrics"] = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
    (Path(directory) / META).write_text(json.dumps(meta, indent=2) + "\n")


def read_checkpoint_meta(directory: Path) -> CheckpointMeta:
    """``xling.json`` of a checkpoint (FileNotFoundError when it predates the file)."""
    doc = json.loads((Path(directory) / META).read_text())
    return CheckpointMeta(
        **{f.name: doc[f.name] for f in fields(CheckpointMeta) if doc.get(f.name) is not None}
    )


def write_results(directory: Path, report: str) -> None:
    (Path(directory) / RESULTS).write_text(report)


def read_results(directory: Path) -> str:
    """The tables the run printed; empty when the checkpoint has none."""
    path = Path(directory) / RESULTS
    return path.read_text() if path.is_file() else ""


def write_trainer_state(directory: Path, state: Mapping[str, Any]) -> None:
    (Path(directory) / TRAINER_STATE).write_text(json.dumps(dict(state)))


def read_trainer_state(directory: Path) -> dict[str, Any]:
    """Step and composition (FileNotFoundError when absent)."""
    return json.loads((Path(directory) / TRAINER_STATE).read_text())
