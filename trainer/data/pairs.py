"""The normalised training data: pairs grouped into parallel groups.

Every loader and builder produces :class:`Pair` rows. A :class:`PairCorpus` groups them by ``pair_id``:
one group holds the translations of one pair (at most one per language). Samplers draw whole groups,
so a batch never holds two members of a group (they would be false negatives), and X-Y batches take
the query from one member and the passage from another.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from xling.trainer.spec import KNOWN_LANGUAGES


@dataclass(frozen=True, slots=True)
class Pair:
    """One (query, passage) example in one language; ``pair_id`` ties together its translations."""

    pair_id: str
    language: str
    query: str
    passage: str
    hard_negatives: tuple[str, ...] = ()


class BadRowError(ValueError):
    """A data row that cannot be used. The message names the source file and row."""


@dataclass
class RowReport:
    """Bad rows seen while loading with ``skip_bad_rows``: counted per reason, with a few examples."""

    skipped: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    examples: list[str] = field(default_factory=list)

    def add(self, err: BadRowError) -> None:
        reason = str(err).rsplit(": ", 1)[-1]
        self.skipped[reason] += 1
        if len(self.examples) < 10:
            self.examples.append(str(err))

    @property
    def total(self) -> int:
        return sum(self.skipped.values())


def check_pair(pair: Pair, where: str) -> None:
    """Raise BadRowError (naming ``where``: file and row) if the pair is unusable."""
    if pair.language not in KNOWN_LANGUAGES:
        raise BadRowError(f"{where}: unknown language code {pair.language!r}")
    if not pair.pair_id:
        raise BadRowError(f"{where}: empty pair_id")
    if not pair.query.strip():
        raise BadRowError(f"{where}: empty query")
    if not pair.passage.strip():
        raise BadRowError(f"{where}: empty passage")
    if any(not n.strip() for n in pair.hard_negatives):
        raise BadRowError(f"{where}: empty hard negative")


class PairCorpus:
    """Parallel groups of pairs, indexed for the samplers.

    ``groups[g]`` maps language -> Pair for group ``g``. ``by_language[lang]`` lists the groups that
    have ``lang``; ``parallel`` lists the groups with two or more languages (usable for X-Y).
    """

    def __init__(self, groups: Sequence[dict[str, Pair]]):
        self.groups: list[dict[str, Pair]] = list(groups)
        self.languages: list[str] = sorted({lang for g in self.groups for lang in g})
        self.by_language: dict[str, list[int]] = {lang: [] for lang in self.languages}
        for gi, group in enumerate(self.groups):
            for lang in group:
                self.by_language[lang].append(gi)
        self.parallel: list[int] = [gi for gi, g in enumerate(self.groups) if len(g) >= 2]

    @classmethod
    def from_pairs(cls, rows: Iterable[tuple[Pair, str]], report: RowReport | None = None) -> PairCorpus:
        """Group ``(pair, where)`` rows by pair_id. A pair_id that repeats a language is a bad row."""
        index: dict[str, dict[str, Pair]] = {}
        for pair, where in rows:
            try:
                check_pair(pair, where)
                group = index.setdefault(pair.pair_id, {})
                if pair.language in group:
                    raise BadRowError(
                        f"{where}: pair_id {pair.pair_id!r} repeats language {pair.language!r}"
                    )
            except BadRowError as err:
                if report is None:
                    raise
                report.add(err)
                continue
            group[pair.language] = pair
        return cls(list(index.values()))

    def __len__(self) -> int:
        return len(self.groups)

    def num_pairs(self) -> int:
        return sum(len(g) for g in self.groups)

    def sizes(self) -> dict[str, int]:
        return {lang: len(ids) for lang, ids in self.by_language.items()}

    def restrict(self, languages: Iterable[str]) -> PairCorpus:
        keep = set(languages)
        groups = [{k: v for k, v in g.items() if k in keep} for g in self.groups]
        return PairCorpus([g for g in groups if g])

    def fingerprint(self) -> str:
        """Content hash: keys caches and is logged to MLflow, so runs say exactly what they trained on."""
        h = hashlib.sha256()
        for group in self.groups:
            for lang in sorted(group):
                p = group[lang]
                h.update("\x1f".join((p.pair_id, lang, p.query, p.passage, *p.hard_negatives)).encode())
                h.update(b"\x1e")
        return h.hexdigest()[:16]

    def merge(self, other: PairCorpus) -> PairCorpus:
        return PairCorpus(self.groups + other.groups)
