"""Training data: every ``data.sources`` entry of a spec, prepared into one corpus.

``prepare_corpus`` (``prepare``) streams the sources into a prepared corpus on disk that workers memory-map
(``store``); ``load_corpus`` is the same preparation held in memory, for small corpora and tests. The
readers (``loaders``), builders (``builders``), the samplers' index (``index``) and the overlap guard
``drop_overlapping`` are public too.
"""

from __future__ import annotations

import tempfile

from xling.api.spec.training import DataSpec
from xling.trainer.data.overlap import drop_overlapping
from xling.trainer.data.pairs import BadRowError, BadRows, Pair, PairCorpus
from xling.trainer.data.prepare import EvalGuard, Prepared, prepare_corpus
from xling.trainer.data.store import DataLocation, PreparedCorpus, open_corpus

__all__ = [
    "BadRowError",
    "DataLocation",
    "EvalGuard",
    "Pair",
    "PairCorpus",
    "Prepared",
    "PreparedCorpus",
    "BadRows",
    "drop_overlapping",
    "load_corpus",
    "open_corpus",
    "prepare_corpus",
]


def load_corpus(data: DataSpec, report: BadRows | None = None) -> PairCorpus:
    """Every source of ``data``, prepared in a temporary directory and read back into memory. Bad rows
    raise BadRowError naming file and row, unless ``data.skip_bad_rows``: then they are counted in
    ``report``."""
    with tempfile.TemporaryDirectory() as tmp:
        return prepare_corpus(data, tmp, report=report).corpus.materialize()
