"""End to end: `xling run manifests/samples/smoke.yaml` on real Ray, logging to a real MLflow store."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_smoke_run_end_to_end(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "XLING_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(
        [sys.executable, "-m", "xling.trainer.cli", "run", str(ROOT / "manifests/samples/smoke.yaml"),
         "--tracking-uri", uri],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    out = proc.stdout
    assert "Zero-shot (step 0)" in out and "8/8 loss=" in out and "checkpoint:" in out

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("smoke")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["sampling.strategy"] == "hybrid" and run.data.params["sampling.alpha"] == "0.5"
    assert run.data.tags["xling.sampling"] == "hybrid"
    loss = client.get_metric_history(run.info.run_id, "train.loss")
    assert sorted(m.step for m in loss) == list(range(1, 9)), "one loss value per step, no duplicates"
    mapk = client.get_metric_history(run.info.run_id, "xquad_r.multi.map")
    assert sorted(m.step for m in mapk) == [0, 8]  # zero-shot and final
    assert all(0.0 <= m.value <= 1.0 for m in mapk)
    assert "batches.xx_fraction" in run.data.metrics
    for side in ("query", "passage"):  # the realised per-language shares of every run
        shares = {k: v for k, v in run.data.metrics.items() if k.startswith(f"batches.{side}_share.")}
        assert set(shares) == {f"batches.{side}_share.{lang}" for lang in ("ar", "de", "en", "es")}
        assert sum(shares.values()) == pytest.approx(1.0)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "batch_composition.json" in artifacts
    # the final checkpoint holds a loadable Hugging Face model
    ckpt = Path(out.split("checkpoint: ")[1].split()[0])
    from transformers import AutoModel

    assert AutoModel.from_pretrained(ckpt / "model") is not None
    assert (ckpt / "trainer_state.json").exists()


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
    big.write_text(text.replace("globalBatchSize: 16", "globalBatchSize: 400").replace("../../data", f"{ROOT}/data"))
    proc = subprocess.run([sys.executable, "-m", "xling.trainer.cli", "run", str(big)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "needs a language with 400 groups" in proc.stderr and "globalBatchSize" in proc.stderr
    assert "ray" not in proc.stdout.lower() and not (tmp_path / "mlflow.db").exists()
