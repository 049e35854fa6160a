"""What a sweep leaves for people: statistics, plots and a summary, built from MLflow alone.

Everything is read back from the sweep's parent run and its nested child runs, so the same summary can
be rebuilt at any time (``xling results SWEEP``), also while a sweep is still running or after it was
interrupted. The driver calls :func:`summarize` then :func:`publish` when the last trial ends.
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import json
import math
import os
import re
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from itertools import combinations
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from xling.trainer.spec import SamplingSpec, SweepSpec
from xling.trainer.stats import MeanCI, PairedTest, hierarchical_bootstrap, holm, mean_ci

if TYPE_CHECKING:
    from mlflow import MlflowClient

#: Artifact folder of the summary on the parent run.
SUMMARY_DIR = "summary"
#: Per-query scores the evaluation logs beside results.json (what the bootstrap between points needs).
PER_QUERY_FILE = "per_query.json"
#: Settings whose per-query scores are bootstrapped, from the per_query.json arrays: AP, then language bias.
SETTINGS = ("multi", "mono", "cross", "rank_distance", "top10_own_share")
#: Suite-name suffix of the full-pool evaluation of each point's best seed (``xling results --full-pool``).
FULL_SUFFIX = "-full"


def full_prefix(prefix: str) -> str:
    """Metric prefix of a suite's full-pool evaluation: ``xquad_r`` -> ``xquad_r_full``."""
    return prefix + FULL_SUFFIX.replace("-", "_")


@dataclass
class TrialRecord:
    """One child run: which point and seed it ran, and its final metrics."""

    run_id: str
    name: str
    point: int
    label: str
    values: dict[str, Any]
    seed: int
    status: str
    metrics: dict[str, float]


@dataclass
class PointSummary:
    """One configuration over its seeds: mean and CI of every headline metric, and its constraints."""

    index: int
    label: str
    values: dict[str, Any]
    trials: list[TrialRecord]
    stats: dict[str, MeanCI]
    violations: list[str] = field(default_factory=list)
    strategy: str = ""
    xx_share: float | None = None  # probability of an X-X-mono batch: the hybrid alpha axis (xy 0, xx 1)
    full: TrialRecord | None = None  # the best seed, where it was evaluated on the full pool

    @property
    def feasible(self) -> bool:
        return bool(self.trials) and not self.violations

    def mean(self, key: str) -> float:
        """Seed mean of a (per-language) metric: what heatmaps and bias plots show."""
        return float(np.mean([t.metrics[key] for t in self.trials if key in t.metrics] or [math.nan]))


@dataclass
class Comparison:
    setting: str
    a: int
    b: int
    test: PairedTest
    p_holm: float


@dataclass
class SweepSummary:
    name: str
    parent_run_id: str
    sweep: SweepSpec
    prefix: str
    planned: int
    points: list[PointSummary]
    zero_shot: dict[str, float]
    comparisons: list[Comparison]
    notes: list[str]
    best: int | None
    zero_shot_full: dict[str, float] = field(default_factory=dict)

    @property
    def finished(self) -> int:
        return sum(len(p.trials) for p in self.points)

    def main_metrics(self) -> list[str]:
        """The objective, then the headline retrieval and bias numbers that exist in these runs."""
        wanted = [self.sweep.metric] + [f"{self.prefix}.{m}" for m in HEADLINE]
        present = {k for p in self.points for k in p.stats}
        return list(dict.fromkeys(k for k in wanted if k in present))


#: Per-language numbers the breakdown of the best point against zero-shot shows.
BY_LANGUAGE = ("multi.map", "mono.map", "bias.rank_distance")
#: The headline numbers of a LAReQA suite, in table order: mAP, recall, then language bias.
HEADLINE = ("multi.map", "mono.map", "cross.map", "mono.r1", "cross.r1", "multi.r10", "bias.rank_distance",
            "bias.top10_own_share")  # fmt: skip


# ----------------------------------------------------------------------------- reading MLflow


def is_headline(key: str) -> bool:
    """Headline metrics: ``xquad_r.multi.map`` or ``train.loss``, not per language, not system metrics."""
    return key.count(".") <= 2 and not key.startswith("system/")


def children_of(parent_run_id: str) -> str:
    """MLflow search filter for the nested runs of a parent."""
    return f"tags.`mlflow.parentRunId` = '{parent_run_id}'"


def child_runs(client: MlflowClient, parent_run_id: str) -> list[TrialRecord]:
    """The sweep's trials as MLflow records them (one nested run per trial, newest state)."""
    parent = client.get_run(parent_run_id)
    runs = client.search_runs(
        [parent.info.experiment_id],
        filter_string=children_of(parent_run_id),
        max_results=10_000,
    )
    records = [
        TrialRecord(
            run_id=r.info.run_id,
            name=r.data.tags["xling.trial"],
            point=int(r.data.tags["xling.point"]),
            label=r.data.tags["xling.point_label"],
            values=json.loads(r.data.tags["xling.point_values"]),
            seed=int(r.data.tags["xling.seed"]),
            status=r.info.status,
            metrics=dict(r.data.metrics),
        )
        for r in runs
        if "xling.trial" in r.data.tags
    ]
    return sorted(records, key=lambda t: (t.point, t.seed))


def zero_shot(client: MlflowClient, run_id: str, keys: list[str]) -> dict[str, float]:
    """Step-0 values (evaluation.atStart); the same for every trial, as all start from the same weights."""
    out = {}
    for key in keys:
        at_start = [m.value for m in client.get_metric_history(run_id, key) if m.step == 0]
        if at_start:
            out[key] = at_start[-1]
    return out


def per_language_keys(metric: str, keys: set[str]) -> dict[str, str]:
    """``xquad_r.multi.map`` -> {"ar": "xquad_r.multi.ar.map", ...} for the keys that exist."""
    head, _, leaf = metric.rpartition(".")
    pattern = re.compile(rf"^{re.escape(head)}\.([a-z]{{2,3}})\.{re.escape(leaf)}$")
    return {m.group(1): k for k in sorted(keys) if (m := pattern.match(k))}


@dataclass
class PerQuery:
    """Per-query AP of one evaluation, per setting, aligned on ``query_ids``."""

    query_ids: list[str]
    language: np.ndarray
    ap: dict[str, np.ndarray]

    @property
    def question_ids(self) -> list[str]:
        """The evaluation names a query ``<lang>:<question id>``; the translations of a question share the
        question id, so the bootstrap resamples them together."""
        bad = next((q for q in self.query_ids if ":" not in q), None)
        if bad is not None:
            raise ValueError(f"{PER_QUERY_FILE}: query_ids: {bad!r} is not <lang>:<question id>")
        return [q.split(":", 1)[1] for q in self.query_ids]


def parse_per_query(doc: dict[str, Any]) -> PerQuery:
    """The evaluation's per_query.json: ``multi_ap`` per query and ``block_ap`` (query x candidate
    language, AP against that language's candidates alone: the own language is mono, the others cross)."""
    language = np.asarray(doc["language"], dtype=np.int64)
    block = np.array(doc["block_ap"], dtype=np.float64)  # None -> NaN
    rows = np.arange(len(language))
    mono = block[rows, language]
    others = block.copy()
    others[rows, language] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of an all-NaN row is NaN, as wanted
        cross = np.nanmean(others, axis=1)
    scores = {"multi": np.array(doc["multi_ap"], dtype=np.float64), "mono": mono, "cross": cross}
    for bias in ("rank_distance", "top10_own_share"):  # logged since the research sweep (older runs: absent)
        if bias in doc:
            scores[bias] = np.array(doc[bias], dtype=np.float64)
    return PerQuery(list(doc["query_ids"]), language, scores)


def load_per_query(client: MlflowClient, run_id: str, suite: str) -> PerQuery | None:
    """Per-query AP of the run's last evaluation of ``suite``, or None where the run has none."""
    steps = [a.path for a in client.list_artifacts(run_id, f"eval/{suite}") if a.is_dir]
    if not steps:
        return None
    last = max(steps, key=lambda p: int(p.rsplit("-", 1)[-1]))
    if not any(a.path.endswith(PER_QUERY_FILE) for a in client.list_artifacts(run_id, last)):
        return None
    return parse_per_query(download_json(client, run_id, f"{last}/{PER_QUERY_FILE}"))


def download_json(client: MlflowClient, run_id: str, path: str) -> Any:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per file otherwise
    with tempfile.TemporaryDirectory() as tmp:
        return json.loads(Path(client.download_artifacts(run_id, path, tmp)).read_text())


# ----------------------------------------------------------------------------- statistics


def _violations(point: PointSummary, sweep: SweepSpec, zero: dict[str, float], keys: set[str]) -> list[str]:
    if not point.trials:
        return ["no finished trial"]
    out = []
    for c in sweep.constraints:
        value = point.stats.get(c.metric, MeanCI(math.nan, math.nan, math.nan, math.nan, 0)).mean
        if c.max is not None and not value <= c.max:
            out.append(f"{c.metric} {value:.4g} > {c.max:g}")
        if c.min is not None and not value >= c.min:
            out.append(f"{c.metric} {value:.4g} < {c.min:g}")
        if c.at_least_zero_shot:
            for lang, key in per_language_keys(c.metric, keys).items():
                if key in zero and not point.mean(key) >= zero[key]:
                    out.append(f"{lang}: {key} {point.mean(key):.4g} below zero-shot {zero[key]:.4g}")
    return out


def _comparisons(
    client: MlflowClient, points: list[PointSummary], suite: str, sweep: SweepSpec, notes: list[str]
) -> list[Comparison]:
    """Hierarchical bootstrap (each point's seeds, then questions) between every two points, per setting,
    Holm-corrected per setting. Every finished trial's per-query AP is a row: training noise (between
    seeds) and test-set noise (between questions) both reach the intervals and p-values."""
    per_point: dict[int, list[PerQuery]] = {}
    missing = 0
    for p in points:
        loaded = [q for t in p.trials if (q := load_per_query(client, t.run_id, suite)) is not None]
        missing += len(p.trials) - len(loaded)
        if loaded:
            per_point[p.index] = loaded
    if missing:
        notes.append(
            f"Bootstrap: {missing} trial(s) logged no per-query AP (eval/{suite}/step-N/{PER_QUERY_FILE})."
        )
    indices = sorted(per_point)
    if len(indices) < 2:
        return []
    first = per_point[indices[0]][0]
    if any(q.query_ids != first.query_ids for i in indices for q in per_point[i]):
        notes.append("Bootstrap skipped: the trials were evaluated on different queries.")
        return []
    single = [points[i].label for i in indices if len(per_point[i]) == 1]
    if single:
        notes.append(f"One seed only ({', '.join(single)}): their comparisons leave training noise out.")
    pairs = [(str(a), str(b)) for a, b in combinations(indices, 2)]
    out = []
    for setting in SETTINGS:
        if any(setting not in q.ap for i in indices for q in per_point[i]):
            continue
        scores = {str(i): np.vstack([q.ap[setting] for q in per_point[i]]) for i in indices}
        if not np.isfinite(np.vstack(list(scores.values()))).all(axis=0).any():
            continue
        tests = hierarchical_bootstrap(
            scores,
            pairs,
            first.question_ids,
            first.language,
            resamples=sweep.bootstrap_samples,
            confidence=sweep.confidence,
        )
        adjusted = holm([tests[p].p_value for p in pairs])
        out += [
            Comparison(setting, int(a), int(b), tests[(a, b)], q)
            for (a, b), q in zip(pairs, adjusted, strict=True)
        ]
    return out


def summarize(client: MlflowClient, parent_run_id: str) -> SweepSummary:
    """Everything the report shows, recomputed from the parent run (its spec, its plan) and the trials."""
    parent = client.get_run(parent_run_id)
    plan = download_json(client, parent_run_id, "sweep/plan.json")
    sweep = SweepSpec.model_validate(plan["sweep"])
    prefix = sweep.metric.split(".")[0]
    records = child_runs(client, parent_run_id)
    finished = [t for t in records if t.status == "FINISHED"]
    keys = {k for t in finished for k in t.metrics}
    headline = sorted(k for k in keys if is_headline(k))
    zero_keys = [k for k in headline if k.startswith(prefix + ".")]
    wanted = [c.metric for c in sweep.constraints if c.at_least_zero_shot] + [
        f"{prefix}.{m}" for m in BY_LANGUAGE
    ]
    for metric in wanted:
        zero_keys += per_language_keys(metric, keys).values()
    zero = zero_shot(client, finished[0].run_id, sorted(set(zero_keys))) if finished else {}
    base_sampling = plan["experiment"]["spec"]["sampling"]
    full_key = f"{full_prefix(prefix)}.multi.map"
    points = []
    for index, point in enumerate(plan["points"]):
        trials = [t for t in finished if t.point == index]
        stats = {k: mean_ci([t.metrics.get(k, math.nan) for t in trials], sweep.confidence) for k in headline}
        sampling = SamplingSpec.model_validate(
            {
                **base_sampling,
                **{k.split(".", 1)[1]: v for k, v in point["values"].items() if k.startswith("sampling.")},
            }
        )
        full = next((t for t in trials if full_key in t.metrics), None)
        points.append(PointSummary(index, point["label"], point["values"], trials, stats, [], sampling.strategy,
                                   sampling.xx_share, full))  # fmt: skip
    for p in points:
        p.violations = _violations(p, sweep, zero, keys)
    notes: list[str] = []
    comparisons: list[Comparison] = []
    if f"{prefix}.multi.map" in keys:  # a LAReQA suite (XQuAD-R, MLQA-R): per-query AP exists
        comparisons = _comparisons(client, points, prefix.replace("_", "-"), sweep, notes)
    sign = 1 if sweep.mode == "max" else -1
    ranked = [p for p in points if p.feasible and sweep.metric in p.stats and p.stats[sweep.metric].n]
    best = max(ranked, key=lambda p: sign * p.stats[sweep.metric].mean).index if ranked else None
    if not ranked and finished:
        notes.append(f"No point meets every constraint and logged {sweep.metric}.")
    return SweepSummary(
        name=parent.data.tags.get("xling.sweep", parent.info.run_name),
        parent_run_id=parent_run_id,
        sweep=sweep,
        prefix=prefix,
        planned=len(plan["trials"]),
        points=points,
        zero_shot=zero,
        comparisons=comparisons,
        notes=notes,
        best=best,
        zero_shot_full={
            k: v for k, v in parent.data.metrics.items() if k.startswith(full_prefix(prefix) + ".")
        },
    )


# ----------------------------------------------------------------------------- tables


@dataclass
class Table:
    """One table, rendered to markdown (terminal, summary.md) and HTML (summary.html) alike."""

    title: str
    columns: list[str]
    rows: list[list[str]]

    def markdown(self) -> str:
        lines = [f"### {self.title}", "", "| " + " | ".join(self.columns) + " |"]
        lines.append("|" + "|".join("---" for _ in self.columns) + "|")
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines)

    def html(self) -> str:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in self.columns)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>" for row in self.rows
        )
        return f"<h3>{html.escape(self.title)}</h3><table><tr>{head}</tr>{body}</table>"


def _fmt(ci: MeanCI | None) -> str:
    if ci is None or ci.n == 0:
        return "-"
    return f"{ci.mean:.4f}" if ci.n == 1 else f"{ci.mean:.4f} ± {ci.half_width:.4f}"


def _short(key: str, prefix: str) -> str:
    return key.removeprefix(prefix + ".")


def tables(s: SweepSummary) -> list[Table]:
    """Points (mean ± CI half-width over seeds), zero-shot, and the comparisons between points."""
    metrics = s.main_metrics()
    pct = round(100 * s.sweep.confidence)
    rows = []
    if s.zero_shot:  # the baseline every point is read against: first
        rows.append(["-", "zero-shot", "-"] + [_fmt(_single(s.zero_shot.get(k))) for k in metrics] + ["-"])
    for p in s.points:
        mark = "best" if p.index == s.best else ("yes" if p.feasible else "no: " + "; ".join(p.violations))
        rows.append(
            [str(p.index), p.label, str(len(p.trials))] + [_fmt(p.stats.get(k)) for k in metrics] + [mark]
        )
    out = [
        Table(
            f"Points: mean ± {pct}% t-interval half-width over seeds",
            ["#", "point", "seeds"] + [_short(k, s.prefix) for k in metrics] + ["feasible"],
            rows,
        )
    ]
    if s.comparisons:
        out.append(
            Table(
                f"Paired bootstrap over questions and seeds ({s.sweep.bootstrap_samples} resamples, macro over "
                "languages; t-interval over seeds beside it)",
                [
                    "setting",
                    "A",
                    "B",
                    "seeds",
                    "A - B",
                    f"{pct}% CI",
                    "p",
                    "p (Holm)",
                    f"{pct}% CI over seeds",
                ],
                [
                    [
                        c.setting,
                        s.points[c.a].label,
                        s.points[c.b].label,
                        "{}/{}".format(*c.test.seeds),
                        f"{c.test.diff:+.4f}",
                        _interval(c.test.low, c.test.high),
                        f"{c.test.p_value:.4f}",
                        f"{c.p_holm:.4f}",
                        _interval(c.test.over_seeds.low, c.test.over_seeds.high),
                    ]
                    for c in s.comparisons
                ],
            )  # fmt: skip
        )
    out += [t for t in (_by_language(s), _full_pool(s)) if t is not None]
    from xling.trainer.paper_claims import claims_table

    if (claims := claims_table(s)) is not None:
        out.append(claims)
    return out


def _by_language(s: SweepSummary) -> Table | None:
    """The best point against zero-shot, language by language: which languages gain or lose."""
    langs = _languages(s)
    if s.best is None or not langs or not s.zero_shot:
        return None
    best, pct = s.points[s.best], round(100 * s.sweep.confidence)
    rows = []
    for lang in langs:
        row = [lang]
        for metric in BY_LANGUAGE:
            setting, leaf = metric.split(".", 1)
            key = f"{s.prefix}.{setting}.{lang}.{leaf}"
            ci = mean_ci([t.metrics.get(key, math.nan) for t in best.trials], s.sweep.confidence)
            zero = s.zero_shot.get(key, math.nan)
            change = ci.mean - zero if ci.n else math.nan
            row += [_fmt(_single(zero)), _fmt(ci), f"{change:+.4f}" if math.isfinite(change) else "-"]
        rows.append(row)
    columns = ["language"] + [f"{m} {w}" for m in BY_LANGUAGE for w in ("zero-shot", "best", "change")]
    return Table(f"By language: best point ({best.label}) against zero-shot, mean ± {pct}% CI over seeds",
                 columns, rows)  # fmt: skip


def _full_pool(s: SweepSummary) -> Table | None:
    """Each point's best seed on the whole suite (``xling results --full-pool``), zero-shot first."""
    full = [p for p in s.points if p.full is not None]
    if not full and not s.zero_shot_full:
        return None
    prefix = full_prefix(s.prefix)
    keys = [f"{prefix}.{m}" for m in HEADLINE]
    rows = (
        [["zero-shot", "-"] + [_fmt(_single(s.zero_shot_full.get(k))) for k in keys]]
        if s.zero_shot_full
        else []
    )
    rows += [[p.label, str(p.full.seed)] + [_fmt(_single(p.full.metrics.get(k))) for k in keys] for p in full]
    return Table("Full pool: the best seed of each point (by the objective) on the whole suite",
                 ["point", "seed"] + [_short(k, prefix) for k in keys], rows)  # fmt: skip


def _interval(low: float, high: float) -> str:
    return f"[{low:+.4f}, {high:+.4f}]" if math.isfinite(low) and math.isfinite(high) else "-"


def _single(value: float | None) -> MeanCI | None:
    return (
        None if value is None or not math.isfinite(value) else MeanCI(value, math.nan, math.nan, math.nan, 1)
    )


def header_lines(s: SweepSummary) -> list[str]:
    best = s.points[s.best].label if s.best is not None else "none"
    return [
        f"Sweep {s.name!r}: {s.finished} of {s.planned} trials finished, {len(s.points)} points x "
        f"{len(s.sweep.seeds)} seeds; MLflow parent run {s.parent_run_id}",
        f"Objective: {s.sweep.mode} {s.sweep.metric}; best feasible point: {best}",
    ]


def markdown(s: SweepSummary) -> str:
    parts = [f"# Sweep {s.name}", "", *header_lines(s), ""]
    for t in tables(s):
        parts += [t.markdown(), ""]
    parts += [f"- {n}" for n in s.notes]
    return "\n".join(parts).rstrip() + "\n"


# ----------------------------------------------------------------------------- plots


def primary_parameter(s: SweepSummary) -> str | None:
    """The x axis: sampling.alpha when swept, else the first numeric parameter, else the first one."""
    params = list(s.sweep.parameters)
    numeric = [p for p in params if all(isinstance(pt.values.get(p), int | float) for pt in s.points)]
    for path in ("sampling.alpha", *numeric, *params):
        if path in params:
            return path
    return None


def _axis(s: SweepSummary) -> tuple[str, dict[int, float], dict[int, str], list[str] | None]:
    """x position of every point, the line (group of other parameters) it belongs to, and tick labels
    when the axis is categorical."""
    x_param = primary_parameter(s)
    groups = {
        p.index: ", ".join(f"{k.rsplit('.', 1)[-1]}={_value(v)}" for k, v in p.values.items() if k != x_param)
        for p in s.points
    }
    values = [p.values.get(x_param) for p in s.points] if x_param else [p.label for p in s.points]
    if x_param and all(isinstance(v, int | float) for v in values):
        return x_param, {p.index: float(v) for p, v in zip(s.points, values, strict=True)}, groups, None
    ticks = list(dict.fromkeys(str(_value(v)) for v in values))
    x = {p.index: float(ticks.index(str(_value(v)))) for p, v in zip(s.points, values, strict=True)}
    return x_param or "point", x, groups, ticks


def _value(v: Any) -> Any:
    return f"{v:.4g}" if isinstance(v, float) else v


def _plot_metric_vs_parameter(s: SweepSummary, plt: Any) -> Any:
    x_param, x, groups, ticks = _axis(s)
    metrics = s.main_metrics()
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6), squeeze=False)
    for ax, key in zip(axes[0], metrics, strict=True):
        for group in dict.fromkeys(groups.values()):
            pts = sorted(
                (p for p in s.points if groups[p.index] == group and key in p.stats), key=lambda p: x[p.index]
            )
            xs = np.array([x[p.index] for p in pts])
            ci = [p.stats[key] for p in pts]
            mean = np.array([c.mean for c in ci])
            line = ax.plot(xs, mean, marker="o", label=group or None)[0]
            low, high = np.array([c.low for c in ci]), np.array([c.high for c in ci])
            ok = np.isfinite(low) & np.isfinite(high)
            if ticks is None:
                ax.fill_between(xs[ok], low[ok], high[ok], alpha=0.2, color=line.get_color())
            else:
                ax.errorbar(xs[ok], mean[ok], yerr=[mean[ok] - low[ok], high[ok] - mean[ok]], fmt="none",
                            color=line.get_color(), capsize=4)  # fmt: skip
        if ticks is not None:
            ax.set_xticks(range(len(ticks)), ticks)
        _metric_axis(s, ax, key, x_param)
    return _seed_ci_figure(s, fig, axes)


def _metric_axis(s: SweepSummary, ax: Any, key: str, xlabel: str) -> None:
    """Zero-shot as a dashed line, labels and grid: the frame of a metric-against-x panel."""
    if key in s.zero_shot:
        ax.axhline(s.zero_shot[key], color="grey", ls="--", lw=1, label="zero-shot")
    ax.set_xlabel(xlabel)
    ax.set_title(_short(key, s.prefix))
    ax.grid(alpha=0.3)


def _seed_ci_figure(s: SweepSummary, fig: Any, axes: Any) -> Any:
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{s.name}: mean and {round(100 * s.sweep.confidence)}% CI over seeds")
    fig.tight_layout()
    return fig


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (x lower is better, y higher is better)."""
    return [
        i
        for i, (x, y) in enumerate(points)
        if not any(ox <= x and oy >= y and (ox, oy) != (x, y) for ox, oy in points)
    ]


def _plot_pareto(s: SweepSummary, plt: Any) -> Any:
    xk, yk = f"{s.prefix}.bias.rank_distance", f"{s.prefix}.multi.map"
    pts = [p for p in s.points if xk in p.stats and yk in p.stats and p.stats[yk].n]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    coords = [(p.stats[xk].mean, p.stats[yk].mean) for p in pts]
    front = pareto_front(coords)
    for i, p in enumerate(pts):
        cx, cy = p.stats[xk], p.stats[yk]
        err = [[cx.mean - cx.low], [cx.high - cx.mean]] if math.isfinite(cx.low) else None
        yerr = [[cy.mean - cy.low], [cy.high - cy.mean]] if math.isfinite(cy.low) else None
        ax.errorbar(cx.mean, cy.mean, xerr=err, yerr=yerr, fmt="o", capsize=3,
                    color="C3" if i in front else "C0", alpha=1.0 if p.feasible else 0.4)  # fmt: skip
        ax.annotate(p.label, (cx.mean, cy.mean), fontsize=7, xytext=(4, 4), textcoords="offset points")
    if front:
        line = sorted(coords[i] for i in front)
        ax.plot([c[0] for c in line], [c[1] for c in line], color="C3", lw=1, label="Pareto front")
    if xk in s.zero_shot and yk in s.zero_shot:
        ax.plot(
            s.zero_shot[xk], s.zero_shot[yk], marker="*", ms=12, color="grey", ls="none", label="zero-shot"
        )
    ax.set_xlabel("rank distance (lower: less same-language bias)")
    ax.set_ylabel("multilingual mAP")
    ax.set_title(f"{s.name}: multilingual mAP vs language bias")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _languages(s: SweepSummary) -> list[str]:
    keys = {k for p in s.points for t in p.trials for k in t.metrics}
    return list(per_language_keys(f"{s.prefix}.mono.map", keys))


def _plot_heatmaps(s: SweepSummary, plt: Any) -> Any:
    langs = _languages(s)
    pts = [p for p in s.points if p.trials][:12]
    cols = min(4, len(pts))
    rows = math.ceil(len(pts) / cols)
    size = 1.2 + 0.45 * len(langs)
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * rows), squeeze=False)
    for ax in axes.ravel()[len(pts) :]:
        ax.axis("off")
    image = None
    for ax, p in zip(axes.ravel(), pts, strict=False):
        m = np.array(
            [[p.mean(f"{s.prefix}.mono.{a}.map" if a == b else f"{s.prefix}.cross.{a}_{b}.map") for b in langs]
             for a in langs]
        )  # fmt: skip
        image = ax.imshow(m, vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(langs)), langs, fontsize=7)
        ax.set_yticks(range(len(langs)), langs, fontsize=7)
        ax.set_title(("* " if p.index == s.best else "") + p.label, fontsize=8)
        if len(langs) <= 6:
            for (i, j), v in np.ndenumerate(m):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="w" if v < 0.6 else "k")
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), label="mAP (query -> candidate language)", shrink=0.8)
    fig.suptitle(f"{s.name}: mAP by language pair, seed mean")
    return fig


def _plot_bias(s: SweepSummary, plt: Any) -> Any:
    x_param, x, _, ticks = _axis(s)
    langs = _languages(s)
    pts = sorted((p for p in s.points if p.trials), key=lambda p: x[p.index])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, metric, title in (
        (axes[0], "rank_distance", "rank distance (lower: less bias)"),
        (axes[1], "top10_own_share", "own-language share of the top 10"),
    ):
        for lang in langs:
            ax.plot([x[p.index] for p in pts], [p.mean(f"{s.prefix}.bias.{lang}.{metric}") for p in pts],
                    marker=".", label=lang)  # fmt: skip
        if ticks is not None:
            ax.set_xticks(range(len(ticks)), ticks)
        ax.set_xlabel(x_param)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, ncol=2)
    fig.suptitle(f"{s.name}: language bias by query language, seed mean")
    fig.tight_layout()
    return fig


def _alpha_points(s: SweepSummary) -> list[PointSummary]:
    """Points on the hybrid axis (xy at 0, hybrid at alpha, xx at 1), when there are at least two."""
    on_axis = sorted((p for p in s.points if p.xx_share is not None and p.trials), key=lambda p: p.xx_share)
    return on_axis if len({p.xx_share for p in on_axis}) >= 2 else []


def _plot_alpha_curve(s: SweepSummary, plt: Any) -> Any:
    """Multilingual mAP and rank distance against alpha, with the seed intervals; mixed (off the axis) as
    a band, zero-shot as a dashed line."""
    pts = _alpha_points(s)
    keys = [k for k in (f"{s.prefix}.multi.map", f"{s.prefix}.bias.rank_distance") if k in pts[0].stats]
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.8), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        xs = np.array([p.xx_share for p in pts])
        ci = [p.stats[key] for p in pts]
        mean, low, high = (np.array([getattr(c, f) for c in ci]) for f in ("mean", "low", "high"))
        ax.errorbar(
            xs, mean, yerr=[mean - low, high - mean], marker="o", capsize=4, label="hybrid (xy = 0, xx = 1)"
        )
        for p in s.points:
            if p.xx_share is None and key in p.stats and p.stats[key].n:
                c = p.stats[key]
                ax.axhline(c.mean, color="C2", lw=1, label=p.label)
                if math.isfinite(c.low):
                    ax.axhspan(c.low, c.high, color="C2", alpha=0.15)
        _metric_axis(s, ax, key, "alpha (probability of an X-X-mono batch)")
    return _seed_ci_figure(s, fig, axes)


def save_plots(s: SweepSummary, directory: Path) -> list[Path]:
    """metric vs the swept parameter, Pareto, heatmaps and bias plots (those the metrics allow)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not any(p.trials for p in s.points):
        return []
    x_name = (primary_parameter(s) or "point").rsplit(".", 1)[-1]
    plots = [(f"metric_vs_{x_name}", _plot_metric_vs_parameter)]
    if _alpha_points(s) and x_name != "alpha":  # an alpha grid has its curve already: metric_vs_alpha
        plots.append(("alpha_curve", _plot_alpha_curve))
    if f"{s.prefix}.bias.rank_distance" in s.main_metrics():
        plots += [("pareto", _plot_pareto), ("bias", _plot_bias)]
    if _languages(s):
        plots.append(("heatmaps", _plot_heatmaps))
    paths = []
    for name, draw in plots:
        fig = draw(s, plt)
        paths.append(directory / f"{name}.png")
        fig.savefig(paths[-1], dpi=110, bbox_inches="tight")
        plt.close(fig)
    return paths


# ----------------------------------------------------------------------------- files and MLflow


def _finite_or_none(value: Any) -> Any:
    """JSON has no NaN or infinity (an interval over one seed, infinite degrees of freedom): null."""
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def to_json(s: SweepSummary) -> dict[str, Any]:
    return {
        "name": s.name,
        "parent_run_id": s.parent_run_id,
        "metric": s.sweep.metric,
        "mode": s.sweep.mode,
        "confidence": s.sweep.confidence,
        "planned_trials": s.planned,
        "finished_trials": s.finished,
        "best": s.best,
        "zero_shot": s.zero_shot,
        "zero_shot_full": s.zero_shot_full,
        "points": [
            {"index": p.index, "label": p.label, "values": p.values, "feasible": p.feasible,
             "violations": p.violations, "seeds": [t.seed for t in p.trials], "runs": [t.run_id for t in p.trials],
             "strategy": p.strategy, "xx_share": p.xx_share,
             "full": {"seed": p.full.seed, "run": p.full.run_id} if p.full else None,
             "metrics": {k: _finite_or_none(vars(c)) for k, c in p.stats.items()}}
            for p in s.points
        ],
        "comparisons": [
            {"setting": c.setting, "a": c.a, "b": c.b, **_finite_or_none(asdict(c.test)), "p_holm": c.p_holm}
            for c in s.comparisons
        ],
        "notes": s.notes,
    }  # fmt: skip


def _write_csv(s: SweepSummary, path: Path) -> None:
    keys = sorted({k for p in s.points for k in p.stats})
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(
            ["point", "label", "seeds", "feasible"]
            + [f"{k}.{f}" for k in keys for f in ("mean", "low", "high")]
        )
        for p in s.points:
            cells = [v for k in keys for v in (p.stats[k].mean, p.stats[k].low, p.stats[k].high)]
            w.writerow([p.index, p.label, len(p.trials), p.feasible] + [f"{v:.6g}" for v in cells])


def _html(s: SweepSummary, images: list[Path]) -> str:
    figures = "".join(
        f'<figure><img alt="{p.stem}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
        f"<figcaption>{p.stem}</figcaption></figure>"
        for p in images
    )
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in s.notes)
    style = (
        "body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;margin-bottom:1em}"
        "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}img{max-width:100%}"
    )
    head = "".join(f"<p>{html.escape(line)}</p>" for line in header_lines(s))
    body = "".join(t.html() for t in tables(s))
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>Sweep {html.escape(s.name)}</title>"
        f"<style>{style}</style></head><body><h1>Sweep {html.escape(s.name)}</h1>{head}{body}"
        f"<ul>{notes}</ul>{figures}</body></html>"
    )


def write_report(s: SweepSummary, directory: Path) -> list[Path]:
    """summary.md, summary.html (self-contained), summary.json, points.csv and the plots."""
    directory.mkdir(parents=True, exist_ok=True)
    images = save_plots(s, directory)
    (directory / "summary.md").write_text(markdown(s), encoding="utf-8")
    (directory / "summary.html").write_text(_html(s, images), encoding="utf-8")
    (directory / "summary.json").write_text(json.dumps(to_json(s), indent=2) + "\n", encoding="utf-8")
    _write_csv(s, directory / "points.csv")
    return sorted(directory.iterdir())


def publish(client: MlflowClient, s: SweepSummary) -> None:
    """Put the report on the parent run, with the best point's numbers as parent metrics."""
    from mlflow.entities import Metric, RunTag

    with tempfile.TemporaryDirectory() as tmp:
        write_report(s, Path(tmp))
        client.log_artifacts(s.parent_run_id, tmp, artifact_path=SUMMARY_DIR)
    metrics = {"sweep.trials_finished": float(s.finished), "sweep.points": float(len(s.points))}
    tags = [RunTag("xling.trials_finished", f"{s.finished}/{s.planned}")]
    if s.best is not None:
        best = s.points[s.best]
        tags.append(RunTag("xling.best_point", best.label))
        for key in s.main_metrics():
            ci = best.stats[key]
            metrics[f"best.{key}"] = ci.mean
            if math.isfinite(ci.low):
                metrics[f"best.{key}.ci_low"], metrics[f"best.{key}.ci_high"] = ci.low, ci.high
    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, 0) for k, v in metrics.items() if math.isfinite(v)]
    client.log_batch(s.parent_run_id, metrics=batch, tags=tags)


# ----------------------------------------------------------------------------- CLI


def find_parent(client: MlflowClient, sweep: str) -> str:
    """A parent run id, or the newest sweep parent run tagged with that sweep name."""
    if re.fullmatch(r"[0-9a-f]{32}", sweep):
        return sweep
    ids = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(
        ids,
        filter_string=f"tags.`xling.sweep` = '{sweep}' and tags.`xling.role` = 'sweep'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        raise ValueError(f"no sweep named {sweep!r} in {client.tracking_uri} (give the parent run id?)")
    return runs[0].info.run_id


def _results(args: argparse.Namespace) -> int:
    from mlflow import MlflowClient

    from xling.trainer.tracking import resolve_tracking_uri

    name, uri, exp = args.sweep, args.tracking_uri, None
    if Path(args.sweep).is_file():
        from xling.trainer.spec import load_experiment

        exp = load_experiment(args.sweep)
        name, uri = exp.metadata.name, uri or exp.spec.tracking.tracking_uri
    elif args.full_pool:
        raise ValueError(
            f"--full-pool: give the sweep's YAML file (it names the suite and model), not {name!r}"
        )
    client = MlflowClient(resolve_tracking_uri(uri))
    parent = find_parent(client, name)
    summary = summarize(client, parent)
    if args.full_pool and exp is not None:
        from xling.trainer.full_pool import evaluate_full_pool

        if evaluate_full_pool(client, summary, exp):
            summary = summarize(client, parent)
    print(markdown(summary), end="")
    if args.out:
        for path in write_report(summary, Path(args.out)):
            print(f"wrote {path}")
    if args.publish:
        publish(client, summary)
        print(f"updated the summary on parent run {summary.parent_run_id}")
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """``xling results SWEEP``: the sweep's summary, rebuilt from MLflow (works mid-sweep too)."""
    p = subparsers.add_parser(
        "results",
        help="print a sweep's summary (mean and CI per point, bootstrap between points) from MLflow",
        description="Rebuild a sweep's summary from its MLflow runs and print it.",
    )
    p.add_argument("sweep", help="the sweep's YAML file, its metadata.name, or its parent run id")
    p.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: the spec's, else sqlite:///mlflow.db)"
    )
    p.add_argument(
        "--out", metavar="DIR", help="also write summary.md/html/json, points.csv and the plots here"
    )
    p.add_argument(
        "--publish", action="store_true", help="also replace the summary artifacts on the parent run"
    )
    p.add_argument(
        "--full-pool",
        action="store_true",
        help="first evaluate each point's best seed and the zero-shot model on the whole suite (not the "
        "sweep's slice), once: a rerun skips what MLflow already has",
    )
    p.set_defaults(func=_results)
    return p
