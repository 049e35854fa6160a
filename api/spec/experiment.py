"""The whole resource: :class:`RetrievalExperiment` (apiVersion, kind, metadata, spec) and the
:class:`ExperimentSpec` that joins the sections, with the checks that span them."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, model_validator

from xling.api.spec.base import (
    KNOWN_LANGUAGES,
    MLQA_R_LANGUAGES,
    XQUAD_R_LANGUAGES,
    Spec,
    field_error,
)
from xling.api.spec.cluster import ClusterSpec, DeadlinesSpec, StorageSpec
from xling.api.spec.sweep import SweepSpec
from xling.api.spec.training import (
    DataSpec,
    DistributedSpec,
    EvaluationSpec,
    LossSpec,
    ModelSpec,
    OptimizationSpec,
    SamplingSpec,
    TrackingSpec,
)


class ExperimentSpec(Spec):
    model: ModelSpec
    data: DataSpec
    sampling: SamplingSpec
    loss: LossSpec = Field(default_factory=LossSpec)
    optimization: OptimizationSpec = Field(default_factory=OptimizationSpec)
    distributed: DistributedSpec = Field(default_factory=DistributedSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    sweep: SweepSpec | None = None
    output_dir: str = Field(
        default="runs", description="Local checkpoints and exports (relative to the CWD)."
    )
    cluster: ClusterSpec = Field(default_factory=ClusterSpec)
    storage: StorageSpec | None = Field(
        default=None,
        description="Checkpoint storage shared by all pods. Required on a cluster (the operator refuses a RayJob "
        "without it unless the platform sets a default); ignored by a local `xling run`.",
    )
    deadlines: DeadlinesSpec = Field(default_factory=DeadlinesSpec)
    suspend: bool = Field(default=False, description="True deletes the Ray cluster; false again resumes.")
    ttl_seconds_after_finished: Annotated[int, Field(ge=0)] = Field(
        default=0,
        description="0: the whole Ray cluster is deleted when the job finishes, so its GPUs are free at once. "
        "N > 0: the GPU workers still go at once, the head (logs, dashboard) N seconds later (KubeRay's "
        "deletionStrategy; it cannot be combined with suspend, so not with Kueue either).",
    )

    @model_validator(mode="after")
    def _cluster_fits(self) -> ExperimentSpec:
        dist = self.distributed
        needed = dist.num_workers * dist.gpus_per_worker
        have = sum(g.replicas * g.gpus for g in self.cluster.worker_groups)
        if self.cluster.worker_groups and have < needed:
            raise field_error(
                "cluster.workerGroups",
                f"{have} GPUs in total, but distributed needs {needed} "
                f"({dist.num_workers} workers x {dist.gpus_per_worker})",
            )
        return self

    @model_validator(mode="after")
    def _cross_field(self) -> ExperimentSpec:
        langs = set(self.data.languages)
        for field, codes in _language_fields(self):
            if unknown := sorted(set(codes) - KNOWN_LANGUAGES):
                raise field_error(field, f"unknown language code {', '.join(map(repr, unknown))} (known: "
                                  f"{', '.join(sorted(KNOWN_LANGUAGES))})")  # fmt: skip
        strategy = self.sampling.strategy
        if strategy in ("xy", "hybrid") and len(langs) < 2:
            raise field_error(
                "sampling.strategy",
                f"{strategy!r} needs query and passage languages to differ, but "
                f"data.languages has only {sorted(langs)}",
            )
        workers = self.distributed.num_workers
        batch = self.optimization.global_batch_size
        if batch < workers:
            raise field_error(
                "optimization.globalBatchSize", f"{batch} is smaller than distributed.numWorkers ({workers})"
            )
        if batch % workers:
            raise field_error(
                "optimization.globalBatchSize",
                f"{batch} must be divisible by distributed.numWorkers ({workers})",
            )
        if self.optimization.warmup_steps > self.optimization.max_steps:
            raise field_error("optimization.warmupSteps", "longer than optimization.maxSteps")
        for i, source in enumerate(self.data.sources):
            extra = set(source.languages or ()) - langs
            if extra:
                raise field_error(
                    f"data.sources[{i}].languages",
                    f"{sorted(extra)} are not in data.languages {sorted(langs)}",
                )
        for i, suite in enumerate(self.evaluation.suites):
            known = {
                "xquad-r": XQUAD_R_LANGUAGES,
                "mlqa-r": MLQA_R_LANGUAGES,
                "ntrex-r": XQUAD_R_LANGUAGES,
            }.get(suite.name)
            missing = set(suite.languages or ()) - set(known or suite.languages or ())
            if missing:
                raise field_error(
                    f"evaluation.suites[{i}].languages",
                    f"{sorted(missing)} are not in the {suite.name} data (it has {', '.join(known or ())})",
                )
            held = [s.hold_out for s in self.data.sources if s.type == "mlqa" and s.path == suite.path]
            if suite.hold_out is not None and suite.hold_out not in held:
                raise field_error(
                    f"evaluation.suites[{i}].holdOut",
                    f"no mlqa training source at {suite.path} holds out this split: set its holdOut to the "
                    "same, or the held-out groups would be trained on",
                )
        if self.sweep is not None:
            self.sweep.check(self)
        ds = self.distributed.deepspeed
        if ds is not None:
            if ds.offload_param.device != "none" and ds.stage != 3:
                raise field_error("distributed.deepspeed.offloadParam", "parameter offload needs stage 3")
            if self.distributed.compile and ds.stage == 3:
                raise field_error(
                    "distributed.compile", "not with ZeRO-3 (its per-module hooks break the graph)"
                )
            for name, off in (("offloadOptimizer", ds.offload_optimizer), ("offloadParam", ds.offload_param)):
                if off.device == "nvme" and not off.nvme_path:
                    raise field_error(f"distributed.deepspeed.{name}.nvmePath", "required with device 'nvme'")
        if self.loss.grad_cache.enabled and self.loss.grad_cache.chunk_size > batch // workers:
            raise field_error(
                "loss.gradCache.chunkSize",
                f"{self.loss.grad_cache.chunk_size} exceeds the per-worker batch ({batch // workers})",
            )
        return self


def _language_fields(spec: ExperimentSpec) -> list[tuple[str, list[str]]]:
    """Every training-data field of ``spec`` with its language codes: a code no data row may carry (``qq``)
    passes the pattern but would be trained on by no one. (Suites are checked against their own languages.)"""
    fields = [("data.languages", spec.data.languages)]
    for i, s in enumerate(spec.data.sources):
        fields += [(f"data.sources[{i}].languages", s.languages or []),
                   (f"data.sources[{i}].language", [s.language] if s.language else [])]  # fmt: skip
    return fields


class Metadata(Spec):
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    name: str = Field(
        pattern=r"^[a-z]([-a-z0-9]*[a-z0-9])?$",
        max_length=63,
        description="DNS-1035 label (starts with a letter): it names the RayJob, its Services and pods.",
    )
    namespace: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class RetrievalExperiment(Spec):
    """The whole file: a Kubernetes custom resource."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    api_version: Literal["xling.io/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["RetrievalExperiment"]
    metadata: Metadata
    spec: ExperimentSpec
    status: dict[str, Any] | None = Field(default=None, description="Written by the operator; ignored here.")

    @property
    def mlflow_experiment_name(self) -> str:
        """The MLflow experiment of its runs: tracking.experimentName, else metadata.name (the trainer writes
        there, the operator reads progress from there)."""
        return self.spec.tracking.experiment_name or self.metadata.name
