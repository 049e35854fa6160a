"""End to end: `xling run manifests/samples/smoke.yaml` on real Ray, logging to a real MLflow store."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.support import ROOT
from xling.api.tags import DATA_FINGERPRINT, SAMPLING

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class SmokeRun:
    """One ``xling run manifests/samples/smoke.yaml``, shared by the tests that read it."""

    directory: Path  # its working directory
    uri: str  # its MLflow store
    out: str  # its console


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> SmokeRun:
    tmp_path = tmp_path_factory.mktemp("smoke")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "XLING_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(
        [sys.executable, "-m", "xling.trainer.cli", "run", str(ROOT / "manifests/samples/smoke.yaml"),
         "--tracking-uri", uri],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return SmokeRun(tmp_path, uri, proc.stdout)


#: The phases of a smoke run, each shown as ``name: what`` and ``name: done in N s``: the driver's, then
#: the worker's (zero-shot, the learning curve's middle point and the final evaluation, export).
PHASES = ("prepare", "train", "zero-shot", "evaluate step 4", "evaluate step 8", "export")


def check_console(out: str) -> None:
    """One screen (40 lines): each phase with its time, the progress bar, the zero-shot -> trained table
    and the command that opens the run; no Ray prefix, no library's line."""
    lines = out.splitlines()
    assert len(lines) <= 40, f"{len(lines)} lines:\n{out}"
    for name in PHASES:
        assert any(line.startswith(f"{name}: ") and " done in " not in line for line in lines), name
        assert any(re.fullmatch(rf"{name}: done in \d+\.\d s( \(.+\))?", line) for line in lines), name
    assert re.search(r"^zero-shot: done in .* \(xquad-r multi\.map 0\.\d{4}, xquad-r-centered", out, re.M)
    assert "] 8/8 loss=" in out and "| | zero-shot | zero-shot, centered | trained (step 8) | change |" in out
    assert "mlflow ui --backend-store-uri" in lines[-2] and lines[-1].startswith("took ")
    assert not any(line.startswith("(") or "Traceback" in line or "INFO" in line for line in lines)


def test_smoke_console_fits_one_screen_and_times_each_phase(smoke_run: SmokeRun) -> None:
    check_console(smoke_run.out)
    log = smoke_run.directory / smoke_run.out.split("log: ")[1].split()[0]
    logged = log.read_text()  # what the console leaves out is there: the tables, Ray's and faiss's lines
    assert all(f"{name}: the tables (step {step})" in logged
               for name, step in (("zero-shot", 0), ("evaluate step 4", 4), ("evaluate step 8", 8)))  # fmt: skip
    assert (
        "mAP matrix" in logged and "xquad-r-centered: 4 languages" in logged and "(RayTrainWorker" in logged
    )


def test_smoke_run_end_to_end(smoke_run: SmokeRun) -> None:
    from mlflow import MlflowClient

    uri, out = smoke_run.uri, smoke_run.out
    assert "zero-shot: done in " in out and "8/8 loss=" in out and "checkpoint:" in out

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("smoke")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = client.get_run(runs[0].info.run_id)  # with its dataset inputs
    assert run.info.status == "FINISHED"
    assert run.data.params["sampling.strategy"] == "hybrid" and run.data.params["sampling.alpha"] == "0.5"
    assert run.data.tags[SAMPLING] == "hybrid"
    loss = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in loss) == list(range(1, 9)), "one loss value per step, no duplicates"
    mapk = client.get_metric_history(run.info.run_id, "xquad_r/multi/map")
    assert sorted(m.step for m in mapk) == [0, 4, 8]  # zero-shot, the curve's middle point and final
    centered = client.get_metric_history(run.info.run_id, "xquad_r_centered/multi/map")
    assert [m.step for m in centered] == [0], "the centering baseline: the untrained model only"
    assert "xquad-r-centered multi.map" in out
    assert all(0.0 <= m.value <= 1.0 for m in mapk)
    assert "batches/xx_fraction" in run.data.metrics
    for side in ("query", "passage"):  # the realised per-language shares of every run
        shares = {k: v for k, v in run.data.metrics.items() if k.startswith(f"batches/{side}_share/")}
        assert set(shares) == {f"batches/{side}_share/{lang}" for lang in ("ar", "de", "en", "es")}
        assert sum(shares.values()) == pytest.approx(1.0)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "batch_composition.json" in artifacts
    tables = {a.path for a in client.list_artifacts(run.info.run_id, "eval/xquad-r/step-4")}
    assert "eval/xquad-r/step-4/table.txt" in tables, "the table the console leaves to the log"
    # MLflow's own fields: source, datasets (digest = the data fingerprint), the logged and registered model
    assert (
        run.data.tags["mlflow.source.name"] == "xling run smoke" and run.data.tags["mlflow.source.git.commit"]
    )
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert inputs["training-pairs"].dataset.digest == run.data.tags[DATA_FINGERPRINT]
    assert "ntrex-128" in inputs["training-pairs"].dataset.source
    assert inputs["xquad-r"].tags[0].value == "evaluation"
    [logged] = client.search_logged_models([exp.experiment_id])
    assert logged.source_run_id == run.info.run_id
    [version] = client.search_model_versions("name = 'xling-smoke'")
    assert version.run_id == run.info.run_id
    assert float(version.tags["xquad_r/multi/map"]) == pytest.approx(
        run.data.metrics["xquad_r/multi/map"], abs=1e-4
    )
    # the final checkpoint holds a sentence-transformers model whose card has the run's numbers
    ckpt = Path(out.split("checkpoint: ")[1].split()[0])
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    assert AutoModel.from_pretrained(ckpt / "model") is not None
    st = SentenceTransformer(str(ckpt / "model"), device="cpu")
    assert st.prompts["query"] == "query: " and st.get_embedding_dimension() == 32
    card = (ckpt / "model" / "README.md").read_text()
    assert (
        f"{run.data.metrics['xquad_r/multi/map']:.4f}" in card
        and (ckpt / "results.txt").read_text().strip() in card
    )
    assert (ckpt / "trainer_state.json").exists()
    import mlflow.pyfunc

    mlflow.set_tracking_uri(uri)
    served = mlflow.pyfunc.load_model(f"models:/{logged.model_id}")
    texts = ["Wie viele Menschen leben in Berlin?", "How many people live in Berlin?"]
    np.testing.assert_allclose(
        served.predict(pd.DataFrame({"text": texts})), st.encode_query(texts), atol=1e-6
    )


def test_bad_spec_fails_before_any_work(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    text = (ROOT / "manifests/samples/smoke.yaml").read_text().replace("alpha: 0.5", "alpha: 1.5")
    bad.write_text(text)
    proc = subprocess.run([sys.executable, "-m", "xling.trainer.cli", "run", str(bad)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2
    assert "spec.sampling.alpha" in proc.stderr and "bad.yaml" in proc.stderr
    assert not (tmp_path / "mlflow.db").exists(), "nothing may start before the spec is valid"


def test_batches_the_data_cannot_fill_are_refused_before_ray(tmp_path: Path) -> None:
    text = (ROOT / "manifests/samples/smoke.yaml").read_text()
    big = tmp_path / "big.yaml"
    big.write_text(
        text.replace("globalBatchSize: 16", "globalBatchSize: 400").replace("../../data", f"{ROOT}/data")
    )
    proc = subprocess.run([sys.executable, "-m", "xling.trainer.cli", "run", str(big)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "needs a language with 400 groups" in proc.stderr and "globalBatchSize" in proc.stderr
    assert "ray" not in proc.stdout.lower() and not (tmp_path / "mlflow.db").exists()
