"""A capacity plan as the table ``xling plan`` prints and a refusal quotes."""

from __future__ import annotations

import math

from xling.trainer.capacity.estimate import USABLE_FRACTION, CapacityPlan


def _count(n: float) -> str:
    """A parameter count as people write it: 85.3k, 118M, 31.45B."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}B" if unit == "B" else f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"


def format_plan(p: CapacityPlan, source: str, cpu: bool = False) -> str:
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
