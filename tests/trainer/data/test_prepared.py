"""The prepared corpus: what preparation writes reads back as the same groups, is reused by preparation key,
keeps the loader's bad-row, conflict-key and asymmetric-group rules, and gives the samplers the very same
batches as the in-memory corpus."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest

from xling.api.spec.training import DataSource, DataSpec, SamplingSpec
from xling.trainer.data import BadRows, DataLocation, PairCorpus, open_corpus, prepare_corpus
from xling.trainer.data.pairs import BadRowError, Pair
from xling.trainer.sampling import build_sampler
from xling.trainer.train_loop import batch_texts

LANGS = ["ar", "de", "en", "es"]


def groups() -> list[dict[str, Pair]]:
    """Parallel groups, MLQA-like asymmetric ones (questions without paragraphs), one paragraph shared by
    two groups, hard negatives, explicit keys, and a monolingual-pool member."""
    out = [{lang: Pair(f"par{i}", lang, f"q{i} {lang}", f"p{i} {lang}", keys=(f"win:{i // 3}",) if i < 6 else ())
            for lang in LANGS} for i in range(40)]  # fmt: skip
    for i in range(20):
        shared = f"para {i - i % 2}"  # groups 2k and 2k+1 share their es paragraph
        out.append({"ar": Pair(f"asym{i}", "ar", f"aq{i}", None), "de": Pair(f"asym{i}", "de", None, f"dp{i}"),
                    "es": Pair(f"asym{i}", "es", f"eq{i}", shared, hard_negatives=(f"p{i} es", f"neg {i}"))})  # fmt: skip
    out.append({"en": Pair("mono0", "en", "mq", "mp", pool="monolingual")})
    return out


def write(path: Path, groups: list[dict[str, Pair]]) -> Path:
    rows = [{"pair_id": p.pair_id, "language": p.language, "query": p.query, "passage": p.passage,
             "hard_negatives": list(p.hard_negatives), "keys": list(p.keys)}
            for g in groups for p in g.values() if p.pool == "shared"]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_keys_jsonl(tmp: Path, gs: list[dict[str, Pair]]) -> DataSpec:
    """A shared source and a monolingual one, as files."""
    shared = write(tmp / "shared.jsonl", gs)
    mono = tmp / "mono.jsonl"
    mono.write_text(json.dumps({"pair_id": "mono0", "language": "en", "query": "mq", "passage": "mp"}) + "\n")
    return DataSpec(languages=LANGS, sources=[DataSource(type="pairs", path=str(shared)),
                                              DataSource(type="pairs", path=str(mono), pool="monolingual")])  # fmt: skip


@pytest.fixture
def spec(tmp_path: Path) -> DataSpec:
    return write_keys_jsonl(tmp_path, groups())


def test_round_trip_and_fingerprint(tmp_path: Path, spec: DataSpec) -> None:
    prepared = prepare_corpus(spec, str(tmp_path / "data"))
    expected = PairCorpus(groups())
    assert prepared.corpus.materialize().groups == expected.groups
    assert prepared.corpus.fingerprint() == expected.fingerprint()
    assert prepared.corpus.sizes() == expected.index.sizes()


def test_same_batches_as_the_in_memory_corpus(tmp_path: Path, spec: DataSpec) -> None:
    disk, memory = prepare_corpus(spec, str(tmp_path / "data")).corpus, PairCorpus(groups())
    for strategy in ("xx", "xy", "hybrid", "mixed"):
        sampling = SamplingSpec(strategy=strategy, seed=7)
        a, b = build_sampler(disk.index, 8, sampling), build_sampler(memory.index, 8, sampling)
        for step in range(50):
            plan = a.plan(step)
            assert plan == b.plan(step)
            assert batch_texts(disk, plan, 1, 2, 2) == batch_texts(memory, plan, 1, 2, 2)


def test_conflict_keys_and_asymmetric_groups(tmp_path: Path, spec: DataSpec) -> None:
    index = prepare_corpus(spec, str(tmp_path / "data")).corpus.index
    by_id = {p.pair_id: g for g, p in enumerate(next(iter(g.values())) for g in groups())}
    # a paragraph two groups share, and a window key three share, are conflict keys; a lone text key is not
    assert set(index.keys(by_id["asym0"])) & set(index.keys(by_id["asym1"]))
    assert set(index.keys(by_id["par0"])) & set(index.keys(by_id["par2"]))
    assert not index.keys(by_id["par30"])
    # asym3's negative "p3 es" is par3's es passage: par3 keeps that key, so batch_texts can skip it
    assert index.keys(by_id["par3"])
    # asymmetric: X-Y pairs only where a query and a passage exist; ar has no X-X
    assert set(index.by_pair()) >= {("ar", "de"), ("ar", "es"), ("es", "de")}
    assert by_id["asym0"] not in index.by_language()["ar"].tolist()
    assert by_id["asym0"] in index.by_pair()[("ar", "de")].tolist()
    # the monolingual-pool group is drawable by X-X only
    assert by_id["mono0"] in index.by_language()["en"].tolist()
    assert by_id["mono0"] not in index.xy_union.tolist()
    # no batch holds two groups with a shared key
    sampler = build_sampler(index, 16, SamplingSpec(strategy="xy", seed=1))
    for step in range(100):
        keys = [k for it in sampler.plan(step).items for k in index.keys(it.group)]
        assert len(keys) == len(set(keys))


def test_reused_by_key_and_rebuilt_when_a_file_changes(tmp_path: Path, spec: DataSpec) -> None:
    root = str(tmp_path / "data")
    first = prepare_corpus(spec, root)
    rows = Path(first.location.uri) / "rows.arrow"
    built = rows.stat().st_mtime_ns
    again = prepare_corpus(spec, root)
    assert again.reused and again.location == first.location and rows.stat().st_mtime_ns == built
    assert prepare_corpus(spec.model_copy(update={"prefetch_steps": 3}), root).reused  # not a data change
    source = Path(spec.sources[0].path)
    added = [
        {"pair_id": "x", "language": lang, "query": f"q {lang}", "passage": f"p {lang}"}
        for lang in ("en", "de")
    ]
    source.write_text(source.read_text() + "".join(json.dumps(r) + "\n" for r in added))
    changed = prepare_corpus(spec, root)
    assert not changed.reused and changed.location.uri != first.location.uri
    assert changed.corpus.num_pairs() == first.corpus.num_pairs() + 2


def test_bad_rows_name_the_row_or_are_counted_and_kept_on_reuse(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    rows = [{"pair_id": f"g{i}", "language": "en", "query": f"q{i}", "passage": f"p{i}"} for i in range(3)]
    rows += [
        {"pair_id": "g1", "language": "en", "query": "again", "passage": "again"},  # line 4: repeats en
        {"pair_id": "g2", "language": "xx", "query": "q", "passage": "p"},
    ]  # line 5: unknown language
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = DataSpec(languages=["en"], sources=[DataSource(type="pairs", path=str(path), pool="monolingual")])
    with pytest.raises(BadRowError, match=r"bad.jsonl:5: unknown language code 'xx'"):
        prepare_corpus(spec, str(tmp_path / "a"))
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    with pytest.raises(BadRowError, match=r"bad.jsonl:4: pair_id 'g1' repeats language 'en'"):
        prepare_corpus(spec, str(tmp_path / "a"))
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    skip = spec.model_copy(update={"skip_bad_rows": True})
    for reused in (False, True):
        report = BadRows()
        prepared = prepare_corpus(skip, str(tmp_path / "b"), report=report)
        assert prepared.reused == reused and report.total == 2 and prepared.corpus.num_pairs() == 3


def test_a_repeat_across_sources_is_a_bad_row_of_the_later_source(tmp_path: Path) -> None:
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text(json.dumps({"pair_id": "g", "language": "en", "query": "q", "passage": "p"}) + "\n")
    b.write_text(json.dumps({"pair_id": "g", "language": "en", "query": "q2", "passage": "p2"}) + "\n")
    spec = DataSpec(languages=["en"], sources=[DataSource(type="pairs", path=str(a), pool="monolingual"),
                                               DataSource(type="pairs", path=str(b), pool="monolingual")])  # fmt: skip
    with pytest.raises(
        BadRowError, match=r"data.sources\[1\] \(pairs .*b.jsonl\): pair_id 'g' repeats language 'en'"
    ):
        prepare_corpus(spec, str(tmp_path / "data"))


def test_a_uri_root_is_uploaded_and_copied_once_per_node(tmp_path: Path, spec: DataSpec) -> None:
    """A bucket (here pyarrow's file:// filesystem): preparation uploads meta last, a worker's node copies
    the corpus into its cache once and memory-maps the copy; a wrong fingerprint is refused."""
    bucket = tmp_path / "bucket"
    prepared = prepare_corpus(spec, f"file://{bucket}", cache=tmp_path / "driver-cache")
    assert (
        prepared.location.uri.startswith("file://")
        and (bucket / Path(prepared.location.uri).name / "meta.json").is_file()
    )
    node = tmp_path / "node-cache"
    corpus = open_corpus(prepared.location, node)
    assert corpus.directory == node / prepared.location.fingerprint
    assert corpus.materialize().groups == PairCorpus(groups()).groups
    assert prepare_corpus(spec, f"file://{bucket}", cache=tmp_path / "other").reused
    with pytest.raises(ValueError, match="expected 0000"):
        open_corpus(DataLocation(prepared.location.uri, "0000"), tmp_path / "node2")


def test_the_workers_get_a_location_not_the_data(tmp_path: Path, spec: DataSpec) -> None:
    location = prepare_corpus(spec, str(tmp_path / "data")).location
    assert len(pickle.dumps(location)) < 500
    assert os.path.isdir(location.uri)
