"""ntrex-r: the held-out, out-of-domain pooled suite from NTREX-128 sentences in the 11 XQuAD-R languages."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from tests.support import ROOT, xling_eval
from xling.api.spec.base import XQUAD_R_LANGUAGES
from xling.api.spec.loading import load_experiment
from xling.api.spec.training import EvalSuite, EvaluationSpec
from xling.trainer.data.builders import ntrex_sentences
from xling.trainer.evaluation.api import evaluate_suite, load_suite
from xling.trainer.evaluation.hashing import HashingEncoder

NTREX = ROOT / "data/demo/ntrex-128"
LINES = range(1000, 1060)


class Oracle:
    """Every text near its line's vector (a little noise of its own): the perfect multilingual encoder, whose
    own-language copy of a query is the query itself."""

    fingerprint = "oracle"

    def __init__(self) -> None:
        texts = ntrex_sentences(NTREX, XQUAD_R_LANGUAGES, LINES)
        self.line = {t: i for lang in XQUAD_R_LANGUAGES for i, t in zip(LINES, texts[lang], strict=True)}

    def encode(self, texts: list[str], kind: str) -> np.ndarray:
        rows = [np.random.default_rng(self.line[t]).standard_normal(64)
                + 0.05 * np.random.default_rng(zlib.crc32(t.encode())).standard_normal(64) for t in texts]  # fmt: skip
        x = np.stack(rows)
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def suite():
    return load_suite(
        EvalSuite(name="ntrex-r", path=str(NTREX), first_line=LINES.start, max_paragraphs=len(LINES))
    )


def test_relevant_are_the_translations_and_the_own_text_is_ranked_out() -> None:
    s = suite()
    assert s.languages == XQUAD_R_LANGUAGES and s.pool_size == 11 * len(LINES)
    rel = s.relevant("de")
    de = XQUAD_R_LANGUAGES.index("de")
    assert (rel[:, de] == -1).all() and (rel[:, np.arange(11) != de] >= 0).all()
    assert [s.pool_ids[j] for j in rel[0] if j >= 0] == [
        f"{lang}:1000:0" for lang in XQUAD_R_LANGUAGES if lang != "de"
    ]
    m = evaluate_suite(s, Oracle()).flat_metrics()
    # the query's own text scores 1.0; were it left in the pool, it would sit above every translation
    assert m["ntrex_r/multi/map"] == pytest.approx(1.0) and m["ntrex_r/cross/map"] == pytest.approx(1.0)
    assert m["ntrex_r/bias/rank_distance"] == pytest.approx(9.0), "the 10 translations fill ranks 1-10"
    assert "ntrex_r/mono/map" not in m, "no monolingual task: the own-language answer is the query"
    per_query = evaluate_suite(s, HashingEncoder()).per_query
    assert len(set(per_query["article"])) < len(set(per_query["paragraph"])) == len(LINES)


def test_the_suite_is_held_out_from_every_research_pool_and_from_centering() -> None:
    for sample in ("research.yaml", "research-gpu-1.yaml"):
        exp = load_experiment(ROOT / "manifests/samples" / sample)
        (held_out,) = [s for s in exp.spec.evaluation.suites if s.name == "ntrex-r"]
        assert {src.type for src in exp.spec.data.sources} == {"mlqa"}, "no NTREX text is trained on"
        c = exp.spec.evaluation.centering
        assert held_out.first_line >= c.first_line + c.sentences, "apart from the centering sentences"
    with pytest.raises(ValueError, match=r"suites\[0\].firstLine: the ntrex-r lines overlap centering's"):
        EvaluationSpec.model_validate({"atStart": True, "centering": {"path": "n", "sentences": 120},
                                       "suites": [{"name": "ntrex-r", "path": "n", "firstLine": 100}]})  # fmt: skip


def test_the_mlqa_pool_holds_none_of_the_suites_sentences() -> None:
    from xling.trainer.data import load_corpus

    exp = load_experiment(ROOT / "manifests/samples/research.yaml")
    (held_out,) = [s for s in exp.spec.evaluation.suites if s.name == "ntrex-r"]
    corpus = load_corpus(exp.spec.data)
    trained = "\x00".join(t for g in corpus.groups for p in g.values() for t in (p.query, p.passage) if t)
    texts = load_suite(held_out).data
    overlap = [t for d in texts.values() for t in d.candidate_texts if len(t) >= 20 and t in trained]
    assert not overlap


def _oracle(name: str, **_: object) -> Oracle:
    """``load_text_encoder`` for ``xling eval``: the oracle, whatever the model name."""
    return Oracle()


def test_xling_eval_runs_the_suite(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--model", "m", "--suite", "ntrex-r", "--data", str(NTREX), "--first-line", "1000",
            "--max-paragraphs", "60", "--languages", "de,zh"]  # fmt: skip
    assert xling_eval(monkeypatch, _oracle, *argv) == 0
    assert "ntrex-r: 2 languages, 120 queries, pool of 120 sentence candidates" in capsys.readouterr().out
