"""Memory per GPU, FLOPs and step time of an experiment at a ZeRO stage: the arithmetic of ``xling plan``."""

from __future__ import annotations

import contextlib
import math
import sys
from dataclasses import dataclass

from xling.api.spec.experiment import ExperimentSpec
from xling.trainer.capacity.flops import flops_per_token
from xling.trainer.capacity.shapes import ModelShape, model_shape

GiB = 2**30
RUNTIME_OVERHEAD_GIB = 2.0  # CUDA context and NCCL per GPU
#: Step-time terms beyond FLOPs, calibrated on issue 26's H200 measurements (tests/trainer/test_capacity.py
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


@dataclass
class CapacityPlan:
    """What ``xling plan`` reports: memory per GPU, FLOPs and step time of one experiment on given hardware."""

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
) -> CapacityPlan:
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
) -> CapacityPlan:
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
    return CapacityPlan(
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
