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
from collections import Counter, defaultdict
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

import numpy as np

from xling.api.errors import InputError
from xling.api.spec.base import KNOWN_LANGUAGES
from xling.trainer.data.index import PASSAGE, QUERY, CorpusIndex, key_hash

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


class BadRowError(InputError):
    """A data row that cannot be used: ``source`` names the file and row (``where``), ``reason`` what is
    wrong with it, so that :class:`BadRows` counts by reason without parsing the text."""

    def __init__(self, where: str, reason: str):
        super().__init__(where, reason)
        self.reason = reason


@dataclass
class BadRows:
    """Bad rows seen while loading with ``skip_bad_rows``: counted per reason, with a few examples."""

    skipped: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    examples: list[str] = field(default_factory=list)

    def add(self, err: BadRowError) -> None:
        self.skipped[err.reason] += 1
        if len(self.examples) < 10:
            self.examples.append(str(err))

    @property
    def total(self) -> int:
        return sum(self.skipped.values())


def check_pair(pair: Pair, where: str) -> None:
    """Raise BadRowError (naming ``where``: file and row) if the pair is unusable."""
    if pair.language not in KNOWN_LANGUAGES:
        raise BadRowError(where, f"unknown language code {pair.language!r}")
    if not pair.pair_id:
        raise BadRowError(where, "empty pair_id")
    if pair.query is None and pair.passage is None:
        raise BadRowError(where, "neither a query nor a passage")
    if pair.query is not None and not pair.query.strip():
        raise BadRowError(where, "empty query")
    if pair.passage is not None and not pair.passage.strip():
        raise BadRowError(where, "empty passage")
    if pair.hard_negatives and pair.passage is None:
        raise BadRowError(where, "hard negatives without a passage")
    if any(not n.strip() for n in pair.hard_negatives):
        raise BadRowError(where, "empty hard negative")


def normalise(text: str) -> str:
    """The form texts are compared in: NFKC, case-folded, white space collapsed."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def text_key(text: str) -> str:
    """The conflict key of a text: two groups holding the same (normalised) text never share a batch."""
    return "text:" + hashlib.blake2b(normalise(text).encode(), digest_size=8).hexdigest()


def connected_components(links: Iterable[tuple[str, Hashable]]) -> dict[str, int]:
    """Item -> its component, for ``(item, key)`` links: items that share a key (directly or through others)
    are one component. Labels follow the sorted items, so they do not depend on the order of the links."""
    parent: dict[str, str] = {}

    def root(item: str) -> str:
        while parent.setdefault(item, item) != item:
            parent[item] = parent[parent[item]]
            item = parent[item]
        return item

    first: dict[Hashable, str] = {}
    for item, key in links:
        parent[root(item)] = root(first.setdefault(key, item))
    labels: dict[str, int] = {}
    return {item: labels.setdefault(root(item), len(labels)) for item in sorted(parent)}


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


def member_digest(pair: Pair) -> bytes:
    """The 8-byte digest of one member; the corpus fingerprint hashes these in group, then language, order."""
    fields = (
        pair.pair_id,
        pair.language,
        pair.query or "\x00",
        pair.passage or "\x00",
        pair.pool,
        *pair.hard_negatives,
    )
    h = hashlib.blake2b(digest_size=8)
    h.update("\x1f".join(fields).encode())
    h.update(b"\x1d" + "\x1f".join(pair.keys).encode() + b"\x1e")
    return h.digest()


def member_keys(pair: Pair) -> list[int]:
    """The conflict keys of one member, hashed: its own keys and a text key per query and passage."""
    texts = [t for t in (pair.query, pair.passage) if t is not None]
    return [key_hash(k) for k in (*pair.keys, *map(text_key, texts))]


def flags(pair: Pair) -> int:
    return (QUERY if pair.query is not None else 0) | (PASSAGE if pair.passage is not None else 0)


class PairCorpus:
    """Parallel groups of pairs held in memory, with the samplers' :class:`CorpusIndex`.

    ``groups[g]`` maps language -> Pair for group ``g``. The prepared corpus (``data.store``) is the same
    thing on disk; this one serves small corpora and tests.
    """

    def __init__(self, groups: Sequence[dict[str, Pair]]):
        self.groups: list[dict[str, Pair]] = [dict(sorted(g.items())) for g in groups]
        self.languages: list[str] = sorted({lang for g in self.groups for lang in g})

    @cached_property
    def index(self) -> CorpusIndex:
        """Built when a sampler asks: hashing every text is most of the cost, and the corpora that loading
        passes through never need it."""
        code = {lang: i for i, lang in enumerate(self.languages)}
        members = [(gi, pair) for gi, group in enumerate(self.groups) for pair in group.values()]
        key_group, key_value, negatives = [], [], []
        for gi, pair in members:
            keys = member_keys(pair)
            key_group += [gi] * len(keys)
            key_value += keys
            negatives += [key_hash(text_key(n)) for n in pair.hard_negatives]
        return CorpusIndex.build(
            self.languages,
            np.array([gi for gi, _ in members], dtype=np.int64),
            np.array([code[p.language] for _, p in members], dtype=np.int64),
            np.array([flags(p) for _, p in members], dtype=np.uint8),
            np.array([shared(g) for g in self.groups], dtype=bool),
            np.array(key_group, dtype=np.int64),
            np.array(key_value, dtype=np.int64),
            np.array(negatives, dtype=np.int64),
        )

    def members(self, refs: Sequence[tuple[int, str]]) -> list[Pair]:
        """The pairs of (group, language) references."""
        return [self.groups[g][lang] for g, lang in refs]

    def negatives(self, refs: Sequence[tuple[int, str]]) -> list[list[tuple[str, int | None]]]:
        """Each reference's hard negatives as (text, group): the data's own carry no group."""
        return [[(n, None) for n in pair.hard_negatives] for pair in self.members(refs)]

    @classmethod
    def from_pairs(cls, rows: Iterable[tuple[Pair, str]], report: BadRows | None = None) -> PairCorpus:
        """Group ``(pair, where)`` rows by pair_id. A pair_id that repeats a language is a bad row."""
        index: dict[str, dict[str, Pair]] = {}
        for pair, where in rows:
            try:
                check_pair(pair, where)
                group = index.setdefault(pair.pair_id, {})
                if pair.language in group:
                    raise BadRowError(where, f"pair_id {pair.pair_id!r} repeats language {pair.language!r}")
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
        return dict(sorted(Counter(lang for g in self.groups for lang in xx_languages(g)).items()))

    def fingerprint(self) -> str:
        """Content hash: keys caches and is logged to MLflow, so runs say exactly what they trained on."""
        h = hashlib.sha256()
        for group in self.groups:
            for pair in group.values():
                h.update(member_digest(pair))
        return h.hexdigest()[:16]
