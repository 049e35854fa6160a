"""``xling plan FILE``: print the capacity plan (or its JSON); exit 1 when it does not fit."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from typing import Any

from xling.api.spec.loading import load_experiment
from xling.trainer.capacity.check import cpu_plan
from xling.trainer.capacity.estimate import make_plan
from xling.trainer.capacity.table import format_plan


def _plan_cmd(args: argparse.Namespace) -> int:
    exp = load_experiment(args.file)
    spec = exp.spec
    cpu = not args.gpus and not spec.distributed.gpus_per_worker  # a CPU spec, planned as it would run here
    gpus = args.gpus or spec.distributed.num_workers * max(spec.distributed.gpus_per_worker, 1)
    plan = cpu_plan(spec) if cpu else make_plan(spec, gpus, args.gpu_mem, mfu=args.mfu, peak_tflops=args.peak_tflops,
                                                gpus_per_node=args.gpus_per_node)  # fmt: skip
    print(json.dumps(asdict(plan), indent=2) if args.json else format_plan(plan, args.file, cpu=cpu))
    return 0 if plan.fits else 1


def add_cli(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "plan", help="memory, FLOPs and step time of an experiment on N GPUs (no GPU needed)"
    )
    p.add_argument("file")
    p.add_argument("--gpus", type=int, help="total GPUs (default: numWorkers x gpusPerWorker)")
    p.add_argument("--gpu-mem", type=float, default=80.0, help="memory per GPU, GiB (default 80: H100)")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument(
        "--mfu", type=float, default=0.4, help="fraction of peak the executed FLOPs reach (default 0.4)"
    )
    p.add_argument(
        "--peak-tflops", type=float, default=989.0, help="dense bf16 peak per GPU (default: H100 SXM)"
    )
    p.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    p.set_defaults(func=_plan_cmd)
