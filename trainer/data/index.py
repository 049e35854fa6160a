"""The samplers' view of a corpus: integer arrays, a few bytes per pair, and no text.

A sampler draws group ids and checks conflict keys; it never reads a query or a passage. These arrays are
all it needs. :meth:`CorpusIndex.build` makes them from per-member arrays, for the in-memory
:class:`~xling.trainer.data.pairs.PairCorpus` and for a prepared corpus alike, so both paths give the same
batches. A prepared corpus stores them as ``.npy`` files that every worker memory-maps: the OS shares the
pages between the workers of a node, and a worker's resident memory holds only the pages its draws touch.

Conflict keys are 64-bit hashes (:func:`key_hash`), and only the keys that could ever matter are kept: a
key found in two groups, or one that is also the text of a hard negative (``batch_texts`` skips a negative
that is the text of an in-batch group). A key of one group alone can never clash, so dropping it changes
no batch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from xling.api.errors import InputError

#: Member flag bits: the member has a query / a passage.
QUERY, PASSAGE = 1, 2
BOTH = QUERY | PASSAGE


def key_hash(key: str) -> int:
    """A conflict key as a signed 64-bit integer (what the index stores and the samplers compare)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little", signed=True)


def _offsets(counts: np.ndarray) -> np.ndarray:
    out = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=out[1:])
    return out


@dataclass(frozen=True)
class CorpusIndex:
    """Compressed-row arrays over groups (``G``), members (``M``, sorted by group then language) and the
    ``L`` languages (sorted; a language's code is its position).

    ``xx_*``: per language, the groups with a query and a passage in it (X-X, mixed). ``xy_*``: per ordered
    language pair ``q * L + p``, the shared-pool groups with a query in ``q`` and a passage in ``p``.
    ``key_*``: per group, its conflict keys."""

    languages: tuple[str, ...]
    member_key: np.ndarray  # int64 [M]: group * L + language code, sorted
    member_flags: np.ndarray  # uint8 [M]: QUERY | PASSAGE
    member_offsets: np.ndarray  # int64 [G + 1]
    xx_offsets: np.ndarray  # int64 [L + 1]
    xx_groups: np.ndarray  # int32
    xy_offsets: np.ndarray  # int64 [L * L + 1]
    xy_groups: np.ndarray  # int32
    xy_union: np.ndarray  # int32: every group some X-Y pair can draw
    mixed_groups: np.ndarray  # int32: every group with an X-X language
    key_offsets: np.ndarray  # int64 [G + 1]
    key_values: np.ndarray  # int64

    @classmethod
    def build(
        cls,
        languages: Sequence[str],
        member_group: np.ndarray,
        member_lang: np.ndarray,
        member_flags: np.ndarray,
        group_shared: np.ndarray,
        key_group: np.ndarray,
        key_value: np.ndarray,
        negative_keys: np.ndarray,
    ) -> CorpusIndex:
        """From members sorted by (group, language): their groups, language codes and flags; whether each
        group is in the shared pool; every (group, key) of the groups' texts and own keys; and the keys of
        all hard-negative texts."""
        n_lang, n_groups = len(languages), len(group_shared)
        if n_groups >= 2**31:
            raise InputError(None, f"{n_groups} groups; the index holds at most 2**31 - 1", field="data")
        member_group = np.asarray(member_group)
        member_lang = np.asarray(member_lang)
        member_flags = np.asarray(member_flags, dtype=np.uint8)
        member_offsets = _offsets(np.bincount(member_group, minlength=n_groups))

        both = member_flags == BOTH
        xx_lang, xx_group = member_lang[both], member_group[both].astype(np.int32)
        order = np.argsort(xx_lang, kind="stable")  # members are sorted by group: each language's list is too
        xx_groups = xx_group[order]
        xx_offsets = _offsets(np.bincount(xx_lang, minlength=n_lang))

        shared = np.asarray(group_shared, dtype=bool)[member_group]
        group32 = np.asarray(member_group, dtype=np.int32)
        queries = [group32[shared & (member_lang == q) & (member_flags & QUERY > 0)] for q in range(n_lang)]
        passages = [
            group32[shared & (member_lang == p) & (member_flags & PASSAGE > 0)] for p in range(n_lang)
        ]
        del group32, shared
        xy_lists = [
            np.intersect1d(queries[q], passages[p], assume_unique=True)
            if q != p else np.empty(0, np.int32)
            for q in range(n_lang) for p in range(n_lang)
        ]  # fmt: skip
        xy_offsets = _offsets(np.array([len(x) for x in xy_lists], dtype=np.int64))
        xy_groups = np.concatenate(xy_lists).astype(np.int32) if xy_lists else np.empty(0, np.int32)
        del queries, passages, xy_lists
        key_offsets, key_values = _conflict_keys(n_groups, key_group, key_value, negative_keys)
        return cls(
            languages=tuple(languages),
            member_key=member_group.astype(np.int64) * n_lang + member_lang,
            member_flags=member_flags,
            member_offsets=member_offsets,
            xx_offsets=xx_offsets,
            xx_groups=xx_groups,
            xy_offsets=xy_offsets,
            xy_groups=xy_groups,
            xy_union=np.unique(xy_groups).astype(np.int32),
            mixed_groups=np.unique(xx_groups).astype(np.int32),
            key_offsets=key_offsets,
            key_values=key_values,
        )

    # ------------------------------------------------------------------ what the samplers read
    def __len__(self) -> int:
        return len(self.member_offsets) - 1

    def by_language(self) -> dict[str, np.ndarray]:
        """Language -> the groups with a query and a passage in it (languages with none left out)."""
        o = self.xx_offsets
        return {
            lang: self.xx_groups[o[i] : o[i + 1]] for i, lang in enumerate(self.languages) if o[i + 1] > o[i]
        }

    def by_pair(self) -> dict[tuple[str, str], np.ndarray]:
        """(query language, passage language) -> the groups X-Y may draw for it (pairs with none left out)."""
        o, langs, n = self.xy_offsets, self.languages, len(self.languages)
        return {(langs[i // n], langs[i % n]): self.xy_groups[o[i] : o[i + 1]]
                for i in range(n * n) if o[i + 1] > o[i]}  # fmt: skip

    def keys(self, group: int) -> list[int]:
        """The conflict keys of ``group``."""
        return self.key_values[self.key_offsets[group] : self.key_offsets[group + 1]].tolist()

    def xx_languages(self, group: int) -> list[str]:
        """The languages in which ``group`` has a query and a passage, sorted."""
        lo, hi = self.member_offsets[group], self.member_offsets[group + 1]
        codes = self.member_key[lo:hi][self.member_flags[lo:hi] == BOTH] % len(self.languages)
        return [self.languages[c] for c in codes.tolist()]

    def members(self, refs: Sequence[tuple[int, str]]) -> np.ndarray:
        """The member positions of (group, language) references (each must exist)."""
        code = {lang: i for i, lang in enumerate(self.languages)}
        wanted = np.array([g * len(self.languages) + code[lang] for g, lang in refs], dtype=np.int64)
        return np.searchsorted(self.member_key, wanted)

    def sizes(self) -> dict[str, int]:
        """Groups per language with a query and a passage there (what an X-X batch can draw)."""
        return {lang: len(ids) for lang, ids in self.by_language().items()}

    def present(self) -> set[str]:
        """The languages some member (a query or a passage) is in."""
        return {self.languages[c] for c in np.unique(self.member_key % len(self.languages)).tolist()}

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self._arrays().values())

    # ------------------------------------------------------------------ on disk
    def _arrays(self) -> dict[str, np.ndarray]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "languages"}

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        for name, array in self._arrays().items():
            np.save(directory / f"{name}.npy", array)

    @classmethod
    def load(cls, directory: Path, languages: Sequence[str]) -> CorpusIndex:
        """Memory-mapped: nothing is read until a sampler touches it."""
        names = [f.name for f in fields(cls) if f.name != "languages"]
        arrays = {n: np.asarray(np.load(directory / f"{n}.npy", mmap_mode="r")) for n in names}
        return cls(languages=tuple(languages), **arrays)


def _conflict_keys(
    n_groups: int, key_group: np.ndarray, key_value: np.ndarray, negative_keys: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per group, its distinct keys that occur more than once (in another group, in practice) or as a hard
    negative's text. Most keys are a single text's and occur once: they are found with one sort of the values
    and dropped before the (group, key) pairs are sorted, so memory stays a few bytes per key."""
    values = np.sort(key_value)
    repeated = values[1:][values[1:] == values[:-1]]
    del values
    wanted = np.unique(np.concatenate([repeated, np.asarray(negative_keys, dtype=np.int64)]))
    at = np.searchsorted(wanted, key_value)
    keep = at < len(wanted)
    keep[keep] = wanted[at[keep]] == key_value[keep]
    del at
    g, v = np.asarray(key_group, dtype=np.int64)[keep], np.asarray(key_value, dtype=np.int64)[keep]
    order = np.lexsort((v, g))
    g, v = g[order], v[order]
    distinct = np.ones(len(v), dtype=bool)
    distinct[1:] = (v[1:] != v[:-1]) | (g[1:] != g[:-1])
    return _offsets(np.bincount(g[distinct], minlength=n_groups)), v[distinct]
