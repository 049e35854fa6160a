"""FLOPs per token, device peaks and MFU: the plan's compute term and the trainer's per-step MFU metric."""

from __future__ import annotations

import functools
import os
import time
from typing import Any

from xling.api.env import PEAK_TFLOPS_ENV

#: Dense bf16 peak per device, TFLOP/s (vendor figures; SXM parts).
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0,
                   "A6000": 155.0, "A10": 125.0}  # fmt: skip
#: (tokens, inputs, outputs) of the fp32 linear layers the CPU peak probe trains: encoder FFN shapes.
CPU_PROBE_SHAPES = ((1024, 1024, 1024), (1024, 768, 3072))
CPU_PROBE_REPEATS = 3


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
