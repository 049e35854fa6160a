"""Batch samplers: the research variable.

Every sampler answers one question: which items form global batch ``step``? The answer is a pure
function of ``(seed, step)`` (an RNG seeded with both), so
- every rank computes the same global batch and takes its own disjoint slice,
- resuming at step k reproduces the batches exactly, with no sampler state to checkpoint,
- the batch type (X-X language, or X-Y) is decided once per *global* step, as homogeneity must hold for
  the negative pool that all ranks share.

No false negatives by construction: a batch holds distinct groups (never two translations of one pair)
and never two groups that share a conflict key (one text, an overlapping NTREX window, a shared MLQA
paragraph), so no in-batch passage also answers another item's query.

The distributions (docs/research-protocol.md): an X-X batch language is drawn uniformly (or by size) over
the languages that can fill a batch; each X-Y item draws its ordered (query, passage) language pair
uniformly (or by size) over the pairs the data can serve, then a group that has that pair.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from xling.api.errors import InputError
from xling.api.metrics import BATCHES, join
from xling.api.spec.training import SamplingSpec
from xling.trainer.data.index import CorpusIndex

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


class _Batch:
    """The groups drawn so far for one batch and the conflict keys they hold."""

    def __init__(self, index: CorpusIndex):
        self.index = index
        self.groups: set[int] = set()
        self.used: set[int] = set()

    def take(self, g: int) -> bool:
        """Add group ``g`` unless it is in the batch already or shares a conflict key with it."""
        if g in self.groups:
            return False
        keys = self.index.keys(g)
        if not self.used.isdisjoint(keys):
            return False
        self.groups.add(g)
        self.used.update(keys)
        return True


def _draw(rng: np.random.Generator, population: Sequence[int], batch: _Batch) -> int | None:
    """A group of ``population`` that fits ``batch``: a few uniform tries (O(1) for a batch far smaller than
    the population), then a scan from a random offset; None when no member fits."""
    n = len(population)
    for i in rng.integers(0, n, size=min(n, 8)):
        g = int(population[i])
        if batch.take(g):
            return g
    start = int(rng.integers(n))
    for j in range(n):
        g = int(population[(start + j) % n])
        if batch.take(g):
            return g
    return None


def _can_fill(population: Sequence[int], index: CorpusIndex, k: int) -> bool:
    """Whether ``population`` holds ``k`` groups without a shared key (greedy, so a yes is certain; it
    stops at the k-th, not at the end of a large population)."""
    batch, taken = _Batch(index), 0
    for g in population:
        taken += batch.take(int(g))
        if taken >= k:
            return True
    return False


def _weights(sizes: Sequence[int], weighting: str, temperature: float) -> np.ndarray:
    w = np.asarray(sizes, dtype=float)
    w = w ** (1.0 / temperature) if weighting == "size" else np.ones_like(w)
    return w / w.sum() if w.sum() else w


class BatchSampler:
    """Base class: subclasses implement :meth:`plan`. ``batch_size`` is the *global* batch size."""

    kind: str = ""  # the batch kind it produces ("hybrid": xx or xy)

    def __init__(self, index: CorpusIndex, batch_size: int, sampling: SamplingSpec, steps: int | None = None):
        self.index = index
        self.batch_size = batch_size
        self.sampling = sampling
        self.steps = steps  # the run's length (optimization.maxSteps): the exact alpha schedule's period
        self._by_language, self._by_pair = index.by_language(), index.by_pair()
        # X-X: only languages that can fill a batch (a smaller one would fail mid-run)
        self._xx_langs = [
            lang for lang, ids in self._by_language.items() if _can_fill(ids, index, batch_size)
        ]
        sizes = [len(self._by_language[lang]) for lang in self._xx_langs]
        self._xx_p = _weights(sizes, sampling.language_weighting, sampling.language_temperature)
        self._xy_pairs = list(self._by_pair)
        sizes = [len(self._by_pair[pair]) for pair in self._xy_pairs]
        self._xy_p = _weights(sizes, sampling.pair_weighting, sampling.language_temperature)
        self._mixed = index.mixed_groups

    def plan(self, step: int) -> BatchPlan:
        raise NotImplementedError

    def uses(self) -> set[str]:
        """The batch kinds this sampler can produce."""
        return {self.kind}

    def drawable(self) -> tuple[set[int], set[str], set[str]]:
        """The groups, query languages and passage languages this sampler can ever draw: the research
        samples check that they are the same for every strategy."""
        groups, queries, passages = set(), set(), set()
        if "xx" in self.uses():
            for lang in self._xx_langs:
                groups.update(self._by_language[lang].tolist())
            queries.update(self._xx_langs)
            passages.update(self._xx_langs)
        if "xy" in self.uses():
            for q, p in self._xy_pairs:
                groups.update(self._by_pair[(q, p)].tolist())
                queries.add(q)
                passages.add(p)
        if "mixed" in self.uses():
            groups.update(self._mixed.tolist())
            queries.update(self._by_language)
            passages.update(self._by_language)
        return groups, queries, passages

    def _fail(self, step: int, what: str) -> InputError:
        return InputError(
            None,
            f"step {step}: cannot fill a global batch of {self.batch_size} ({what}) with groups that share no "
            "conflict key; lower optimization.globalBatchSize or add data",
        )

    def _xx(self, rng: np.random.Generator, step: int) -> BatchPlan:
        lang = self._xx_langs[int(rng.choice(len(self._xx_langs), p=self._xx_p))]
        batch, population, items = _Batch(self.index), self._by_language[lang], []
        for _ in range(self.batch_size):
            g = _draw(rng, population, batch)
            if g is None:
                raise self._fail(step, f"X-X in {lang}")
            items.append(Item(g, lang, lang))
        return BatchPlan(step, "xx", tuple(items), language=lang)

    def _xy(self, rng: np.random.Generator, step: int) -> BatchPlan:
        batch, p, items = _Batch(self.index), self._xy_p.copy(), []
        while len(items) < self.batch_size:
            if not p.sum():
                raise self._fail(step, "X-Y")
            i = int(rng.choice(len(p), p=p / p.sum()))
            qlang, plang = self._xy_pairs[i]
            g = _draw(rng, self._by_pair[(qlang, plang)], batch)
            if g is None:
                p[i] = 0.0  # this language pair has no group left that fits the batch
                continue
            items.append(Item(g, qlang, plang))
        return BatchPlan(step, "xy", tuple(items))

    def _mixed_batch(self, rng: np.random.Generator, step: int) -> BatchPlan:
        batch, items = _Batch(self.index), []
        for _ in range(self.batch_size):
            g = _draw(rng, self._mixed, batch)
            if g is None:
                raise self._fail(step, "mixed")
            langs = self.index.xx_languages(g)
            lang = langs[int(rng.integers(len(langs)))]
            items.append(Item(g, lang, lang))
        return BatchPlan(step, "mixed", tuple(items))


class XXSampler(BatchSampler):
    """X-X-mono: every batch is one language (drawn uniformly or by size)."""

    kind = "xx"

    def plan(self, step: int) -> BatchPlan:
        return self._xx(_rng(self.sampling.seed, step), step)


class XYSampler(BatchSampler):
    """X-Y: each pair's query and passage languages differ (pairs drawn independently)."""

    kind = "xy"

    def plan(self, step: int) -> BatchPlan:
        return self._xy(_rng(self.sampling.seed, step), step)


def xx_count(alpha: float, steps: int) -> int:
    """X-X batches in a run of ``steps`` under the exact schedule: round(alpha * steps), halves up."""
    return math.floor(alpha * steps + 0.5)


class HybridSampler(BatchSampler):
    """Hybrid: X-X-mono with probability alpha, else X-Y; one decision per global batch.

    ``alphaSchedule: bernoulli`` tosses a coin per batch; ``exact`` makes every block of ``steps``
    consecutive steps hold exactly :func:`xx_count` X-X batches, placed by a seeded permutation of the
    block, so the decision is still a pure function of (seed, step) and ranks and resumes agree."""

    kind = "hybrid"

    def __init__(self, index: CorpusIndex, batch_size: int, sampling: SamplingSpec, steps: int | None = None):
        super().__init__(index, batch_size, sampling, steps)
        if sampling.alpha_schedule == "exact" and not steps:
            raise InputError(
                None, "'exact' needs the run's length (optimization.maxSteps)", field="sampling.alphaSchedule"
            )
        self._block: tuple[int, np.ndarray] | None = None

    def uses(self) -> set[str]:
        return {"xx"} if self.sampling.alpha >= 1 else {"xy"} if self.sampling.alpha <= 0 else {"xx", "xy"}

    def is_xx(self, step: int, rng: np.random.Generator) -> bool:
        """The batch type of ``step``; ``rng`` is the step's own generator (the coin of bernoulli)."""
        if self.sampling.alpha_schedule == "bernoulli":
            return bool(rng.random() < self.sampling.alpha)
        assert self.steps  # checked in __init__
        block, position = divmod(step, self.steps)
        if self._block is None or self._block[0] != block:
            order = np.random.default_rng([self.sampling.seed, block, 0xA1FA]).permutation(self.steps)
            self._block = (block, order < xx_count(self.sampling.alpha, self.steps))
        return bool(self._block[1][position])

    def plan(self, step: int) -> BatchPlan:
        rng = _rng(self.sampling.seed, step)
        if self.sampling.alpha in (0.0, 1.0):  # no coin: XXSampler's (1) and XYSampler's (0) batches
            return self._xx(rng, step) if self.sampling.alpha else self._xy(rng, step)
        return self._xx(rng, step) if self.is_xx(step, rng) else self._xy(rng, step)


class MixedSampler(BatchSampler):
    """LAReQA's X-X: same-language pairs, languages mixed inside the batch (a further baseline)."""

    kind = "mixed"

    def plan(self, step: int) -> BatchPlan:
        return self._mixed_batch(_rng(self.sampling.seed, step), step)


SAMPLERS: dict[str, type[BatchSampler]] = {
    "xx": XXSampler,
    "xy": XYSampler,
    "hybrid": HybridSampler,
    "mixed": MixedSampler,
}


def build_sampler(
    index: CorpusIndex, batch_size: int, sampling: SamplingSpec, steps: int | None = None
) -> BatchSampler:
    """The spec's sampler for a run of ``steps`` global steps; refused (before any worker starts) when the
    data cannot fill its batches."""
    sampler = SAMPLERS[sampling.strategy](index, batch_size, sampling, steps)
    uses = sampler.uses()
    if "xx" in uses and not sampler._xx_langs:
        raise InputError(
            None,
            f"{sampling.strategy!r} needs a language with {batch_size} groups that have a query "
            f"and a passage in it and share no conflict key (optimization.globalBatchSize); the data has "
            f"{index.sizes() or 'none'}",
            field="sampling.strategy",
        )
    if "xy" in uses and not _can_fill(index.xy_union, index, batch_size):
        raise InputError(
            None,
            f"{sampling.strategy!r} needs at least {batch_size} parallel groups (a query and a "
            f"passage in two languages, no shared conflict key); the data has {len(index.xy_union)}",
            field="sampling.strategy",
        )
    if "mixed" in uses and not _can_fill(sampler._mixed, index, batch_size):
        raise InputError(
            None, f"'mixed' needs {batch_size} groups that share no conflict key", field="sampling.strategy"
        )
    return sampler


@dataclass
class Composition:
    """The realised batch mix, counted so runs can show what they actually trained on."""

    kinds: Counter[str] = field(default_factory=Counter)
    languages: Counter[str] = field(default_factory=Counter)
    passages: Counter[str] = field(default_factory=Counter)
    pairs: Counter[str] = field(default_factory=Counter)

    def add(self, plan: BatchPlan) -> None:
        self.kinds[plan.kind] += 1
        for item in plan.items:
            self.languages[item.qlang] += 1
            self.passages[item.plang] += 1
            self.pairs[f"{item.qlang}-{item.plang}"] += 1

    def metrics(self) -> dict[str, float]:
        """Batch-kind fractions and the realised per-language query and passage shares."""
        total = max(1, sum(self.kinds.values()))
        out = {join(BATCHES, f"{k}_fraction"): v / total for k, v in self.kinds.items()}
        out[join(BATCHES, "total")] = float(total)
        for name, counts in (("query_share", self.languages), ("passage_share", self.passages)):
            n = max(1, sum(counts.values()))
            out.update({join(BATCHES, name, lang): c / n for lang, c in sorted(counts.items())})
        return out

    @classmethod
    def from_dict(cls, counts: dict[str, dict[str, int]]) -> Composition:
        """The counts a checkpoint saved (:meth:`as_dict`), so a resumed run keeps counting where it was."""
        return cls(
            **{name: Counter(counts.get(name, {})) for name in ("kinds", "languages", "passages", "pairs")}
        )

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {"kinds": dict(self.kinds), "languages": dict(self.languages), "passages": dict(self.passages),
                "pairs": dict(self.pairs)}  # fmt: skip
