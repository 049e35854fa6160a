"""The flat metric names: one format, written by the evaluation, read back by the reports and the operator."""

from __future__ import annotations

from xling.api.metrics import is_headline, language_of, prefix_of, split_language, suite_prefix


def test_a_suite_prefix_and_the_prefix_of_a_name() -> None:
    assert suite_prefix("mlqa-holdout") == "mlqa_holdout"
    assert prefix_of("xquad_r.multi.map") == "xquad_r" and prefix_of("train.loss") == "train"


def test_headline_names_are_not_per_language_nor_system_metrics() -> None:
    assert is_headline("xquad_r.multi.map") and is_headline("train.loss")
    assert not is_headline("xquad_r.mono.ar.map") and not is_headline("system/cpu_utilization_percentage")


def test_a_per_language_name_is_split_around_its_language() -> None:
    assert split_language("xquad_r.multi.de.map") == ("xquad_r.multi", "de", "map")
    assert language_of("xquad_r.multi.map", "xquad_r.multi.de.map") == "de"
    assert language_of("xquad_r.multi.map", "xquad_r.multi.de.mrr") is None
    assert language_of("xquad_r.multi.map", "mlqa_r.multi.de.map") is None
    assert language_of("xquad_r.multi.map", "xquad_r.multi.map") is None
