"""Training throughput (pairs/s): xling vs sentence-transformers, and 2 ZeRO-3 workers vs 1 worker.

All runs train the same tiny random model (xling/tiny-random: a BertModel like e5-small, 2 x 32 wide, 85k params,
tokenizer trained on the data) on the same bundled NTREX pairs with the same global batch, mean pooling,
L2 normalisation, InfoNCE at temperature 0.05 (= MultipleNegativesRankingLoss scale 20), max length 64 and
no prefixes. sentence-transformers gets exactly the (query, passage) pairs of xling's hybrid batches.

Every process runs one torch thread (one core each: 1 for sentence-transformers and the 1-worker run, 2
for the 2-worker run), so the comparison holds per core and the scaling is with the cores added.
Throughput is batch / median step time after ``--warmup`` steps, everything in a step included
(tokenisation, the optimizer, logging): for xling from MLflow's per-step timestamps, for
sentence-transformers from a trainer callback. The median and the best of ``--repeats`` interleaved
rounds keep other processes on a shared machine from deciding the result.

    python bench/bench_train.py [--steps 60] [--warmup 8] [--batch 32] [--repeats 2]
    (needs sentence-transformers, not a project dependency: pip install sentence-transformers==6.2.0)
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def experiment(name: str, steps: int, batch: int, workers: int, zero3: bool) -> Any:
    from xling.trainer.spec import parse_experiment, resolve_paths

    # one torch thread per process; a spare restart (see tests/test_faults.py) does not move the median step time
    distributed: dict[str, Any] = {"numWorkers": workers, "cpusPerWorker": 1, "maxFailures": 1}
    if zero3:
        distributed["deepspeed"] = {"stage": 3}
    doc = {
        "apiVersion": "xling.io/v1alpha1",
        "kind": "RetrievalExperiment",
        "metadata": {"name": name},
        "spec": {
            "model": {"name": "xling/tiny-random", "queryPrefix": "", "passagePrefix": "",
                      "maxQueryLength": 64, "maxPassageLength": 64},
            "data": {"languages": ["ar", "de", "en", "es"],
                     "sources": [{"type": "ntrex", "path": "data/demo/ntrex-128"}]},
            "sampling": {"strategy": "hybrid", "alpha": 0.5, "seed": 0},
            "loss": {"temperature": 0.05},
            "optimization": {"learningRate": 1e-3, "maxSteps": steps, "globalBatchSize": batch, "warmupSteps": 1},
            "distributed": distributed,
        },
    }  # fmt: skip
    return resolve_paths(parse_experiment(doc, name), ROOT)


def steady_rate(step_ends_s: list[float], batch: int, warmup: int) -> float:
    """Pairs per second at the median duration of the steps after ``warmup``."""
    steady = step_ends_s[warmup - 1 :]
    return batch / statistics.median(b - a for a, b in itertools.pairwise(steady))


def bench_xling(
    tmp: Path, name: str, steps: int, batch: int, warmup: int, workers: int, zero3: bool
) -> float:
    from mlflow import MlflowClient

    from xling.trainer.run import run_experiment

    exp = experiment(name, steps, batch, workers, zero3)
    exp.spec.output_dir = str(tmp / "runs")
    uri = f"sqlite:///{tmp}/mlflow.db"
    result = run_experiment(exp, tracking_uri=uri)
    history = sorted(MlflowClient(uri).get_metric_history(result.run_id, "train.loss"), key=lambda m: m.step)
    return steady_rate([m.timestamp / 1000 for m in history], batch, warmup)


def bench_sentence_transformers(tmp: Path, steps: int, batch: int, warmup: int) -> float:
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from sentence_transformers.losses import MultipleNegativesRankingLoss
    from sentence_transformers.models import Normalize, Pooling, Transformer
    from sentence_transformers.training_args import SentenceTransformerTrainingArguments
    from transformers import TrainerCallback

    from xling.trainer.run import prepare
    from xling.trainer.sampling import build_sampler
    from xling.trainer.train_loop import batch_texts

    exp = experiment("st", steps, batch, 1, False)
    corpus, _, model_path = prepare(exp)
    sampler = build_sampler(corpus, batch, exp.spec.sampling)
    anchors, positives = [], []
    for step in range(steps):
        queries, passages, _ = batch_texts(corpus, sampler.plan(step).items, 0)
        anchors += queries
        positives += passages
    encoder = Transformer(model_path, max_seq_length=64)
    model = SentenceTransformer(
        modules=[encoder, Pooling(encoder.get_embedding_dimension(), "mean"), Normalize()]
    )

    ends: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            ends.append(time.time())

    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp / "st"), per_device_train_batch_size=batch, max_steps=steps, learning_rate=1e-3,
        warmup_steps=1, save_strategy="no", report_to=[], logging_steps=10**6, use_cpu=True,
        dataloader_drop_last=True, seed=0,
    )  # fmt: skip
    trainer = SentenceTransformerTrainer(
        model=model, args=args, train_dataset=Dataset.from_dict({"anchor": anchors, "positive": positives}),
        loss=MultipleNegativesRankingLoss(model, scale=20.0), callbacks=[Clock()],
    )  # fmt: skip
    trainer.train()
    return steady_rate(ends, batch, warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    from xling.trainer.run import LOCAL_ENV

    extensions = str(ROOT / ".cache" / "torch_extensions")
    for key, value in {
        **LOCAL_ENV,
        "TORCH_EXTENSIONS_DIR": extensions,
        "XLING_CACHE": str(ROOT / ".cache"),
    }.items():
        os.environ.setdefault(key, value)  # before Ray starts: its workers inherit them
    import ray
    import torch

    torch.set_num_threads(1)  # sentence-transformers runs in this process
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    common = (args.steps, args.batch, args.warmup)
    runs = {
        "sentence-transformers 1 process": lambda tmp: bench_sentence_transformers(tmp, *common),
        "xling 1 worker": lambda tmp: bench_xling(tmp, "bench-1w", *common, workers=1, zero3=False),
        "xling 2 workers ZeRO-3": lambda tmp: bench_xling(
            tmp, "bench-2w-zero3", *common, workers=2, zero3=True
        ),
        "xling 2 workers all-reduce": lambda tmp: bench_xling(
            tmp, "bench-2w", *common, workers=2, zero3=False
        ),
    }
    rates = dict.fromkeys(runs, 0.0)
    with tempfile.TemporaryDirectory() as d:
        for i, (name, bench) in enumerate(list(runs.items()) * args.repeats):
            tmp = Path(d) / str(i)
            tmp.mkdir()
            rates[name] = max(rates[name], bench(tmp))
    ray.shutdown()
    print(f"\nbatch {args.batch}, {args.steps} steps ({args.warmup} warm-up), best of {args.repeats}")
    for name, rate in rates.items():
        print(f"  {name:34s} {rate:8.1f} pairs/s")
    st, one, zero3, allreduce = rates.values()
    print(f"  xling 1 worker / sentence-transformers: {one / st:.2f}x")
    print(f"  xling 2 workers ZeRO-3 / 1 worker:      {zero3 / one:.2f}x")
    print(f"  xling 2 workers all-reduce / 1 worker:  {allreduce / one:.2f}x")


if __name__ == "__main__":
    main()
