"""Readers for pairs already in the normalised form: JSONL, CSV/TSV, Parquet files and Hugging Face datasets.

Every reader yields ``(Pair, where)``; ``where`` names the file and row (``file:line`` for JSONL/CSV, the
1-based line of the row's first physical line; ``file:index`` for Parquet and Hugging Face rows, 0-based as
pandas shows them), so :meth:`PairCorpus.from_pairs` can report bad rows precisely. Rows that cannot even be
turned into a Pair (invalid JSON, a missing JSONL key, a malformed hard-negative list) raise
:class:`BadRowError` here, or are counted in the :class:`BadRows` when one is given (``skipBadRows``).
A file that lacks a required column fails as a whole, naming the file and the column.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from xling.api.errors import InputError
from xling.trainer.data.pairs import BadRowError, BadRows, Pair

#: Columns (JSONL keys) every normalised row must have; ``hard_negatives`` and ``keys`` (conflict keys:
#: rows that share one never meet in a batch, e.g. a source document id) are optional.
PAIR_COLUMNS = ("pair_id", "language", "query", "passage")
HARD_NEGATIVES = "hard_negatives"
KEYS = "keys"
JSONL_SUFFIXES = (".jsonl", ".ndjson")
CSV_SUFFIXES = (".csv", ".tsv")
PARQUET_SUFFIXES = (".parquet", ".pq")

Row = tuple[Pair, str]


def open_text(path: str | Path) -> IO[str]:
    """Open a UTF-8 text file, gunzipping ``*.gz`` transparently (staged data is stored gzip-compressed)."""
    path = Path(path)
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return path.open(encoding="utf-8", newline="")


def format_of(path: Path) -> str:
    """``jsonl``, ``csv``, ``tsv`` or ``parquet`` from the file name (a trailing ``.gz`` is ignored)."""
    name = path.name.lower().removesuffix(".gz")
    for fmt, suffixes in (("jsonl", JSONL_SUFFIXES), ("csv", CSV_SUFFIXES), ("parquet", PARQUET_SUFFIXES)):
        for suffix in suffixes:
            if name.endswith(suffix):
                return "tsv" if suffix == ".tsv" else fmt
    raise InputError(
        path,
        "unknown pair-file format; expected one of "
        f"{', '.join(JSONL_SUFFIXES + CSV_SUFFIXES + PARQUET_SUFFIXES)} (optionally .gz)",
    )


def _strings(value: Any, where: str, column: str) -> tuple[str, ...]:
    """A list of strings (hard negatives, keys): a list (JSONL/Parquet), a JSON-encoded list or a
    ``|``-separated string (CSV)."""
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        if value.lstrip().startswith("["):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as err:
                raise BadRowError(where, f"{column} is not a valid JSON list ({err.msg})") from None
        else:
            return tuple(value.split("|"))
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise BadRowError(where, f"{column} must be a list of strings")
    return tuple(value)


def _text(value: Any) -> str:
    """A cell as text: missing values become empty (and are then rejected by check_pair with the row)."""
    return "" if value is None else str(value)


def _side(value: Any) -> str | None:
    """A query or passage cell: JSON null (or a Parquet null) means the group has no such side in this
    language (a question without a paragraph, say); anything else is text, checked by check_pair."""
    return None if value is None or (isinstance(value, float) and value != value) else str(value)


def to_pair(record: Mapping[str, Any], where: str) -> Pair:
    """Build a Pair from one row; a missing key is a bad row (JSONL rows need not share keys)."""
    missing = [c for c in PAIR_COLUMNS if c not in record]
    if missing:
        raise BadRowError(where, f"missing key {missing[0]!r}")
    return Pair(
        pair_id=_text(record["pair_id"]),
        language=_text(record["language"]),
        query=_side(record["query"]),
        passage=_side(record["passage"]),
        hard_negatives=_strings(record.get(HARD_NEGATIVES), where, HARD_NEGATIVES),
        keys=_strings(record.get(KEYS), where, KEYS),
    )


def _guarded(report: BadRows | None, make: Callable[..., Pair], *args: Any) -> Pair | None:
    """Call ``make``; a BadRowError is raised, or counted and the row dropped when a report is given."""
    try:
        return make(*args)
    except BadRowError as err:
        if report is None:
            raise
        report.add(err)
        return None


def _emit(records: Iterable[tuple[Mapping[str, Any], str]], report: BadRows | None) -> Iterator[Row]:
    for record, where in records:
        pair = _guarded(report, to_pair, record, where)
        if pair is not None:
            yield pair, where


def require_columns(columns: Iterable[str], source: str) -> None:
    """Fail for the whole file when a required column is absent: every row would be bad."""
    present = set(columns)
    for column in PAIR_COLUMNS:
        if column not in present:
            raise InputError(
                source, f"missing column {column!r} (has: {', '.join(sorted(present)) or 'none'})"
            )


def _json_pair(line: str, where: str) -> Pair:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise BadRowError(f"{where}:{err.colno}", f"invalid JSON ({err.msg})") from None  # file:line:column
    if not isinstance(record, dict):
        raise BadRowError(where, "expected a JSON object")
    return to_pair(record, where)


def read_jsonl(path: Path, report: BadRows | None = None) -> Iterator[Row]:
    with open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            pair = _guarded(report, _json_pair, line, where)
            if pair is not None:
                yield pair, where


def read_csv(path: Path, report: BadRows | None = None, delimiter: str = ",") -> Iterator[Row]:
    with open_text(path) as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        require_columns(reader.fieldnames or (), str(path))

        def records() -> Iterator[tuple[dict[str, Any], str]]:
            start = reader.line_num + 1  # a quoted field may span lines: name the row's first line
            for record in reader:
                yield record, f"{path}:{start}"
                start = reader.line_num + 1

        yield from _emit(records(), report)


def read_parquet(path: Path, report: BadRows | None = None) -> Iterator[Row]:
    import pyarrow.parquet as pq

    source = io.BytesIO(gzip.decompress(path.read_bytes())) if path.suffix == ".gz" else path
    data = pq.ParquetFile(source)
    names = data.schema_arrow.names
    require_columns(names, str(path))
    columns = [c for c in (*PAIR_COLUMNS, HARD_NEGATIVES, KEYS) if c in names]
    index = 0
    for batch in data.iter_batches(columns=columns):
        rows = batch.to_pylist()
        yield from _emit(((r, f"{path}:{index + i}") for i, r in enumerate(rows)), report)
        index += len(rows)


def pair_files(path: str | Path) -> list[Path]:
    """The pair files of a source: the file itself, or every supported file in a directory (sorted)."""
    path = Path(path)
    if path.is_dir():
        suffixes = JSONL_SUFFIXES + CSV_SUFFIXES + PARQUET_SUFFIXES
        files = [p for p in sorted(path.iterdir()) if p.name.lower().removesuffix(".gz").endswith(suffixes)]
        if not files:
            raise InputError(path, "directory holds no JSONL, CSV/TSV or Parquet pair files")
        return files
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    format_of(path)
    return [path]


def read_pairs(path: str | Path, report: BadRows | None = None) -> Iterator[Row]:
    """Rows of a normalised pair file, or of all pair files in a directory (so parallel files can group). A
    file that cannot be decoded at all (not UTF-8, not Parquet) is the user's to fix: an InputError naming it."""
    from pyarrow import ArrowInvalid

    for file in pair_files(path):
        fmt = format_of(file)
        try:
            if fmt == "jsonl":
                yield from read_jsonl(file, report)
            elif fmt == "parquet":
                yield from read_parquet(file, report)
            else:
                yield from read_csv(file, report, delimiter="\t" if fmt == "tsv" else ",")
        except (UnicodeDecodeError, ArrowInvalid) as err:
            raise InputError(file, f"cannot be read as {fmt}: {err}") from err


def read_hf(name: str, split: str = "train", report: BadRows | None = None) -> Iterator[Row]:
    """Rows of a Hugging Face dataset in the normalised form: a hub name, a local dataset folder, or a
    ``save_to_disk`` folder. Loading failures (offline, unknown name, unknown split) name the dataset."""
    import datasets

    local = Path(name)
    try:
        if (local / "state.json").exists() or (local / "dataset_dict.json").exists():
            data = datasets.load_from_disk(str(local))
            if isinstance(data, datasets.DatasetDict):
                data = data[split]
        else:
            data = datasets.load_dataset(name, split=split)
    except Exception as err:  # datasets raises many unrelated types; all mean "cannot load this name"
        offline = (
            " (HF_HUB_OFFLINE is set: only local folders work)" if os.environ.get("HF_HUB_OFFLINE") else ""
        )
        raise InputError(
            name, f"cannot load Hugging Face dataset split {split!r}{offline}: {type(err).__name__}: {err}"
        ) from err
    source = f"{name}[{split}]"
    require_columns(data.column_names, source)
    yield from _emit(((r, f"{source}:{i}") for i, r in enumerate(data)), report)
