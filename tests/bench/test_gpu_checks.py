"""bench/gpu.sh's CPU side: the skip paths and the pure helpers of bench/gpu_checks.py (no GPU, no Ray)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT, load_bench

SCRIPT = ROOT / "bench" / "gpu.sh"


gc = load_bench("gpu_checks")


def _sh(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env})  # fmt: skip


def test_no_gpu_skips_cleanly():
    proc = _sh(XLING_NVIDIA_SMI="/nonexistent/nvidia-smi")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "no CUDA GPU: skipped"


def test_gpu_without_cuda_torch_says_so(tmp_path):
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'Fake GPU'\n")
    fake.chmod(0o755)
    proc = _sh(XLING_NVIDIA_SMI=str(fake), XLING_GPU_PYTHON=sys.executable)
    assert proc.returncode == 0, proc.stderr
    assert "GPU: Fake GPU" in proc.stdout
    assert "no Python with CUDA torch found" in proc.stdout


def test_big_encoder_is_about_a_billion_parameters():
    shape = gc.big_shape(gc.big_config())  # xling plan's meta-device counting: nothing allocated
    assert shape.model_class == "XLMRobertaModel"
    assert 1.1e9 < shape.dense_params < 1.3e9
    assert 1.2e9 < shape.total_params < 1.4e9
    assert (shape.hidden, shape.layers, shape.ffn) == (2048, 24, 8192)


def test_specs_validate_and_plan_fits_one_h200(tmp_path):
    from xling.trainer.capacity.estimate import make_plan

    train = gc.experiment(gc.train_doc(work=str(tmp_path)))
    dist = train.spec.distributed
    assert (dist.gpus_per_worker, dist.precision, dist.deepspeed) == (1, "bf16", None)
    assert train.spec.sampling.strategy == "hybrid"
    # it shows learning: XQuAD-R before (zero-shot) and after
    assert train.spec.evaluation.at_start and Path(train.spec.evaluation.suites[0].path).is_dir()
    assert Path(train.spec.data.sources[0].path).is_dir()  # resolved against manifests/samples/

    model = tmp_path / "xlmr"
    gc.big_config().save_pretrained(model)
    exp = gc.experiment(gc.zero3_doc(str(model), work=str(tmp_path)))
    assert exp.spec.distributed.deepspeed.stage == 3
    plan = make_plan(exp.spec, gpus=1, gpu_mem_gb=139.0)
    assert plan.fits and 15 < plan.memory_per_gpu_gb < 139


def test_steady_skips_the_first_window():
    assert gc.steady([]) is None
    assert gc.steady([5.0]) == 5.0
    assert gc.steady([1.0, 10.0, 12.0, 11.0]) == 11.0


def test_tokenizer_texts_cover_the_scripts():
    texts = gc.tokenizer_texts(limit_chars=200_000)
    joined = "".join(texts)
    assert texts and sum(map(len, texts)) <= 220_000
    assert any("\u4e00" <= ch <= "\u9fff" for ch in joined)  # zh


def test_orchestrator_reports_skips_and_failures(tmp_path, capsys):
    rc = gc.main(
        [
            "--work",
            str(tmp_path),
            "--sections",
            "train,zero3,eval,bogus",
            "--skip",
            "train=no model",
            "--skip",
            "zero3=needs deepspeed",
            "--skip",
            "eval=needs faiss",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "[train] FAILED/SKIPPED: skipped: no model" in out
    assert "[zero3] FAILED/SKIPPED: skipped: needs deepspeed" in out
    assert (tmp_path / "summary.json").is_file()


def test_learning_and_step_lines():
    metrics = {
        "train/loss": {"first": 2.1, "last": 1.2},
        gc.POOLED_MAP: {"first": 0.41, "last": 0.47, "windows": 2},
    }
    assert gc.learned(metrics) == {
        "loss": (2.1, 1.2),
        "map": (0.41, 0.47),
        "loss_fell": True,
        "map_rose": True,
    }
    assert gc.learned({})["map_rose"] is None
    results = [{"case": c, "batch": 256, "pairs_per_s": v, "mfu": 0.4, "step_s": 256 / v, "plan_step_s": 0.8,
                "loss_first": 4.2, "loss_last": 4.0, "detail": ""} for c, v in (("xling-auto", 400.0), ("ref-bf16", 440.0))]  # fmt: skip
    lines = gc.step_lines(results, [["xling-auto", "ref-bf16"], ["xling-zero3", "ds-zero3"]])
    assert "[step] batch 256 xling-auto / ref-bf16: 400.0 / 440.0 pairs/s = 0.909" in lines
    assert any(
        "xling-auto" in x and "vs plan 0.800 s (measured/plan 0.80)" in x and "(fell)" in x for x in lines
    )
    assert not any("xling-zero3 /" in x for x in lines)  # only pairs with both sides


@pytest.mark.parametrize("name", ["train", "zero3", "eval"])
def test_summary_lines_format_results(name):
    results = {
        "train": {"ok": True, "wall_s": 40.0, "spec": {"steps": 60, "globalBatchSize": 256},
                  "metrics": {"train/tokens_per_s": {"steady": 1e5}, "train/mfu": {"steady": 0.05}}},
        "zero3": {"ok": True, "wall_s": 90.0, "spec": {"steps": 30, "globalBatchSize": 64}, "peak_alloc_gib": 30.0,
                  "plan": {"total_params": 1.28e9, "dense_params": 1.21e9, "memory_per_gpu_gb": 40.0,
                           "memory_breakdown_gb": {"runtime": 2.0}}, "metrics": {}},
        "eval": {"ok": True, "faiss": "CPU faiss", "map": {"multi.map": 0.5}, "timings_s": {}, "wall_s": 9.0},
    }  # fmt: skip
    text = "\n".join(gc.summary_lines({name: results[name]}, {"date": "2026-12-02", "gpu": "NVIDIA H200"}))
    assert f"[{name}]" in text and "NVIDIA H200" in text
