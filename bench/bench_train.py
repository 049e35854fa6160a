"""Training throughput (pairs/s): xling vs sentence-transformers, 2 workers vs 1, and xling's FLOP/s vs the CPU peak.

``--model tiny`` (default) trains a tiny random model (xling/tiny-random: a BertModel like e5-small,
2 x 32 wide, 85k params, tokenizer trained on the data) on the bundled NTREX pairs, max length 64, no
prefixes, every process on one torch thread: xling 1 worker, 2 workers ZeRO-3 and 2 workers all-reduce
against sentence-transformers, per core.

``--model e5-small`` trains the real demo model as ``manifests/samples/demo.yaml`` does
(xling/multilingual-e5-small, frozen word embeddings, "query: "/"passage: " prefixes, maxQueryLength 32,
maxPassageLength 128, batch 32, the bundled MLQA research pool, lr 1e-5, weight decay 0.01, warm-up 10)
with the evaluation off: sentence-transformers on 2 threads, xling 1 worker x 2 threads, xling 2 workers
x 1 thread (plain all-reduce), and xling 1 worker x 1 thread; each xling rate also as model FLOP/s
((2N + 4 N_trainable) per real token, N = non-embedding parameters, trainer/capacity/flops.py) over the CPU peak
of the threads it ran on, measured in the same run (``cpu_peak_flops``: the best fp32 linear-layer
training step, before and after the runs; the higher counts).

Both: the same loss (mean pooling, L2 normalisation, InfoNCE at temperature 0.05 = sentence-transformers'
MultipleNegativesRankingLoss scale 20) and the same pairs (sentence-transformers gets exactly the
(query, passage) pairs of xling's hybrid batches). Throughput is batch / median step time after
``--warmup`` steps, everything in a step included (tokenisation, the optimizer, logging): for xling from
MLflow's per-step timestamps, for sentence-transformers from a trainer callback. Rounds are interleaved
and the best of ``--repeats`` counts, so other processes on a shared machine do not decide the result.

    python bench/bench_train.py [--steps 60] [--warmup 8] [--batch 32] [--repeats 2]
    python bench/bench_train.py --model e5-small [--steps 16] [--warmup 4] [--repeats 2]
    (needs sentence-transformers, not a project dependency: pip install sentence-transformers==6.2.0)
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def experiment(
    name: str, steps: int, batch: int, workers: int, zero3: bool, model: str = "tiny", threads: float = 1
) -> Any:
    from xling.api.spec.loading import parse_experiment, resolve_paths

    # a spare restart (see tests/trainer/test_faults.py) does not move the median step time
    distributed: dict[str, Any] = {"numWorkers": workers, "cpusPerWorker": threads, "maxFailures": 1}
    if zero3:
        distributed["deepspeed"] = {"stage": 3}
    if model == "e5-small":
        return demo_experiment(name, steps, batch, distributed)
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


DEMO = ROOT / "manifests" / "samples" / "demo.yaml"


def demo_experiment(name: str, steps: int, batch: int, distributed: dict[str, Any]) -> Any:
    """manifests/samples/demo.yaml as it trains (with ``model.lengthBuckets``), without its evaluation and model
    registration, every step logged (the step times come from MLflow's timestamps)."""
    import yaml

    from xling.api.spec.loading import parse_experiment, resolve_paths

    doc = yaml.safe_load(DEMO.read_text())
    doc["metadata"]["name"] = name
    spec = doc["spec"]
    opt = spec["optimization"]
    opt.update({"maxSteps": steps, "globalBatchSize": batch, "logEvery": 1})
    opt["warmupSteps"] = min(opt["warmupSteps"], steps)  # a short run; the schedule does not change the time
    spec["distributed"] = distributed
    spec["model"]["lengthBuckets"] = True  # the faster CPU setting (model.lengthBuckets)
    spec.pop("evaluation", None)
    spec.pop("tracking", None)
    return resolve_paths(parse_experiment(doc, name), DEMO.parent)


def steady_rate(step_ends_s: list[float], batch: int, warmup: int) -> float:
    """Pairs per second at the median duration of the steps after ``warmup``."""
    steady = step_ends_s[warmup - 1 :]
    return batch / statistics.median(b - a for a, b in itertools.pairwise(steady))


@dataclass
class Rate:
    pairs_per_s: float
    flops: float = 0.0  # model FLOP/s (xling only)
    threads: int = 1  # torch threads of all processes together


def bench_xling(
    tmp: Path, name: str, steps: int, batch: int, warmup: int, workers: int, zero3: bool,
    model: str = "tiny", threads: int = 1,
) -> Rate:  # fmt: skip
    from mlflow import MlflowClient

    from xling.trainer.run import run_experiment

    exp = experiment(name, steps, batch, workers, zero3, model, threads)
    exp.spec.output_dir = str(tmp / "runs")
    uri = f"sqlite:///{tmp}/mlflow.db"
    result = run_experiment(exp, tracking_uri=uri)
    client = MlflowClient(uri)
    history = sorted(client.get_metric_history(result.run_id, "train/loss"), key=lambda m: m.step)
    # logEvery 1: each logged tokens/s is one step's real tokens (all ranks) over its time
    tokens = sorted(client.get_metric_history(result.run_id, "train/tokens_per_s"), key=lambda m: m.step)
    tokens_per_s = statistics.median(m.value for m in tokens[warmup:]) if model == "e5-small" else 0.0
    return Rate(steady_rate([m.timestamp / 1000 for m in history], batch, warmup),
                tokens_per_s * flops_per_token(exp), workers * threads)  # fmt: skip


def flops_per_token(exp: Any) -> float:
    """(2N + 4 N_trainable) of the experiment's model, as the trainer's MFU counts it (trainer/capacity/flops.py)."""
    from xling.trainer.capacity.flops import count_dense_params
    from xling.trainer.driver import prepare_data, resolve_model
    from xling.trainer.model import BiEncoder, load_backbone

    path = resolve_model(exp.spec, prepare_data(exp))
    model = BiEncoder(load_backbone(path, exp.spec.model))
    return 2 * count_dense_params(model) + 4 * count_dense_params(model, trainable_only=True)


def bench_sentence_transformers(
    tmp: Path, steps: int, batch: int, warmup: int, model: str = "tiny", threads: int = 1
) -> Rate:
    import torch
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from sentence_transformers.losses import MultipleNegativesRankingLoss
    from sentence_transformers.models import Normalize, Pooling, Transformer
    from sentence_transformers.training_args import SentenceTransformerTrainingArguments
    from transformers import TrainerCallback

    from xling.trainer.driver import prepare_data, resolve_model
    from xling.trainer.sampling import build_sampler
    from xling.trainer.train_loop import batch_texts

    exp = experiment("st", steps, batch, 1, False, model, threads)
    spec = exp.spec
    prepared = prepare_data(exp)
    model_path = resolve_model(spec, prepared)
    corpus = prepared.corpus
    sampler = build_sampler(corpus.index, batch, spec.sampling)
    anchors, positives = [], []
    for step in range(steps):
        queries, passages, _, _ = batch_texts(corpus, sampler.plan(step), 0, 1, 0)
        anchors += [spec.model.query_prefix + q for q in queries]
        positives += [spec.model.passage_prefix + p for p in passages]
    # one max length for both sides: queries get maxPassageLength too (few reach maxQueryLength)
    encoder = Transformer(
        model_path, max_seq_length=max(spec.model.max_query_length, spec.model.max_passage_length)
    )
    if spec.model.freeze_embeddings:
        encoder.auto_model.get_input_embeddings().weight.requires_grad_(False)
    st_model = SentenceTransformer(
        modules=[encoder, Pooling(encoder.get_embedding_dimension(), "mean"), Normalize()]
    )

    ends: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            ends.append(time.time())

    opt = spec.optimization
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp / "st"), per_device_train_batch_size=batch, max_steps=steps,
        learning_rate=opt.learning_rate, weight_decay=opt.weight_decay, warmup_steps=opt.warmup_steps,
        save_strategy="no", report_to=[], logging_steps=10**6, use_cpu=True, dataloader_drop_last=True, seed=0,
    )  # fmt: skip
    trainer = SentenceTransformerTrainer(
        model=st_model, args=args, train_dataset=Dataset.from_dict({"anchor": anchors, "positive": positives}),
        loss=MultipleNegativesRankingLoss(st_model, scale=1 / spec.loss.temperature), callbacks=[Clock()],
    )  # fmt: skip
    torch.set_num_threads(threads)  # sentence-transformers runs in this process
    trainer.train()
    return Rate(steady_rate(ends, batch, warmup), threads=threads)


def measure_peaks(peaks: dict[int, float] | None = None, tries: int = 3) -> dict[int, float]:
    """The CPU peak the trainer's MFU divides by (trainer/capacity/flops.py ``cpu_peak_flops``) at 1 and 2 threads:
    the best of ``tries`` fresh probes and of ``peaks`` measured before (another process only lowers it)."""
    from xling.trainer.capacity.flops import cpu_peak_flops

    best = dict(peaks or {})
    for t in (1, 2):
        for _ in range(tries):  # not the cached value: measure now
            best[t] = max(best.get(t, 0.0), cpu_peak_flops.__wrapped__(t))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["tiny", "e5-small"], default="tiny")
    parser.add_argument("--steps", type=int, help="steps per run (tiny 60, e5-small 16)")
    parser.add_argument("--warmup", type=int, help="steps not timed (tiny 8, e5-small 4)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--only", help="comma-separated run names (substrings) to run, e.g. 'xling 1 worker'")
    args = parser.parse_args()
    e5 = args.model == "e5-small"
    steps = args.steps or (16 if e5 else 60)
    warmup = args.warmup or (4 if e5 else 8)
    from xling.trainer.driver import LOCAL_ENV

    extensions = str(ROOT / ".cache" / "torch_extensions")
    for key, value in {
        **LOCAL_ENV,
        "TORCH_EXTENSIONS_DIR": extensions,
        "XLING_CACHE": str(ROOT / ".cache"),
    }.items():
        os.environ.setdefault(key, value)  # before Ray starts: its workers inherit them
    import ray
    import torch

    torch.set_num_threads(1)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    common = (steps, args.batch, warmup)
    Bench = Callable[[Path], Rate]
    if e5:
        runs: dict[str, Bench] = {
            "sentence-transformers 1 process x 2 threads": lambda tmp: bench_sentence_transformers(
                tmp, *common, model="e5-small", threads=2
            ),
            "xling 1 worker x 2 threads": lambda tmp: bench_xling(
                tmp, "bench-e5-1w2t", *common, workers=1, zero3=False, model="e5-small", threads=2
            ),
            "xling 2 workers x 1 thread all-reduce": lambda tmp: bench_xling(
                tmp, "bench-e5-2w1t", *common, workers=2, zero3=False, model="e5-small", threads=1
            ),
            "xling 1 worker x 1 thread": lambda tmp: bench_xling(
                tmp, "bench-e5-1w1t", *common, workers=1, zero3=False, model="e5-small", threads=1
            ),
        }
    else:
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
    if args.only:
        wanted = [w.strip() for w in args.only.split(",")]
        runs = {k: v for k, v in runs.items() if any(w in k for w in wanted)}
    peaks: dict[int, float] = {}
    rates: dict[str, Rate] = {}
    loads: list[float] = []
    with tempfile.TemporaryDirectory() as d:
        for i, (name, bench) in enumerate(list(runs.items()) * args.repeats):
            tmp = Path(d) / str(i)
            tmp.mkdir()
            loads.append(os.getloadavg()[0])
            if e5:
                peaks = measure_peaks(peaks)
            rate = bench(tmp)
            print(f"round {i // len(runs)}: {name}: {rate.pairs_per_s:.2f} pairs/s, "
                  f"{rate.flops / 1e9:.1f} GFLOP/s, load {loads[-1]:.2f}", flush=True)  # fmt: skip
            if name not in rates or rate.pairs_per_s > rates[name].pairs_per_s:
                rates[name] = rate
    ray.shutdown()
    if e5:
        peaks = measure_peaks(peaks)
    print(f"\nmodel {args.model}, batch {args.batch}, {steps} steps ({warmup} warm-up), best of {args.repeats}, "
          f"load average 1 min at the runs' starts {min(loads):.2f}-{max(loads):.2f}")  # fmt: skip
    if e5:
        print("  CPU peak (cpu_peak_flops): " + ", ".join(f"{t} thread{'s' * (t > 1)} {p / 1e9:.1f} GFLOP/s"
                                                           for t, p in peaks.items()))  # fmt: skip
    for name, rate in rates.items():
        line = f"  {name:44s} {rate.pairs_per_s:8.2f} pairs/s"
        if rate.flops:
            line += f"  {rate.flops / 1e9:6.1f} GFLOP/s = {rate.flops / peaks[rate.threads]:5.1%} of the {rate.threads}-thread peak"
        print(line)
    names = list(rates)
    if e5:
        pairs = [("xling 1 worker x 2 threads", "sentence-transformers 1 process x 2 threads"),
                 ("xling 2 workers x 1 thread all-reduce", "xling 1 worker x 2 threads")]  # fmt: skip
    else:
        pairs = [("xling 1 worker", "sentence-transformers 1 process"), ("xling 2 workers ZeRO-3", "xling 1 worker"),
                 ("xling 2 workers all-reduce", "xling 1 worker")]  # fmt: skip
    for a, b in pairs:
        if a in names and b in names:
            print(f"  {a} / {b}: {rates[a].pairs_per_s / rates[b].pairs_per_s:.2f}x")


if __name__ == "__main__":
    main()
