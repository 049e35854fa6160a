"""Builders: the staged public datasets (see shared/data/README.md) as normalised pairs.

Each builder yields ``(Pair, where)`` rows for :meth:`PairCorpus.from_pairs`. ``pair_id``s are namespaced
by source (``xnli:dev:12``, ``ntrex:7``, ``tydiqa:ar.dev:3``, ``squad:arcd:5``, ``iapp:train:9``), so two
sources never share a group by accident. Parallel sources (XNLI, NTREX) give one group per aligned row with
up to 11 languages; MLQA gives one group per question id, with a question and/or a paragraph per language;
the other QA sources are monolingual (one language per group).
"""

from __future__ import annotations

import functools
import io
import json
import re
import zipfile
from collections.abc import Collection, Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from xling.api.errors import InputError
from xling.trainer.data.loaders import Row, open_text
from xling.trainer.data.overlap import SCRIPT_OF
from xling.trainer.data.pairs import Pair, connected_components, normalise, text_key

#: NTREX-128 file codes -> ISO 639-1. English is the US-English reference (``eng-US``), like the others a
#: human translation of the WMT19 source, so all 11 languages come from the same process.
NTREX_LANGUAGES = {
    "arb": "ar", "deu": "de", "ell": "el", "eng-US": "en", "hin": "hi", "rus": "ru",
    "spa": "es", "tha": "th", "tur": "tr", "vie": "vi", "zho-CN": "zh",
}  # fmt: skip
#: Sentences shorter than this (abbreviations, headings, enumerations) merge into the next one. Thai has
#: spaces between clauses as well as sentences, so it needs longer pieces: with 60, our spans on XQuAD-R
#: Thai have median 77 characters (its own sentences: 176) and 81% of answer passages stay inside the
#: XQuAD-R answer sentence; other languages match XQuAD-R's sentence breaks exactly for 79% (zh) to 96%.
MIN_SENTENCE_CHARS = 20
MIN_THAI_SENTENCE_CHARS = 60


def _wanted(language: str, languages: Collection[str] | None) -> bool:
    return languages is None or language in languages


def _existing(directory: Path, name: str) -> Path | None:
    """``name`` or ``name.gz`` in ``directory`` (staged copies are gzipped, upstream ones are not), or None."""
    return next((c for c in (directory / name, directory / f"{name}.gz") if c.exists()), None)


def _find(directory: Path, name: str) -> Path:
    """:func:`_existing`, or FileNotFoundError naming the directory and the file."""
    if (found := _existing(directory, name)) is None:
        raise FileNotFoundError(f"{directory}: missing {name}[.gz]")
    return found


def _lines(path: Path) -> list[str]:
    with open_text(path) as f:
        return [line.rstrip("\r\n") for line in f]


# --- XNLI -------------------------------------------------------------------------------------------------


def xnli_rows(
    path: str | Path, split: str = "dev", languages: Collection[str] | None = None
) -> Iterator[Row]:
    """Hypothesis -> premise from ``{split}-<lang>.tsv[.gz]``. Line *i* is the same pair in every language,
    so it is one group (``xnli:<split>:<i>``). dev keeps entailment rows only (830 per language); test has
    no labels, so every hypothesis -> its premise counts (5,010 per language, 3 hypotheses per premise)."""
    if split not in ("dev", "test"):
        raise InputError(None, f"xnli: split must be 'dev' or 'test', got {split!r}")
    root = Path(path)
    files = sorted(root.glob(f"{split}-*.tsv")) + sorted(root.glob(f"{split}-*.tsv.gz"))
    if not files:
        raise FileNotFoundError(f"{root}: no XNLI files {split}-<lang>.tsv[.gz]")
    for file in files:
        language = file.name.removeprefix(f"{split}-").split(".")[0]
        if not _wanted(language, languages):
            continue
        for lineno, line in enumerate(_lines(file), 1):
            # A short (malformed) line yields empty text, which check_pair rejects with the file and line.
            premise, hypothesis, label = (line.split("\t") + ["", "", ""])[:3]
            if split == "dev" and label != "entailment":
                continue
            yield Pair(f"xnli:{split}:{lineno}", language, hypothesis, premise), f"{file}:{lineno}"


# --- NTREX-128 --------------------------------------------------------------------------------------------


def _document_spans(doc_ids: list[str]) -> list[tuple[int, int]]:
    """For each line, the [start, end) line range of its document (documents are contiguous runs)."""
    spans: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(doc_ids) + 1):
        if i == len(doc_ids) or doc_ids[i] != doc_ids[start]:
            spans.extend([(start, i)] * (i - start))
            start = i
    return spans


def _contained(lines: list[str], language: str) -> dict[int, list[int]]:
    """For each line, the other lines whose (normalised) sentence it contains: NTREX repeats a quote inside a
    longer line of another document. Found through an index of sentence starts (3 words, or 6 characters in
    scripts without spaces), then checked as substrings: O(total length), not O(lines²)."""
    unspaced, n = language in SCRIPT_OF, 6 if language in SCRIPT_OF else 3
    norm = [normalise(line) for line in lines]
    tokens = [list(t) if unspaced else t.split() for t in norm]
    starts: dict[tuple[str, ...], list[int]] = {}
    for i, toks in enumerate(tokens):
        if len(toks) >= n:
            starts.setdefault(tuple(toks[:n]), []).append(i)
    found: dict[int, list[int]] = {}
    for k, toks in enumerate(tokens):
        for pos in range(1, len(toks) - n + 1):  # a sentence starting at position 0 is the line itself
            for i in starts.get(tuple(toks[pos : pos + n]), ()):
                if i != k and norm[i] in norm[k]:
                    found.setdefault(k, []).append(i)
    return found


def ntrex_doc_ids(path: str | Path) -> list[str]:
    """The news document of every NTREX-128 line (DOCUMENT_IDS.tsv)."""
    return _lines(_find(Path(path), "DOCUMENT_IDS.tsv"))


def ntrex_languages(path: str | Path) -> list[str]:
    """The languages (of ``NTREX_LANGUAGES``) whose NTREX-128 file is in ``path``, sorted."""
    root = Path(path)
    have = [lang for code, lang in NTREX_LANGUAGES.items() if _existing(root, f"newstest2019-ref.{code}.txt")]
    if not have:
        raise FileNotFoundError(f"{root}: no NTREX-128 files newstest2019-ref.<code>.txt[.gz]")
    return sorted(have)


def ntrex_sentences(path: str | Path, languages: Collection[str], lines: range) -> dict[str, list[str]]:
    """Lines ``lines`` (0-based) of each language's NTREX-128 file: the same source sentences, translated."""
    root, out = Path(path), {}
    codes = {language: code for code, language in NTREX_LANGUAGES.items()}
    for language in languages:
        if language not in codes:
            raise InputError(root, f"NTREX-128 has no {language!r} file here (it has {sorted(codes)})")
        file = _find(root, f"newstest2019-ref.{codes[language]}.txt")
        text = _lines(file)
        if lines.stop > len(text):
            raise InputError(file, f"{len(text)} lines, fewer than the {lines.stop} asked for")
        out[language] = [text[i] for i in lines]
    return out


def ntrex_rows(path: str | Path, languages: Collection[str] | None = None, window: int = 2) -> Iterator[Row]:
    """Sentence -> its document context: the up to ``window`` sentences before and after it in the same
    document (DOCUMENT_IDS.tsv), *without* the sentence itself, so the model must match a sentence to its
    surroundings rather than find a copy of it. Line *i* is one 11-way group (``ntrex:<i>``). A sentence
    that occurs verbatim in its window is skipped in that language (17 of 21,967 in NTREX-128)."""
    root = Path(path)
    doc_ids = _lines(_find(root, "DOCUMENT_IDS.tsv"))
    spans = _document_spans(doc_ids)
    for code, language in NTREX_LANGUAGES.items():
        if not _wanted(language, languages):
            continue
        file = _find(root, f"newstest2019-ref.{code}.txt")
        lines = _lines(file)
        if len(lines) != len(doc_ids):
            raise InputError(file, f"{len(lines)} lines, but DOCUMENT_IDS.tsv has {len(doc_ids)}")
        sep = "" if language == "zh" else " "  # Thai separates sentences with a space
        within = _contained(lines, language)
        for i, sentence in enumerate(lines):
            start, end = spans[i]
            lo, hi = max(start, i - window), min(end, i + window + 1)
            context = sep.join(lines[lo:i] + lines[i + 1 : hi])
            if sentence.strip() and sentence.strip() in context:
                continue  # a headline repeated by the next line, or a fragment such as ",": no real task
            # Conflict keys: the sentences this pair touches, and those its lines quote. Two pairs whose windows
            # share a sentence (the same line, the same sentence in another document, or a sentence quoted
            # inside a longer line) never meet in a batch, so no in-batch passage holds another item's query.
            touched = [k for j in range(lo, hi) for k in (j, *within.get(j, ()))]
            keys = tuple(text_key(lines[k]) for k in touched if lines[k].strip())
            yield Pair(f"ntrex:{i + 1}", language, sentence, context, keys=keys), f"{file}:{i + 1}"


# --- extractive QA (SQuAD-style JSON, TyDi GoldP, iapp) ---------------------------------------------------

_BREAK = re.compile(r"(?<=[.!?؟।॥])\s+|(?<=[。！？])\s*|\s*\n\s*")
_THAI_BREAK = re.compile(r"\s+")  # Thai marks sentence (and clause) ends with a space


def sentence_spans(text: str, language: str) -> list[tuple[int, int]]:
    """[start, end) character spans of the sentences of ``text``: a simple multilingual splitter (after
    . ! ? ؟ । ॥ plus space, after 。！？, at newlines; at any space for Thai). Fragments shorter than
    MIN_SENTENCE_CHARS (MIN_THAI_SENTENCE_CHARS) merge into the next sentence, a short last one into the
    previous, so no sentence is shorter unless the whole text is."""
    thai = language == "th"
    pattern, min_chars = (_THAI_BREAK, MIN_THAI_SENTENCE_CHARS) if thai else (_BREAK, MIN_SENTENCE_CHARS)
    pieces: list[tuple[int, int]] = []
    start = 0
    for m in pattern.finditer(text):
        pieces.append((start, m.start()))
        start = m.end()
    pieces.append((start, len(text)))

    def short(span: tuple[int, int]) -> bool:
        return len(text[span[0] : span[1]].strip()) < min_chars

    merged: list[tuple[int, int]] = []
    for piece in pieces:
        if merged and short(merged[-1]):
            merged[-1] = (merged[-1][0], piece[1])
        else:
            merged.append(piece)
    if len(merged) > 1 and short(merged[-1]):
        last = merged.pop()
        merged[-1] = (merged[-1][0], last[1])
    return merged


def _locate(context: str, answer: str, start: int | None) -> int | None:
    """Where the answer starts: at ``start`` if it is there, else its first occurrence, else unknown."""
    if not answer:
        return None
    if start is not None and context.startswith(answer, start):
        return start
    found = context.find(answer)
    return found if found >= 0 else None


def answer_passage(context: str, answer: str, answer_start: int | None, language: str) -> str:
    """The sentence(s) holding the answer span; the whole paragraph when the answer cannot be located
    (TyDi GoldP dev ships blank answers: its paragraphs are already the gold passages)."""
    start = _locate(context, answer, answer_start)
    if start is None:
        return context.strip()
    end = start + len(answer)
    hits = [(s, e) for s, e in sentence_spans(context, language) if s < end and e > start]
    return context[hits[0][0] : hits[-1][1]].strip() if hits else context.strip()


class Question(NamedTuple):
    pair_id: str
    language: str
    question: str
    context: str
    answer: str
    answer_start: int | None
    where: str
    upstream_id: str = ""


def _as_int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _qa_rows(questions: Iterable[Question]) -> Iterator[Row]:
    """Question -> answer passage. Of several questions with the same passage only the first is kept:
    two of them in one batch would make each other's positive a false negative."""
    seen: set[tuple[str, str]] = set()
    for q in questions:
        passage = answer_passage(q.context, q.answer, q.answer_start, q.language)
        if (q.language, passage) in seen:
            continue
        seen.add((q.language, passage))
        yield Pair(q.pair_id, q.language, q.question.strip(), passage), q.where


def _json_stem(path: Path) -> str:
    return path.name.removesuffix(".gz").removesuffix(".json")


def _squad_files(path: str | Path) -> list[Path]:
    path = Path(path)
    if path.is_file():
        return [path]
    files = sorted(path.glob("*.json")) + sorted(path.glob("*.json.gz"))
    if not files:
        raise FileNotFoundError(f"{path}: no SQuAD-style *.json[.gz] files")
    return files


def _squad_questions(file: Path, prefix: str, language: str) -> Iterator[Question]:
    try:
        with open_text(file) as f:
            doc = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:  # ValueErrors both: the file is the user's
        raise InputError(file, f"not valid JSON ({err})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise InputError(file, "not SQuAD-style JSON (no top-level 'data' list)")
    qas = (
        (p, qa) for article in doc["data"] for p in article.get("paragraphs", ()) for qa in p.get("qas", ())
    )
    for n, (paragraph, qa) in enumerate(qas, 1):
        answer = next((a for a in qa.get("answers") or () if a.get("text")), {})
        yield Question(
            pair_id=f"{prefix}:{n}",
            language=language,
            question=qa.get("question", ""),
            context=paragraph.get("context", ""),
            answer=answer.get("text", ""),
            answer_start=_as_int(answer.get("answer_start")),
            where=f"{file}:question {n} (id {qa.get('id')})",
            upstream_id=str(qa.get("id", "")),
        )


def squad_rows(path: str | Path, language: str) -> Iterator[Row]:
    """A SQuAD v1.1-style file (or every *.json[.gz] in a directory) in one ``language``: question -> the
    sentence holding the answer. The n-th question of a file is ``squad:<file stem>:<n>`` (upstream ids
    need not be unique: TyDi's English train file reuses them), its upstream id is kept in ``where``."""
    for file in _squad_files(path):
        yield from _qa_rows(_squad_questions(file, f"squad:{_json_stem(file)}", language))


_TYDI_NAME = re.compile(r"^tydiqa\.goldp\.(?P<lang>[a-z]{2,3})\.(?P<split>\w+)\.json(\.gz)?$")


def tydiqa_rows(
    path: str | Path, split: str | None = None, languages: Collection[str] | None = None
) -> Iterator[Row]:
    """TyDi QA GoldP files ``tydiqa.goldp.<lang>.<split>.json[.gz]``: one file, or a directory (with
    ``split``, only that split's files). The file name gives the language and the pair_id prefix
    (``tydiqa:<lang>.<split>:<n>``)."""
    root = Path(path)
    files = [root] if root.is_file() else sorted(root.glob("tydiqa.goldp.*.json*"))
    if not files:
        raise FileNotFoundError(f"{root}: no tydiqa.goldp.<lang>.<split>.json[.gz] files")
    parsed = []
    for file in files:
        m = _TYDI_NAME.match(file.name)
        if m is None:
            raise InputError(file, "expected a name like tydiqa.goldp.<lang>.<split>.json[.gz]")
        if (split is None or m["split"] == split) and _wanted(m["lang"], languages):
            parsed.append((file, m["lang"], m["split"]))
    questions = (q for f, lang, sp in parsed for q in _squad_questions(f, f"tydiqa:{lang}.{sp}", lang))
    yield from _qa_rows(questions)


def iapp_rows(path: str | Path, split: str = "train") -> Iterator[Row]:
    """iApp Thai Wikipedia QA: ``data/<split>.jsonl`` (train/valid/test) inside ``data.zip`` (``path`` is the
    zip or its folder). One JSON object per question with its full context; question -> answer sentence."""
    archive = Path(path)
    if archive.is_dir():
        archive = archive / "data.zip"
    member = f"data/{split}.jsonl"
    with zipfile.ZipFile(archive) as z:
        if member not in z.namelist():
            raise InputError(archive, f"no {member} (has: {', '.join(z.namelist())})")
        with z.open(member) as raw:
            lines = list(io.TextIOWrapper(raw, encoding="utf-8"))

    def questions() -> Iterator[Question]:
        for lineno, line in enumerate(lines, 1):
            record = json.loads(line)
            answers = record.get("answers") or {}
            yield Question(
                pair_id=f"iapp:{split}:{lineno}",
                language="th",
                question=record.get("question", ""),
                context=record.get("context", ""),
                answer=(answers.get("text") or [""])[0],
                answer_start=_as_int((answers.get("answer_start") or [None])[0]),
                where=f"{archive}!{member}:{lineno}",
            )

    yield from _qa_rows(questions())


# --- MLQA (cross-lingual QA, grouped by question id) ------------------------------------------------------

_MLQA_NAME = re.compile(
    r"^(?P<split>dev|test)-context-(?P<c>[a-z]{2})-question-(?P<q>[a-z]{2})\.json(\.gz)?$"
)


def mlqa_context_languages(path: str | Path) -> list[str]:
    """The paragraph (context) languages of the MLQA files in ``path``, sorted: the languages a pooled MLQA
    suite can have candidates in."""
    root = Path(path)
    found = [_MLQA_NAME.match(f.name) for f in sorted(root.glob("*-context-*-question-*.json*"))]
    if not (have := sorted({m["c"] for m in found if m})):
        raise FileNotFoundError(f"{root}: no MLQA files <split>-context-<C>-question-<Q>.json[.gz]")
    return have


def mlqa_rows(
    path: str | Path, split: str | None = None, languages: Collection[str] | None = None
) -> Iterator[Row]:
    """MLQA files ``<split>-context-<C>-question-<Q>.json[.gz]``: questions in Q over paragraphs in C. A
    question id is shared by its translations across files, so each id is one group
    (``mlqa:<split>:<id>``) holding, per language, the question (where some file asks it in that language)
    and/or the passage: the sentence with the answer, or the whole paragraph when the answer is blank (as in
    the bundled copy). Where several files give a language's question or paragraph, the first is kept (the
    bundled files agree on all of them).

    Several questions often share one paragraph; their groups share its text key, so they never meet in a
    batch (each one's positive would be the other's false negative)."""
    root = Path(path)
    files = [root] if root.is_file() else sorted(root.glob("*-context-*-question-*.json*"))
    if not files:
        raise FileNotFoundError(f"{root}: no MLQA files <split>-context-<C>-question-<Q>.json[.gz]")
    queries: dict[tuple[str, str], dict[str, tuple[str, str]]] = {}
    passages: dict[tuple[str, str], dict[str, tuple[str, str]]] = {}
    for file in files:
        m = _MLQA_NAME.match(file.name)
        if m is None:
            raise InputError(file, "expected a name like test-context-de-question-ar.json[.gz]")
        if split is not None and m["split"] != split:
            continue
        for q in _squad_questions(file, "", m["q"]):
            key = (m["split"], q.upstream_id)
            if _wanted(m["q"], languages):
                queries.setdefault(key, {}).setdefault(m["q"], (q.question.strip(), q.where))
            if _wanted(m["c"], languages):
                passage = answer_passage(q.context, q.answer, q.answer_start, m["c"])
                passages.setdefault(key, {}).setdefault(m["c"], (passage, q.where))
    for key in sorted(queries.keys() | passages.keys()):
        qs, ps = queries.get(key, {}), passages.get(key, {})
        for lang in sorted(qs.keys() | ps.keys()):
            query, passage = qs.get(lang), ps.get(lang)
            where = query[1] if query else ps[lang][1]
            texts = (query[0] if query else None, passage[0] if passage else None)
            yield Pair(f"mlqa:{key[0]}:{key[1]}", lang, *texts), where


class HoldOut(NamedTuple):
    """An MLQA hold-out (:func:`mlqa_holdout`): the held-out groups, each with its component."""

    component_of: dict[str, int]  # held-out pair id -> its component
    groups: int  # of the directory
    components: int  # of the directory

    def counts(self) -> dict[str, int]:
        """What a run prints and logs (``data/held_out/*``): groups and components held out, of how many."""
        held = {"groups": len(self.component_of), "components": len(set(self.component_of.values()))}
        return held | {"of_groups": self.groups, "of_components": self.components}

    def summary(self) -> str:
        n = self.counts()
        return (f"held out {n['groups']} of {n['of_groups']} groups ({n['components']} of {n['of_components']} "
                "components) for the mlqa-holdout suite")  # fmt: skip


@functools.cache
def mlqa_holdout(path: str, fraction: float, seed: int) -> HoldOut:
    """Split MLQA groups off by connected components: groups sharing a (normalised) paragraph or question, in
    any language, are one component, so no text of a held-out group is in any kept group. Components are
    taken in a permutation seeded by ``seed`` until ``round(fraction * groups)`` groups are held out. The
    split reads every file and language in ``path``, whatever a spec keeps, so training and the suite
    always agree on it."""
    links = [(pair.pair_id, text_key(text)) for pair, _ in mlqa_rows(path)
             for text in (pair.query, pair.passage) if text is not None]  # fmt: skip
    component = connected_components(links)
    members: dict[int, list[str]] = {}
    for pid, c in component.items():
        members.setdefault(c, []).append(pid)
    target, held = round(fraction * len(component)), {}
    for c in np.random.default_rng(seed).permutation(len(members)):
        if len(held) >= target:
            break
        held |= dict.fromkeys(members[int(c)], int(c))
    return HoldOut(held, len(component), len(members))
