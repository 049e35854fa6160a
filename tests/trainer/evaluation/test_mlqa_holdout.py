"""mlqa-holdout: the in-domain hold-out, MLQA groups split off by components of shared texts before training,
never drawn by any arm, scored as a paragraph-level pooled suite."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest

from tests.support import ROOT, xling_eval
from xling.api.spec.experiment import ExperimentSpec
from xling.api.spec.loading import load_experiment
from xling.api.spec.training import EvalSuite, SamplingSpec
from xling.trainer.data import load_corpus
from xling.trainer.data.builders import mlqa_holdout, mlqa_rows
from xling.trainer.data.pairs import text_key
from xling.trainer.data.prepare import held_out
from xling.trainer.evaluation.api import evaluate_suite, load_suite
from xling.trainer.sampling import build_sampler

MLQA = str(ROOT / "data/demo/mlqa-test-gxlt")
SAMPLES = ["research.yaml", "research-gpu-1.yaml"]
STRATEGIES = [SamplingSpec(strategy="xx"), SamplingSpec(strategy="xy"), SamplingSpec(strategy="mixed"),
              SamplingSpec(strategy="hybrid", alpha=0.5, alpha_schedule="exact")]  # fmt: skip


def groups_by_text() -> dict[str, set[str]]:
    """Every normalised question and paragraph of the directory -> the groups that hold it, any language."""
    out: dict[str, set[str]] = {}
    for pair, _ in mlqa_rows(MLQA):
        for text in (pair.query, pair.passage):
            if text is not None:
                out.setdefault(text_key(text), set()).add(pair.pair_id)
    return out


def test_the_split_takes_whole_components_deterministically() -> None:
    split = mlqa_holdout(MLQA, 0.1, 0)
    held = split.component_of
    by_text = groups_by_text()
    all_groups = set().union(*by_text.values())
    assert split.groups == len(all_groups) and len(held) >= round(0.1 * len(all_groups))
    # no text (paragraph or question, any language) is held by a held-out group and a kept one
    crossing = [k for k, groups in by_text.items() if 0 < len(groups & held.keys()) < len(groups)]
    assert not crossing
    # groups that share a text share a component label; whole components: fewer components than groups
    assert all(len({held[g] for g in groups}) == 1 for groups in by_text.values() if groups <= held.keys())
    assert len(set(held.values())) < len(held)
    mlqa_holdout.cache_clear()
    assert mlqa_holdout(MLQA, 0.1, 0) == split, "a pure function of (files, fraction, seed)"
    assert mlqa_holdout(MLQA, 0.1, 1).component_of.keys() != held.keys()


@pytest.mark.parametrize("sample", SAMPLES)
def test_no_held_out_group_is_trained_on_or_drawn_by_any_strategy(sample: str) -> None:
    spec = load_experiment(ROOT / "manifests/samples" / sample).spec
    ((i, source),) = [(i, s) for i, s in enumerate(spec.data.sources) if s.hold_out is not None]
    (suite,) = [s for s in spec.evaluation.suites if s.name == "mlqa-holdout"]
    assert suite.hold_out == source.hold_out and suite.path == source.path
    held = mlqa_holdout(source.path, source.hold_out.fraction, source.hold_out.seed).component_of
    corpus = load_corpus(spec.data)
    trained = {next(iter(g.values())).pair_id for g in corpus.groups}
    without = spec.data.model_copy(deep=True)
    without.sources[i].hold_out = None
    before = {next(iter(g.values())).pair_id for g in load_corpus(without).groups}
    assert len(before & held.keys()) > 300, "the hold-out takes research-pool groups"
    assert trained == before - held.keys(), "exactly the held-out groups are gone"
    texts = {text_key(t) for g in corpus.groups for p in g.values() for t in (p.query, p.passage) if t}
    suite_texts = [t for d in load_suite(suite).data.values() for t in d.candidate_texts + d.query_texts]
    assert not texts & {text_key(t) for t in suite_texts}, "no suite text is trained on, in any language"
    batch = spec.optimization.global_batch_size
    for strategy in STRATEGIES:
        sampler = build_sampler(corpus.index, batch, strategy, 40)
        drawn = {corpus.groups[item.group][lang].pair_id for step in range(40)
                 for item in sampler.plan(step).items for lang in (item.qlang, item.plang)}  # fmt: skip
        assert drawn and not drawn & held.keys(), strategy.strategy
        assert {
            corpus.groups[g][next(iter(corpus.groups[g]))].pair_id for g in sampler.drawable()[0]
        } == trained


def test_a_run_prints_and_logs_what_it_held_out(tmp_path: Path) -> None:
    import mlflow

    from xling.trainer.driver import log_training_data

    spec = load_experiment(ROOT / "manifests/samples/research.yaml").spec
    split = held_out(spec.data.sources[0])
    assert split is not None and split.summary().startswith(
        f"held out {len(split.component_of)} of {split.groups}"
    )
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.MlflowClient(uri)
    run = client.create_run(client.create_experiment("holdout"))
    log_training_data(uri, run.info.run_id, spec, "fingerprint", None)
    logged = client.get_run(run.info.run_id).data.metrics
    assert logged["data/held_out/groups"] == len(split.component_of) > logged["data/held_out/components"] > 0
    assert logged["data/held_out/of_groups"] == split.groups


class Oracle:
    """The perfect encoder: a question is its group's vector, a paragraph the normalised sum of the vectors of
    the groups it answers (two questions on one paragraph share it), in every language, plus a little noise of
    its own (so the translations of a paragraph do not tie)."""

    fingerprint = "oracle"

    def __init__(self) -> None:
        self.groups: dict[str, set[str]] = {}
        for pair, _ in mlqa_rows(MLQA):
            for text in (pair.query, pair.passage):
                if text is not None:
                    self.groups.setdefault(text, set()).add(pair.pair_id)

    def encode(self, texts: list[str], kind: str) -> np.ndarray:
        rng = np.random.default_rng
        x = np.stack([sum(rng(zlib.crc32(g.encode())).standard_normal(1024) for g in self.groups[t])
                      + 0.05 * rng(zlib.crc32(t.encode())).standard_normal(1024) for t in texts])  # fmt: skip
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def holdout_suite(**extra: object) -> EvalSuite:
    return EvalSuite.model_validate(
        {"name": "mlqa-holdout", "path": MLQA, "holdOut": {"fraction": 0.1}} | extra
    )


def test_the_suite_pools_paragraphs_and_scores_the_perfect_encoder_at_one() -> None:
    suite = load_suite(holdout_suite())
    held = mlqa_holdout(MLQA, 0.1, 0).component_of
    assert suite.languages == ("de", "es", "vi", "zh") and suite.candidate_context == "paragraph"
    for lang in suite.languages:
        data = suite.data[lang]
        assert set(data.query_ids) <= held.keys() and len(set(data.candidate_texts)) == len(
            data.candidate_texts
        )
    # the relevant set of a question: its group's paragraph in every language that has one
    rel = suite.relevant("vi")
    assert (rel >= 0).sum(axis=1).min() >= 1 and (rel >= 0).sum(axis=1).max() <= 4
    results = evaluate_suite(suite, Oracle())
    m = results.flat_metrics()
    assert m["mlqa_holdout/multi/map"] == pytest.approx(1.0)
    assert m["mlqa_holdout/mono/map"] == pytest.approx(1.0) and m["mlqa_holdout/cross/map"] == pytest.approx(
        1.0
    )
    # the relevant paragraphs fill the top ranks: rank distance |R| - 1 (undefined for |R| = 1), macro over
    # query languages
    sizes = [(suite.relevant(lang) >= 0).sum(axis=1) for lang in suite.languages]
    ideal = np.mean([(r[r > 1] - 1).mean() for r in sizes])
    assert m["mlqa_holdout/bias/rank_distance"] == pytest.approx(ideal)
    # the bootstrap's clusters are the hold-out's components: one per component, both units
    qids = [q.split(":", 1)[1] for part in results.ranked for q in part.query_ids]
    paragraph = results.per_query["paragraph"]
    assert (
        len(set(paragraph)) == len({held[q] for q in qids})
        and (paragraph == results.per_query["article"]).all()
    )
    assert all(
        len({held[q] for q, c in zip(qids, paragraph, strict=True) if c == label}) == 1
        for label in set(paragraph)
    )


def _oracle(name: str, **_: object) -> Oracle:
    """``load_text_encoder`` for ``xling eval``: the oracle, whatever the model name."""
    return Oracle()


def test_xling_eval_runs_the_suite(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--model", "m", "--suite", "mlqa-holdout", "--data", MLQA, "--hold-out", "0.1",
            "--languages", "de,zh"]  # fmt: skip
    assert xling_eval(monkeypatch, _oracle, *argv) == 0
    suite = load_suite(holdout_suite(languages=["de", "zh"]))
    queries = sum(len(d.query_ids) for d in suite.data.values())
    out = capsys.readouterr().out
    assert f"mlqa-holdout: 2 languages, {queries:,} queries, pool of {suite.pool_size:,} paragraph" in out
    for flags, problem in (
        (["--suite", "mlqa-holdout"], "--hold-out: is required by the mlqa-holdout suite and only there"),
        (["--suite", "xquad-r", "--hold-out", "0.1"], "--hold-out: is required by the mlqa-holdout suite"),
        (
            ["--suite", "mlqa-holdout", "--hold-out", "0.1", "--max-paragraphs", "5"],
            "--max-paragraphs: not for",
        ),
    ):
        assert xling_eval(monkeypatch, _oracle, "--model", "m", *flags) == 2
        assert problem in capsys.readouterr().err


def test_the_split_must_be_the_training_sources() -> None:
    base = load_experiment(ROOT / "manifests/samples/research.yaml").spec.model_dump(by_alias=True)
    suites = base["evaluation"]["suites"]
    k = next(i for i, s in enumerate(suites) if s["name"] == "mlqa-holdout")
    suites[k]["holdOut"]["seed"] = 1
    with pytest.raises(ValueError, match=rf"evaluation.suites\[{k}\].holdOut: no mlqa training source"):
        ExperimentSpec.model_validate(base)
    with pytest.raises(ValueError, match="holdOut: is required by the mlqa-holdout suite"):
        EvalSuite.model_validate({"name": "mlqa-holdout", "path": MLQA})
    with pytest.raises(ValueError, match="maxParagraphs: not for mlqa-holdout"):
        holdout_suite(maxParagraphs=10)
    with pytest.raises(ValueError, match="holdOut: is for mlqa sources"):
        ExperimentSpec.model_validate(base | {"data": base["data"] | {"sources": [
            {"type": "ntrex", "path": "n", "holdOut": {"fraction": 0.1}}]}})  # fmt: skip
