"""How many pods of what size an experiment's Ray cluster gets: derived worker groups, sized per GPU and for a
sweep's concurrent trials (pure, like :mod:`xling.operator.manifests`, which builds them into the RayCluster)."""

from __future__ import annotations

import math

from xling.api.spec.cluster import WorkerGroupSpec
from xling.api.spec.experiment import ExperimentSpec


def _cpu(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{round(value * 1000)}m"


def concurrent_trials(spec: ExperimentSpec) -> int:
    """Trials that run at once: the cluster is sized for this many (1 without a sweep)."""
    if spec.sweep is None:
        return 1
    return min(spec.sweep.max_concurrent_trials or 1, spec.sweep.trial_count)


def gpus_per_pod(spec: ExperimentSpec) -> int:
    """GPUs of one derived worker pod: a whole node's worth, or all a trial needs if that is fewer."""
    dist = spec.distributed
    return min(spec.cluster.gpu_node.gpus, dist.num_workers * dist.gpus_per_worker)


def worker_groups(spec: ExperimentSpec) -> list[WorkerGroupSpec]:
    """The declared groups, or one derived from spec.distributed and the sweep's concurrency.

    GPU runs: pods of gpusPerPod GPUs holding one rank per GPU (NCCL uses NVLink inside a pod), CPU and memory
    sized per GPU. CPU runs: one pod per rank. Sweeps: room for maxConcurrentTrials trials at once.
    """
    if spec.cluster.worker_groups:
        return spec.cluster.worker_groups
    dist, trials = spec.distributed, concurrent_trials(spec)
    if not dist.gpus_per_worker:
        # A sweep's trial drivers need CPU too (Tune trainables; the head advertises none): one more per pod.
        cpu = dist.cpus_per_worker + (1 if spec.sweep is not None else 0)
        return [WorkerGroupSpec(name="workers", replicas=dist.num_workers * trials, cpu=_cpu(cpu))]
    node, per_pod = spec.cluster.gpu_node, gpus_per_pod(spec)
    ranks = per_pod // dist.gpus_per_worker
    pods = math.ceil(dist.num_workers / ranks)
    cpu = max(node.cpu_per_gpu * per_pod, dist.cpus_per_worker * ranks + 1)  # +1: Ray's own processes
    return [
        WorkerGroupSpec(
            name="workers",
            replicas=pods * trials,
            gpus=per_pod,
            cpu=_cpu(cpu),
            memory=f"{node.memory_per_gpu_gi * per_pod}Gi",
        )
    ]


def pod_count(spec: ExperimentSpec) -> int:
    """Pods of the Ray cluster, head included."""
    return 1 + sum(g.replicas for g in worker_groups(spec))


def describe_pods(spec: ExperimentSpec) -> list[str]:
    """How the spec maps to pods, for ``xling render`` and the docs."""
    head = spec.cluster.head
    lines = [f"head: 1 pod, {head.cpu} CPU, {head.memory}, no GPUs, no Ray CPUs (driver and dashboard only)"]
    dist = spec.distributed
    for g in worker_groups(spec):
        gpus = f", {g.gpus} {g.gpu_resource}" if g.gpus else ""
        ranks = f", {g.gpus // dist.gpus_per_worker} rank(s) each" if g.gpus and dist.gpus_per_worker else ""
        lines.append(f"group {g.name}: {g.replicas} pod(s) x ({g.cpu} CPU, {g.memory}{gpus}){ranks}")
    lines.append(
        f"training: {dist.num_workers} rank(s) per trial, {dist.gpus_per_worker} GPU(s) and "
        f"{dist.cpus_per_worker:g} CPU(s) each"
    )
    if spec.sweep is not None:
        total, at_once = spec.sweep.trial_count, concurrent_trials(spec)
        gpus = at_once * dist.num_workers * dist.gpus_per_worker
        lines.append(
            f"sweep: {total} trial(s), {at_once} at once ({gpus} GPUs at once), {math.ceil(total / at_once)} "
            "round(s): wall-clock is about that many times one trial's (`xling plan` estimates one)"
        )
    return lines
