"""The evaluation's plots as the MLflow run shows them: no title over the colour bar, no legend over a bar."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import matplotlib
import numpy as np
import pytest

from xling.trainer.evaluation.report import _bias_bars, _heatmap

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LANGS = ["ar", "de", "en", "es"]  # the smoke run's: the smallest figures


def _results(**bias: float) -> Any:
    """What the two plots read of a LareqaResults (a high own-language share: the tall bars of zero-shot)."""
    per_lang = {"top10_own_share": 0.95, "pool_own_share": 0.25, "rank_distance": 40.0, **bias}
    return SimpleNamespace(languages=LANGS, map_matrix=np.full((4, 4), 0.4), suite="xquad-r",
                           candidate_context="sentence", bias={lang: per_lang for lang in LANGS}, exact=True)  # fmt: skip


def _box(artist: Any, fig: Any) -> Any:
    return artist.get_window_extent(fig.canvas.get_renderer())


@pytest.fixture(autouse=True)
def _close() -> Any:
    yield
    plt.close("all")


def test_the_heatmap_title_stays_clear_of_the_colour_bar() -> None:
    fig = _heatmap(_results(), plt)
    fig.canvas.draw()
    matrix, colorbar = fig.axes
    assert not _box(matrix.title, fig).overlaps(_box(colorbar, fig))


def test_the_bias_legend_covers_no_bar() -> None:
    fig = _bias_bars(_results(), plt)
    fig.canvas.draw()
    legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend())]
    bars = [patch for ax in fig.axes for patch in ax.patches]
    assert legends and bars
    assert not [b for b in bars for legend in legends if _box(legend, fig).overlaps(_box(b, fig))]
    for ax in fig.axes:  # nor a title over the other plot
        assert not any(
            _box(ax.title, fig).overlaps(_box(other, fig)) for other in fig.axes if other is not ax
        )
