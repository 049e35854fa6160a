"""Data loading: pair files, bad-row reporting, the builders on the real staged data, and the demo pack."""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.support import ROOT
from xling.api.spec.base import XQUAD_R_LANGUAGES
from xling.api.spec.training import DataSource, DataSpec
from xling.trainer.data import builders, load_corpus, loaders, overlap, pairs
from xling.trainer.data.pairs import BadRowError, BadRows, PairCorpus

SHARED = Path(os.environ.get("XLING_SHARED") or ROOT.parent / "shared") / "data"
DEMO = ROOT / "data" / "demo"
needs_shared = pytest.mark.skipif(
    not SHARED.is_dir(), reason=f"staged data not found at {SHARED} (set XLING_SHARED)"
)

ROWS: list[dict[str, Any]] = [
    {"pair_id": "p1", "language": "en", "query": "who wrote it", "passage": "She wrote it.", "hard_negatives": ["He did not."]},
    {"pair_id": "p1", "language": "de", "query": "wer schrieb es", "passage": "Sie schrieb es.", "hard_negatives": []},
    {"pair_id": "p2", "language": "en", "query": "where is it", "passage": "It is here.", "hard_negatives": ["a", "b"]},
]  # fmt: skip


def write_pairs(path: Path, rows: Sequence[dict[str, Any]], negatives_as: str = "json") -> Path:
    """Write rows as JSONL, CSV (negatives JSON- or |-encoded) or Parquet, chosen by the file name."""
    fmt = loaders.format_of(path)
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        out = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(list(rows)), out)
        data = out.getvalue()
    elif fmt == "jsonl":
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    else:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        for r in rows:
            negs = r.get("hard_negatives", [])
            encoded = json.dumps(negs) if negatives_as == "json" else "|".join(negs)
            writer.writerow({**r, "hard_negatives": encoded})
        data = buf.getvalue().encode()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


#: file name -> where the k-th (0-based) data row is reported: JSONL line k+1, CSV line k+2, Parquet index k.
FORMATS = {
    "rows.jsonl": 1,
    "rows.csv": 2,
    "rows.parquet": 0,
    "rows.jsonl.gz": 1,
    "rows.csv.gz": 2,
    "rows.parquet.gz": 0,
}


@pytest.mark.parametrize("name", FORMATS)
def test_formats_load_the_same_corpus(tmp_path: Path, name: str) -> None:
    corpus = PairCorpus.from_pairs(loaders.read_pairs(write_pairs(tmp_path / name, ROWS)))
    assert len(corpus) == 2 and corpus.sizes() == {"de": 1, "en": 2}
    assert corpus.groups[0]["en"].hard_negatives == ("He did not.",)
    assert corpus.groups[1]["en"].hard_negatives == ("a", "b")
    assert corpus.groups[0]["de"].hard_negatives == ()


def test_csv_pipe_separated_negatives_and_multiline_rows(tmp_path: Path) -> None:
    rows = [dict(ROWS[2], passage="line one\nline two"), dict(ROWS[0], query="")]
    path = write_pairs(tmp_path / "rows.csv", rows, negatives_as="pipe")
    got = list(loaders.read_pairs(path))
    assert got[0][0].hard_negatives == ("a", "b") and got[0][0].passage == "line one\nline two"
    assert got[1][1] == f"{path}:4"  # the second row starts on line 4: the first spans lines 2-3
    with pytest.raises(BadRowError, match=r"rows\.csv:4: empty query"):
        PairCorpus.from_pairs(got)


BAD_ROWS = {
    "empty query": {"query": "  "},
    "unknown language code 'xx'": {"language": "xx"},
    "repeats language 'en'": {"pair_id": "p2", "language": "en"},
}


@pytest.mark.parametrize("name", ["rows.jsonl", "rows.csv", "rows.parquet"])
@pytest.mark.parametrize("reason", BAD_ROWS)
def test_bad_row_names_file_and_row(tmp_path: Path, name: str, reason: str) -> None:
    rows = [ROWS[0], ROWS[2], dict(ROWS[1], **BAD_ROWS[reason])]
    path = write_pairs(tmp_path / name, rows)
    with pytest.raises(BadRowError) as err:
        PairCorpus.from_pairs(loaders.read_pairs(path))
    assert f"{path}:{2 + FORMATS[name]}: " in str(err.value) and reason in str(err.value)


def test_skip_bad_rows_counts_them(tmp_path: Path) -> None:
    rows = [ROWS[0], ROWS[2]] + [
        {**ROWS[1], "pair_id": f"b{i}", **bad} for i, bad in enumerate(BAD_ROWS.values())
    ]
    path = write_pairs(tmp_path / "rows.jsonl", rows)
    path.write_text(path.read_text() + "{not json\n" + '{"pair_id": "x"}\n')
    spec = DataSpec(
        languages=["en", "de"],
        sources=[DataSource(type="pairs", path=str(path), pool="monolingual")],
        skip_bad_rows=True,
    )
    report = BadRows()
    corpus = load_corpus(spec, report)
    assert corpus.num_pairs() == 2 and report.total == 5
    assert report.skipped["empty query"] == 1 and report.skipped["unknown language code 'xx'"] == 1
    assert f"{path}:6:2: invalid JSON (Expecting property name enclosed in double quotes)" in report.examples
    assert any(e == f"{path}:7: missing key 'language'" for e in report.examples)
    with pytest.raises(BadRowError, match=r"rows\.jsonl:3: empty query"):
        load_corpus(spec.model_copy(update={"skip_bad_rows": False}))


@pytest.mark.parametrize("name", ["rows.csv", "rows.parquet"])
def test_missing_column_names_file_and_column(tmp_path: Path, name: str) -> None:
    path = write_pairs(tmp_path / name, [{k: v for k, v in r.items() if k != "passage"} for r in ROWS])
    with pytest.raises(ValueError, match=rf"{name}: missing column 'passage'"):
        list(loaders.read_pairs(path))


def test_directory_source_groups_parallel_files(tmp_path: Path) -> None:
    write_pairs(tmp_path / "a-en.jsonl", [ROWS[0]])
    write_pairs(tmp_path / "b-de.parquet", [ROWS[1]])
    (tmp_path / "README.md").write_text("not data")
    corpus = PairCorpus.from_pairs(loaders.read_pairs(tmp_path))
    assert len(corpus) == 1 and set(corpus.groups[0]) == {"en", "de"}
    with pytest.raises(ValueError, match="unknown pair-file format"):
        list(loaders.read_pairs(tmp_path / "README.md"))


def test_load_corpus_restricts_caps_and_merges_sources(tmp_path: Path) -> None:
    en = write_pairs(tmp_path / "en.jsonl", [ROWS[0], ROWS[2]])
    de = write_pairs(tmp_path / "de.csv", [ROWS[1]])
    sources = [
        DataSource(type="pairs", path=str(en), max_pairs_per_language=1, pool="monolingual"),
        DataSource(type="pairs", path=str(de), pool="monolingual"),
    ]
    corpus = load_corpus(DataSpec(languages=["en", "de"], sources=sources))
    assert len(corpus) == 1 and set(corpus.groups[0]) == {"en", "de"}  # p1 joined across the two sources
    only_de = load_corpus(DataSpec(languages=["de"], sources=sources))
    assert only_de.sizes() == {"de": 1}
    with pytest.raises(BadRowError, match=r"data\.sources\[1\].*'p1' repeats language 'en'"):
        load_corpus(DataSpec(languages=["en"], sources=[sources[0], sources[0]]))
    with pytest.raises(ValueError, match="no source has pairs"):
        load_corpus(DataSpec(languages=["ar"], sources=sources))
    with pytest.raises(ValueError, match="needs the field 'language'"):
        load_corpus(DataSpec(languages=["ar"], sources=[DataSource(type="squad", path=str(en))]))


def test_hf_local_dataset_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(saved))
    raw = tmp_path / "raw"
    raw.mkdir()
    write_pairs(raw / "train.jsonl", ROWS)
    for path in (saved, raw):
        corpus = load_corpus(
            DataSpec(
                languages=["en", "de"], sources=[DataSource(type="hf", path=str(path), pool="monolingual")]
            )
        )
        assert corpus.sizes() == {"de": 1, "en": 2}
        assert corpus.groups[1]["en"].hard_negatives == ("a", "b")


def test_hf_hub_name_fails_clearly_offline(tmp_path: Path) -> None:
    """Run in a fresh interpreter: the hub libraries read HF_HUB_OFFLINE only when imported."""
    code = "from xling.trainer.data import loaders; list(loaders.read_hf('someone/no-such-dataset', 'train'))"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0
    assert (
        "InputError: someone/no-such-dataset: cannot load Hugging Face dataset split 'train'" in proc.stderr
    )
    assert "HF_HUB_OFFLINE" in proc.stderr


# --- builder helpers --------------------------------------------------------------------------------------


def test_sentence_spans_and_answer_passage() -> None:
    text = "Dr. Who went home. It rained all day long there! Was it cold? Yes, quite cold indeed.\nNew line here."
    sentences = [text[s:e].strip() for s, e in builders.sentence_spans(text, "en")]
    assert sentences == [  # "Dr." and short sentences merge forward; a short last one merges back
        "Dr. Who went home. It rained all day long there!",
        "Was it cold? Yes, quite cold indeed.\nNew line here.",
    ]
    zh = "这是第一句话，它比较长一些，至少有二十个字。这是第二句话，也比较长一些，超过二十个字！第三句呢？"
    assert builders.answer_passage(zh, "第二句话", zh.index("第二句话"), "zh").startswith("这是第二句话")
    hi = "यह पहला वाक्य है जो काफी लंबा है। यह दूसरा वाक्य है जो भी लंबा है।"
    assert builders.answer_passage(hi, "दूसरा", hi.index("दूसरा"), "hi") == "यह दूसरा वाक्य है जो भी लंबा है।"
    assert builders.answer_passage(" whole paragraph ", "", None, "en") == "whole paragraph"
    assert builders.answer_passage(text, "It rained", 0, "en").startswith("Dr. Who")  # wrong offset: searched


def test_drop_overlapping_words_and_characters() -> None:
    eval_texts = [
        "one two three four five six seven eight nine ten eleven",
        "这是一个很长的中文句子用于检测训练数据和评测数据之间是否存在重叠情况",
        "ประโยคภาษาไทยที่ยาวมากสำหรับการตรวจสอบการซ้อนทับระหว่างข้อมูลฝึกและข้อมูลทดสอบ",
    ]
    rows = [
        ("a", "en", "q", "Zero, one two three four five six seven eight nine ten!"),  # word 10-gram
        ("a", "de", "q", "harmlos"),  # dropped with its group
        ("b", "en", "q", "one two three four five six seven eight nine"),  # only 9 words
        ("c", "zh", "用于检测训练数据和评测数据之间是否存在重叠", "p"),  # 21 characters shared
        ("d", "zh", "q", "检测训练数据和评测数据之间的"),  # 14 characters
        ("e", "th", "q", "การตรวจสอบการซ้อนทับระหว่างข้อมูลฝึกและข้อมูลทดสอบ"),  # > 40 characters
        ("f", "th", "q", "การตรวจสอบการซ้อนทับระหว่าง"),  # < 40 characters
    ]
    corpus = PairCorpus.from_pairs((builders.Pair(*r), "t") for r in rows)
    kept, dropped = overlap.drop_overlapping(corpus, eval_texts)
    assert dropped == 3
    assert [next(iter(g.values())).pair_id for g in kept.groups] == ["b", "d", "f"]


# --- builders on the real staged data ---------------------------------------------------------------------


def full_groups(corpus: PairCorpus, languages: Sequence[str] = XQUAD_R_LANGUAGES) -> int:
    return sum(set(g) == set(languages) for g in corpus.groups)


@needs_shared
def test_xnli_dev_and_test() -> None:
    dev = PairCorpus.from_pairs(builders.xnli_rows(SHARED / "xnli"))
    assert len(dev) == 830 and full_groups(dev) == 830
    group = dev.groups[0]
    assert (
        group["en"].pair_id == "xnli:dev:3"
        and group["de"].query == "Er sagte seiner Mutter, er sei nach Hause gekommen."
    )
    test = PairCorpus.from_pairs(builders.xnli_rows(SHARED / "xnli", "test", {"en", "th"}))
    assert test.sizes() == {"en": 5010, "th": 5010}


@needs_shared
def test_ntrex_sentence_to_context() -> None:
    corpus = PairCorpus.from_pairs(builders.ntrex_rows(SHARED / "ntrex-128"))
    assert len(corpus) == 1997 and corpus.languages == sorted(XQUAD_R_LANGUAGES)
    assert min(corpus.sizes().values()) >= 1994 and corpus.num_pairs() == 11 * 1997 - 17
    assert full_groups(corpus) >= 1980
    for group in corpus.groups:
        for pair in group.values():
            assert pair.passage and pair.query not in pair.passage
    first = corpus.groups[0]["en"]
    assert first.pair_id == "ntrex:1" and first.query.startswith("Welsh AMs worried")
    assert first.passage.startswith("There is consternation")


@needs_shared
def test_tydiqa_dev_and_train() -> None:
    ar = PairCorpus.from_pairs(builders.tydiqa_rows(SHARED / "tydiqa-goldp", "dev", {"ar"}))
    assert ar.sizes() == {"ar": 842}  # 921 questions on 842 distinct gold passages
    assert ar.groups[0]["ar"].pair_id == "tydiqa:ar.dev:1"
    every = PairCorpus.from_pairs(builders.tydiqa_rows(SHARED / "tydiqa-goldp"))
    assert every.sizes() == {"ar": 842, "en": 3933, "ru": 778}


@needs_shared
def test_squad_arcd_answer_sentences() -> None:
    corpus = PairCorpus.from_pairs(builders.squad_rows(SHARED / "native-qa" / "arcd" / "arcd.json.gz", "ar"))
    assert corpus.sizes() == {"ar": 799}
    doc = json.loads(gzip.decompress((SHARED / "native-qa" / "arcd" / "arcd.json.gz").read_bytes()))
    contexts = [p["context"] for a in doc["data"] for p in a["paragraphs"]]
    pairs = [g["ar"] for g in corpus.groups]
    assert all(p.pair_id.startswith("squad:arcd:") for p in pairs)
    assert (
        sum(any(p.passage in c and len(p.passage) < len(c.strip()) for c in contexts) for p in pairs[:50])
        >= 45
    )


@needs_shared
def test_squad_cmrc_bad_questions_are_reported() -> None:
    path = SHARED / "native-qa" / "cmrc2018"
    with pytest.raises(
        BadRowError, match=r"cmrc2018_trial\.json\.gz:question 748 \(id TRIAL_776_QUERY_4\): empty query"
    ):
        PairCorpus.from_pairs(builders.squad_rows(path, "zh"))
    report = BadRows()
    assert PairCorpus.from_pairs(builders.squad_rows(path, "zh"), report).sizes() == {"zh": 3732}
    assert report.total == 2


@needs_shared
def test_iapp_thai() -> None:
    corpus = PairCorpus.from_pairs(builders.iapp_rows(SHARED / "native-qa" / "iapp-wiki-qa"))
    assert corpus.sizes() == {"th": 4670}
    valid = PairCorpus.from_pairs(
        builders.iapp_rows(SHARED / "native-qa" / "iapp-wiki-qa" / "data.zip", "valid")
    )
    assert valid.groups[0]["th"].pair_id == "iapp:valid:1"
    with pytest.raises(ValueError, match=r"no data/dev\.jsonl"):
        list(builders.iapp_rows(SHARED / "native-qa" / "iapp-wiki-qa", "dev"))


@needs_shared
def test_overlap_guard_finds_the_oxygen_passage() -> None:
    doc = json.loads((SHARED / "xquad-r" / "en.json").read_text())
    texts = [
        t
        for a in doc["data"]
        for p in a["paragraphs"]
        for t in (p["context"], *(q["question"] for q in p["qas"]))
    ]
    corpus = PairCorpus.from_pairs(builders.tydiqa_rows(SHARED / "tydiqa-goldp", "train"))
    kept, dropped = overlap.drop_overlapping(corpus, texts)
    assert dropped == 1 and len(kept) == len(corpus) - 1
    assert not any("Sendivogius" in g["en"].passage for g in kept.groups)


# --- the demo pack ----------------------------------------------------------------------------------------


def test_demo_pack_loads_without_shared_data() -> None:
    sources = [
        DataSource(type="mlqa", path=str(DEMO / "mlqa-test-gxlt"), languages=["de", "es", "vi", "zh"]),
        DataSource(type="ntrex", path=str(DEMO / "ntrex-128"), max_pairs_per_language=100),
        DataSource(type="tydiqa", path=str(DEMO / "tydiqa-goldp"), pool="monolingual"),
        DataSource(type="squad", path=str(DEMO / "native-qa" / "arcd"), language="ar", pool="monolingual"),
        DataSource(
            type="squad",
            path=str(DEMO / "native-qa" / "cmrc2018" / "cmrc2018_dev.json.gz"),
            language="zh",
            pool="monolingual",
        ),
        DataSource(type="iapp", path=str(DEMO / "native-qa" / "iapp-wiki-qa"), pool="monolingual"),
    ]
    corpus = load_corpus(DataSpec(languages=list(XQUAD_R_LANGUAGES), sources=sources))
    sizes = corpus.sizes()
    assert sizes["en"] == 100 + 3933 and sizes["ar"] == 100 + 842 + 799
    assert sizes["zh"] == 3128 + 100 + 2837 and sizes["th"] == 100 + 4670
    assert sizes["de"] == 3821 + 100 and sizes["vi"] == 1675 + 100
    # only the MLQA and NTREX groups may be drawn for X-Y
    sources = [
        next(iter(corpus.groups[g].values())).pair_id.split(":")[0] for g in corpus.index.xy_union.tolist()
    ]
    assert set(sources) == {"mlqa", "ntrex"} and sources.count("mlqa") == 5328


def test_demo_pack_contents() -> None:
    for lang in XQUAD_R_LANGUAGES:
        doc = json.loads(gzip.decompress((DEMO / "xquad-r" / f"{lang}.json.gz").read_bytes()))
        assert sum(len(p["qas"]) for a in doc["data"] for p in a["paragraphs"]) == 1190
    for folder, license_file in [
        ("ntrex-128", "LICENSE.md"), ("tydiqa-goldp", "LICENSE"), ("native-qa/arcd", "LICENSE"),
        ("native-qa/cmrc2018", "LICENSE"), ("native-qa/iapp-wiki-qa", "LICENSE"), ("xquad-r", "LICENSE"),
        ("mlqa-test-gxlt", "LICENSE"), ("mlqa-test-gxlt", "SOURCE.md"),
    ]:  # fmt: skip
        assert (DEMO / folder / license_file).is_file(), folder
    assert not (DEMO / "xnli").exists() and not (DEMO / "native-qa" / "tquad").exists()
    assert sum(f.stat().st_size for f in DEMO.rglob("*") if f.is_file()) < 20_000_000


def test_mlqa_groups_questions_and_paragraphs_by_question_id() -> None:
    corpus = PairCorpus.from_pairs(builders.mlqa_rows(DEMO / "mlqa-test-gxlt"))
    assert len(corpus) == 9677  # distinct question ids (SOURCE.md)
    queries = {lang for g in corpus.groups for lang, p in g.items() if p.query is not None}
    passages = {lang for g in corpus.groups for lang, p in g.items() if p.passage is not None}
    assert queries == {"ar", "de", "es", "hi", "vi", "zh"} and passages == {"de", "es", "vi", "zh"}
    assert sum(len(g) >= 2 and bool(pairs.xx_languages(g)) for g in corpus.groups) == 5328
    # one paragraph serves several questions: their groups share its text key
    owners: dict[str, int] = {}
    for g in corpus.groups:
        for p in g.values():
            if p.passage is not None:
                owners[p.passage] = owners.get(p.passage, 0) + 1
    assert max(owners.values()) > 1
    de_only = PairCorpus.from_pairs(builders.mlqa_rows(DEMO / "mlqa-test-gxlt", languages={"de"}))
    assert {lang for g in de_only.groups for lang in g} == {"de"}


def test_mlqa_bad_rows_name_file_and_question(tmp_path: Path) -> None:
    doc = {"data": [{"paragraphs": [{"context": "Ein Absatz.", "qas": [
        {"id": "a1", "question": "Was?", "answers": [{"text": "", "answer_start": 0}]},
        {"id": "a2", "question": " ", "answers": []}]}]}]}  # fmt: skip
    file = tmp_path / "test-context-de-question-ar.json"
    file.write_text(json.dumps(doc))
    with pytest.raises(
        BadRowError, match=r"test-context-de-question-ar\.json:question 2 \(id a2\): empty query"
    ):
        PairCorpus.from_pairs(builders.mlqa_rows(tmp_path))
    (tmp_path / "test-context-de-question-ar.json").rename(tmp_path / "context-de.json")
    with pytest.raises(FileNotFoundError, match="no MLQA files"):
        list(builders.mlqa_rows(tmp_path))


def test_the_report_counts_a_bad_row_by_the_reason_the_error_carries() -> None:
    """The reason is the error's own field, not the text after its last ": " (a reason may hold one)."""
    reason = "hard_negatives is not a valid JSON list (Expecting value: line 1 column 1 (char 0))"
    err = BadRowError("rows.csv:4", reason)
    report = BadRows()
    report.add(err)
    assert dict(report.skipped) == {reason: 1} and report.examples == [f"rows.csv:4: {reason}"]
    assert (err.source, err.reason) == ("rows.csv:4", reason)


def test_a_squad_file_that_is_not_json_is_named(tmp_path: Path) -> None:
    """A truncated download: json's own ValueError used to reach the user without the file's name (and, now
    that only InputError is printed, would show as a traceback)."""
    from xling.api.errors import InputError

    (tmp_path / "train.json").write_text('{"data": [')
    with pytest.raises(InputError, match=r"train\.json: not valid JSON \(Expecting value"):
        list(builders.squad_rows(tmp_path / "train.json", "en"))
