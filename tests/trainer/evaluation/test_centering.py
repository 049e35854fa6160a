"""The language-mean centering baseline on the real XQuAD-R and NTREX-128 files: the arithmetic against a
hand computation, its effect on a model with a language offset, and its ways in (spec, ``xling eval``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.support import ROOT, xling_eval
from xling.api.errors import InputError
from xling.api.spec.training import CenteringSpec, EvaluationSpec
from xling.trainer.data.builders import ntrex_sentences
from xling.trainer.evaluation.api import evaluate_with_centering
from xling.trainer.evaluation.centering import language_means
from xling.trainer.evaluation.hashing import HashingEncoder
from xling.trainer.evaluation.lareqa import load_lareqa
from xling.trainer.evaluation.lareqa_scoring import evaluate_lareqa

XQUAD, NTREX = ROOT / "data/demo/xquad-r", ROOT / "data/demo/ntrex-128"
LANGS = ["ar", "de", "en", "th", "zh"]


class Table:
    """An encoder that looks its vectors up: the hand-centred embeddings, fed back through the scorer."""

    fingerprint = "table"

    def __init__(self, rows: dict[tuple[str, str], np.ndarray]) -> None:
        self.rows = rows

    def encode(self, texts: list[str], kind: str) -> np.ndarray:
        return np.stack([self.rows[(t, kind)] for t in texts])


@pytest.fixture(scope="module")
def suite():
    return load_lareqa("xquad-r", XQUAD, languages=LANGS, max_paragraphs=20)


def test_centering_subtracts_each_languages_ntrex_mean_and_renormalises(suite) -> None:
    enc, spec = HashingEncoder(), CenteringSpec(path=str(NTREX), sentences=50, first_line=100)
    texts = ntrex_sentences(NTREX, LANGS, range(100, 150))
    rows = {}
    for lang in LANGS:
        for kind, own in (
            ("passage", suite.data[lang].candidate_texts),
            ("query", suite.data[lang].query_texts),
        ):
            mean = enc.encode(texts[lang], kind).astype(np.float64).mean(axis=0)
            x = enc.encode(own, kind) - mean
            rows |= {(t, kind): v / np.linalg.norm(v) for t, v in zip(own, x.astype(np.float32), strict=True)}
    by_hand = evaluate_lareqa(suite, Table(rows))
    centered = evaluate_lareqa(suite, enc, centering=language_means(enc, spec, LANGS))
    assert centered.multi_map == pytest.approx(by_hand.multi_map, abs=1e-6)
    assert centered.map_matrix == pytest.approx(by_hand.map_matrix, abs=1e-6)
    assert centered.fingerprints["centering"].endswith("lines 101-150 (NTREX-128, 50 per language)")


class Offset(HashingEncoder):
    """The hashing encoder plus a large per-language offset (the language of a text looked up)."""

    def __init__(self, language_of: dict[str, str]) -> None:
        super().__init__()
        self.language_of, self.fingerprint = language_of, "offset"
        rng = np.random.default_rng(0)
        self.offset = {lang: 2.0 * rng.standard_normal(self.dim) / np.sqrt(self.dim) for lang in LANGS}

    def encode(self, texts: list[str], kind: str) -> np.ndarray:
        x = super().encode(texts, kind) + np.stack([self.offset[self.language_of[t]] for t in texts])
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_centering_removes_a_language_offset_and_is_logged_as_its_own_suite(suite) -> None:
    """A per-language offset is what centering removes: with it, a model's centred results are those of
    the same model without the offset (normalisation aside), and its language bias drops."""
    spec = CenteringSpec(path=str(NTREX), sentences=60)
    language_of = {t: lang for lang in LANGS for t in ntrex_sentences(NTREX, [lang], range(60))[lang]}
    language_of |= {
        t: lang for lang in LANGS for t in suite.data[lang].candidate_texts + suite.data[lang].query_texts
    }
    plain, base = evaluate_with_centering(suite, Offset(language_of), spec)
    assert plain.suite == "xquad-r" and base.suite == "xquad-r-centered"
    before, after = plain.flat_metrics(), base.flat_metrics()
    assert before["xquad_r/bias/top10_own_share"] > 0.9, "the offset puts the own language on top"
    assert after["xquad_r_centered/bias/top10_own_share"] < before["xquad_r/bias/top10_own_share"] - 0.2
    _, without = evaluate_with_centering(suite, HashingEncoder(), spec)
    assert base.multi_map == pytest.approx(without.multi_map, abs=0.02)
    assert base.flat_metrics()["xquad_r_centered/bias/top10_own_share"] == pytest.approx(
        without.flat_metrics()["xquad_r_centered/bias/top10_own_share"], abs=0.05
    )
    assert len(evaluate_with_centering(suite, HashingEncoder(), None)) == 1


def test_bad_centering_input_names_the_field_or_file(suite, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"centering.*needs atStart: true"):
        EvaluationSpec.model_validate({"centering": {"path": str(NTREX)}})
    assert (
        EvaluationSpec.model_validate({"atStart": True, "centering": {"path": "x"}}).centering.sentences
        == 120
    )
    with pytest.raises(InputError, match=r"evaluation.centering: .*fewer than the 3000"):
        language_means(HashingEncoder(), CenteringSpec(path=str(NTREX), sentences=3000), LANGS)
    with pytest.raises(InputError, match=r"evaluation.centering: .*no 'xx' file"):
        language_means(HashingEncoder(), CenteringSpec(path=str(NTREX)), ["xx"])
    with pytest.raises(InputError, match=r"evaluation.centering: .*missing newstest2019-ref.arb.txt"):
        language_means(HashingEncoder(), CenteringSpec(path=str(tmp_path)), ["ar"])


def test_xling_eval_prints_and_writes_the_centering_baseline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    argv = ["--model", "m", "--suite", "xquad-r", "--data", str(XQUAD), "--languages", "ar,de",
            "--max-paragraphs", "10", "--centering-data", str(NTREX), "--centering-sentences", "40",
            "--out", "res.json"]  # fmt: skip
    assert xling_eval(monkeypatch, lambda name, **_: HashingEncoder(), *argv) == 0
    out = capsys.readouterr().out
    assert (
        "language-mean centering baseline (means: " in out
        and "lines 1-40 (NTREX-128, 40 per language)" in out
    )
    saved = json.loads(Path("res-centered.json").read_text())
    assert saved["suite"] == "xquad-r-centered" and "xquad_r_centered/multi/map" in saved["metrics"]
    assert "xquad_r/multi/map" in json.loads(Path("res.json").read_text())["metrics"]


def test_training_never_sees_the_centering_sentences() -> None:
    """The baseline's means must come from text that is neither test nor training data: the driver's
    overlap guard drops training rows that contain them, as it does for the evaluation suites."""
    from xling.api.spec.loading import load_experiment
    from xling.trainer.driver import eval_guard

    spec = load_experiment(ROOT / "manifests/samples/smoke.yaml").spec  # centres on NTREX lines 1901-1940
    guard = eval_guard(spec)
    assert guard is not None and '"centering"' in guard.key
    lines = ntrex_sentences(NTREX, ["ar", "es"], range(1900, 1940))
    texts = set(guard.texts())
    assert set(lines["ar"]) | set(lines["es"]) <= texts
    without = spec.model_copy(update={"evaluation": spec.evaluation.model_copy(update={"centering": None})})
    assert not set(lines["ar"]) & set(eval_guard(without).texts())
