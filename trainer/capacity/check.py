"""The plan on the devices this process sees: ``check_fits`` refuses a run that cannot fit before any worker
starts, ``auto_stage`` resolves ``stage: auto``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from xling.api.env import GPU_MEM_GB_ENV
from xling.api.errors import InputError, sweep_point
from xling.api.spec.experiment import ExperimentSpec, RetrievalExperiment
from xling.trainer.capacity.estimate import CapacityPlan, GiB, make_plan
from xling.trainer.capacity.shapes import model_shape
from xling.trainer.capacity.table import format_plan


class PlanError(InputError):
    """The experiment cannot fit on the stated hardware (raised before any worker starts): the user changes
    the field it names, or the hardware."""


def resolve_stage(spec: ExperimentSpec, plan: CapacityPlan) -> ExperimentSpec:
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


def local_plan(spec: ExperimentSpec, model: str | None = None) -> CapacityPlan | None:
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


def check_fits(exp: RetrievalExperiment) -> CapacityPlan | None:
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


def check_each_fits(
    exp: RetrievalExperiment, specs: Sequence[tuple[str | None, ExperimentSpec]] = ()
) -> None:
    """:func:`check_fits` for each (label, spec) of ``specs`` (a sweep's points; default: ``exp``'s own
    spec), a refusal prefixed with its point's label."""
    for label, spec in specs or [(None, exp.spec)]:
        with sweep_point(label):
            check_fits(exp.model_copy(update={"spec": spec}))


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


def cpu_plan(spec: ExperimentSpec, shape: Any = None) -> CapacityPlan:
    """A CPU run's plan: every worker is a "device" whose memory is its share of this host's."""
    workers = spec.distributed.num_workers
    return make_plan(spec, workers, _host_memory_gb() / workers, shape=shape, gpus_per_node=workers)
