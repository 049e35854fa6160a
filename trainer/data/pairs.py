"""The normalised training data: pairs grouped into parallel groups.

Every loader and builder produces :class:`Pair` rows. A :class:`PairCorpus` groups them by ``pair_id``:
one group holds the translations of one pair (at most one member per language). A member may have a
query, a passage, or both (MLQA has questions in ar and hi but paragraphs only in de, es, vi and zh), so
X-X items use languages with both and X-Y items take the query from one member and the passage from
another.

Samplers draw whole groups and never two groups that share a *conflict key* (see :func:`text_key` and
``Pair.keys``): a batch then never holds a passage that also answers another of its queries.
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

from xling.trainer.spec import KNOWN_LANGUAGES

Pool = Literal["shared", "monolingual"]


@dataclass(frozen=True, slots=True)
class Pair:
    """One language member of a group: its query and/or passage; ``pair_id`` ties the translations together.

    ``query``/``passage`` is ``None`` where the group has no such side in this language (an empty string is
    a bad row). ``keys`` are conflict keys beyond the automatic text keys (e.g. the NTREX lines a pair
    touches); ``pool`` says which strategies may draw the group (``data.sources[].pool``)."""

    pair_id: str
    language: str
    query: str | None
    passage: str | None
    hard_negatives: tuple[str, ...] = ()
    keys: tuple[str, ...] = ()
    pool: Pool = "shared"


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
    if pair.query is None and pair.passage is None:
        raise BadRowError(f"{where}: neither a query nor a passage")
    if pair.query is not None and not pair.query.strip():
        raise BadRowError(f"{where}: empty query")
    if pair.passage is not None and not pair.passage.strip():
        raise BadRowError(f"{where}: empty passage")
    if pair.hard_negatives and pair.passage is None:
        raise BadRowError(f"{where}: hard negatives without a passage")
    if any(not n.strip() for n in pair.hard_negatives):
        raise BadRowError(f"{where}: empty hard negative")


def normalise(text: str) -> str:
    """The form texts are compared in: NFKC, case-folded, white space collapsed."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def text_key(text: str) -> str:
    """The conflict key of a text: two groups holding the same (normalised) text never share a batch."""
    return "text:" + hashlib.blake2b(normalise(text).encode(), digest_size=8).hexdigest()


def group_keys(group: dict[str, Pair]) -> set[str]:
    """Every conflict key of a group: its members' own keys and a text key per query and passage."""
    keys: set[str] = set()
    for pair in group.values():
        keys.update(pair.keys)
        keys.update(text_key(t) for t in (pair.query, pair.passage) if t is not None)
    return keys


def xx_languages(group: dict[str, Pair]) -> list[str]:
    """Languages in which the group has both a query and a passage (usable for X-X and mixed items)."""
    return sorted(lang for lang, p in group.items() if p.query is not None and p.passage is not None)


def xy_pairs(group: dict[str, Pair]) -> list[tuple[str, str]]:
    """Ordered (query language, passage language) pairs, different languages, the group can serve."""
    queries = sorted(lang for lang, p in group.items() if p.query is not None)
    passages = sorted(lang for lang, p in group.items() if p.passage is not None)
    return [(q, p) for q in queries for p in passages if q != p]


def pair_id(group: dict[str, Pair]) -> str:
    """The id every member of a group shares."""
    return next(iter(group.values())).pair_id


def shared(group: dict[str, Pair]) -> bool:
    """Whether every strategy may draw the group (no member from a ``monolingual`` pool)."""
    return all(p.pool == "shared" for p in group.values())


def serves_every_strategy(group: dict[str, Pair]) -> bool:
    """A group every strategy can draw: one X-X language and one X-Y language pair."""
    return bool(xx_languages(group)) and bool(xy_pairs(group))


class PairCorpus:
    """Parallel groups of pairs, indexed for the samplers.

    ``groups[g]`` maps language -> Pair for group ``g``. ``by_language[lang]`` lists the groups with a query
    and a passage in ``lang`` (X-X, mixed); ``by_pair[(q, p)]`` the groups X-Y may draw for that ordered
    language pair (not those of a ``monolingual`` pool); ``keys[g]`` the conflict-key ids of group ``g``
    (``key_ids`` maps each key to its id).
    """

    def __init__(self, groups: Sequence[dict[str, Pair]]):
        self.groups: list[dict[str, Pair]] = list(groups)
        self.languages: list[str] = sorted({lang for g in self.groups for lang in g})
        self.by_language: dict[str, list[int]] = defaultdict(list)
        self.by_pair: dict[tuple[str, str], list[int]] = defaultdict(list)
        for gi, group in enumerate(self.groups):
            for lang in xx_languages(group):
                self.by_language[lang].append(gi)
            if shared(group):
                for pair in xy_pairs(group):
                    self.by_pair[pair].append(gi)
        self.by_language = dict(sorted(self.by_language.items()))
        self.by_pair = dict(sorted(self.by_pair.items()))

    @cached_property
    def key_ids(self) -> dict[str, int]:
        """Each conflict key's id. Hashing every text is most of a corpus's build time, so it waits until a
        sampler asks: the corpora that loading, capping and merging pass through never pay for it."""
        ids: dict[str, int] = {}
        for group in self.groups:
            for key in sorted(group_keys(group)):
                ids.setdefault(key, len(ids))
        return ids

    @cached_property
    def keys(self) -> list[tuple[int, ...]]:
        """The conflict-key ids of each group."""
        ids = self.key_ids
        return [tuple(ids[key] for key in sorted(group_keys(group))) for group in self.groups]

    @classmethod
    def from_pairs(cls, rows: Iterable[tuple[Pair, str]], report: RowReport | None = None) -> PairCorpus:
        """Group ``(pair, where)`` rows by pair_id. A pair_id that repeats a language is a bad row."""
        index: dict[str, dict[str, Pair]] = {}
        for pair, where in rows:
            try:
                check_pair(pair, where)
                group = index.setdefault(pair.pair_id, {})
                if pair.language in group:
                    raise BadRowError(f"{where}: pair_id {pair.pair_id!r} repeats language {pair.language!r}")
            except BadRowError as err:
                if report is None:
                    raise
                report.add(err)
                continue
            group[pair.language] = pair
        return cls([g for g in index.values() if g])

    def __len__(self) -> int:
        return len(self.groups)

    def num_pairs(self) -> int:
        return sum(len(g) for g in self.groups)

    def sizes(self) -> dict[str, int]:
        """Groups per language with a query and a passage there (what an X-X batch can draw)."""
        return {lang: len(ids) for lang, ids in self.by_language.items()}

    def xy_groups(self) -> list[int]:
        """The groups an X-Y batch can draw (any language pair)."""
        return sorted({g for ids in self.by_pair.values() for g in ids})

    def fingerprint(self) -> str:
        """Content hash: keys caches and is logged to MLflow, so runs say exactly what they trained on."""
        h = hashlib.sha256()
        for group in self.groups:
            for lang in sorted(group):
                p = group[lang]
                fields = (p.pair_id, lang, p.query or "\x00", p.passage or "\x00", p.pool, *p.hard_negatives)
                h.update("\x1f".join(fields).encode())
                h.update(b"\x1d" + "\x1f".join(p.keys).encode() + b"\x1e")
        return h.hexdigest()[:16]
