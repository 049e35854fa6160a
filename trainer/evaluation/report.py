"""Human- and tracker-facing output: terminal table, JSON, CSV, plots, MLflow."""

from __future__ import annotations

import csv
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from xling.trainer.evaluation.lareqa import CLUSTER_UNITS
from xling.trainer.evaluation.results import LareqaResults, MiraclResults, SuiteResults, json_number

if TYPE_CHECKING:
    import mlflow

#: MLflow accepts at most 1000 metrics per log_batch call.
_BATCH = 1000

_LAREQA_COLUMNS = (
    ("mono.map", "mono.map"),
    ("mono.r1", "mono.r1"),
    ("cross.map", "cross.map"),
    ("cross.r1", "cross.r1"),
    ("multi.map", "multi.map"),
    ("multi.r10", "multi.r10"),
    ("bias.rank_distance", "RD"),
    ("bias.top10_own_share", "top10.own"),
    ("bias.pool_own_share", "pool.own"),
    ("bias.own_first", "own.first"),
)


def _cell(value: float, width: int) -> str:
    if not np.isfinite(value):
        return "-".rjust(width)
    return f"{value:{width}.1f}" if abs(value) >= 10 else f"{value:{width}.4f}"


def _grid(header: list[str], rows: list[tuple[str, list[float]]], width: int = 9) -> list[str]:
    lines = ["lang " + "".join(h.rjust(width + 1) for h in header)]
    lines += [f"{name:<5}" + "".join(" " + _cell(v, width) for v in values) for name, values in rows]
    return lines


def _lareqa_table(r: LareqaResults) -> str:
    keys = [k for k, _ in _LAREQA_COLUMNS]
    per_lang = r.per_language()
    summary = r.summary()
    rows = [(lang, [per_lang[lang][k] for k in keys]) for lang in r.languages]
    rows.append(("mean", [summary[k] for k in keys]))
    mode = "exact over the full pool" if r.exact else f"top-{r.depth} of the pool and of each language"
    lines = [
        f"{r.suite}: {len(r.languages)} languages, {sum(r.n_queries.values()):,} queries, pool of "
        f"{sum(r.n_candidates.values()):,} {r.candidate_context} candidates; index {r.index} ({mode})",
        *_grid([h for _, h in _LAREQA_COLUMNS], rows),
    ]
    if r.unavailable:
        lines.append(f"not available: {', '.join(r.unavailable)} ({r.unavailable_reason})")
    lines += [
        "",
        "mAP matrix (rows: query language, columns: candidate language)",
        *_grid(r.languages, [(x, list(r.map_matrix[i])) for i, x in enumerate(r.languages)], width=6),
    ]
    return "\n".join(lines)


def _miracl_table(r: MiraclResults) -> str:
    rows = [(lang, [r.scores[lang]["ndcg10"], r.scores[lang]["recall100"]]) for lang in r.languages]
    summary = r.summary()
    rows.append(("mean", [summary["ndcg10"], summary["recall100"]]))
    head = f"{r.suite}: {len(r.languages)} languages, {sum(r.n_queries.values()):,} judged queries; index {r.index}"
    return "\n".join([head, *_grid(["nDCG@10", "R@100"], rows)])


def format_table(results: SuiteResults) -> str:
    """The results as a fixed-width table for the terminal."""
    if isinstance(results, MiraclResults):
        return _miracl_table(results)
    return _lareqa_table(results)


def headline_number(results: SuiteResults) -> str:
    """The suite's main number in a few words, for a console line: ``xquad-r multi.map 0.2124``."""
    key = "ndcg10" if isinstance(results, MiraclResults) else "multi.map"
    return f"{results.suite} {key} {results.summary()[key]:.4f}"


def write_results_json(results: SuiteResults, path: str | Path) -> None:
    """One JSON with every number (metrics, matrices, per-language bias, settings, timings)."""
    payload = {**results.to_dict(), "metrics": results.flat_metrics()}
    Path(path).write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_per_query_json(results: LareqaResults, path: Path) -> None:
    """Per-query AP for paired tests between runs: ``multi_ap`` and ``block_ap`` (query x candidate
    language: the own language is mono, the others cross), aligned on ``query_ids``."""
    pq = results.per_query
    payload = {
        "languages": results.languages,
        "query_ids": [q for part in results.ranked for q in part.query_ids],
        "language": pq["language"].tolist(),
        "multi_ap": [json_number(v) for v in pq["multi_ap"]],
        "block_ap": [[json_number(v) for v in row] for row in pq["block_ap"]],
        # per-query language bias, so that bias differences get question-clustered intervals too
        "rank_distance": [json_number(v) for v in pq["rank_distance"]],
        "top10_own_share": [json_number(v) for v in pq["top10_own_share"]],
        # the paragraph and article cluster of every query: the units the sweep's bootstrap resamples
        **{unit: pq[unit].tolist() for unit in CLUSTER_UNITS},
    }
    path.write_text(json.dumps(payload, separators=(",", ":")) + "\n", encoding="utf-8")


def write_matrix_csv(results: LareqaResults, path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["query\\candidate", *results.languages])
        for lang, row in zip(results.languages, results.map_matrix, strict=True):
            writer.writerow([lang, *(f"{v:.6f}" for v in row)])


def _heatmap(results: LareqaResults, plt: Any) -> Any:
    langs, n = results.languages, len(results.languages)
    fig, ax = plt.subplots(figsize=(1.6 + 0.6 * n, 1.2 + 0.55 * n), layout="constrained")
    im = ax.imshow(results.map_matrix, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(n), langs)
    ax.set_yticks(range(n), langs)
    ax.set_xlabel("candidate language")
    ax.set_ylabel("query language")
    for (i, j), value in np.ndenumerate(results.map_matrix):
        if np.isfinite(value):
            ax.text(
                j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color="w" if value < 0.6 else "k"
            )
    fig.colorbar(im, ax=ax, label="mAP")
    # over the matrix only, on two lines: one line ran over the colour bar of a small matrix
    ax.set_title(f"{results.suite} mAP\n({results.candidate_context} candidates)", fontsize=9)
    return fig


def _bias_bars(results: LareqaResults, plt: Any) -> Any:
    langs, bias = results.languages, results.bias
    x = np.arange(len(langs))
    fig, (left, right) = plt.subplots(1, 2, figsize=(2 + 1.1 * len(langs), 3.8), layout="constrained")
    left.bar(
        x - 0.2, [bias[lang]["top10_own_share"] for lang in langs], 0.4, label="own-language share of top 10"
    )
    left.bar(x + 0.2, [bias[lang]["pool_own_share"] for lang in langs], 0.4, label="its share of the pool")
    left.set_xticks(x, langs)
    fig.legend(fontsize=7, loc="outside lower left", ncols=2)  # below the axes: inside, it covered a bar
    left.set_title("same-language hits", fontsize=9)
    right.bar(x, [bias[lang]["rank_distance"] for lang in langs])
    right.set_xticks(x, langs)
    right.set_title(
        "mean max rank distance\n(lower = less bias)" if results.exact else "rank distance: needs index flat",
        fontsize=9,
    )
    return fig


def _own_vs_other(results: LareqaResults, plt: Any) -> Any:
    own, other = results.per_query["own_rank"], results.per_query["best_other_rank"]
    ok = np.isfinite(own) & np.isfinite(other)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(own[ok], other[ok], s=2, alpha=0.3)
    top = max(2.0, float(np.max(np.concatenate([own[ok], other[ok]]), initial=2.0)))
    ax.plot([1, top], [1, top], "k--", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("rank of the same-language positive")
    ax.set_ylabel("rank of the best other-language positive")
    ax.set_title("above the diagonal: own language preferred")
    return fig


def write_pngs(
    subject: Any, plots: list[tuple[str, Callable[[Any, Any], Any]]], directory: Path
) -> list[Path]:
    """``directory/<name>.png`` for each ``(name, draw)``, ``draw(subject, plt)`` returning its figure; drawn
    with matplotlib's file-only backend (no display on a cluster pod). Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for name, draw in plots:
        fig = draw(subject, plt)
        paths.append(directory / f"{name}.png")
        fig.savefig(paths[-1], dpi=110, bbox_inches="tight")
        plt.close(fig)
    return paths


def save_plots(results: LareqaResults, directory: Path) -> list[Path]:
    """mAP heatmap and the bias views as PNGs; returns the files written."""
    plots = [("map_matrix", _heatmap), ("bias_by_language", _bias_bars)]
    if results.exact:  # the per-query ranks it shows exist only with exact ranks
        plots.append(("bias_own_vs_other", _own_vs_other))
    return write_pngs(results, plots, directory)


def write_artifacts(results: SuiteResults, directory: Path) -> None:
    """results.json and the table ``xling run`` logs (table.txt), plus for LAReQA suites per_query.json,
    the mAP matrix CSV and the plots."""
    directory.mkdir(parents=True, exist_ok=True)
    write_results_json(results, directory / "results.json")
    (directory / "table.txt").write_text(format_table(results) + "\n", encoding="utf-8")
    if isinstance(results, LareqaResults):
        write_per_query_json(results, directory / "per_query.json")
        write_matrix_csv(results, directory / "map_matrix.csv")
        save_plots(results, directory)


def log_to_mlflow(
    results: SuiteResults, client: mlflow.MlflowClient, run_id: str, step: int, prefix: str | None = None
) -> None:
    """Log every flat metric at ``step`` (batched) and the artifacts under ``eval/<suite>/step-<step>``."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = sorted(results.flat_metrics(prefix).items())
    for lo in range(0, len(items), _BATCH):
        batch = [Metric(key=k, value=v, timestamp=now, step=step) for k, v in items[lo : lo + _BATCH]]
        client.log_batch(run_id, metrics=batch)
    with tempfile.TemporaryDirectory() as tmp:
        write_artifacts(results, Path(tmp))
        client.log_artifacts(run_id, tmp, artifact_path=f"eval/{results.suite}/step-{step}")
