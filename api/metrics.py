"""The flat metric names xling logs, written by the evaluation and read by the reports and the operator.

A name is ``suite.setting[.lang].metric``: the suite's prefix (:func:`suite_prefix`, ``xquad-r`` ->
``xquad_r``), the setting (``multi``, ``mono``, ``bias``), a language code for a per-language value, and the
metric (``map``, ``r10``). MIRACL's have no setting (``miracl.ndcg10``, ``miracl.de.ndcg10``); training's are
``train.*`` and ``batches.*``. Standard library only: the operator imports it.
"""

from __future__ import annotations

from typing import NamedTuple


class LanguageKey(NamedTuple):
    """A name split around its last-but-one part: ``xquad_r.multi.de.map`` -> (``xquad_r.multi``, ``de``,
    ``map``); whether ``lang`` is a language code is for the caller to decide."""

    head: str
    lang: str
    leaf: str


def suite_prefix(suite: str) -> str:
    """The prefix of a suite's metrics: its name with ``_`` for ``-`` (``mlqa-r`` -> ``mlqa_r``)."""
    return suite.replace("-", "_")


def prefix_of(metric: str) -> str:
    """The suite prefix (or ``train``, ``batches``) a metric name starts with."""
    return metric.split(".")[0]


def is_headline(key: str) -> bool:
    """Headline metrics: ``xquad_r.multi.map`` or ``train.loss``, not per language (``xquad_r.multi.ar.map``),
    not MLflow's system metrics. (MIRACL's per-language ``miracl.de.ndcg10`` counts as one: two dots.)"""
    return key.count(".") <= 2 and not key.startswith("system/")


def split_language(key: str) -> LanguageKey:
    """``key`` split into the name it is a per-language value of, the language part and the metric."""
    stem, _, leaf = key.rpartition(".")
    head, _, lang = stem.rpartition(".")
    return LanguageKey(head, lang, leaf)


def language_of(metric: str, key: str) -> str | None:
    """The language part of ``key`` when ``key`` is a per-language value of ``metric`` (``xquad_r.multi.map``
    and ``xquad_r.multi.de.map`` -> ``de``), else None."""
    head, _, leaf = metric.rpartition(".")
    parts = split_language(key)
    return parts.lang if (parts.head, parts.leaf) == (head, leaf) and parts.lang else None
