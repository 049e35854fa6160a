"""The flat metric names: one format, written by the evaluation, read back by the reports and the operator."""

from __future__ import annotations

from xling.api.metrics import (
    flat_name,
    from_dotted,
    is_headline,
    join,
    language_of,
    prefix_of,
    split,
    suite_prefix,
    with_prefix,
)


def test_a_suite_prefix_and_the_prefix_of_a_name() -> None:
    assert suite_prefix("mlqa-holdout") == "mlqa_holdout"
    assert prefix_of("xquad_r/multi/map") == "xquad_r" and prefix_of("train/loss") == "train"
    assert with_prefix("xquad_r_centered/multi/map", "xquad_r") == "xquad_r/multi/map"


def test_names_are_slash_separated_with_the_language_last_so_mlflow_groups_them() -> None:
    assert join("xquad_r", "multi", "map") == "xquad_r/multi/map" == flat_name("xquad_r", "multi.map")
    assert flat_name("xquad_r", "multi.map", "de") == "xquad_r/multi/map/de"
    assert flat_name("miracl", "ndcg10", "de") == "miracl/ndcg10/de"
    assert split("xquad_r/multi/map/de") == ["xquad_r", "multi", "map", "de"]


def test_headline_names_are_not_per_language_nor_system_metrics() -> None:
    assert is_headline("xquad_r/multi/map") and is_headline("train/loss") and is_headline("miracl/ndcg10")
    assert not is_headline("xquad_r/mono/map/ar") and not is_headline("system/cpu_utilization_percentage")
    assert not is_headline("xquad_r/cross/map/ar_de")
    # one part fewer than a LAReQA per-language name, still per language
    assert not is_headline("miracl/ndcg10/de") and not is_headline("batches/query_share/de")


def test_the_language_of_a_per_language_name() -> None:
    assert language_of("xquad_r/multi/map", "xquad_r/multi/map/de") == "de"
    assert language_of("miracl/ndcg10", "miracl/ndcg10/de") == "de"
    assert language_of("xquad_r/multi/map", "xquad_r/multi/mrr/de") is None
    assert language_of("xquad_r/multi/map", "mlqa_r/multi/map/de") is None
    assert language_of("xquad_r/multi/map", "xquad_r/multi/map") is None


def test_an_old_dotted_name_is_respelled() -> None:
    assert from_dotted("xquad_r.multi.map") == "xquad_r/multi/map"
    assert from_dotted("xquad_r.multi.de.map") == "xquad_r/multi/map/de"
    assert from_dotted("miracl.de.ndcg10") == "miracl/ndcg10/de"
    assert from_dotted("train.loss") == "train/loss"
    assert from_dotted("xquad_r/multi/map") is None and from_dotted("loss") is None
