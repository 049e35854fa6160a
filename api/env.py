"""Every ``XLING_*`` environment variable xling reads or sets, named once, each with what it does.

The trainer, its workers and the operator read the names from here (a test keeps any other ``XLING_``
literal out of ``trainer/`` and ``operator/``); :data:`VARIABLES` maps each name to its one-line description,
for documentation and checks. Standard library only.
"""

from __future__ import annotations

#: Every variable's name -> what it does (filled in by :func:`_variable`, in the order below).
VARIABLES: dict[str, str] = {}


def _variable(name: str, doc: str) -> str:
    """Register ``name`` with its one-line description and return the name."""
    assert name.startswith("XLING_") and name not in VARIABLES, name
    VARIABLES[name] = doc
    return name


# ----------------------------------------------------------------------------- the trainer and its workers

CACHE_ENV = _variable("XLING_CACHE", "Overrides the cache directory (models, prepared corpora, embeddings).")
EXPERIMENT_UID_ENV = _variable(
    "XLING_EXPERIMENT_UID",
    "Set by the operator on every Ray pod: the RetrievalExperiment's uid, tagged on every MLflow run (absent "
    "in a local run).",
)
EXPERIMENT_ENV = _variable("XLING_EXPERIMENT", "Set by the operator on every Ray pod: the experiment's name.")
NAMESPACE_ENV = _variable(
    "XLING_NAMESPACE", "Set by the operator on every Ray pod: the experiment's namespace."
)
GPU_MEM_GB_ENV = _variable(
    "XLING_GPU_MEM_GB",
    "Memory of one GPU in GiB, instead of the visible GPU's, for plans and deepspeed.stage auto (a GPU-less head).",
)
PEAK_TFLOPS_ENV = _variable(
    "XLING_PEAK_TFLOPS",
    "The device's peak TFLOP/s for plans and MFU, instead of the GPU table or the CPU probe.",
)
FAULT_KILL_ENV = _variable(
    "XLING_FAULT_KILL",
    "Fault-tolerance tests only: STEP:RANK SIGKILLs that rank at that step, first attempt only.",
)

# ----------------------------------------------------------------------------- the operator

PLATFORM_DEFAULTS_ENV = _variable(
    "XLING_PLATFORM_DEFAULTS",
    "The platform-defaults YAML file (Helm's platformDefaults) the operator applies.",
)
WATCH_NAMESPACES_ENV = _variable(
    "XLING_WATCH_NAMESPACES", "Comma-separated namespaces the operator watches (default: all)."
)
LIVENESS_ENV = _variable(
    "XLING_LIVENESS", "The operator's liveness probe URL (default http://0.0.0.0:8080/healthz)."
)
LOG_FORMAT_ENV = _variable("XLING_LOG_FORMAT", "The operator's log format: json (default) or plain.")
VERBOSE_ENV = _variable("XLING_VERBOSE", "1: the operator logs at debug level.")
METRICS_PORT_ENV = _variable(
    "XLING_METRICS_PORT", "Port of the operator's Prometheus metrics (unset: not served)."
)
MAX_WORKERS_ENV = _variable(
    "XLING_MAX_WORKERS", "Handler threads of the operator (kopf's max_workers; default 16)."
)
CONSISTENCY_TIMEOUT_ENV = _variable(
    "XLING_CONSISTENCY_TIMEOUT", "Seconds kopf waits for its own status write to come back (default 1)."
)
WATCHDOG_INTERVAL_ENV = _variable(
    "XLING_WATCHDOG_INTERVAL",
    "Seconds between the operator's no-progress checks of a running experiment (default 60).",
)
LEASE_NAME_ENV = _variable(
    "XLING_LEASE_NAME", "The Lease the operator replicas elect a leader on (empty: no election)."
)
LEASE_NAMESPACE_ENV = _variable(
    "XLING_LEASE_NAMESPACE", "The Lease's namespace, the operator's own (default: default)."
)
LEASE_DURATION_ENV = _variable("XLING_LEASE_DURATION", "Seconds a leader's Lease lasts without renewal.")
LEASE_RENEW_DEADLINE_ENV = _variable(
    "XLING_LEASE_RENEW_DEADLINE", "Seconds a leader has to renew before it steps down."
)
LEASE_RETRY_PERIOD_ENV = _variable(
    "XLING_LEASE_RETRY_PERIOD", "Seconds between a standby's tries to take the Lease."
)
