"""``xling plan FILE --gpus N --gpu-mem 80``: will this experiment fit, and how long will a step take?

Everything is arithmetic on the model's shape, so it runs before any worker starts and without a GPU:

- the model is instantiated on the ``meta`` device from its Hugging Face config (a local dir or the hub
  cache) or from a built-in table of known shapes, giving exact parameter counts and the largest layer;
- model states per GPU come from DeepSpeed's own estimators (the ones ``estimate_zero3_model_states_mem_
  needs_all_cold`` prints), activations from the transformer's saved tensors per token, plus the
  GradCache buffers, DeepSpeed's communication buckets and a fixed runtime overhead;
- FLOPs per step are 6N per token, 8N with GradCache, +2N with activation checkpointing (N: non-embedding
  parameters); step time is the slowest of those FLOPs at a stated fraction of peak, the host's kernel
  launches (small models are launch-bound) and ZeRO-3's per-module fetches and parameter traffic, plus
  the optimizer step's memory traffic (constants calibrated on issue 26's H200 measurements).

``check_fits`` is what ``xling run`` calls to refuse a run that cannot fit. The FLOP and peak helpers also
feed the trainer's per-step MFU metric.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

from xling.api.env import GPU_MEM_GB_ENV, PEAK_TFLOPS_ENV
from xling.api.errors import InputError
from xling.api.spec.base import DEMO_MODEL, TINY_MODEL
from xling.api.spec.experiment import ExperimentSpec, RetrievalExperiment
from xling.api.spec.loading import load_experiment

GiB = 2**30


def _shape(
    model_type: str, vocab: int, hidden: int, layers: int, heads: int, ffn: int, **extra: int
) -> tuple:
    kwargs = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads)
    return model_type, kwargs | {"intermediate_size": ffn, **extra}


_E5_SMALL = _shape("bert", 250037, 384, 12, 12, 1536)
_XLMR_LARGE = _shape("xlm-roberta", 250002, 1024, 24, 16, 4096, max_position_embeddings=514)
#: Shapes known without hub access: (model_type, config kwargs). ``xling/xlm-roberta-30b`` is the
#: hypothetical 30B XLM-R-shaped encoder of the design notes (no such checkpoint exists: plan-only, refused by
#: ``xling run`` and the operator, ``ModelSpec.plan_only``).
KNOWN_SHAPES: dict[str, tuple[str, dict[str, int]]] = {
    TINY_MODEL: _shape("bert", 2000, 32, 2, 2, 64),
    DEMO_MODEL: _E5_SMALL,
    "intfloat/multilingual-e5-small": _E5_SMALL,
    "intfloat/multilingual-e5-large": _XLMR_LARGE,
    "BAAI/bge-m3": _XLMR_LARGE,
    "facebook/xlm-roberta-xl": _shape(
        "xlm-roberta-xl", 250880, 2560, 36, 32, 10240, max_position_embeddings=514
    ),
    "facebook/xlm-roberta-xxl": _shape(
        "xlm-roberta-xl", 250880, 4096, 48, 32, 16384, max_position_embeddings=514
    ),
    # bench/gpu_checks.py's randomly initialised encoder, whose GPU step issue 26 measured
    "xling/xlm-roberta-1.3b-bench": _shape(
        "xlm-roberta", 32768, 2048, 24, 16, 8192, max_position_embeddings=514, type_vocab_size=1
    ),
    "xling/xlm-roberta-30b": _shape("xlm-roberta", 250002, 7168, 48, 56, 28672, max_position_embeddings=514),
    "intfloat/e5-mistral-7b-instruct": _shape("mistral", 32000, 4096, 32, 32, 14336, num_key_value_heads=8),
    "Qwen/Qwen3-Embedding-8B": _shape(
        "qwen3", 151665, 4096, 36, 32, 12288, num_key_value_heads=8, head_dim=128
    ),
    "Qwen/Qwen2.5-32B": _shape("qwen2", 152064, 5120, 64, 40, 27648, num_key_value_heads=8),
}
#: Dense bf16 peak per device, TFLOP/s (vendor figures; SXM parts).
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0,
                   "A6000": 155.0, "A10": 125.0}  # fmt: skip
#: (tokens, inputs, outputs) of the fp32 linear layers the CPU peak probe trains: encoder FFN shapes.
CPU_PROBE_SHAPES = ((1024, 1024, 1024), (1024, 768, 3072))
CPU_PROBE_REPEATS = 3
RUNTIME_OVERHEAD_GIB = 2.0  # CUDA context and NCCL per GPU
#: Step-time terms beyond FLOPs, calibrated on issue 26's H200 measurements (tests/trainer/test_plan.py
#: holds them): the host time to launch one transformer layer's kernels in one forward or backward pass
#: of eager PyTorch (e5-small: 75-84 ms a step at any batch, 12 layers x 4 passes); what one ZeRO-3
#: parameter fetch costs beyond its bytes (hooks, the gather's launch and its stream waits: raw DeepSpeed
#: ZeRO-3 took 0.76 s where ZeRO-2 took 0.29 s for the 1.28B bench model on one GPU, ~590 fetches a step);
#: and the optimizer step's memory traffic (fp32 master, two moments, gradient: read and written).
LAUNCH_S_PER_LAYER_PASS = 1.5e-3
ZERO3_FETCH_S = 1.4e-3
OPTIMIZER_BYTES_PER_PARAM = 36
HBM_GBS = 3000.0  # effective device-memory bandwidth of an H100/H200-class GPU (GB/s)
USABLE_FRACTION = 0.95  # allocator fragmentation: a plan that needs the last 5% will not run


class PlanError(InputError):
    """The experiment cannot fit on the stated hardware (raised before any worker starts): the user changes
    the field it names, or the hardware."""


# ------------------------------------------------------------------------------------------ model shape


@dataclass(frozen=True)
class ModelShape:
    name: str
    model_class: str
    total_params: int
    embedding_params: int  # lookups, no matmul FLOPs
    largest_layer_params: int  # the most parameters any one module owns (ZeRO-3 gathers it whole)
    hidden: int
    layers: int
    ffn: int
    gated_mlp: bool  # SwiGLU-style MLPs keep three ffn-wide tensors, not two
    module_params: tuple[
        int, ...
    ] = ()  # the direct parameters of each module that has any (ZeRO-3 fetch units)

    @property
    def dense_params(self) -> int:
        return self.total_params - self.embedding_params


def model_shape(name: str, revision: str | None = None, trust_remote_code: bool = False) -> ModelShape:
    """Exact counts from a config: the model is built on the meta device (no memory, no weights)."""
    import torch
    from transformers import AutoConfig, AutoModel

    if name in KNOWN_SHAPES:
        model_type, kwargs = KNOWN_SHAPES[name]
        config = AutoConfig.for_model(model_type, **kwargs)
    else:
        try:
            config = AutoConfig.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
        except OSError as err:
            known = ", ".join(sorted(KNOWN_SHAPES))
            raise InputError(
                None, f"model {name!r}: no config found offline ({err}); known shapes: {known}"
            ) from None
    with torch.device("meta"):
        model = AutoModel.from_config(config, trust_remote_code=trust_remote_code)
    embedding = sum(
        p.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()
    )
    sizes = [sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()]
    return ModelShape(
        name=name, model_class=type(model).__name__, total_params=sum(p.numel() for p in model.parameters()),
        embedding_params=embedding, largest_layer_params=max(sizes), hidden=config.hidden_size,
        layers=config.num_hidden_layers, ffn=config.intermediate_size,
        gated_mlp=getattr(config, "hidden_act", "") == "silu", module_params=tuple(n for n in sizes if n),
    )  # fmt: skip


# ------------------------------------------------------------------------------------------ FLOPs


def flops_per_token(dense_params: int, grad_cache: bool, checkpointing: bool) -> float:
    """Executed FLOPs per token: 2N forward + 4N backward, +2N for GradCache's extra no-grad forward and
    +2N for recomputing checkpointed activations (attention's seq-dependent term is < 1% here)."""
    return (6 + 2 * grad_cache + 2 * checkpointing) * dense_params


def _linear_step_flops(tokens: int, n_in: int, n_out: int, gen: Any) -> float:
    """Best FLOP/s over the timed repeats of one fp32 linear layer's forward and backward."""
    import torch

    x = torch.randn(tokens, n_in, generator=gen, requires_grad=True)
    w = torch.randn(n_out, n_in, generator=gen, requires_grad=True)
    grad = torch.randn(tokens, n_out, generator=gen)
    best = 0.0
    for rep in range(CPU_PROBE_REPEATS + 1):  # the first is a warm-up (allocation, kernel choice)
        t0 = time.perf_counter()
        torch.nn.functional.linear(x, w).backward(grad)
        if rep:
            best = max(best, 6 * tokens * n_in * n_out / (time.perf_counter() - t0))
    return best


@functools.cache
def cpu_peak_flops(threads: int) -> float:
    """The best FLOP/s of a training step of an fp32 linear layer (forward and both backward GEMMs,
    6·tokens·in·out FLOPs) on ``threads`` torch threads, measured once per process and thread count.

    A CPU has no datasheet figure to trust: a guessed per-core constant put MFU above 1. The probe is
    the most GEMM-bound work training does, so a real step (attention, norms, optimizer, tokenisation)
    reaches at most this rate. It draws from its own generator: the training RNG stream is untouched."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    try:
        with torch.inference_mode(False), torch.enable_grad():  # whatever mode the caller is in
            return max(_linear_step_flops(*shape, gen) for shape in CPU_PROBE_SHAPES)
    finally:
        torch.set_num_threads(previous)


def model_flops_utilization(
    dense_params: int, tokens: float, seconds: float, peak: float, trainable: int | None = None
) -> float:
    """MFU: model FLOPs per real token (2N forward, 4N backward over the ``trainable`` dense parameters:
    6N when all train; no recomputation counted) per second over ``peak`` FLOP/s. Frozen lower layers
    (``model.freezeLayers``) run no backward, so counting 6N for them would overstate the MFU."""
    backward = dense_params if trainable is None else trainable
    return (2 * dense_params + 4 * backward) * tokens / seconds / peak


def peak_flops() -> float:
    """This process's device peak in FLOP/s: ``XLING_PEAK_TFLOPS``, else the GPU table, else the CPU
    probe with the torch threads in use."""
    import torch

    if env := os.environ.get(PEAK_TFLOPS_ENV):
        return float(env) * 1e12
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        tflops = next((v for k, v in GPU_PEAK_TFLOPS.items() if k in name), GPU_PEAK_TFLOPS["A100"])
        return tflops * 1e12
    return cpu_peak_flops(torch.get_num_threads())


def count_dense_params(model: Any, trainable_only: bool = False) -> int:
    """Non-embedding parameters of a live model (ZeRO-3 partitioned ones counted at full size); with
    ``trainable_only``, those that get a gradient."""
    import torch

    embedding = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    return sum(
        getattr(p, "ds_numel", p.numel())
        for p in model.parameters()
        if id(p) not in embedding and (p.requires_grad or not trainable_only)
    )


# ------------------------------------------------------------------------------------------ the plan


@dataclass
class Plan:
    model: str
    model_class: str
    total_params: int
    dense_params: int
    largest_layer_params: int
    gpus: int
    gpus_per_node: int
    gpu_mem_gb: float
    zero_stage: int
    memory_breakdown_gb: dict[str, float]
    memory_per_gpu_gb: float
    host_memory_per_node_gb: float
    tokens_per_step: int
    flops_per_token: float
    flops_per_step: float
    compute_time_s: float
    launch_time_s: float
    allgather_gb_per_gpu: float
    zero3_fetches: int
    comm_time_s: float
    optimizer_time_s: float
    step_time_s: float
    mfu: float
    peak_tflops: float
    fits: bool
    notes: list[str]


#: The stages ``stage: auto`` tries, least sharded first (ZeRO-1 saves less than ZeRO-2 for the same traffic).
AUTO_STAGES = (0, 2, 3)


def make_plan(
    spec: ExperimentSpec,
    gpus: int,
    gpu_mem_gb: float,
    mfu: float = 0.4,
    peak_tflops: float = 989.0,
    gpus_per_node: int = 8,
    inter_node_gbs: float = 50.0,
    intra_node_gbs: float = 450.0,
    shape: ModelShape | None = None,
) -> Plan:
    """Memory per GPU, FLOPs and step time of ``spec`` on ``gpus`` devices of ``gpu_mem_gb`` GiB each.

    With ``distributed.deepspeed.stage: auto`` the plan is that of the least-sharded stage of
    :data:`AUTO_STAGES` that fits (sharding costs time: ZeRO-3 re-gathers every layer in every forward
    and backward, 2.6x ZeRO-2's step for the 1.28B bench model on one H200), with a note that says why;
    if none fits, that of ZeRO-3, which does not fit."""
    shape = shape or model_shape(spec.model.name, spec.model.revision, spec.model.trust_remote_code)
    args = (gpus, gpu_mem_gb, mfu, peak_tflops, gpus_per_node, inter_node_gbs, intra_node_gbs, shape)
    ds = spec.distributed.deepspeed
    if ds is None or ds.stage != "auto":
        return _stage_plan(spec, ds.stage if ds else -1, *args)
    # optimizer offload needs a ZeRO stage >= 1
    stages = [s for s in AUTO_STAGES if s > 0 or ds.offload_optimizer.device == "none"]
    plans = [_stage_plan(spec, s, *args) for s in stages]
    chosen = next((p for p in plans if p.fits), plans[-1])
    usable = USABLE_FRACTION * gpu_mem_gb
    tried = ", ".join(f"ZeRO-{p.zero_stage} {p.memory_per_gpu_gb:.1f} GiB" for p in plans)
    if chosen.fits:
        why = (
            "the least-sharded stage that fits" if chosen is plans[0] else "the less-sharded ones do not fit"
        )
        chosen.notes.insert(
            0, f"stage auto: ZeRO-{chosen.zero_stage}, {why} ({tried}; {usable:.1f} GiB usable)"
        )
    else:
        chosen.notes.insert(0, f"stage auto: no stage fits ({tried}; {usable:.1f} GiB usable)")
    return chosen


def resolve_stage(spec: ExperimentSpec, plan: Plan) -> ExperimentSpec:
    """``spec`` with ``stage: auto`` replaced by the stage ``plan`` chose (the spec itself otherwise);
    refuses (PlanError naming the field) a spec that fits at no stage."""
    ds = spec.distributed.deepspeed
    if ds is None or ds.stage != "auto":
        return spec
    if not plan.fits:
        raise PlanError(
            None,
            f"auto: the experiment fits at no ZeRO stage on {plan.gpus} GPU(s) "
            f"of {plan.gpu_mem_gb:g} GiB\n" + format_plan(plan, spec.model.name),
            field="distributed.deepspeed.stage",
        )
    distributed = spec.distributed.model_copy(
        update={"deepspeed": ds.model_copy(update={"stage": plan.zero_stage})}
    )
    return spec.model_copy(update={"distributed": distributed})


def _stage_plan(
    spec: ExperimentSpec,
    stage: int,
    gpus: int,
    gpu_mem_gb: float,
    mfu: float,
    peak_tflops: float,
    gpus_per_node: int,
    inter_node_gbs: float,
    intra_node_gbs: float,
    shape: ModelShape,
) -> Plan:
    """make_plan at one ZeRO stage (-1: no DeepSpeed)."""
    dist, ds, loss, opt = spec.distributed, spec.distributed.deepspeed, spec.loss, spec.optimization
    per_node = min(gpus, gpus_per_node)
    nodes = math.ceil(gpus / per_node)
    n, notes = shape.total_params, []
    offload_opt = bool(ds and ds.offload_optimizer.device != "none")
    offload_param = bool(ds and ds.offload_param.device != "none")

    # model states (bytes per GPU, host bytes per node)
    if stage >= 1:
        with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed logs to stdout on import: keep it for --json
            from deepspeed.runtime.zero import stage3, stage_1_and_2
    if stage == 3:
        host, states, _ = stage3.estimate_zero3_model_states_mem_needs(
            n,
            shape.largest_layer_params,
            per_node,
            nodes,
            cpu_offload=offload_opt,
            cpu_offload_params=offload_param,
        )
    elif stage in (1, 2):
        host, states = stage_1_and_2.estimate_zero2_model_states_mem_needs(
            n, per_node, nodes, cpu_offload=offload_opt
        )
    else:  # replicated: fp32 AdamW (params, grads, two moments) or DeepSpeed's mixed precision (+ 16-bit copy)
        host, states = 0, (18 if stage == 0 else 16) * n

    # activations of the largest graph alive at once
    act_bytes = 2 if dist.precision == "bf16" else 4
    per_gpu_batch = opt.global_batch_size // gpus
    texts = 1 + loss.hard_negatives  # passages per query
    q_len, p_len = spec.model.max_query_length, spec.model.max_passage_length
    if loss.grad_cache.enabled:
        chunk = min(loss.grad_cache.chunk_size, per_gpu_batch)
        graph_tokens = chunk * max(q_len, p_len)
    else:
        graph_tokens = per_gpu_batch * (q_len + texts * p_len)
    mlp_tensors = 3 if shape.gated_mlp else 2
    layer_bytes_per_token = (
        9 * shape.hidden + mlp_tensors * shape.ffn
    ) * act_bytes  # saved tensors, flash attention
    if dist.activation_checkpointing:
        activations = graph_tokens * (shape.layers * shape.hidden * act_bytes + layer_bytes_per_token)
    else:
        activations = graph_tokens * shape.layers * layer_bytes_per_token
    # embeddings, their gradients and the logits of the global-batch loss (fp32)
    local, candidates = per_gpu_batch * (1 + texts), opt.global_batch_size * texts
    loss_bytes = 4 * (2 * local * shape.hidden + 3 * per_gpu_batch * candidates)
    buffers = (
        (ds.reduce_bucket_size + (ds.prefetch_bucket_size if stage == 3 else 0)) * act_bytes
        if stage >= 1
        else 0
    )
    breakdown = {"model_states": states, "activations": activations, "loss_and_cache": loss_bytes,
                 "comm_buffers": buffers, "runtime": RUNTIME_OVERHEAD_GIB * GiB}  # fmt: skip
    total = sum(breakdown.values())

    # time: compute, kernel launches and ZeRO-3 fetches overlap (the slowest sets the pace), then the
    # optimizer step
    tokens = opt.global_batch_size * (q_len + texts * p_len)
    fpt = flops_per_token(shape.dense_params, loss.grad_cache.enabled, dist.activation_checkpointing)
    flops = fpt * tokens
    compute_s = flops / (gpus * peak_tflops * 1e12 * mfu)
    if loss.grad_cache.enabled:  # per chunk: pass 1 forward, pass 2 forward and backward
        calls = math.ceil(per_gpu_batch / chunk) + math.ceil(per_gpu_batch * texts / chunk)
        fwd, bwd = 2 * calls, calls
    else:  # the query and the passage forward, and the backward through each
        fwd, bwd = 2, 2
    launch_s = LAUNCH_S_PER_LAYER_PASS * shape.layers * (fwd + bwd)
    gather_gb, comm_s, fetches = 0.0, 0.0, 0
    if stage == 3:  # every module above the persistence threshold is fetched in each pass
        fetched = sum(1 for m in shape.module_params if m >= ds.param_persistence_threshold)
        fetches = fetched * (fwd + bwd)
        comm_s = fetches * ZERO3_FETCH_S
    if stage == 3 and gpus > 1:
        per_gather = 2 * n * (gpus - 1) / gpus  # 16-bit parameters arriving at each GPU
        inter = inter_node_gbs if nodes > 1 else intra_node_gbs
        bwd_bw = (
            intra_node_gbs if (nodes == 1 or ds.hpz_partition_size > 1) else inter
        )  # hpZ: intra-node copy
        gather_gb = per_gather * (fwd + bwd) / 1e9
        comm_s += per_gather * (fwd / inter + bwd / bwd_bw) / 1e9
    if comm_s > max(compute_s, launch_s):
        notes.append(
            f"communication-bound: ZeRO-3 fetches take {comm_s:.2f} s vs {compute_s:.2f} s of compute; "
            + (
                "a stage that gathers nothing fits (stage: auto)"
                if gpus == 1
                else "raise gradCache.chunkSize, set hpzPartitionSize to the GPUs per node, or use fewer, "
                "larger GPUs"
            )
        )
    # replicated: every GPU updates all parameters; ZeRO 1-3: its partition
    optimizer_s = OPTIMIZER_BYTES_PER_PARAM * n / (gpus if stage >= 1 else 1) / (HBM_GBS * 1e9)
    step_s = max(compute_s, launch_s, comm_s) + optimizer_s
    fits = total <= USABLE_FRACTION * gpu_mem_gb * GiB
    if not fits:
        notes.append(
            _advice(stage, offload_opt, offload_param, dist.activation_checkpointing, loss.grad_cache.enabled)
        )
    return Plan(
        model=shape.name, model_class=shape.model_class, total_params=n, dense_params=shape.dense_params,
        largest_layer_params=shape.largest_layer_params, gpus=gpus, gpus_per_node=per_node, gpu_mem_gb=gpu_mem_gb,
        zero_stage=stage, memory_breakdown_gb={k: round(v / GiB, 2) for k, v in breakdown.items()},
        memory_per_gpu_gb=round(total / GiB, 2), host_memory_per_node_gb=round(host / GiB, 1),
        tokens_per_step=tokens, flops_per_token=fpt, flops_per_step=flops, compute_time_s=compute_s,
        launch_time_s=launch_s, allgather_gb_per_gpu=round(gather_gb, 1), zero3_fetches=fetches,
        comm_time_s=comm_s, optimizer_time_s=optimizer_s, step_time_s=step_s, mfu=mfu,
        peak_tflops=peak_tflops, fits=fits, notes=notes,
    )  # fmt: skip


def _advice(stage: int, offload_opt: bool, offload_param: bool, checkpointing: bool, grad_cache: bool) -> str:
    steps = [
        (stage < 3, "distributed.deepspeed.stage: 3"),
        (not checkpointing, "distributed.activationCheckpointing: true"),
        (not grad_cache, "loss.gradCache.enabled: true"),
        (stage == 3 and not offload_opt, "distributed.deepspeed.offloadOptimizer.device: cpu"),
        (stage == 3 and not offload_param, "distributed.deepspeed.offloadParam.device: cpu"),
    ]
    todo = [s for cond, s in steps if cond]
    return "does not fit; try " + (", then ".join(todo) if todo else "more GPUs")


def _count(n: float) -> str:
    """A parameter count as people write it: 85.3k, 118M, 31.45B."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}B" if unit == "B" else f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"


def format_plan(p: Plan, source: str, cpu: bool = False) -> str:
    """The plan as a table; ``cpu``: its devices are CPU workers sharing this host's memory (no step time:
    the GPU throughput model does not apply)."""
    gb = p.memory_breakdown_gb
    nodes = math.ceil(p.gpus / p.gpus_per_node)
    stage = f"ZeRO-{p.zero_stage}" if p.zero_stage >= 0 else "no DeepSpeed (replicated)"
    where = (
        f"{p.gpus} CPU worker(s), {p.gpu_mem_gb:.1f} GiB of host memory each"
        if cpu
        else f"{p.gpus} GPUs x {p.gpu_mem_gb:g} GiB ({nodes} node(s) x {p.gpus_per_node})"
    )
    lines = [
        f"xling plan: {source} on {where}",
        f"  model        {p.model} ({p.model_class}): {_count(p.total_params)} params, "
        f"{_count(p.dense_params)} non-embedding, largest layer {_count(p.largest_layer_params)}",
        f"  {'mem/worker' if cpu else 'memory/GPU'}   model states {gb['model_states']:8.2f} GiB  ({stage}, DeepSpeed estimator)",
        f"               activations  {gb['activations']:8.2f} GiB",
        f"               loss + cache {gb['loss_and_cache']:8.2f} GiB",
        f"               comm buffers {gb['comm_buffers']:8.2f} GiB",
        f"               runtime      {gb['runtime']:8.2f} GiB",
        f"               total        {p.memory_per_gpu_gb:8.2f} GiB of {p.gpu_mem_gb:.4g} "
        f"({USABLE_FRACTION * p.gpu_mem_gb:.1f} usable)",
    ]
    if p.host_memory_per_node_gb:
        lines.append(
            f"  host memory  {p.host_memory_per_node_gb:.1f} GiB per node (offload / construction buffers)"
        )
    lines += [
        f"  FLOPs/step   {p.flops_per_step:.3e} ({p.flops_per_token / p.dense_params:.0f}N x {p.tokens_per_step} tokens)",
        "  step time    not estimated for CPU workers (the GPU throughput model does not apply)"
        if cpu
        else f"  step time    {p.step_time_s:.3f} s = the slowest of compute {p.compute_time_s:.3f} s (at {p.mfu:.0%} of "
        f"{p.peak_tflops:g} TFLOP/s per GPU), kernel launches {p.launch_time_s:.3f} s and ZeRO-3 fetches "
        f"{p.comm_time_s:.3f} s ({p.zero3_fetches} fetches, {p.allgather_gb_per_gpu:g} GB/GPU), "
        f"+ optimizer {p.optimizer_time_s:.3f} s",
        f"  verdict      {'FITS' if p.fits else 'DOES NOT FIT'}",
    ]
    lines += [f"  note: {n}" for n in p.notes]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ run-time check


def _host_memory_gb() -> float:
    import psutil

    return psutil.virtual_memory().total / GiB


def _local_gpu_memory_gb() -> float | None:
    import torch

    if env := os.environ.get(GPU_MEM_GB_ENV):
        return float(env)
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory / GiB
    return None


def local_plan(spec: ExperimentSpec, model: str | None = None) -> Plan | None:
    """The plan of ``spec`` on the devices this process sees: its node's GPU memory (or
    ``XLING_GPU_MEM_GB`` on a GPU-less head node) for GPU runs; for CPU runs, host memory shared by all
    workers. ``model`` is a local model dir to read the shape from (default: the spec's model name).
    None if it cannot tell (unknown model shape offline, or GPU size unknown)."""
    dist = spec.distributed
    try:
        shape = model_shape(model or spec.model.name, spec.model.revision, spec.model.trust_remote_code)
    except (ValueError, OSError):
        return None
    if dist.gpus_per_worker > 0:
        mem = _local_gpu_memory_gb()
        if mem is None:
            return None
        return make_plan(spec, dist.num_workers * dist.gpus_per_worker, mem, shape=shape)
    return cpu_plan(spec, shape)


def check_fits(exp: RetrievalExperiment) -> Plan | None:
    """Refuse (PlanError) a run that cannot fit, before any worker starts; the plan, or None when it
    cannot tell (see :func:`local_plan`)."""
    spec = exp.spec
    gpu_run = spec.distributed.gpus_per_worker > 0
    plan = local_plan(spec)
    if plan is None:
        return None
    resolve_stage(spec, plan)  # a stage: auto that fits nowhere is refused naming the field
    if not plan.fits:
        workers = spec.distributed.num_workers
        where = "GPU" if gpu_run else f"worker (host memory {_host_memory_gb():.0f} GiB shared by {workers})"
        raise PlanError(
            exp.metadata.name,
            f"refused before starting any worker: needs {plan.memory_per_gpu_gb:.1f} GiB per "
            f"{where}, has {plan.gpu_mem_gb:.1f} GiB\n"
            + format_plan(plan, exp.metadata.name, cpu=not gpu_run),
        )
    return plan


def auto_stage(spec: ExperimentSpec, model: str | None = None) -> ExperimentSpec:
    """``spec`` with ``stage: auto`` resolved on the devices this process sees, the choice and why
    logged; unchanged where it cannot tell (a GPU-less head node: the workers, which see their GPUs,
    resolve it the same way, as every rank's plan is the same arithmetic)."""
    ds = spec.distributed.deepspeed
    if ds is None or ds.stage != "auto" or (plan := local_plan(spec, model)) is None:
        return spec
    resolved = resolve_stage(spec, plan)
    print(f"xling: {plan.notes[0]}", flush=True)
    return resolved


def cpu_plan(spec: ExperimentSpec, shape: Any = None) -> Plan:
    """A CPU run's plan: every worker is a "device" whose memory is its share of this host's."""
    workers = spec.distributed.num_workers
    return make_plan(spec, workers, _host_memory_gb() / workers, shape=shape, gpus_per_node=workers)


# ------------------------------------------------------------------------------------------ CLI


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
