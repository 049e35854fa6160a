"""Where a demo training step's time goes, and what length buckets and attention dropout cost.

Builds the real ``Trainer`` in this process (rank 0 of 1, no Ray) on manifests/samples/demo.yaml
(multilingual-e5-small, frozen word embeddings, maxQueryLength 32 / maxPassageLength 128, batch 32,
MLQA) and times its ``train_step`` under variants that alternate step by step (the order reversed
every round), so a load that comes and goes on a shared machine hits every variant alike:

    pad         the padded batch in one forward (the default: model.lengthBuckets off)
    bucket      length buckets on CPU (model.lengthBuckets, trainer/model.py)
    noattndrop  bucket, and attention-probability dropout 0 (an experiment: not what the demo trains)
    nodrop      bucket, and no dropout at all (an experiment)

Each step's rate is model FLOP/s ((2N + 4 N_trainable) per real token, as the trainer's MFU) over
``cpu_peak_flops`` at the same thread count, probed before and after (the best counts). CPU seconds
are printed too: under load they move less than wall time. ``--profile`` adds a torch.profiler table of
two steps of the first variant.

    python bench/profile_step.py [--threads 2] [--rounds 3] [--variants pad,bucket,noattndrop] [--profile]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", default="pad,bucket,noattndrop")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("XLING_CACHE", str(ROOT / ".cache"))
    import torch

    from xling.api.spec.loading import load_experiment
    from xling.trainer.capacity.flops import cpu_peak_flops
    from xling.trainer.driver import prepare_data, resolve_model
    from xling.trainer.job import Job
    from xling.trainer.train_loop import Trainer

    exp = load_experiment(ROOT / "manifests" / "samples" / "demo.yaml")
    exp.spec.distributed.cpus_per_worker = args.threads
    exp.spec.evaluation.suites = []
    prepared = prepare_data(exp)
    path = resolve_model(exp.spec, prepared)
    trainer = Trainer(Job(exp.spec, prepared.location, path), rank=0, world=1)
    backbone = trainer.model.backbone
    dropouts = [m for m in backbone.modules() if isinstance(m, torch.nn.Dropout)]
    attention = [m.dropout for m in backbone.modules() if type(m).__name__.endswith("SelfAttention")]

    def use(variant: str) -> None:
        trainer.model.length_buckets = variant != "pad"
        for m in dropouts:
            m.p = 0.0 if variant == "nodrop" else 0.1
        for m in attention:
            m.p = 0.0 if variant in ("noattndrop", "nodrop") else 0.1

    variants = args.variants.split(",")
    flops_per_token = 2 * trainer.dense_params + 4 * trainer.trainable_params
    peak = max(cpu_peak_flops.__wrapped__(args.threads) for _ in range(3))
    wall: dict[str, list[float]] = {v: [] for v in variants}
    rate: dict[str, list[float]] = {v: [] for v in variants}
    per_cpu_s: dict[str, list[float]] = {v: [] for v in variants}
    step, loads = 0, []
    use("bucket")
    trainer.train_step(step)  # warm-up: allocations, kernel choice
    step += 1
    for r in range(args.rounds):
        for v in variants if r % 2 == 0 else variants[::-1]:
            use(v)
            loads.append(os.getloadavg()[0])
            c, t = time.process_time(), time.perf_counter()
            tokens = trainer.train_step(step).tokens
            dt, dc = time.perf_counter() - t, time.process_time() - c
            step += 1
            wall[v].append(dt)
            rate[v].append(tokens * flops_per_token / dt)
            per_cpu_s[v].append(tokens * flops_per_token / dc)
            print(
                f"round {r} {v:10s} {dt:6.2f} s ({dc:6.2f} CPU s), {tokens} tokens, load {loads[-1]:.2f}",
                flush=True,
            )
    peak = max(peak, *(cpu_peak_flops.__wrapped__(args.threads) for _ in range(3)))
    print(
        f"\n{args.threads} threads, {args.rounds} rounds, load average (1 min) {min(loads):.2f}-{max(loads):.2f}"
    )
    print(f"  peak (cpu_peak_flops, best of 6 probes): {peak / 1e9:.1f} GFLOP/s")
    for v in variants:
        med = statistics.median(rate[v])
        print(f"  {v:10s} step {statistics.median(wall[v]):6.2f} s  {med / 1e9:6.1f} GFLOP/s = {med / peak:5.1%} of "
              f"peak (best {max(rate[v]) / peak:5.1%}); {statistics.median(per_cpu_s[v]) / 1e9:.1f} GFLOP per CPU s")  # fmt: skip
    base = variants[0]
    for v in variants[1:]:
        ratios = [a / b for a, b in zip(wall[base], wall[v], strict=True)]
        print(f"  {base} / {v} step time, median over rounds: {statistics.median(ratios):.3f}")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        use(variants[0])
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for s in range(step, step + 2):
                trainer.train_step(s)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))


if __name__ == "__main__":
    main()
