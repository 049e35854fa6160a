"""The training side of the spec: what ``xling run`` reads to train, evaluate and track one run.

Model, data, sampling, loss, optimization, distribution, evaluation and tracking: every section a local run
uses (the operator passes them through to the cluster's driver untouched).
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Literal

from pydantic import Field, model_validator

from xling.api.contracts import DEFAULT_TRACKING_URI, EMBEDDING_CACHE_DEFAULT
from xling.api.spec.base import (
    BUILT_IN_MODELS,
    DEMO_MODEL,
    TINY_MODEL,
    CandidateContext,
    IndexKind,
    Lang,
    Pooling,
    PositiveInt,
    SecretRef,
    Spec,
    SuiteName,
    field_error,
    is_xling_model,
)


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
        if not is_xling_model(self.name) or self.name in BUILT_IN_MODELS:
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
            raise field_error(
                "holdOut", f"is for mlqa sources (components of shared paragraphs), not {self.type}"
            )
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
            raise field_error("holdOut", "is required by the mlqa-holdout suite and only there")
        if self.hold_out is not None and (self.max_paragraphs or self.candidate_context != "sentence"):
            raise field_error(
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
            raise field_error("centering", "is a baseline of the untrained model: it needs atStart: true")
        for i, suite in enumerate(self.suites):
            c = self.centering
            end = suite.first_line + suite.max_paragraphs if suite.max_paragraphs else math.inf
            if (
                suite.name == "ntrex-r"
                and c
                and suite.first_line < c.first_line + c.sentences
                and c.first_line < end
            ):
                raise field_error(
                    f"suites[{i}].firstLine",
                    f"the {suite.name} lines overlap centering's (lines {c.first_line + 1}-{c.first_line + c.sentences})",
                )
        if self.curve_points and (self.curve_points < 3 or not self.at_start):
            raise field_error(
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


class TrackingSpec(Spec):
    tracking_uri: str | None = Field(default=None, description=f"Default: {DEFAULT_TRACKING_URI} in the CWD.")
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
            raise field_error(
                "trackingUri", "credentials in the URI; put them in tracking.credentials (a Secret)"
            )
        return self
