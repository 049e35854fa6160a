"""Preparation: a spec's ``data.sources`` streamed once into a prepared corpus (``data.store``).

Rows are read, checked and appended to ``rows.arrow`` a batch at a time; what grouping needs stays behind
in compact per-row arrays (a pair-id hash, the language, flags, conflict-key hashes, an 8-byte digest:
about 40 bytes a row, never a text). Grouping, capping, merging sources, the shared-pool rule and the
overlap guard then run as array operations, with the rules the in-memory loader always had:

- a pair_id that repeats a language within a source, or across sources, is a bad row (named by file and
  row, or by source);
- ``maxPairsPerLanguage`` keeps, per language, the first groups of the source in order of first appearance;
- groups join across sources by pair_id, in order of first appearance;
- a shared-pool group that cannot serve every strategy is dropped (a shared source left with none is an
  error), and with ``dropEvalOverlap`` every group that shares an n-gram with the evaluation data.

A prepared corpus is named by its *preparation key*: the data spec, the size and mtime of every source file,
what the overlap guard reads, and the format. A run whose key exists reuses it; a sweep prepares once.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import tempfile
from array import array
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc

from xling.api.errors import InputError
from xling.api.spec.base import KNOWN_LANGUAGES
from xling.api.spec.training import DataSource, DataSpec
from xling.trainer.data.builders import (
    HoldOut,
    iapp_rows,
    mlqa_holdout,
    mlqa_rows,
    ntrex_rows,
    squad_rows,
    tydiqa_rows,
    xnli_rows,
)
from xling.trainer.data.index import PASSAGE, QUERY, CorpusIndex, key_hash
from xling.trainer.data.loaders import Row, read_hf, read_pairs
from xling.trainer.data.overlap import overlap_test
from xling.trainer.data.pairs import (
    BadRowError,
    BadRows,
    Pair,
    check_pair,
    flags,
    member_digest,
    member_keys,
    text_key,
)
from xling.trainer.data.store import (
    FORMAT,
    INDEX,
    META,
    ROW_SCHEMA,
    ROWS,
    DataLocation,
    PreparedCorpus,
    store_once,
)

log = logging.getLogger(__name__)

ALL_LANGUAGES = sorted(KNOWN_LANGUAGES)
BATCH_ROWS = 8192


@dataclass(frozen=True)
class EvalGuard:
    """The evaluation texts training must never contain: ``key`` names them (part of the preparation key),
    ``texts`` loads them (only when a corpus is built)."""

    key: str
    texts: Callable[[], list[str]]


@dataclass
class Prepared:
    """A prepared corpus, opened, and how it came to be."""

    corpus: PreparedCorpus
    location: DataLocation
    report: BadRows
    reused: bool
    mined: dict | None = None  # what mining found and removed (``mining``)


def source_rows(source: DataSource, languages: Collection[str], report: BadRows | None) -> Iterator[Row]:
    """The rows of one source; ``languages`` lets the per-language-file builders skip files."""
    path = source.path
    match source.type:
        case "pairs":
            return read_pairs(path, report)
        case "hf":
            return read_hf(path, source.split or "train", report)
        case "xnli":
            return xnli_rows(path, source.split or "dev", languages)
        case "ntrex":
            return ntrex_rows(path, languages)
        case "mlqa":
            return mlqa_rows(path, source.split, languages)
        case "tydiqa":
            return tydiqa_rows(path, source.split, languages)
        case "iapp":
            return iapp_rows(path, source.split or "train")
        case "squad":
            if source.language is None:
                raise InputError(path, "a squad source needs the field 'language' (the language of the file)")
            return squad_rows(path, source.language)
    raise InputError(path, f"unknown source type {source.type!r}")


def source_name(i: int, source: DataSource) -> str:
    return f"data.sources[{i}] ({source.type} {source.path})"


def file_stats(path: str) -> list[tuple[str, int, int]] | str:
    """Size and mtime of every file under a local source path; a hub name stands for itself."""
    p = Path(path)
    if not p.exists():
        return path
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    return [
        (str(f.relative_to(p)) if p.is_dir() else f.name, f.stat().st_size, f.stat().st_mtime_ns)
        for f in files
    ]


def preparation_key(data: DataSpec, guard: EvalGuard | None) -> str:
    basis = {"format": FORMAT, "data": data.model_dump(mode="json", exclude={"prefetch_steps", "hard_negatives"}),
             "files": [file_stats(s.path) for s in data.sources],
             "guard": guard.key if guard and data.drop_eval_overlap else None}  # fmt: skip
    return hashlib.sha256(json.dumps(basis, sort_keys=True).encode()).hexdigest()[:16]


def prepare_corpus(
    data: DataSpec, root: str, guard: EvalGuard | None = None, report: BadRows | None = None,
    cache: Path | None = None,
) -> Prepared:  # fmt: skip
    """The prepared corpus of ``data`` under ``root`` (a directory or a URI), built unless one with the same
    preparation key is there. Bad rows raise BadRowError naming file and row, unless ``data.skip_bad_rows``:
    then they are counted in ``report`` (a fresh one when none is passed). ``cache`` is the node-local copy
    of a corpus in a URI root (default: a temporary directory)."""
    from xling.trainer.data.store import open_corpus

    report = (report if report is not None else BadRows()) if data.skip_bad_rows else None
    key = preparation_key(data, guard)
    target = f"{root.rstrip('/')}/{key}"
    cache = cache or Path(tempfile.gettempdir()) / "xling-prepared"
    meta, reused = store_once(target, cache, lambda staging: _build(data, staging, guard, report))
    location = DataLocation(target, meta["fingerprint"])
    corpus = open_corpus(location, cache)
    if report is None:
        report = BadRows()
    if reused:
        report.skipped.update(meta["bad_rows"]["skipped"])
        report.examples += meta["bad_rows"]["examples"]
    return Prepared(corpus, location, report, reused)


class _Rows:
    """What grouping needs of every row read, as compact arrays; the rows themselves go to rows.arrow."""

    def __init__(self, writer: pa.ipc.RecordBatchFileWriter):
        self.writer = writer
        self.pending: list[dict] = []
        self.source, self.lang = array("h"), array("B")
        self.pid, self.keys, self.negatives = array("q"), array("q"), array("q")
        self.key_count, self.negative_count = array("H"), array("H")
        self.flags, self.wanted, self.overlaps = array("B"), array("B"), array("B")
        self.digest = bytearray()

    def add(self, source: int, pair: Pair, where: str, wanted: bool, overlaps: bool) -> None:
        self.source.append(source)
        self.lang.append(ALL_LANGUAGES.index(pair.language))
        self.pid.append(key_hash(pair.pair_id))
        keys = member_keys(pair)
        self.keys.extend(keys)
        self.key_count.append(len(keys))
        negatives = [key_hash(text_key(n)) for n in pair.hard_negatives]
        self.negatives.extend(negatives)
        self.negative_count.append(len(negatives))
        self.flags.append(flags(pair))
        self.wanted.append(wanted)
        self.overlaps.append(overlaps)
        self.digest += member_digest(pair)
        self.pending.append({"pair_id": pair.pair_id, "language": pair.language, "query": pair.query,
                             "passage": pair.passage, "hard_negatives": list(pair.hard_negatives),
                             "keys": list(pair.keys), "pool": pair.pool, "where": where})  # fmt: skip
        if len(self.pending) >= BATCH_ROWS:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.writer.write_batch(pa.RecordBatch.from_pylist(self.pending, schema=ROW_SCHEMA))
            self.pending = []

    def arrays(self) -> dict[str, np.ndarray]:
        digest = np.frombuffer(self.digest, dtype=np.uint64)  # no copy: appending is over
        return {"digest": digest} | {name: np.frombuffer(getattr(self, name), dtype=dtype) if len(getattr(self, name)) else np.empty(0, dtype)
                for name, dtype in (("source", np.int16), ("lang", np.uint8), ("pid", np.int64), ("keys", np.int64),
                                    ("negatives", np.int64), ("key_count", np.uint16), ("negative_count", np.uint16),
                                    ("flags", np.uint8), ("wanted", np.bool_), ("overlaps", np.bool_))}  # fmt: skip


def held_out(source: DataSource) -> HoldOut | None:
    """The split ``source.holdOut`` asks for (None without it): its groups are skipped when the source is
    read, before the shared-pool rule and any sampler, so no strategy can draw them."""
    if source.hold_out is None:
        return None
    return mlqa_holdout(source.path, source.hold_out.fraction, source.hold_out.seed)


def _stream(data: DataSpec, staging: Path, guard: EvalGuard | None, report: BadRows | None) -> _Rows:
    """Read every source once: each row checked (a bad one raised or counted) and written."""
    overlaps = overlap_test(guard.texts()) if guard is not None and data.drop_eval_overlap else None
    with pa.OSFile(str(staging / ROWS), "wb") as sink, pa.ipc.new_file(sink, ROW_SCHEMA) as writer:
        rows = _Rows(writer)
        for i, source in enumerate(data.sources):
            languages = set(data.languages) & set(source.languages or data.languages)
            held = split.component_of if (split := held_out(source)) else {}
            for pair, where in source_rows(source, languages, report):
                if source.sides == "both" and (pair.query is None or pair.passage is None):
                    continue
                if pair.pair_id in held:
                    continue
                try:
                    check_pair(pair, where)
                except BadRowError as err:
                    if report is None:
                        raise
                    report.add(err)
                    continue
                wanted = pair.language in languages
                pair = replace(pair, pool=source.pool)
                rows.add(i, pair, where, wanted, wanted and overlaps is not None and overlaps(pair))
        rows.flush()
    return rows


def _bad(
    table: pa.Table,
    bad: Iterable[int],
    message: Callable[[int, dict], tuple[str, str]],
    report: BadRows | None,
) -> None:
    """Raise the first of the bad rows ``bad`` (row numbers, in order), or count them all; ``message`` gives
    a row's where and reason."""
    for row in bad:
        err = BadRowError(*message(int(row), table.slice(int(row), 1).to_pylist()[0]))
        if report is None:
            raise err
        report.add(err)


def _runs(*keys: np.ndarray) -> np.ndarray:
    """For arrays sorted by ``keys``: True where a new run of equal keys starts."""
    start = np.ones(len(keys[0]), dtype=bool)
    if len(start):
        start[1:] = np.logical_or.reduce([k[1:] != k[:-1] for k in keys])
    return start


def _first_of_runs(start: np.ndarray) -> np.ndarray:
    """For each position of a sorted array, the position where its run starts."""
    return np.flatnonzero(start)[np.cumsum(start) - 1]


def _build(data: DataSpec, staging: Path, guard: EvalGuard | None, report: BadRows | None) -> dict:
    """Stream the sources into ``staging``, group the rows, write the index and meta; returns the meta."""
    rows = _stream(data, staging, guard, report)
    a = rows.arrays()
    table = pa.ipc.open_file(pa.memory_map(str(staging / ROWS))).read_all()
    src, pid, lang, seq = a["source"], a["pid"], a["lang"], np.arange(len(a["pid"]))
    names = [source_name(i, s) for i, s in enumerate(data.sources)]

    # A pair_id that repeats a language within a source: the later row is bad.
    order = np.lexsort((seq, lang, pid, src))
    repeats = np.sort(order[~_runs(src[order], pid[order], lang[order])])
    _bad(table, repeats, lambda _, r: (r["where"], f"pair_id {r['pair_id']!r} repeats language {r['language']!r}"),
         report)  # fmt: skip
    valid = np.ones(len(seq), dtype=bool)
    valid[repeats] = False
    del order, repeats

    # Each row's group within its source first appears at row first_seq.
    v = np.flatnonzero(valid)
    o = v[np.lexsort((v, pid[v], src[v]))]
    first_seq = np.full(len(seq), -1, dtype=np.int64)
    first_seq[o] = o[_first_of_runs(_runs(src[o], pid[o]))]
    del v, o

    # maxPairsPerLanguage: per source and language, the first groups in order of first appearance.
    c = np.flatnonzero(valid & a["wanted"])
    o = c[np.lexsort((first_seq[c], lang[c], src[c]))]
    rank = np.arange(len(o)) - _first_of_runs(_runs(src[o], lang[o]))
    caps = np.array([s.max_pairs_per_language or len(seq) + 1 for s in data.sources], dtype=np.int64)
    kept = np.zeros(len(seq), dtype=bool)
    kept[o[rank < caps[src[o]]]] = True
    del c, o, rank, valid

    # Sources merge by pair_id; a language that two sources give is a bad row of the later one.
    k = np.flatnonzero(kept)
    o = k[np.lexsort((first_seq[k], lang[k], pid[k]))]
    again = o[~_runs(pid[o], lang[o])]
    again = again[np.lexsort((again, first_seq[again]))]
    _bad(table, again, lambda row, r: (names[src[row]], f"pair_id {r['pair_id']!r} repeats language "
         f"{r['language']!r} of an earlier source"), report)  # fmt: skip
    member = kept.copy()
    member[again] = False
    del k, o, again, seq
    return _finish(data, staging, a, kept, member, first_seq, names, report)


def _finish(
    data: DataSpec, staging: Path, a: dict[str, np.ndarray], kept: np.ndarray, member: np.ndarray,
    first_seq: np.ndarray, names: list[str], report: BadRows | None,
) -> dict:  # fmt: skip
    """Order the groups, apply the shared-pool rule and the overlap guard, write the index and meta."""
    src, pid, lang = a["source"], a["pid"], a["lang"]
    # A group's place: its first appearance in the first source that kept one of its rows.
    k = np.flatnonzero(kept)
    o = k[np.lexsort((first_seq[k], pid[k]))]
    start = _runs(pid[o])
    group_pids, group_first = pid[o][start], first_seq[o][start]  # sorted by pid
    rank = np.empty(len(group_pids), dtype=np.int64)
    rank[np.argsort(group_first, kind="stable")] = np.arange(len(group_pids))
    m = np.flatnonzero(member)
    group = rank[np.searchsorted(group_pids, pid[m])]
    n_groups = len(group_pids)
    del k, o, start, group_pids, group_first, rank

    pools_shared = np.array([s.pool == "shared" for s in data.sources], dtype=bool)
    f = a["flags"][m]
    count = functools.partial(_count_per_group, group, n_groups)
    group_shared = count(~pools_shared[src[m]]) == 0
    n_query, n_passage, n_both = count(f & QUERY > 0), count(f & PASSAGE > 0), count(f == QUERY | PASSAGE)
    xy_ok = (n_query > 0) & (n_passage > 0) & ~((n_query == 1) & (n_passage == 1) & (n_both == 1))
    drop = group_shared & ~((n_both > 0) & xy_ok)
    for i, (name, source) in enumerate(zip(names, data.sources, strict=True)):
        mine = np.unique(group[src[m] == i]) if source.pool == "shared" else np.empty(0, np.int64)
        sizes = {ALL_LANGUAGES[c]: int(n) for c, n in enumerate(np.bincount(lang[kept & (src == i) & (a["flags"] == 3)],
                                                                        minlength=len(ALL_LANGUAGES))) if n}  # fmt: skip
        n_kept = len(np.unique(pid[kept & (src == i)]))
        log.info("%s: %d groups, pairs per language %s", name, n_kept, sizes)
        if not n_kept:
            languages = sorted(set(data.languages) & set(source.languages or data.languages))
            log.warning("%s: no pairs in languages %s", name, languages)
        dropped = int(drop[mine].sum())
        if len(mine) and dropped == len(mine):
            raise InputError(
                name,
                f"none of its {len(mine)} groups can serve every sampling strategy (X-X needs a query and "
                "a passage in one language, X-Y a query and a passage in two); set pool: monolingual to use it "
                "for X-X and mixed batches only",
            )
        if dropped:
            log.warning(
                "%s: %d of %d groups left out of the shared pool (no X-X or no X-Y item)",
                name,
                dropped,
                len(mine),
            )
    overlapping = (count(a["overlaps"][m]) > 0) & ~drop
    drop |= overlapping
    if report is not None and report.total:
        log.warning("skipped %d bad rows: %s", report.total, dict(report.skipped))
    keep_group = ~drop
    if not keep_group.any():
        raise InputError(None, f"no source has pairs in languages {sorted(data.languages)}", field="data")
    kept_members = keep_group[group]
    rows, new_group = m[kept_members], (np.cumsum(keep_group) - 1).astype(np.int32)[group[kept_members]]
    del m, group, f, kept_members, count  # the index build below is the peak: hold nothing it does not need
    return _write(staging, a, rows, new_group, group_shared[keep_group], int(overlapping.sum()), report)


def _count_per_group(group: np.ndarray, n_groups: int, mask: np.ndarray) -> np.ndarray:
    """How many members of each group ``mask`` selects."""
    return np.bincount(group[mask], minlength=n_groups)


def _write(
    staging: Path, a: dict[str, np.ndarray], rows: np.ndarray, group: np.ndarray, group_shared: np.ndarray,
    dropped_overlap: int, report: BadRows | None,
) -> dict:  # fmt: skip
    """The index and meta of the members ``rows`` (row numbers) in groups ``group`` (0..G-1, in order)."""
    present = np.unique(a["lang"][rows])
    lang = np.searchsorted(present, a["lang"][rows]).astype(np.uint8)
    order = np.lexsort((lang, group))
    rows, group, lang = rows[order], group[order], lang[order]
    key_group, key_value = _member_keys(a, rows, group)
    _, negatives = _gather(a["negatives"], a["negative_count"], rows, group)
    languages = [ALL_LANGUAGES[c] for c in present]
    index = CorpusIndex.build(
        languages, group, lang, a["flags"][rows], group_shared, key_group, key_value, negatives
    )
    index.save(staging / INDEX)
    np.save(staging / INDEX / "member_row.npy", rows.astype(np.int64))
    meta = {
        "format": FORMAT,
        "fingerprint": hashlib.sha256(a["digest"][rows].tobytes()).hexdigest()[:16],
        "languages": languages,
        "groups": len(group_shared),
        "pairs": len(rows),
        "sizes": index.sizes(),
        "dropped_overlap": dropped_overlap,
        "index_bytes": index.nbytes(),
        "bad_rows": {
            "skipped": dict(report.skipped) if report else {},
            "examples": report.examples if report else [],
        },
    }
    (staging / META).write_text(json.dumps(meta, indent=1))
    return meta


def _member_keys(
    a: dict[str, np.ndarray], rows: np.ndarray, group: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(group, key) of every member's conflict key, 12 bytes a key (the index keeps the ones that can clash)."""
    row_group = np.full(len(a["pid"]), -1, dtype=np.int32)
    row_group[rows] = group
    key_group = row_group[np.repeat(np.arange(len(row_group), dtype=np.int32), a["key_count"])]
    del row_group
    member = key_group >= 0
    return key_group[member], a["keys"][member]


def _gather(
    values: np.ndarray, counts: np.ndarray, rows: np.ndarray, group: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The variable-length per-row ``values`` (``counts`` per row, concatenated) of ``rows``, with their groups."""
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    n = counts[rows].astype(np.int64)
    within = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
    return np.repeat(group, n), values[np.repeat(offsets[rows], n) + within]
