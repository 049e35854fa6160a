"""Training data: every ``data.sources`` entry of a spec, read into one :class:`PairCorpus`.

``load_corpus`` is the entry point; the readers (``loaders``) and builders (``builders``) it dispatches to
and the overlap guard ``drop_overlapping`` are public too.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Collection, Iterator
from dataclasses import replace

from xling.trainer.data.builders import (
    drop_overlapping,
    iapp_rows,
    mlqa_rows,
    ntrex_rows,
    squad_rows,
    tydiqa_rows,
    xnli_rows,
)
from xling.trainer.data.loaders import Row, read_hf, read_pairs
from xling.trainer.data.pairs import (
    BadRowError,
    Pair,
    PairCorpus,
    RowReport,
    pair_id,
    serves_every_strategy,
    shared,
)
from xling.trainer.spec import DataSource, DataSpec

__all__ = [
    "BadRowError",
    "Pair",
    "PairCorpus",
    "RowReport",
    "drop_overlapping",
    "limit",
    "load_corpus",
    "load_source",
]

log = logging.getLogger(__name__)


def source_rows(source: DataSource, languages: Collection[str], report: RowReport | None) -> Iterator[Row]:
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
                raise ValueError(
                    f"{path}: a squad source needs the field 'language' (the language of the file)"
                )
            return squad_rows(path, source.language)
    raise ValueError(f"{path}: unknown source type {source.type!r}")


def limit(corpus: PairCorpus, languages: Collection[str], max_per_language: int | None) -> PairCorpus:
    """Keep ``languages`` and, per language, the first ``max_per_language`` groups (deterministic, and the
    same groups in every language of a parallel source, so capping keeps it parallel)."""
    counts: Counter[str] = Counter()
    groups = []
    for group in corpus.groups:
        kept = {}
        for lang, pair in group.items():
            if lang in languages and (max_per_language is None or counts[lang] < max_per_language):
                counts[lang] += 1
                kept[lang] = pair
        if kept:
            groups.append(kept)
    return PairCorpus(groups)


def load_source(
    source: DataSource, languages: Collection[str], report: RowReport | None = None
) -> PairCorpus:
    """One source, checked row by row, restricted to ``languages`` (and to members with both sides when
    ``sides: both``), capped, its rows tagged with its pool."""
    rows = ((replace(pair, pool=source.pool), where) for pair, where in source_rows(source, languages, report))
    if source.sides == "both":
        rows = ((pair, where) for pair, where in rows if pair.query is not None and pair.passage is not None)
    return limit(PairCorpus.from_pairs(rows, report), languages, source.max_pairs_per_language)


def _merge(named: list[tuple[str, PairCorpus]], report: RowReport | None) -> PairCorpus:
    """Join groups that share a pair_id across sources (e.g. one pairs file per language); a language
    that two sources give the same pair_id is a bad row."""
    index: dict[str, dict[str, Pair]] = {}
    for name, corpus in named:
        for group in corpus.groups:
            gid = pair_id(group)
            target = index.setdefault(gid, {})
            for lang, pair in group.items():
                if lang in target:
                    err = BadRowError(
                        f"{name}: pair_id {gid!r} repeats language {lang!r} of an earlier source"
                    )
                    if report is None:
                        raise err
                    report.add(err)
                    continue
                target[lang] = pair
    return PairCorpus(list(index.values()))


def load_corpus(spec: DataSpec, report: RowReport | None = None) -> PairCorpus:
    """Every source of ``spec``, restricted to ``spec.languages`` (and each source's own ``languages``),
    merged into one corpus. Bad rows raise BadRowError naming file and row, unless ``spec.skip_bad_rows``:
    then they are counted in ``report`` (a fresh one, logged, when none is passed)."""
    if not spec.skip_bad_rows:
        report = None
    elif report is None:
        report = RowReport()
    named = []
    for i, source in enumerate(spec.sources):
        languages = set(spec.languages) & set(source.languages or spec.languages)
        corpus = load_source(source, languages, report)
        name = f"data.sources[{i}] ({source.type} {source.path})"
        log.info("%s: %d groups, pairs per language %s", name, len(corpus), corpus.sizes())
        if not len(corpus):
            log.warning("%s: no pairs in languages %s", name, sorted(languages))
        named.append((name, corpus))
    corpus = _shared_pool(named, _merge(named, report))
    if report is not None and report.total:
        log.warning("skipped %d bad rows: %s", report.total, dict(report.skipped))
    if not len(corpus):
        raise ValueError(f"data: no source has pairs in languages {sorted(spec.languages)}")
    return corpus


def _shared_pool(named: list[tuple[str, PairCorpus]], corpus: PairCorpus) -> PairCorpus:
    """Keep the groups of ``shared`` sources that every strategy can draw (an X-X language and an X-Y
    language pair), so that the arms of a comparison train on one pool; ``monolingual`` groups stay.

    A shared source left with no group is an error that names it: giving a monolingual QA set to the X-X
    arm alone must be asked for (``pool: monolingual``), never happen silently."""
    kept = [g for g in corpus.groups if not shared(g) or serves_every_strategy(g)]
    kept_ids = {pair_id(g) for g in kept}
    for name, source in named:
        ids = {pair_id(g) for g in source.groups if shared(g)}
        dropped = len(ids - kept_ids)
        if ids and dropped == len(ids):
            raise ValueError(
                f"{name}: none of its {len(ids)} groups can serve every sampling strategy (X-X needs a query and "
                "a passage in one language, X-Y a query and a passage in two); set pool: monolingual to use it "
                "for X-X and mixed batches only"
            )
        if dropped:
            log.warning("%s: %d of %d groups left out of the shared pool (no X-X or no X-Y item)", name, dropped, len(ids))
    return PairCorpus(kept)
