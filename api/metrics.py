"""The flat metric names xling logs, written by the evaluation and read by the reports and the operator.

A name is ``suite/setting/metric[/lang]``: the suite's prefix (:func:`suite_prefix`, ``xquad-r`` ->
``xquad_r``), the setting (``multi``, ``mono``, ``cross``, ``bias``), the metric (``map``, ``r10``) and, for
a per-language value, the language code last (``xquad_r/multi/map/de``; a pair for ``cross``: ``ar_de``).
MIRACL's have no setting (``miracl/ndcg10``, ``miracl/ndcg10/de``); training's are ``train/*`` and
``batches/*``. ``/`` because MLflow's UI groups a run's charts by everything before the last one, so a
metric's languages chart side by side. This module is the only one that knows the separator: the others
build and take names apart with :func:`join`, :func:`split`, :func:`is_headline` and :func:`language_of`.
Standard library only: the operator imports it.
"""

from __future__ import annotations

#: Separates a name's parts.
SEP = "/"
#: The LAReQA settings: a name with one has a part more before its language than one without.
SETTINGS = frozenset({"mono", "cross", "multi", "bias"})
#: Where MLflow's own (system) metrics live; never an xling metric.
SYSTEM = "system"
#: The prefixes of the training loop's metrics, of the batch-composition counters and of what the driver
#: logs of the training data (``data/held_out/groups``, ``data/mined/removed/<rule>``).
TRAIN, BATCHES, DATA = "train", "batches", "data"
#: The prefix of a sweep parent run's copy of its best point's metrics (``best/xquad_r/multi/map``).
BEST = "best"


def suite_prefix(suite: str) -> str:
    """The prefix of a suite's metrics: its name with ``_`` for ``-`` (``mlqa-r`` -> ``mlqa_r``)."""
    return suite.replace("-", "_")


def join(*parts: str) -> str:
    """A name from its parts: ``join("xquad_r", "multi", "map")`` -> ``xquad_r/multi/map``."""
    return SEP.join(parts)


def split(name: str) -> list[str]:
    """A name's parts, the inverse of :func:`join`."""
    return name.split(SEP)


def train_metric(name: str) -> str:
    """A training-loop metric: ``loss`` -> ``train/loss``."""
    return join(TRAIN, name)


#: The training loss, reported at every log step (ASHA's default metric, the operator's progress).
LOSS = train_metric("loss")


def prefix_of(metric: str) -> str:
    """The suite prefix (or ``train``, ``batches``) a metric name starts with."""
    return split(metric)[0]


def with_prefix(metric: str, prefix: str) -> str:
    """``metric`` under another prefix (``xquad_r_centered/multi/map`` -> ``xquad_r/multi/map``)."""
    return join(prefix, *split(metric)[1:])


def _headline_parts(parts: list[str]) -> int:
    """How many parts a headline name of this shape has: prefix, setting if any, metric."""
    return 3 if len(parts) > 2 and parts[1] in SETTINGS else 2


def is_headline(key: str) -> bool:
    """Headline metrics: ``xquad_r/multi/map``, ``miracl/ndcg10`` or ``train/loss``, not per language
    (``xquad_r/multi/map/ar``, ``miracl/ndcg10/de``, ``batches/query_share/de``), not MLflow's system
    metrics."""
    parts = split(key)
    return parts[0] != SYSTEM and len(parts) <= _headline_parts(parts)


def language_of(metric: str, key: str) -> str | None:
    """The language part of ``key`` when ``key`` is a per-language value of ``metric`` (``xquad_r/multi/map``
    and ``xquad_r/multi/map/de`` -> ``de``), else None."""
    head, sep, lang = key.rpartition(SEP)
    return lang if sep and head == metric and lang else None


def from_dotted(name: str) -> str | None:
    """The ``/`` spelling of a name in the old ``.`` one (``xquad_r.multi.de.map`` ->
    ``xquad_r/multi/map/de``), for a message to a spec that still uses it; None when ``name`` is not one."""
    if SEP in name or "." not in name:
        return None
    parts = name.split(".")
    if len(parts) > _headline_parts(parts) and parts[0] != "batches":  # the language came before the metric
        parts[-2], parts[-1] = parts[-1], parts[-2]
    return join(*parts)


def flat_name(prefix: str, key: str, lang: str | None = None) -> str:
    """The flat name of a result under a suite's prefix: ``key`` is the results files' own (``multi.map``,
    ``ndcg10``), ``lang`` a language or pair for a per-language value."""
    return join(prefix, *key.split("."), *([lang] if lang else []))
