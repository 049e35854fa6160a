"""Batch samplers: the research variable.

Every sampler answers one question: which pairs form global batch ``step``? The answer is a pure
function of ``(seed, step)`` (an RNG seeded with both), so
- every rank computes the same global batch and takes its own disjoint slice,
- resuming at step k reproduces the batches exactly, with no sampler state to checkpoint,
- the batch type (X-X language, or X-Y) is decided once per *global* step, as homogeneity must hold for
  the negative pool that all ranks share.

A batch draws distinct parallel groups, so it never holds two translations of one pair (false negatives).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from xling.trainer.data.pairs import PairCorpus
from xling.trainer.spec import SamplingSpec

BatchKind = Literal["xx", "xy", "mixed"]


@dataclass(frozen=True)
class Item:
    """One training example: the query side of group ``group`` in ``qlang``, its passage in ``plang``."""

    group: int
    qlang: str
    plang: str


@dataclass(frozen=True)
class BatchPlan:
    step: int
    kind: BatchKind
    items: tuple[Item, ...]
    language: str | None = None  # the X-X batch language

    def shard(self, rank: int, world_size: int) -> tuple[Item, ...]:
        """This rank's disjoint, contiguous slice of the global batch."""
        per = len(self.items) // world_size
        return self.items[rank * per : (rank + 1) * per]


def _rng(seed: int, step: int) -> np.random.Generator:
    return np.random.default_rng([seed, step, 0x5EED])


def _distinct(rng: np.random.Generator, population: list[int], k: int) -> list[int]:
    """k distinct members of ``population``: rejection sampling, O(k) for k << n, no O(n) permutation."""
    n = len(population)
    if k > n:
        raise ValueError(f"cannot draw {k} distinct parallel groups from {n}")
    if 2 * k > n:
        return [population[i] for i in rng.permutation(n)[:k]]
    chosen: dict[int, None] = {}
    while len(chosen) < k:
        for i in rng.integers(0, n, size=k - len(chosen)):
            chosen.setdefault(int(i))
    return [population[i] for i in chosen]


class BatchSampler:
    """Base class: subclasses implement :meth:`plan`. ``batch_size`` is the *global* batch size."""

    kind: str = ""

    def __init__(self, corpus: PairCorpus, batch_size: int, spec: SamplingSpec):
        self.corpus = corpus
        self.batch_size = batch_size
        self.spec = spec
        sizes = np.array([len(corpus.by_language[lang]) for lang in corpus.languages], dtype=float)
        if spec.language_weighting == "size":
            w = sizes ** (1.0 / spec.language_temperature)
        else:
            w = (sizes >= batch_size).astype(float)  # uniform over languages that can fill a batch
        self._mono_langs = corpus.languages
        self._mono_p = w / w.sum() if w.sum() > 0 else w

    def plan(self, step: int) -> BatchPlan:
        raise NotImplementedError

    def _xx(self, rng: np.random.Generator, step: int) -> BatchPlan:
        if not self._mono_p.sum():
            raise ValueError(f"no language has {self.batch_size} pairs for an X-X batch")
        lang = str(rng.choice(self._mono_langs, p=self._mono_p))
        groups = _distinct(rng, self.corpus.by_language[lang], self.batch_size)
        return BatchPlan(step, "xx", tuple(Item(g, lang, lang) for g in groups), language=lang)

    def _xy(self, rng: np.random.Generator, step: int) -> BatchPlan:
        groups = _distinct(rng, self.corpus.parallel, self.batch_size)
        items = []
        for g in groups:
            langs = sorted(self.corpus.groups[g])
            q, p = rng.choice(len(langs), size=2, replace=False)
            items.append(Item(g, langs[q], langs[p]))
        return BatchPlan(step, "xy", tuple(items))

    def _mixed(self, rng: np.random.Generator, step: int) -> BatchPlan:
        groups = _distinct(rng, list(range(len(self.corpus))), self.batch_size)
        items = []
        for g in groups:
            langs = sorted(self.corpus.groups[g])
            lang = langs[int(rng.integers(len(langs)))]
            items.append(Item(g, lang, lang))
        return BatchPlan(step, "mixed", tuple(items))


class XXSampler(BatchSampler):
    """X-X-mono: every batch is one language (drawn uniformly or by size)."""

    def plan(self, step: int) -> BatchPlan:
        return self._xx(_rng(self.spec.seed, step), step)


class XYSampler(BatchSampler):
    """X-Y: each pair's query and passage languages differ (pairs drawn independently)."""

    def plan(self, step: int) -> BatchPlan:
        return self._xy(_rng(self.spec.seed, step), step)


class HybridSampler(BatchSampler):
    """Hybrid: X-X-mono with probability alpha, else X-Y; one decision per global batch."""

    def plan(self, step: int) -> BatchPlan:
        rng = _rng(self.spec.seed, step)
        return self._xx(rng, step) if rng.random() < self.spec.alpha else self._xy(rng, step)


class MixedSampler(BatchSampler):
    """LAReQA's X-X: same-language pairs, languages mixed inside the batch (a further baseline)."""

    def plan(self, step: int) -> BatchPlan:
        return self._mixed(_rng(self.spec.seed, step), step)


SAMPLERS: dict[str, type[BatchSampler]] = {
    "xx": XXSampler,
    "xy": XYSampler,
    "hybrid": HybridSampler,
    "mixed": MixedSampler,
}


def build_sampler(corpus: PairCorpus, batch_size: int, spec: SamplingSpec) -> BatchSampler:
    sampler = SAMPLERS[spec.strategy](corpus, batch_size, spec)
    needs_parallel = spec.strategy == "xy" or (spec.strategy == "hybrid" and spec.alpha < 1.0)
    if needs_parallel and len(corpus.parallel) < batch_size:
        raise ValueError(
            f"sampling.strategy: {spec.strategy!r} needs at least {batch_size} parallel groups "
            f"(pairs with two or more languages); the data has {len(corpus.parallel)}"
        )
    return sampler


@dataclass
class Composition:
    """The realised batch mix, counted so runs can show what they actually trained on."""

    kinds: Counter[str] = field(default_factory=Counter)
    languages: Counter[str] = field(default_factory=Counter)
    pairs: Counter[str] = field(default_factory=Counter)

    def add(self, plan: BatchPlan) -> None:
        self.kinds[plan.kind] += 1
        for item in plan.items:
            self.languages[item.qlang] += 1
            self.pairs[f"{item.qlang}-{item.plang}"] += 1

    def metrics(self) -> dict[str, float]:
        total = max(1, sum(self.kinds.values()))
        out = {f"batches.{k}_fraction": v / total for k, v in self.kinds.items()}
        out["batches.total"] = float(total)
        return out

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {"kinds": dict(self.kinds), "languages": dict(self.languages), "pairs": dict(self.pairs)}
