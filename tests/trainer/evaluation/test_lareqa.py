"""LAReQA loader: relevant sets, subsets, gzip, partial parallelism (MLQA-R-like) and bad input."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pytest

from xling.trainer.evaluation.errors import EvalDataError
from xling.trainer.evaluation.lareqa import load_lareqa


def paragraph(sentences: list[str], qas: list[tuple[str, str, int]]) -> dict[str, Any]:
    """A LAReQA paragraph; ``qas`` are (id, question, index of the answer sentence)."""
    context = " ".join(sentences)
    breaks, start = [], 0
    for s in sentences:
        breaks.append([start, start + len(s)])
        start += len(s) + 1
    return {
        "context": context,
        "sentences": sentences,
        "sentence_breaks": breaks,
        "qas": [
            {"id": qid, "question": q, "answers": [{"text": sentences[k][:3], "answer_start": breaks[k][0]}]}
            for qid, q, k in qas
        ],
    }


def write(directory: Path, lang: str, paragraphs: list[dict[str, Any]], gz: bool = False) -> Path:
    doc = json.dumps({"version": "1.1", "data": [{"title": "t", "paragraphs": paragraphs}]})
    path = directory / f"{lang}.json{'.gz' if gz else ''}"
    path.write_bytes(gzip.compress(doc.encode()) if gz else doc.encode())
    return path


def test_partial_parallelism_like_mlqa_r(tmp_path: Path) -> None:
    # q1 in en/de/es, q2 in en/de, q3 only in en: 3, 2 and 1 relevant sentences.
    write(
        tmp_path,
        "en",
        [
            paragraph(["A one.", "A two."], [("q1", "en1?", 1), ("q2", "en2?", 0)]),
            paragraph(["B one."], [("q3", "en3?", 0)]),
        ],
    )
    write(
        tmp_path,
        "de",
        [paragraph(["D eins.", "D zwei.", "D drei."], [("q2", "de2?", 2), ("q1", "de1?", 0)])],
        gz=True,
    )
    write(tmp_path, "es", [paragraph(["E uno."], [("q1", "es1?", 0)])])
    suite = load_lareqa("mlqa-r", tmp_path)
    assert suite.languages == ("de", "en", "es")
    assert suite.pool_size == 7
    assert suite.offsets == {"de": 0, "en": 3, "es": 6}
    en = suite.relevant("en")
    assert suite.data["en"].query_ids == ["q1", "q2", "q3"]
    assert en.tolist() == [[0, 4, 6], [2, 3, -1], [-1, 5, -1]]
    assert suite.relevant("de").tolist() == [[2, 3, -1], [0, 4, 6]]
    assert suite.data["en"].candidate_ids == ["en:0:0", "en:0:1", "en:1:0"]


def test_max_paragraphs_keeps_positions_and_max_queries_keeps_relevant_sets(tmp_path: Path) -> None:
    for lang in ("en", "de"):
        write(
            tmp_path,
            lang,
            [
                paragraph([f"{lang} p{p} s{s}." for s in range(2)], [(f"q{p}", f"{lang}{p}?", 1)])
                for p in range(3)
            ],
        )
    suite = load_lareqa("xquad-r", tmp_path, max_paragraphs=2, max_queries=1)
    assert suite.pool_size == 8
    assert suite.data["de"].candidate_texts[2] == "de p1 s0."
    assert suite.data["en"].query_ids == ["q0"]
    assert set(suite.data["de"].answer_of) == {"q0", "q1"}
    assert suite.relevant("en").tolist() == [[1, 5]]


def test_paragraph_context_candidates(tmp_path: Path) -> None:
    write(tmp_path, "en", [paragraph(["First.", "Second."], [("q", "?", 0)])])
    suite = load_lareqa("xquad-r", tmp_path, candidate_context="paragraph")
    assert suite.data["en"].candidate_texts == ["First. First. Second.", "Second. First. Second."]
    assert suite.candidate_context == "paragraph"


def _bad(par: dict[str, Any]) -> None:
    par["qas"][0]["answers"][0]["answer_start"] = 999


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda p: p.pop("sentence_breaks"), r"data\[0\]\.paragraphs\[0\]: missing 'sentence_breaks'"),
        (_bad, r"paragraphs\[0\]\.qas\[0\] \(id q\): answer_start 999 is outside every sentence"),
        (lambda p: p["sentences"].pop(), r"paragraphs\[0\]: 1 sentences but 2 sentence_breaks"),
        (lambda p: p["qas"].append(dict(p["qas"][0])), r"qas\[1\] \(id q\): duplicate question id"),
        (lambda p: p["qas"][0].pop("answers"), r"qas\[0\] \(id q\): missing 'answers'"),
        (
            lambda p: p["qas"][0]["answers"][0].update(answer_start="7"),
            r"'answer_start' must be int, got str",
        ),
    ],
)
def test_bad_input_names_file_and_record(tmp_path: Path, mutate: Any, message: str) -> None:
    par = paragraph(["One.", "Two."], [("q", "?", 1)])
    mutate(par)
    path = write(tmp_path, "en", [par])
    with pytest.raises(EvalDataError, match=message) as err:
        load_lareqa("xquad-r", tmp_path)
    assert str(err.value).startswith(str(path))


def test_missing_language_file_and_bad_json(tmp_path: Path) -> None:
    write(tmp_path, "en", [paragraph(["One."], [("q", "?", 0)])])
    with pytest.raises(EvalDataError, match=r"no de\.json or de\.json\.gz"):
        load_lareqa("xquad-r", tmp_path, languages=["en", "de"])
    (tmp_path / "de.json").write_text("{oops")
    with pytest.raises(EvalDataError, match=r"de\.json: not valid JSON"):
        load_lareqa("xquad-r", tmp_path)
    with pytest.raises(EvalDataError, match="not a directory"):
        load_lareqa("xquad-r", tmp_path / "nowhere")
