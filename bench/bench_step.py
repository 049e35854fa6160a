"""xling's training step against its own references, on the same batches: where does xling's step lose time?

Every case trains the same model (same weights on disk) on the same batches: xling's ``Trainer`` reads
and tokenises them (its sampler, its prefetch thread), and the references get exactly those tensors. A
case runs 3 warm-up and 10 timed steps (``--warmup``, ``--steps``); pairs/s is the batch over the mean
timed step, MFU counts (2N + 4N_trainable) FLOPs per token slot computed, padding included, over this
device's peak (``plan.peak_flops``: the GPU table, or the CPU probe). Cases:

    ref-amp      plain PyTorch: fp32 master weights, bf16 autocast (fp32 without ``--precision bf16``),
                 mean pooling, L2 normalisation and InfoNCE over the in-batch passages in fp32,
                 gradient clipping at 1, AdamW (fused on CUDA)
    ref-bf16     the same with bf16 weights (``--precision bf16`` only)
    ds-zero2     raw DeepSpeed ZeRO-2 around the same model and step (torch AdamW as client optimizer)
    ds-zero3     raw DeepSpeed ZeRO-3
    xling-torch  xling's Trainer.train_step without DeepSpeed (its TorchEngine)
    xling-auto   xling with distributed.deepspeed.stage: auto (the plan's choice on this device)
    xling-zero3  xling with ZeRO-3 forced

It prints one line per case (step time, pairs/s, MFU, the plan's predicted step, first and last loss),
then xling/reference ratios of pairs/s: xling-torch/ref-amp (the loop's own cost), xling-auto/ref-bf16
(issue 26's target: >= 0.85 at batch 256 on the GPU), xling-zero3/ds-zero3 (>= 0.9; at batch 64 xling
adds at most 10 %). ``--rounds 2`` repeats the cases in reversed order and reports the median ratio,
so a load that comes and goes on a shared machine hits both sides alike.

    python bench/bench_step.py --mode cpu                 # tiny random BERT, batch 8: runs anywhere (~1 min)
    python bench/bench_step.py --mode gpu --batch 64 256  # the 1.28B bench encoder (bench/gpu_checks.py), bf16
    python bench/bench_step.py --mode gpu --model e5-small --batch 32 512

The plan's step time is its GPU model (``xling plan``: H100/H200 constants); on a CPU it is printed
for completeness only.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CASES = ("ref-amp", "ref-bf16", "ds-zero2", "ds-zero3", "xling-torch", "xling-auto", "xling-zero3")
#: (numerator, denominator) of the printed ratios
RATIOS = (("xling-torch", "ref-amp"), ("xling-auto", "ref-bf16"), ("xling-auto", "ref-amp"),
          ("xling-zero3", "ds-zero3"), ("xling-auto", "ds-zero2"))  # fmt: skip
TEMPERATURE, MAX_GRAD_NORM, LR = 0.05, 1.0, 1e-5


def _gpu_checks() -> Any:
    spec = importlib.util.spec_from_file_location("gpu_checks", ROOT / "bench" / "gpu_checks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def spec_doc(
    mode: str, model: str, batch: int, precision: str, stage: int | str | None, output_dir: str
) -> dict[str, Any]:
    """The experiment every case shares: MLQA (GPU mode, queries 32 / passages 128 tokens) or the bundled
    NTREX sample (CPU mode, 16 / 32), in-batch negatives only, no evaluation."""
    gpu = mode == "gpu"
    source = (
        {"type": "mlqa", "path": str(ROOT / "data/demo/mlqa-test-gxlt"), "sides": "both"}
        if gpu
        else {"type": "ntrex", "path": str(ROOT / "data/demo/ntrex-128"), "maxPairsPerLanguage": 128}
    )
    distributed: dict[str, Any] = {"numWorkers": 1, "gpusPerWorker": int(gpu), "precision": precision}
    if stage is not None:
        distributed["deepspeed"] = {"stage": stage}
    return {
        "apiVersion": "xling.io/v1alpha1",
        "kind": "RetrievalExperiment",
        "metadata": {"name": "bench-step"},
        "spec": {
            "model": {"name": model, "pooling": "mean", "maxQueryLength": 32 if gpu else 16,
                      "maxPassageLength": 128 if gpu else 32},
            "data": {"languages": ["de", "es", "vi", "zh"] if gpu else ["de", "en"], "sources": [source]},
            "sampling": {"strategy": "hybrid", "seed": 0},
            "loss": {"temperature": TEMPERATURE},
            "optimization": {"globalBatchSize": batch, "maxSteps": 1000, "learningRate": LR, "warmupSteps": 0,
                             "maxGradNorm": MAX_GRAD_NORM, "weightDecay": 0.0, "logEvery": 1000},
            "distributed": distributed,
            "evaluation": {"suites": []},
            "outputDir": output_dir,  # the prepared corpus
        },
    }  # fmt: skip


# ------------------------------------------------------------------------------------------ the references


def info_nce_fp32(q: Any, p: Any) -> Any:
    """Mean-pooled embeddings in, in-batch InfoNCE out; normalisation, logits and cross-entropy in fp32."""
    import torch
    import torch.nn.functional as F

    q, p = F.normalize(q.float(), dim=-1), F.normalize(p.float(), dim=-1)
    return F.cross_entropy(q @ p.T / TEMPERATURE, torch.arange(len(q), device=q.device))


def mean_pool(hidden: Any, mask: Any) -> Any:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden.float() * m).sum(1) / m.sum(1).clamp(min=1)


class Reference:
    """Plain PyTorch (``engine`` None) or raw DeepSpeed around a Hugging Face encoder."""

    def __init__(self, model_dir: str, device: Any, dtype: Any, autocast: bool, zero: int | None):
        import torch
        from transformers import AutoModel

        self.device, self.autocast = device, autocast
        model = AutoModel.from_pretrained(model_dir, dtype=dtype, add_pooling_layer=False).to(device).train()
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=LR, weight_decay=0.0, fused=device.type == "cuda"
        )
        self.engine = None
        if zero is not None:
            import deepspeed

            config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                      "bf16": {"enabled": dtype == torch.bfloat16 or autocast},
                      "zero_optimization": {"stage": zero}, "gradient_clipping": MAX_GRAD_NORM,
                      "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}  # fmt: skip
            self.engine, _, _, _ = deepspeed.initialize(
                model=model.float(), optimizer=optimizer, config=config
            )
            self.autocast = False  # DeepSpeed's bf16 mode holds bf16 weights and fp32 master copies itself
            model = self.engine.module
        self.model, self.optimizer = model, optimizer

    def encode(self, x: dict[str, Any]) -> Any:
        import torch

        run = self.engine or self.model
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return mean_pool(run(**x).last_hidden_state, x["attention_mask"])

    def step(self, batch: Any) -> Any:
        import torch

        cuda = self.device.type == "cuda"
        q_in, p_in = ({k: v.to(self.device, non_blocking=cuda) for k, v in x.items()}
                      for x in (batch.queries, batch.passages))  # fmt: skip
        loss = info_nce_fp32(self.encode(q_in), self.encode(p_in))
        if self.engine is not None:
            self.engine.backward(loss)
            self.engine.step()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), MAX_GRAD_NORM)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


# ------------------------------------------------------------------------------------------ timing


@dataclass
class Result:
    case: str
    batch: int
    step_s: float
    pairs_per_s: float
    mfu: float
    plan_step_s: float | None
    loss_first: float
    loss_last: float
    detail: str = ""


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(step: Callable[[int], Any], warmup: int, steps: int) -> tuple[float, list[float]]:
    """Mean seconds of the timed steps (warm-up steps first, untimed), and every step's loss."""
    losses = [step(i) for i in range(warmup)]
    sync()
    t0 = time.perf_counter()
    losses += [step(i) for i in range(warmup, warmup + steps)]
    sync()
    return (time.perf_counter() - t0) / steps, [float(x) for x in losses]


def free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def init_single_process() -> None:
    """torch.distributed for one rank, as DeepSpeed needs (gloo on CPU, NCCL on a GPU)."""
    import torch

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port))
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


class Bench:
    """One model and batch size: the shared batches, then every case in turn."""

    def __init__(self, args: argparse.Namespace, model: str, batch: int):
        import torch

        from xling.api.spec.loading import parse_experiment
        from xling.trainer.capacity.flops import peak_flops
        from xling.trainer.driver import prepare_data, resolve_model

        self.args, self.batch = args, batch
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.exp = lambda stage: parse_experiment(
            spec_doc(args.mode, model, batch, args.precision, stage, args.output_dir), "b"
        )
        exp = self.exp(None)
        prepared = prepare_data(exp)
        self.model_path = resolve_model(exp.spec, prepared)
        self.data = prepared.location
        self.peak = peak_flops()
        self.n = args.warmup + args.steps
        self.batches = None  # read by the first xling case, the references reuse them

    def trainer(self, stage: int | str | None) -> Any:
        from xling.trainer.job import Job
        from xling.trainer.train_loop import Trainer

        return Trainer(Job(self.exp(stage).spec, self.data, self.model_path), rank=0, world=1)

    def flops_per_token(self, model: Any) -> tuple[int, int]:
        from xling.trainer.capacity.flops import count_dense_params

        return count_dense_params(model), count_dense_params(model, trainable_only=True)

    def plan_s(self, spec: Any) -> tuple[float | None, str]:
        """The plan's step time of ``spec`` on this device (before any model is built: a live ZeRO-3
        config would partition the plan's meta-device model too)."""
        import torch

        from xling.trainer.capacity.estimate import make_plan
        from xling.trainer.capacity.shapes import model_shape

        if self.device.type == "cuda":
            gpu_mem = torch.cuda.get_device_properties(0).total_memory / 2**30
        else:
            gpu_mem = self.args.gpu_mem
        try:
            shape = model_shape(self.model_path)  # stage auto: the plan of the stage it picks
            return make_plan(spec, 1, gpu_mem, peak_tflops=self.peak / 1e12, shape=shape).step_time_s, ""
        except (ValueError, OSError) as err:  # the plan needs the model's shape: say why it is missing
            return None, f" (no plan: {err})"

    def result(self, case: str, step_s: float, losses: list[float], params: tuple[int, int],
               plan: tuple[float | None, str], detail: str) -> Result:  # fmt: skip
        from xling.trainer.capacity.flops import model_flops_utilization

        slots = statistics.mean(b.slots for b in self.batches)
        mfu = model_flops_utilization(params[0], slots, step_s, self.peak, params[1])
        return Result(case, self.batch, step_s, self.batch / step_s, mfu, plan[0], losses[0], losses[-1],
                      detail + plan[1])  # fmt: skip

    def run(self, case: str) -> Result:
        import torch

        from xling.trainer.optim_engine import rank_seed

        if case.startswith("xling"):
            stage = {"xling-torch": None, "xling-auto": "auto", "xling-zero3": 3}[case]
            plan = self.plan_s(self.exp(stage).spec)
            tr = self.trainer(stage)  # seeds torch as rank 0 does
            if self.batches is None:
                self.batches = [tr.read_batch(i) for i in range(self.n)]
            step_s, losses = timed(lambda i: tr.train_step(i).loss, self.args.warmup, self.args.steps)
            ds = tr.spec.distributed.deepspeed
            detail = "no DeepSpeed" if ds is None else f"ZeRO-{ds.stage}"
            out = self.result(case, step_s, losses, (tr.dense_params, tr.trainable_params), plan, detail)
            tr.batches.close()
            del tr
            free()
            return out
        zero = {"ds-zero2": 2, "ds-zero3": 3}.get(case)
        plan = self.plan_s(self.exp(zero).spec)
        if self.batches is None:
            reader = self.trainer(None)
            self.batches = [reader.read_batch(i) for i in range(self.n)]
            reader.batches.close()
            del reader
            free()
        bf16 = self.args.precision == "bf16"
        dtype = torch.bfloat16 if case == "ref-bf16" else torch.float32
        ref = Reference(self.model_path, self.device, dtype, autocast=bf16 and case == "ref-amp", zero=zero)
        torch.manual_seed(rank_seed(0, 0))  # the dropout stream xling's rank 0 draws from
        step_s, losses = timed(lambda i, r=ref: r.step(self.batches[i]), self.args.warmup, self.args.steps)
        detail = {"ref-amp": "fp32 master" + (" + bf16 autocast" if bf16 else ""), "ref-bf16": "bf16 weights",
                  "ds-zero2": "raw DeepSpeed ZeRO-2", "ds-zero3": "raw DeepSpeed ZeRO-3"}[case]  # fmt: skip
        out = self.result(case, step_s, losses, self.flops_per_token(ref.model), plan, detail)
        del ref
        free()
        return out


def cases(args: argparse.Namespace) -> list[str]:
    chosen = [c for c in args.cases.split(",") if c]
    unknown = set(chosen) - set(CASES)
    if unknown:
        raise SystemExit(f"--cases: unknown {sorted(unknown)}; known: {', '.join(CASES)}")
    if args.precision != "bf16":
        chosen = [c for c in chosen if c != "ref-bf16"]
    # ZeRO-3 last: a live ZeRO-3 config makes transformers build later models partitioned
    return sorted(chosen, key=lambda c: c.endswith("zero3"))


def ratio_lines(rounds: list[dict[str, Result]]) -> list[str]:
    lines = []
    for num, den in RATIOS:
        vals = [r[num].pairs_per_s / r[den].pairs_per_s for r in rounds if num in r and den in r]
        if vals:
            lines.append(
                f"  {num} / {den}: {statistics.median(vals):.3f} (pairs/s; median of {len(vals)} round(s))"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument(
        "--model", default=None, help="cpu: xling/tiny-random; gpu: bench (1.28B) or e5-small"
    )
    parser.add_argument("--batch", type=int, nargs="+", default=None)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default=None, help="cpu: fp32; gpu: bf16")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="torch threads on CPU")
    parser.add_argument("--gpu-mem", type=float, default=141.0, help="GiB per GPU for the plan on a CPU")
    parser.add_argument("--work", default=None, help="where the bench model is built (gpu mode)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--output-dir", default=str(Path(tempfile.gettempdir()) / "xling-bench-step"),
                        help="where the prepared corpus goes")  # fmt: skip
    args = parser.parse_args(argv)
    gpu = args.mode == "gpu"
    args.precision = args.precision or ("bf16" if gpu else "fp32")
    args.batch = args.batch or ([64, 256] if gpu else [8])
    os.environ.setdefault("XLING_CACHE", str(ROOT / ".cache"))
    init_single_process()
    import torch

    if gpu and not torch.cuda.is_available():
        print("bench_step: --mode gpu needs a CUDA GPU")
        return 2
    if not gpu:
        torch.set_num_threads(args.threads)
    model = args.model or ("bench" if gpu else "xling/tiny-random")
    if model == "bench":
        gc_mod = _gpu_checks()
        work = Path(args.work or tempfile.mkdtemp(prefix="bench-step-"))
        model = str(gc_mod.build_big_model(work / "xlmr-1b", gc_mod.big_config()))
    elif model == "e5-small":
        model = "xling/multilingual-e5-small"
    chosen = cases(args)
    print(f"bench_step: {args.mode} mode, {torch.cuda.get_device_name() if gpu else 'CPU'}, model {model}, "
          f"{args.precision}, {args.warmup} warm-up + {args.steps} timed steps, cases {', '.join(chosen)}",
          flush=True)  # fmt: skip
    everything: list[dict[str, Any]] = []
    for batch in args.batch:
        bench = Bench(args, model, batch)
        rounds: list[dict[str, Result]] = []
        for r in range(args.rounds):
            order = chosen if r % 2 == 0 else sorted(chosen[::-1], key=lambda c: c.endswith("zero3"))
            rounds.append({})
            for case in order:
                res = bench.run(case)
                rounds[-1][case] = res
                everything.append(asdict(res))
                plan = f"{res.plan_step_s:.3f} s" if res.plan_step_s is not None else "-"
                fell = "fell" if res.loss_last < res.loss_first else "did not fall"
                print(f"batch {batch:4d} {case:12s} {res.step_s * 1e3:9.1f} ms/step {res.pairs_per_s:9.1f} pairs/s "
                      f"MFU {res.mfu:6.3f}  plan {plan} (measured/plan "
                      f"{res.step_s / res.plan_step_s if res.plan_step_s else float('nan'):.2f})  loss "
                      f"{res.loss_first:.4f} -> {res.loss_last:.4f} ({fell})  {res.detail}", flush=True)  # fmt: skip
        print(f"batch {batch}: xling / reference")
        print("\n".join(ratio_lines(rounds)), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(everything, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
