"""LAReQA-format suites (XQuAD-R, MLQA-R): SQuAD JSON plus per-paragraph sentence spans.

Every sentence of every paragraph in every language is a candidate. A question's relevant set is the
sentence holding its answer start, in its own paragraph and in each other language's version of the
same question id (11 per question on XQuAD-R; 2-4 on MLQA-R, whose ids are not in every language).
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from xling.api.spec.base import CandidateContext, ClusterUnit
from xling.api.spec.training import HoldOutSpec
from xling.trainer.data.pairs import connected_components
from xling.trainer.evaluation.errors import EvalDataError

#: The clusters above the question that per_query.json labels every query with (sweep.bootstrapUnit).
CLUSTER_UNITS: tuple[ClusterUnit, ...] = ("paragraph", "article")


@dataclass(frozen=True)
class LanguageData:
    """One language's candidates and queries. Candidate indices are local to the language."""

    language: str
    file: Path
    candidate_ids: list[str]
    candidate_texts: list[str]
    query_ids: list[str]
    query_texts: list[str]
    #: question id -> local index of its answer sentence, for every question whose paragraph is kept
    #: (max_queries shortens the query list, never the relevant sets).
    answer_of: dict[str, int]
    #: question id -> (article, paragraph) position in the file: the units the bootstrap resamples.
    place_of: dict[str, tuple[int, int]] = field(default_factory=dict)


@dataclass(frozen=True)
class LareqaSuite:
    """A loaded suite; the pooled candidate index is the concatenation of the languages in order."""

    name: str
    languages: tuple[str, ...]
    candidate_context: CandidateContext
    data: dict[str, LanguageData]
    fingerprint: str
    options: dict[str, Any] = field(default_factory=dict)
    #: a query's own-language relevant candidate is its own text (a parallel-sentence suite, ntrex-r):
    #: left out of its relevant set and of its ranking, so only translations count
    self_match: bool = False

    @cached_property
    def offsets(self) -> dict[str, int]:
        """Start of each language's block in the pool."""
        out, start = {}, 0
        for lang in self.languages:
            out[lang] = start
            start += len(self.data[lang].candidate_ids)
        return out

    @property
    def pool_size(self) -> int:
        return sum(len(d.candidate_ids) for d in self.data.values())

    @cached_property
    def pool_ids(self) -> list[str]:
        """Candidate ids in pool order (``<lang>:<paragraph>:<sentence>``)."""
        return [cid for lang in self.languages for cid in self.data[lang].candidate_ids]

    @cached_property
    def candidate_language(self) -> np.ndarray:
        """Language index (into ``languages``) of every pooled candidate."""
        return np.repeat(
            np.arange(len(self.languages)), [len(self.data[lang].candidate_ids) for lang in self.languages]
        )

    def clusters(self, unit: ClusterUnit) -> dict[str, int]:
        """Question id -> its cluster: the connected component of questions that share a paragraph (or an
        article) in any language. Translations of a question always share one; on XQuAD-R, whose files are
        parallel, a paragraph cluster is one paragraph; on MLQA-R it joins paragraphs that translations link."""
        return connected_components(
            (qid, (lang, article) if unit == "article" else (lang, article, paragraph))
            for lang in self.languages
            for qid, (article, paragraph) in self.data[lang].place_of.items()
        )

    def own_copy(self, lang: str) -> np.ndarray | None:
        """With ``self_match``: each query's own text in the pool (to be ranked out), else None."""
        if not self.self_match:
            return None
        answer_of, offset = self.data[lang].answer_of, self.offsets[lang]
        return np.array([offset + answer_of[q] for q in self.data[lang].query_ids], dtype=np.int64)

    def relevant(self, lang: str) -> np.ndarray:
        """Pooled indices of each query's relevant candidates, shape (queries, languages), -1 = none."""
        ids = self.data[lang].query_ids
        out = np.full((len(ids), len(self.languages)), -1, dtype=np.int64)
        for j, other in enumerate(self.languages):
            if self.self_match and other == lang:
                continue
            answer_of, offset = self.data[other].answer_of, self.offsets[other]
            for i, qid in enumerate(ids):
                if qid in answer_of:
                    out[i, j] = offset + answer_of[qid]
        return out


def find_file(directory: Path, lang: str) -> Path:
    """``<lang>.json`` or its gzipped copy."""
    for name in (f"{lang}.json", f"{lang}.json.gz"):
        if (directory / name).is_file():
            return directory / name
    raise EvalDataError(directory, f"no {lang}.json or {lang}.json.gz")


def discover_languages(directory: Path) -> list[str]:
    """Language codes of the ``<lang>.json[.gz]`` files in a directory, sorted."""
    if not directory.is_dir():
        raise EvalDataError(directory, "not a directory")
    names = {p.name.split(".")[0] for p in directory.iterdir() if p.name.endswith((".json", ".json.gz"))}
    langs = sorted(n for n in names if n.isalpha() and n.islower() and 2 <= len(n) <= 3)
    if not langs:
        raise EvalDataError(directory, "no <lang>.json or <lang>.json.gz files")
    return langs


def _read_json(path: Path) -> tuple[Any, bytes]:
    raw = path.read_bytes()
    text = gzip.decompress(raw) if path.name.endswith(".gz") else raw
    try:
        return json.loads(text), text
    except json.JSONDecodeError as err:
        raise EvalDataError(path, f"not valid JSON ({err})") from None


def _field(record: dict[str, Any], key: str, path: Path, where: str | None, kind: type) -> Any:
    """``record[key]``, of type ``kind``; ``where`` is the record's location in the file (None: the root)."""
    if not isinstance(record, dict) or key not in record:
        raise EvalDataError(path, f"missing {key!r}", field=where)
    value = record[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise EvalDataError(path, f"{key!r} must be {kind.__name__}, got {type(value).__name__}", field=where)
    return value


def _paragraphs(doc: Any, path: Path) -> list[tuple[int, str, dict[str, Any]]]:
    """Every paragraph in file order, with its article's index and its location for error messages."""
    articles = _field(doc, "data", path, None, list)
    out = []
    for a, article in enumerate(articles):
        paragraphs = _field(article, "paragraphs", path, f"data[{a}]", list)
        out.extend((a, f"data[{a}].paragraphs[{p}]", par) for p, par in enumerate(paragraphs))
    return out


def _answer_sentence(breaks: list[Any], start: int, path: Path, where: str) -> int:
    for i, span in enumerate(breaks):
        if not (isinstance(span, list | tuple) and len(span) == 2):
            raise EvalDataError(path, f"sentence_breaks[{i}] is not a [start, end] pair", field=where)
        if span[0] <= start < span[1]:
            return i
    raise EvalDataError(
        path, f"answer_start {start} is outside every sentence (sentence_breaks {breaks})", field=where
    )


def load_language(
    path: Path,
    lang: str,
    *,
    candidate_context: CandidateContext = "sentence",
    max_paragraphs: int | None = None,
    max_queries: int | None = None,
) -> tuple[LanguageData, str]:
    """Parse one language file; return its data and a digest of the file's bytes."""
    doc, raw = _read_json(path)
    cand_ids: list[str] = []
    cand_texts: list[str] = []
    query_ids: list[str] = []
    query_texts: list[str] = []
    answer_of: dict[str, int] = {}
    place_of: dict[str, tuple[int, int]] = {}
    for p, (article, where, par) in enumerate(_paragraphs(doc, path)[:max_paragraphs]):
        context = _field(par, "context", path, where, str)
        sentences = _field(par, "sentences", path, where, list)
        breaks = _field(par, "sentence_breaks", path, where, list)
        if len(sentences) != len(breaks):
            raise EvalDataError(
                path, f"{len(sentences)} sentences but {len(breaks)} sentence_breaks", field=where
            )
        first = len(cand_ids)
        for s, sentence in enumerate(sentences):
            if not isinstance(sentence, str):
                raise EvalDataError(path, f"sentences[{s}] is not a string", field=where)
            cand_ids.append(f"{lang}:{p}:{s}")
            cand_texts.append(sentence if candidate_context == "sentence" else f"{sentence} {context}")
        for k, qa in enumerate(_field(par, "qas", path, where, list)):
            qwhere = f"{where}.qas[{k}]"
            qid = _field(qa, "id", path, qwhere, str)
            qwhere = f"{qwhere} (id {qid})"
            answers = _field(qa, "answers", path, qwhere, list)
            if not answers:
                raise EvalDataError(path, "empty 'answers'", field=qwhere)
            start = _field(answers[0], "answer_start", path, f"{qwhere}.answers[0]", int)
            if qid in answer_of:
                raise EvalDataError(path, "duplicate question id", field=qwhere)
            answer_of[qid] = first + _answer_sentence(breaks, start, path, qwhere)
            place_of[qid] = (article, p)
            query_ids.append(qid)
            query_texts.append(_field(qa, "question", path, qwhere, str))
    data = LanguageData(
        language=lang,
        file=path,
        candidate_ids=cand_ids,
        candidate_texts=cand_texts,
        query_ids=query_ids[:max_queries],
        query_texts=query_texts[:max_queries],
        answer_of=answer_of,
        place_of=place_of,
    )
    return data, hashlib.sha256(raw).hexdigest()


def load_lareqa(
    name: str,
    directory: str | Path,
    *,
    languages: list[str] | None = None,
    candidate_context: CandidateContext = "sentence",
    max_paragraphs: int | None = None,
    max_queries: int | None = None,
) -> LareqaSuite:
    """Load a LAReQA-format suite. ``max_paragraphs`` keeps the first N paragraphs of each language
    (the same positions, so XQuAD-R stays parallel); ``max_queries`` keeps the first N questions."""
    directory = Path(directory)
    langs = list(languages or discover_languages(directory))
    data: dict[str, LanguageData] = {}
    digest = hashlib.sha256(f"{candidate_context}|{max_paragraphs}|{max_queries}".encode())
    for lang in langs:
        data[lang], file_digest = load_language(
            find_file(directory, lang),
            lang,
            candidate_context=candidate_context,
            max_paragraphs=max_paragraphs,
            max_queries=max_queries,
        )
        digest.update(f"|{lang}:{file_digest}".encode())
    return LareqaSuite(
        name=name,
        languages=tuple(langs),
        candidate_context=candidate_context,
        data=data,
        fingerprint=digest.hexdigest()[:16],
        options={"max_paragraphs": max_paragraphs, "max_queries": max_queries, "path": str(directory)},
    )


def load_ntrex_suite(
    name: str, directory: str | Path, *, languages: list[str] | None, first_line: int, lines: int | None
) -> LareqaSuite:
    """A pooled parallel-sentence suite from NTREX-128 (news, out of the QA domain): every line is a query
    in every language, relevant are its translations in the other languages (its own text is ranked out),
    candidates are the same lines in all languages. Clusters for the bootstrap: the line (paragraph) and
    its news document (article)."""
    from xling.trainer.data.builders import NTREX_LANGUAGES, ntrex_doc_ids, ntrex_sentences

    directory = Path(directory)
    langs = list(languages or sorted(NTREX_LANGUAGES.values()))
    try:
        doc_ids = ntrex_doc_ids(directory)
        stop = len(doc_ids) if lines is None else first_line + lines
        if stop > len(doc_ids) or first_line >= stop:
            raise ValueError(f"lines {first_line + 1}-{stop} are not within its {len(doc_ids)} lines")
        texts = ntrex_sentences(directory, langs, range(first_line, stop))
    except (OSError, ValueError) as err:
        raise EvalDataError(directory, f"{name}: {err}") from None
    docs = {d: k for k, d in enumerate(dict.fromkeys(doc_ids))}
    qids = [str(i) for i in range(first_line, stop)]
    place = {q: (docs[doc_ids[int(q)]], int(q)) for q in qids}
    digest = hashlib.sha256(f"ntrex|{first_line}|{stop}".encode())
    data = {}
    for lang in langs:
        digest.update("\0".join(texts[lang]).encode())
        data[lang] = LanguageData(lang, directory, [f"{lang}:{q}:0" for q in qids], texts[lang], qids, texts[lang],
                                  {q: k for k, q in enumerate(qids)}, place)  # fmt: skip
    return LareqaSuite(name, tuple(langs), "sentence", data, digest.hexdigest()[:16],
                       {"first_line": first_line, "lines": stop - first_line, "path": str(directory)},
                       self_match=True)  # fmt: skip


def load_mlqa_holdout(
    name: str, directory: str | Path, *, languages: list[str] | None, hold_out: HoldOutSpec,
    max_queries: int | None = None,
) -> LareqaSuite:  # fmt: skip
    """The in-domain hold-out of an MLQA training source (``data.sources[i].holdOut``), pooled at paragraph
    level: queries are the held-out questions in each language, candidates the held-out paragraphs (each
    distinct text once per language), relevant the paragraph of the question's group in every language that
    has it. Paragraphs, not sentences: the bundled MLQA files carry no answer spans (the builder's passage is
    the whole paragraph), so no answer sentence exists, and paragraphs are what training matches questions
    to. A question whose text another held-out group asks too (MLQA repeats a few) is left out: both
    groups' paragraphs answer it, but only one would count. Clusters for the bootstrap: the hold-out
    component (questions sharing a paragraph), for both units."""
    from xling.trainer.data.builders import mlqa_holdout, mlqa_rows

    directory = Path(directory)
    try:
        split = mlqa_holdout(str(directory), hold_out.fraction, hold_out.seed)
        rows = [pair for pair, _ in mlqa_rows(directory) if pair.pair_id in split.component_of]
    except (OSError, ValueError) as err:
        raise EvalDataError(directory, f"{name}: {err}") from None
    langs = list(languages or sorted({p.language for p in rows if p.passage is not None}))
    answered = {p.pair_id for p in rows if p.passage is not None and p.language in langs}
    digest = hashlib.sha256(f"mlqa-holdout|{hold_out.fraction}|{hold_out.seed}|{max_queries}".encode())
    data = {}
    for lang in langs:
        mine = sorted((p for p in rows if p.language == lang), key=lambda p: p.pair_id)
        paragraphs: dict[str, int] = {}
        answer_of = {p.pair_id: paragraphs.setdefault(p.passage, len(paragraphs)) for p in mine if p.passage}
        asked = Counter(p.query for p in mine)
        queries = [p for p in mine if p.query is not None and p.pair_id in answered and asked[p.query] == 1]
        queries = queries[:max_queries]
        place = {p.pair_id: (split.component_of[p.pair_id],) * 2 for p in mine}
        digest.update("\0".join([*paragraphs, *(q.query for q in queries)]).encode())
        data[lang] = LanguageData(lang, directory, [f"{lang}:{k}:0" for k in range(len(paragraphs))], list(paragraphs),
                                  [q.pair_id for q in queries], [q.query for q in queries], answer_of, place)  # fmt: skip
    return LareqaSuite(name, tuple(langs), "paragraph", data, digest.hexdigest()[:16],
                       {"fraction": hold_out.fraction, "seed": hold_out.seed, "max_queries": max_queries,
                        "path": str(directory)})  # fmt: skip
