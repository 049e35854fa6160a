"""On the real XQuAD-R files: relevant sets, and every metric against references (scikit-learn's
average_precision_score, a brute-force argsort ranking, and the TREC files re-scored)."""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from mlflow.entities import Metric
from sklearn.metrics import average_precision_score

from tests.support import ROOT
from xling.api.spec.base import XQUAD_R_LANGUAGES
from xling.trainer.evaluation.cli import add_cli
from xling.trainer.evaluation.hashing import HashingEncoder
from xling.trainer.evaluation.lareqa import LareqaSuite, find_file, load_lareqa
from xling.trainer.evaluation.lareqa_scoring import evaluate_lareqa
from xling.trainer.evaluation.report import format_table, log_to_mlflow, write_artifacts
from xling.trainer.evaluation.results import EXACT_BIAS_METRICS, LareqaResults
from xling.trainer.evaluation.trec import mean_scores, read_qrels, read_run, score_run, write_qrels, write_run

CANDIDATES = {"ar": 1222, "de": 1276, "el": 1234, "en": 1180, "es": 1215, "hi": 1244, "ru": 1219, "th": 852,
              "tr": 1167, "vi": 1209, "zh": 1196}  # fmt: skip


@pytest.fixture(scope="module")
def xquad_dir() -> Path:
    for candidate in (ROOT / "data/demo/xquad-r", ROOT.parent / "shared/data/xquad-r"):
        if (candidate / "en.json").is_file() or (candidate / "en.json.gz").is_file():
            return candidate
    pytest.skip("XQuAD-R files not found (data/demo/xquad-r or ../shared/data/xquad-r)")


def _read(path: Path) -> bytes:
    raw = path.read_bytes()
    return gzip.decompress(raw) if path.name.endswith(".gz") else raw


def raw_answer_sentences(path: Path, lang: str) -> dict[str, str]:
    """question id -> candidate id of its answer sentence, parsed independently of the loader."""
    doc = json.loads(_read(path))
    out, p = {}, 0
    for article in doc["data"]:
        for par in article["paragraphs"]:
            for qa in par["qas"]:
                start = qa["answers"][0]["answer_start"]
                (s,) = [k for k, (b, e) in enumerate(par["sentence_breaks"]) if b <= start < e]
                out[qa["id"]] = f"{lang}:{p}:{s}"
            p += 1
    return out


def test_relevant_sets_on_the_real_files(xquad_dir: Path) -> None:
    suite = load_lareqa("xquad-r", xquad_dir)
    assert suite.languages == XQUAD_R_LANGUAGES
    assert {lang: len(suite.data[lang].candidate_ids) for lang in suite.languages} == CANDIDATES
    assert suite.pool_size == 13_014
    pool_ids = [cid for lang in suite.languages for cid in suite.data[lang].candidate_ids]
    answers = {lang: raw_answer_sentences(find_file(xquad_dir, lang), lang) for lang in suite.languages}
    total = 0
    for lang in suite.languages:
        relevant = suite.relevant(lang)
        assert relevant.shape == (1190, 11) and (relevant >= 0).all()  # 11 relevant per question
        for qid, row in zip(suite.data[lang].query_ids, relevant, strict=True):
            assert [pool_ids[r] for r in row] == [answers[other][qid] for other in suite.languages]
        total += len(relevant)
    assert total == 13_090


def brute_force(suite: LareqaSuite, enc: HashingEncoder) -> dict[str, np.ndarray]:
    """Every metric from full argsort rankings, scikit-learn AP and plain loops."""
    langs = suite.languages
    pool = np.vstack([enc.encode(suite.data[x].candidate_texts, "passage") for x in langs])
    cand_lang = suite.candidate_language
    n = len(langs)
    out = {k: np.zeros((n, n)) for k in ("map", "r1")}
    out |= {k: np.zeros(n) for k in ("multi_map", "r10", "rd", "own_first", "top10", "strong", "gap")}
    for i, x in enumerate(langs):
        scores = enc.encode(suite.data[x].query_texts, "query") @ pool.T
        per_query = {k: [] for k in ("ap", "r10", "rd", "own_first", "top10", "strong", "gap")}
        block = {k: [[] for _ in langs] for k in ("ap", "r1")}
        for s, rel in zip(scores, suite.relevant(x), strict=True):
            assert all(np.sum(s == s[r]) == 1 for r in rel)  # no ties: argsort ranks are unambiguous
            labels = np.isin(np.arange(len(s)), rel)
            order = np.argsort(-s, kind="stable")
            rank = np.empty(len(s), dtype=int)
            rank[order] = np.arange(1, len(s) + 1)
            ranks = rank[rel]
            per_query["ap"].append(average_precision_score(labels, s))
            per_query["r10"].append(np.mean(ranks <= 10))
            per_query["rd"].append(ranks.max() - ranks.min())
            per_query["own_first"].append(ranks[i] < np.delete(ranks, i).min())
            per_query["top10"].append(np.mean(cand_lang[order[:10]] == i))
            per_query["strong"].append(ranks.max() == len(rel))
            per_query["gap"].append(np.delete(ranks, i).mean() - ranks[i])
            for j in range(n):
                sub = cand_lang == j
                block["ap"][j].append(average_precision_score(labels[sub], s[sub]))
                block["r1"][j].append(labels[sub][np.argmax(s[sub])])
        out["map"][i] = [np.mean(v) for v in block["ap"]]
        out["r1"][i] = [np.mean(v) for v in block["r1"]]
        for key, name in (("ap", "multi_map"), ("r10", "r10"), ("rd", "rd"), ("own_first", "own_first"),
                          ("top10", "top10"), ("strong", "strong"), ("gap", "gap")):  # fmt: skip
            out[name][i] = np.mean(per_query[key])
    return out


def test_every_metric_matches_a_brute_force_reference(xquad_dir: Path) -> None:
    suite = load_lareqa("xquad-r", xquad_dir, languages=["ar", "de", "en"], max_paragraphs=25)
    enc = HashingEncoder()
    res = evaluate_lareqa(suite, enc)
    ref = brute_force(suite, enc)
    np.testing.assert_allclose(res.map_matrix, ref["map"], rtol=0, atol=1e-9)
    np.testing.assert_allclose(res.r1_matrix, ref["r1"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(res.multi_map, ref["multi_map"], rtol=0, atol=1e-9)
    np.testing.assert_allclose(res.multi_r10, ref["r10"], rtol=0, atol=1e-12)
    for i, lang in enumerate(suite.languages):
        got = res.bias[lang]
        expected = {"rank_distance": ref["rd"][i], "own_first": ref["own_first"][i],
                    "top10_own_share": ref["top10"][i], "strong_alignment": ref["strong"][i],
                    "same_lang_gap": ref["gap"][i], "own_first_chance": 1 / 3}  # fmt: skip
        assert got == pytest.approx(got | expected, abs=1e-9)


@pytest.fixture(scope="module")
def real_run(xquad_dir: Path) -> tuple[LareqaSuite, HashingEncoder, LareqaResults]:
    suite = load_lareqa("xquad-r", xquad_dir, languages=["ar", "de", "en", "zh"])
    enc = HashingEncoder()
    return suite, enc, evaluate_lareqa(suite, enc)


def test_ap_equals_sklearn_on_a_real_run(real_run: tuple[LareqaSuite, HashingEncoder, LareqaResults]) -> None:
    suite, enc, res = real_run
    pool = np.vstack([enc.encode(suite.data[x].candidate_texts, "passage") for x in suite.languages])
    ap = res.per_query["multi_ap"]
    offset = 0
    for i, lang in enumerate(suite.languages):
        queries = enc.encode(suite.data[lang].query_texts, "query")
        relevant = suite.relevant(lang)
        scores = queries @ pool.T  # lareqa_scoring's own expression, so scores are bit-identical
        mine = ap[offset : offset + len(queries)]
        assert res.multi_map[i] == pytest.approx(mine.mean(), abs=1e-12)
        for q in range(0, len(queries), 7):
            labels = np.isin(np.arange(len(pool)), relevant[q])
            assert abs(mine[q] - average_precision_score(labels, scores[q])) < 1e-9
        offset += len(queries)
    assert 0 < res.summary()["multi.map"] < res.summary()["mono.map"]


def test_trec_files_rescore_to_the_same_map(xquad_dir: Path, tmp_path: Path) -> None:
    suite = load_lareqa("xquad-r", xquad_dir, languages=["de", "el", "en"], max_paragraphs=15)
    res = evaluate_lareqa(suite, HashingEncoder(), depth=suite.pool_size)
    write_run(res.ranked, tmp_path / "run.trec")
    write_qrels(res.ranked, tmp_path / "qrels.trec")
    run, qrels = read_run(tmp_path / "run.trec"), read_qrels(tmp_path / "qrels.trec")
    assert len(qrels) == sum(res.n_queries.values()) and next(iter(qrels)).startswith("de:")
    per_query = score_run(run, qrels, ["map", "recall_10"])
    for lang, multi_map, r10 in zip(res.languages, res.multi_map, res.multi_r10, strict=True):
        mine = {q: v for q, v in per_query.items() if q.startswith(f"{lang}:")}
        assert mean_scores(mine) == pytest.approx({"map": multi_map, "recall_10": r10}, abs=1e-9)


def test_flat_metric_names(real_run: tuple[LareqaSuite, HashingEncoder, LareqaResults]) -> None:
    res = real_run[2]
    flat = res.flat_metrics()
    assert not [k for k in flat if "@" in k or "=" in k]
    for name in ("multi/map", "mono/map", "cross/map", "cross/map/ar_de", "mono/map/en", "multi/r10",
                 "bias/rank_distance", "mono/r1", "cross/r1", "cross/map/zh", "bias/top10_own_share/en"):  # fmt: skip
        assert f"xquad_r/{name}" in flat
    assert len(flat) == 15 + 4 * 15 + 12 * 2
    assert set(res.flat_metrics("xq")) == {k.replace("xquad_r/", "xq/", 1) for k in flat}
    table = format_table(res)
    assert "mAP matrix" in table and table.count("\n") > 10


class FakeClient:
    def __init__(self) -> None:
        self.batches: list[list[Metric]] = []
        self.artifacts: dict[str, list[str]] = {}

    def log_batch(self, run_id: str, metrics: list[Metric]) -> None:
        self.batches.append(metrics)

    def log_artifacts(self, run_id: str, local_dir: str, artifact_path: str) -> None:
        self.artifacts[artifact_path] = sorted(p.name for p in Path(local_dir).iterdir())


def test_log_to_mlflow_batches_metrics_by_step(
    real_run: tuple[LareqaSuite, HashingEncoder, LareqaResults],
) -> None:
    res = real_run[2]
    client = FakeClient()
    log_to_mlflow(res, client, "run-1", step=7)  # type: ignore[arg-type]
    logged = {m.key: m for batch in client.batches for m in batch}
    assert logged.keys() == res.flat_metrics().keys() and {m.step for m in logged.values()} == {7}
    assert client.artifacts == {
        "eval/xquad-r/step-7": [
            "bias_by_language.png",
            "bias_own_vs_other.png",
            "map_matrix.csv",
            "map_matrix.png",
            "per_query.json",
            "results.json",
            "table.txt",  # what the terminal shows, which xling run leaves to its log
        ]  # fmt: skip  # fmt: skip
    }


def test_per_query_json_feeds_the_sweep_report(
    real_run: tuple[LareqaSuite, HashingEncoder, LareqaResults], tmp_path: Path
) -> None:
    summary = pytest.importorskip("xling.trainer.sweep.summary")
    res = real_run[2]
    write_artifacts(res, tmp_path)
    parsed = summary.parse_per_query(json.loads((tmp_path / "per_query.json").read_text()))
    assert parsed.query_ids[0] == f"ar:{real_run[0].data['ar'].query_ids[0]}"
    by_language = [{q for q, lang in zip(parsed.question_ids, parsed.language, strict=True) if lang == i}
                   for i in range(len(res.languages))]  # fmt: skip
    assert all(ids == by_language[0] for ids in by_language), "translations share the question id"
    for i in range(len(res.languages)):
        mine = parsed.language == i
        assert parsed.ap["multi"][mine].mean() == pytest.approx(res.multi_map[i], abs=1e-12)
        assert parsed.ap["mono"][mine].mean() == pytest.approx(res.map_matrix[i, i], abs=1e-12)


def test_per_query_json_labels_each_query_with_its_paragraph_and_article(
    real_run: tuple[LareqaSuite, HashingEncoder, LareqaResults], xquad_dir: Path, tmp_path: Path
) -> None:
    """The sweep's bootstrap resamples paragraphs (sweep.bootstrapUnit): every query carries the paragraph
    and the article of its question, parsed here independently of the loader, and translations share them."""
    suite, _, res = real_run
    write_artifacts(res, tmp_path)
    doc = json.loads((tmp_path / "per_query.json").read_text())
    raw = raw_answer_sentences(find_file(xquad_dir, "en"), "en")  # question id -> en:<paragraph>:<sentence>
    article_of, p = {}, 0
    for a, article in enumerate(json.loads(_read(find_file(xquad_dir, "en")))["data"]):
        for _ in article["paragraphs"]:
            article_of[p], p = a, p + 1
    paragraph = {qid: int(cid.split(":")[1]) for qid, cid in raw.items()}
    for unit, truth in (
        ("paragraph", paragraph),
        ("article", {q: article_of[k] for q, k in paragraph.items()}),
    ):
        labels = dict(zip(doc["query_ids"], doc[unit], strict=True))
        clusters: dict[int, set[int]] = {}
        for query, label in labels.items():
            clusters.setdefault(label, set()).add(truth[query.split(":", 1)[1]])
        assert all(len(v) == 1 for v in clusters.values()), f"one {unit} per label"
        assert len(clusters) == len(set(truth.values())), f"one label per {unit}"
    assert len(set(doc["paragraph"])) == 240 and len(set(doc["article"])) == 48


def test_embedding_cache_is_reused_and_keyed_by_fingerprint(xquad_dir: Path, tmp_path: Path) -> None:
    suite = load_lareqa("xquad-r", xquad_dir, languages=["de", "en"], max_paragraphs=5)
    enc = HashingEncoder()
    first = evaluate_lareqa(suite, enc, cache_dir=tmp_path)
    assert enc.calls == 4 and len(list(tmp_path.glob("xquad-r.de.sentence.passage.*.npy"))) == 1
    second = evaluate_lareqa(suite, enc, cache_dir=tmp_path)
    assert enc.calls == 4 and second.flat_metrics() == first.flat_metrics()
    other = HashingEncoder(dim=128)
    evaluate_lareqa(suite, other, cache_dir=tmp_path)
    assert other.calls == 4


def test_cli_end_to_end_with_mlflow(
    xquad_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    loaded = []

    def load_text_encoder(name: str, **kwargs: object) -> HashingEncoder:
        loaded.append((name, kwargs))
        return HashingEncoder()

    monkeypatch.setitem(
        sys.modules, "xling.trainer.model", SimpleNamespace(load_text_encoder=load_text_encoder)
    )
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root is relative to the CWD
    parser = argparse.ArgumentParser(prog="xling")
    add_cli(parser.add_subparsers())
    argv = ["eval", "--model", "some/model", "--suite", "xquad-r", "--data", str(xquad_dir), "--languages",
            "ar,de", "--max-queries", "30", "--max-paragraphs", "40", "--out", "res.json", "--run-file",
            "run.trec", "--qrels-file", "qrels.trec", "--tracking-uri", "sqlite:///mlflow.db"]  # fmt: skip
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    assert loaded == [("some/model", {"pooling": "mean", "query_prefix": "query: ", "passage_prefix": "passage: ",
                                      "max_length": 128})]  # fmt: skip
    assert "mAP matrix" in capsys.readouterr().out
    saved = json.loads(Path("res.json").read_text())
    assert saved["n_queries"] == {"ar": 30, "de": 30} and saved["metrics"]["xquad_r/multi/map"] > 0
    first = Path("run.trec").read_text().splitlines()[0].split()
    assert first[0].startswith("ar:") and first[1:2] == ["Q0"] and first[3] == "1" and first[5] == "xling"
    assert len(read_qrels("qrels.trec")) == 60
    import mlflow

    client = mlflow.MlflowClient(tracking_uri="sqlite:///mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("xling-eval").experiment_id])
    assert run.data.metrics["xquad_r/multi/map"] == pytest.approx(saved["metrics"]["xquad_r/multi/map"])
    assert run.data.params["languages"] == "ar,de"
    names = {a.path for a in client.list_artifacts(run.info.run_id, "eval/xquad-r/step-0")}
    assert "eval/xquad-r/step-0/map_matrix.png" in names and len(names) == 7

    args = parser.parse_args(["eval", "--model", "m", "--suite", "xquad-r", "--data", str(xquad_dir),
                              "--languages", "ar,xx"])  # fmt: skip
    assert args.func(args) == 2
    assert "no xx.json or xx.json.gz" in capsys.readouterr().err


@pytest.mark.parametrize("index", ["ivf", "hnsw"])
def test_approximate_indexes_score_from_top_k_lists(xquad_dir: Path, index: str) -> None:
    suite = load_lareqa("xquad-r", xquad_dir, languages=["de", "en", "zh"], max_paragraphs=30)
    enc = HashingEncoder()
    exact = evaluate_lareqa(suite, enc).summary()
    approx = evaluate_lareqa(suite, enc, index=index, depth=suite.pool_size)
    assert not approx.exact and approx.index == index
    assert approx.summary()["multi.map"] == pytest.approx(exact["multi.map"], abs=0.01)


@pytest.mark.parametrize("index", ["ivf", "hnsw"])
def test_approximate_mono_and_cross_search_each_language_and_bias_is_not_guessed(
    xquad_dir: Path, index: str, tmp_path: Path
) -> None:
    """Depth covers each language but not the pool. Each language's index is small enough to be searched
    exhaustively, so mono/cross must equal the exact ones; a pooled top-depth list misses positives that
    are first in their own language. Rank-based bias is reported as not available, not read off a subset."""
    suite = load_lareqa("xquad-r", xquad_dir, languages=["de", "en", "zh"], max_paragraphs=30)
    enc = HashingEncoder()
    exact = evaluate_lareqa(suite, enc)
    depth = max(len(d.candidate_ids) for d in suite.data.values())
    assert depth < suite.pool_size / 2
    approx = evaluate_lareqa(suite, enc, index=index, depth=depth)
    # FAISS sums inner products in another order: a near-tie may flip, nothing more
    np.testing.assert_allclose(approx.map_matrix, exact.map_matrix, rtol=0, atol=1e-3)
    np.testing.assert_allclose(approx.r1_matrix, exact.r1_matrix, rtol=0, atol=1e-2)
    assert approx.summary()["multi.map"] <= exact.summary()["multi.map"] + 1e-12  # AP@depth of the pool
    unavailable = [f"bias.{m}" for m in EXACT_BIAS_METRICS]
    assert approx.unavailable == unavailable and exact.unavailable == []
    assert all(np.isnan(approx.bias[lang][m]) for lang in suite.languages for m in EXACT_BIAS_METRICS)
    assert not any(".rank_distance" in k or ".own_first" in k for k in approx.flat_metrics())
    assert approx.bias["en"]["top10_own_share"] == pytest.approx(
        exact.bias["en"]["top10_own_share"], abs=0.05
    )
    assert "not available: bias.rank_distance" in format_table(approx)
    write_artifacts(approx, tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["unavailable"]["metrics"] == unavailable and "index flat" in saved["unavailable"]["reason"]
    assert saved["summary"]["bias.rank_distance"] is None and saved["exact"] is False
