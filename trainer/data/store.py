"""A prepared corpus on disk: the rows as one Arrow file, the samplers' index as ``.npy`` files.

Layout of one prepared corpus (a directory named by its preparation key, see ``data.prepare``)::

    rows.arrow      Arrow IPC file: every row read from the sources, in source order (pair_id, language,
                    query, passage, hard_negatives, keys, pool, where)
    index/*.npy     the CorpusIndex, plus member_row.npy (the rows.arrow row of each member)
    meta.json       fingerprint, languages, counts, the bad-row report: written last, so its presence
                    means the corpus is complete

Everything is memory-mapped when opened: a worker holds no text, and reads the rows of its slice of each
step (``members``). On a cluster the corpus lives in the run's storage; a ``s3://``/``gs://`` one is
copied once per node into a local cache (``locate``) because a memory map needs a local file.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import mmap
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc

from xling.api.errors import InputError
from xling.trainer.data.index import CorpusIndex
from xling.trainer.data.pairs import Pair, PairCorpus

#: Bumped whenever the layout or the meaning of a prepared corpus changes: older ones are not reused.
FORMAT = 1
ROWS, INDEX, META, NEGATIVES = "rows.arrow", "index", "meta.json", "negatives"

ROW_SCHEMA = pa.schema([
    ("pair_id", pa.string()), ("language", pa.string()), ("query", pa.string()), ("passage", pa.string()),
    ("hard_negatives", pa.list_(pa.string())), ("keys", pa.list_(pa.string())), ("pool", pa.string()),
    ("where", pa.string()),
])  # fmt: skip


@dataclass(frozen=True)
class DataLocation:
    """What a worker gets instead of the data (or of a staged model): where the directory is in the run's
    storage and what it must hold (:func:`locate` makes the node-local copy)."""

    uri: str  # a local directory or a pyarrow filesystem URI (s3://, gs://, file://)
    fingerprint: str
    negatives: str | None = None  # the key of mined hard negatives under negatives/ (``mining``)


class PreparedCorpus:
    """A prepared corpus, memory-mapped: ``index`` for the samplers, ``members`` for the texts."""

    def __init__(self, directory: Path, negatives: str | None = None):
        self.directory = directory
        self.meta: dict[str, Any] = json.loads((directory / META).read_text())
        self.languages: list[str] = self.meta["languages"]
        self.index = CorpusIndex.load(directory / INDEX, self.languages)
        self.member_row = np.asarray(np.load(directory / INDEX / "member_row.npy", mmap_mode="r"))
        reader = pa.ipc.open_file(pa.py_buffer(_random_access_map(directory / ROWS)))  # zero-copy batches
        self.batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
        self.batch_starts = np.cumsum([0] + [b.num_rows for b in self.batches])
        #: Mined negatives: per member, the member positions of its negatives (-1: none).
        self.mined = (
            np.load(directory / NEGATIVES / negatives / "members.npy", mmap_mode="r") if negatives else None
        )

    def __len__(self) -> int:
        return len(self.index)

    def num_pairs(self) -> int:
        return len(self.member_row)

    def sizes(self) -> dict[str, int]:
        return self.index.sizes()

    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    def members(self, refs: Sequence[tuple[int, str]]) -> list[Pair]:
        """The pairs of (group, language) references, read in one take from the memory-mapped rows."""
        return self.read(self.member_row[self.index.members(refs)]) if refs else []

    def negatives(self, refs: Sequence[tuple[int, str]]) -> list[list[tuple[str, int | None]]]:
        """Each reference's hard negatives as (text, group): the data's own (group None), then the mined
        ones with the group they are the passage of, so a batch can leave out its own groups' texts."""
        positions = self.index.members(refs)
        own = [[(n, None) for n in p.hard_negatives] for p in self.read(self.member_row[positions])]
        if self.mined is None:
            return own
        mined = np.asarray(self.mined[positions])
        flat = mined[mined >= 0]
        texts = iter(p.passage for p in self.read(self.member_row[flat]))
        groups = iter((self.index.member_key[flat] // len(self.languages)).tolist())
        for out, row in zip(own, mined, strict=True):
            out += [(next(texts), next(groups)) for m in row if m >= 0]
        return own

    def read(self, rows: np.ndarray) -> list[Pair]:
        """The pairs at row numbers ``rows``, taken batch by batch: a take over the whole table would first
        copy every text into one array."""
        if not len(rows):
            return []
        chunk = np.searchsorted(self.batch_starts, rows, side="right") - 1
        order = np.argsort(chunk, kind="stable")
        out: list[Pair] = [None] * len(rows)  # type: ignore[list-item]
        bounds = np.flatnonzero(np.r_[True, chunk[order][1:] != chunk[order][:-1], True])
        for lo, hi in itertools.pairwise(bounds):
            at = order[lo:hi]
            c = int(chunk[at[0]])
            for i, pair in zip(
                at, rows_to_pairs(self.batches[c].take(rows[at] - self.batch_starts[c])), strict=True
            ):
                out[i] = pair
        return out

    def materialize(self, groups: int | None = None) -> PairCorpus:
        """The first ``groups`` groups (all by default) as Python objects: small corpora and tests; a worker
        never does this."""
        n = len(self) if groups is None else min(groups, len(self))
        offsets = self.index.member_offsets[: n + 1]
        pairs = self.read(self.member_row[: offsets[-1]])
        return PairCorpus([{p.language: p for p in pairs[offsets[g] : offsets[g + 1]]} for g in range(n)])


def _random_access_map(path: Path) -> mmap.mmap:
    """The file memory-mapped read-only, advised for random access: a step reads a few rows here and there,
    and the default read-ahead would map megabytes around each of them."""
    with path.open("rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    mapped.madvise(mmap.MADV_RANDOM)
    return mapped


def rows_to_pairs(table: pa.Table | pa.RecordBatch) -> list[Pair]:
    columns = [table.column(name).to_pylist() for name in ("pair_id", "language", "query", "passage",
                                                          "hard_negatives", "keys", "pool")]  # fmt: skip
    return [Pair(pid, lang, q, p, tuple(negs or ()), tuple(keys or ()), pool)
            for pid, lang, q, p, negs, keys, pool in zip(*columns, strict=True)]  # fmt: skip


def read_meta(directory: Path) -> dict[str, Any] | None:
    """The meta of a complete prepared corpus of this format, else None."""
    try:
        meta = json.loads((directory / META).read_text())
    except (OSError, ValueError):
        return None
    return meta if meta.get("format") == FORMAT else None


def store_once(
    target: str, cache: Path, build: Callable[[Path], dict[str, Any]]
) -> tuple[dict[str, Any], bool]:
    """The meta of the complete directory at ``target`` (a local path or a URI), and whether it was there
    already; else ``build`` fills a staging directory (writing ``meta.json`` with ``format`` and
    ``fingerprint``), which is published there. A URI's staging directory is kept as this node's copy in
    ``cache``. Prepared corpora and staged models (``model.stage_model``) are stored this way."""
    remote = "://" in target
    meta = remote_meta(target) if remote else read_meta(Path(target))
    if meta is not None:
        return meta, True
    staging_parent = cache if remote else Path(target).parent
    staging_parent.mkdir(parents=True, exist_ok=True)
    staging = Path(
        tempfile.mkdtemp(prefix=f"{target.rstrip('/').rsplit('/', 1)[-1]}.tmp-", dir=staging_parent)
    )
    meta = build(staging)
    publish(staging, target, keep_local=cache / meta["fingerprint"] if remote else None)
    return meta, False


def publish(staging: Path, target: str, keep_local: Path | None = None) -> None:
    """Move a finished staging directory to ``target`` (a local path or a URI: uploaded, and the staging
    directory kept as ``keep_local``). A concurrent preparer that got there first wins: its corpus has the
    same preparation key, so it is the same corpus."""
    if "://" in target:
        import pyarrow.fs

        fs, path = pyarrow.fs.FileSystem.from_uri(target)
        if fs.get_file_info(f"{path}/{META}").type == pyarrow.fs.FileType.NotFound:
            local = pyarrow.fs.LocalFileSystem()
            meta = (staging / META).rename(staging.parent / f"{staging.name}.{META}")  # uploaded last
            fs.create_dir(path)  # pyarrow makes the folders of nested files only (a bucket needs none)
            pyarrow.fs.copy_files(str(staging), path, source_filesystem=local, destination_filesystem=fs)
            pyarrow.fs.copy_files(
                str(meta), f"{path}/{META}", source_filesystem=local, destination_filesystem=fs
            )
            meta.rename(staging / META)
        target_dir = keep_local or staging
    else:
        target_dir = Path(target)
    target_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        staging.rename(target_dir)
    except OSError:  # someone else published it meanwhile
        if read_meta(target_dir) is None:
            raise
        shutil.rmtree(staging)


def publish_negatives(directory: Path, uri: str) -> None:
    """Upload mined negatives beside a corpus in a bucket, ``meta.json`` last, unless they are there."""
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(uri)
    if fs.get_file_info(f"{path}/{META}").type != pyarrow.fs.FileType.NotFound:
        return
    local = pyarrow.fs.LocalFileSystem()
    for name in sorted(p.name for p in directory.iterdir() if p.name != META) + [META]:
        pyarrow.fs.copy_files(
            str(directory / name), f"{path}/{name}", source_filesystem=local, destination_filesystem=fs
        )


def remote_meta(uri: str) -> dict[str, Any] | None:
    """``read_meta`` for a URI."""
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(uri)
    try:
        with fs.open_input_stream(f"{path}/{META}") as f:
            meta = json.loads(f.read())
    except (OSError, ValueError):
        return None
    return meta if meta.get("format") == FORMAT else None


def locate(location: DataLocation, cache: Path) -> Path:
    """A local directory holding the prepared corpus (or staged model) of ``location``: the directory itself,
    or a copy in ``cache`` made once per node (the workers of a node wait on a lock; one copies)."""
    if "://" not in location.uri:
        directory = Path(location.uri)
    else:
        directory = cache / location.fingerprint
        if read_meta(directory) is None:
            _fetch(location.uri, directory, cache)
    meta = read_meta(directory)
    if meta is not None and location.negatives and "://" in location.uri:  # mined after this node's copy
        _fetch(
            f"{location.uri}/{NEGATIVES}/{location.negatives}",
            directory / NEGATIVES / location.negatives,
            cache,
        )
    if meta is None or meta["fingerprint"] != location.fingerprint:
        found = meta["fingerprint"] if meta else "nothing (is the storage shared with this node?)"
        raise InputError(location.uri, f"expected {location.fingerprint}, found {found}")
    return directory


def _fetch(uri: str, directory: Path, cache: Path) -> None:
    """Copy the directory at ``uri`` to ``directory`` unless it is there (one copier per node)."""
    import pyarrow.fs

    if directory.is_dir():
        return
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f"{directory.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not directory.is_dir():
            fs, path = pyarrow.fs.FileSystem.from_uri(uri)
            staging = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")
            staging.mkdir(exist_ok=True)  # pyarrow makes the folders of nested files only
            pyarrow.fs.copy_files(path, str(staging), source_filesystem=fs,
                                  destination_filesystem=pyarrow.fs.LocalFileSystem())  # fmt: skip
            staging.rename(directory)


def open_corpus(location: DataLocation, cache: Path) -> PreparedCorpus:
    return PreparedCorpus(locate(location, cache), location.negatives)
