"""A sweep's summary, built from MLflow alone: every trial's metrics, each point's mean and CI over seeds,
its constraints, and the bootstrap between points.

Everything is read back from the sweep's parent run and its nested child runs, so the same summary can
be rebuilt at any time (``xling results SWEEP``), also while a sweep is still running or after it was
interrupted. The driver calls :func:`summarize_sweep` then :func:`~xling.trainer.sweep.report.publish`
when the last trial ends.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import warnings
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from xling.api.errors import InputError
from xling.api.metrics import (
    flat_name,
    is_headline,
    join,
    language_of,
    prefix_of,
    split,
    suite_prefix,
    with_prefix,
)
from xling.api.spec.base import ClusterUnit
from xling.api.spec.sweep import SweepSpec
from xling.api.spec.training import CenteringSpec, SamplingSpec
from xling.api.tags import POINT, POINT_LABEL, POINT_VALUES, SEED, SWEEP, TRIAL, children_of
from xling.trainer.evaluation.centering import CENTERED as CENTERED_SUFFIX
from xling.trainer.stats import MeanCI, PairedTest, hierarchical_bootstrap, holm, mean_ci

if TYPE_CHECKING:
    from mlflow import MlflowClient

#: Per-query scores the evaluation logs beside results.json (what the bootstrap between points needs).
PER_QUERY_FILE = "per_query.json"
#: Settings whose per-query scores are bootstrapped, from the per_query.json arrays: AP, then language bias.
SETTINGS = ("multi", "mono", "cross", "rank_distance", "top10_own_share")
#: The settings where a higher score is better (the bias ones are lower-is-better).
HIGHER_IS_BETTER = ("multi", "mono", "cross")
#: Suite-name suffix of the full-pool evaluation of each point's best seed (``xling results --full-pool``).
FULL_SUFFIX = "-full"


def full_prefix(prefix: str) -> str:
    """Metric prefix of a suite's full-pool evaluation: ``xquad_r`` -> ``xquad_r_full``."""
    return prefix + FULL_SUFFIX.replace("-", "_")


def short_key(key: str, prefix: str) -> str:
    """A metric's name without its suite prefix, as tables and plots show it: ``multi/map``."""
    parts = split(key)
    return join(*parts[1:]) if parts[0] == prefix else key


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
    #: learning curve (evaluation.curvePoints): metric -> [(step, mean and CI over seeds)], steps ascending
    curves: dict[str, list[tuple[int, MeanCI]]] = field(default_factory=dict)

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
    #: what the comparisons' bootstrap resampled: sweep.bootstrapUnit, or question where the runs lack it
    bootstrap_unit: str = "question"
    #: the language-mean centering baseline (evaluation.centering) under the plain metric names, its source
    centered: dict[str, float] = field(default_factory=dict)
    centering_source: str | None = None
    #: the other LAReQA suites' prefixes (e.g. ntrex_r): seed means and baselines, no tests
    held_out: list[str] = field(default_factory=list)
    #: every point against that baseline (b is CENTERED), Holm-corrected per setting as their own family
    against_centering: list[Comparison] = field(default_factory=list)

    @property
    def finished(self) -> int:
        return sum(len(p.trials) for p in self.points)

    def main_metrics(self) -> list[str]:
        """The objective, then the headline retrieval and bias numbers that exist in these runs."""
        wanted = [self.sweep.metric] + [flat_name(self.prefix, m) for m in HEADLINE]
        present = {k for p in self.points for k in p.stats}
        return list(dict.fromkeys(k for k in wanted if k in present))

    def languages(self) -> list[str]:
        """The query languages of the per-language metrics the finished trials logged."""
        keys = {k for p in self.points for t in p.trials for k in t.metrics}
        return list(per_language_keys(flat_name(self.prefix, "mono.map"), keys))


#: Per-language numbers the breakdown of the best point against zero-shot shows (results keys, as
#: :func:`~xling.api.metrics.flat_name` takes them; so is HEADLINE).
BY_LANGUAGE = ("multi.map", "mono.map", "bias.rank_distance")
#: The headline numbers of a LAReQA suite, in table order: mAP, recall, then language bias.
HEADLINE = ("multi.map", "mono.map", "cross.map", "mono.r1", "cross.r1", "multi.r10", "bias.rank_distance",
            "bias.top10_own_share")  # fmt: skip


# ----------------------------------------------------------------------------- reading MLflow


#: Comparison.b of a test against the centering baseline (not a point of the sweep).
CENTERED = -1


def centering_source(document: dict[str, Any] | None) -> str | None:
    """Where the baseline's means came from, as the report states it (``document``: the centering spec)."""
    if not document:
        return None
    centering = CenteringSpec.model_validate(document)
    first = centering.first_line + 1
    return f"NTREX-128 lines {first}-{first + centering.sentences - 1} ({centering.sentences} per language)"


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
            name=r.data.tags[TRIAL],
            point=int(r.data.tags[POINT]),
            label=r.data.tags[POINT_LABEL],
            values=json.loads(r.data.tags[POINT_VALUES]),
            seed=int(r.data.tags[SEED]),
            status=r.info.status,
            metrics=dict(r.data.metrics),
        )
        for r in runs
        if TRIAL in r.data.tags
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
    """``xquad_r/multi/map`` -> {"ar": "xquad_r/multi/map/ar", ...} for the keys that exist."""
    found = {k: language_of(metric, k) for k in sorted(keys)}
    return {lang: k for k, lang in found.items() if lang and re.fullmatch(r"[a-z]{2,3}", lang)}


@dataclass
class PerQuery:
    """Per-query AP of one evaluation, per setting, aligned on ``query_ids``."""

    query_ids: list[str]
    language: np.ndarray
    ap: dict[str, np.ndarray]
    #: unit (paragraph, article) -> each query's cluster; absent in evaluations logged before they were
    clusters: dict[str, list[int]] = field(default_factory=dict)

    def units(self, unit: ClusterUnit) -> list[str] | None:
        """Each query's bootstrap unit, or None where this evaluation did not log that unit."""
        if unit == "question":
            return self.question_ids
        return [str(c) for c in self.clusters[unit]] if unit in self.clusters else None

    @property
    def question_ids(self) -> list[str]:
        """The evaluation names a query ``<lang>:<question id>``; the translations of a question share the
        question id, so the bootstrap resamples them together."""
        bad = next((q for q in self.query_ids if ":" not in q), None)
        if bad is not None:
            raise InputError(PER_QUERY_FILE, f"query_ids: {bad!r} is not <lang>:<question id>")
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
    clusters = {unit: list(doc[unit]) for unit in ("paragraph", "article") if unit in doc}
    return PerQuery(list(doc["query_ids"]), language, scores, clusters)


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
) -> tuple[list[Comparison], list[Comparison], ClusterUnit]:
    """Hierarchical bootstrap (each point's seeds, then paragraphs) between every two points, per setting,
    Holm-corrected per setting; then every point against the centering baseline (one deterministic
    evaluation of the untrained model: a configuration with one "seed"), its own Holm family. Every
    finished trial's per-query AP is a row: training noise (between seeds) and test-set noise (between
    paragraphs) both reach the intervals and p-values."""
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
    unit = sweep.bootstrap_unit
    if len(indices) < 2:
        return [], [], unit
    first = per_point[indices[0]][0]
    if any(q.query_ids != first.query_ids for i in indices for q in per_point[i]):
        notes.append("Bootstrap skipped: the trials were evaluated on different queries.")
        return [], [], unit
    single = [points[i].label for i in indices if len(per_point[i]) == 1]
    if single:
        notes.append(f"One seed only ({', '.join(single)}): their comparisons leave training noise out.")
    pairs = [(str(a), str(b)) for a, b in combinations(indices, 2)]
    units = first.units(unit)
    if units is None:
        notes.append(
            f"Bootstrap over questions, not {unit}s (sweep.bootstrapUnit): the trials' {PER_QUERY_FILE} has "
            f"no {unit} ids, so the intervals are too narrow where questions on one {unit} share difficulty."
        )
        unit, units = "question", first.question_ids
    centered = load_per_query(client, points[indices[0]].trials[0].run_id, suite + CENTERED_SUFFIX)
    if centered is not None and centered.query_ids != first.query_ids:
        notes.append("Centering baseline left out of the tests: it was evaluated on different queries.")
        centered = None
    baseline = [(str(i), str(CENTERED)) for i in indices] if centered is not None else []
    out, against = [], []
    for setting in SETTINGS:
        if any(setting not in q.ap for i in indices for q in per_point[i]):
            continue
        scores = {str(i): np.vstack([q.ap[setting] for q in per_point[i]]) for i in indices}
        if not np.isfinite(np.vstack(list(scores.values()))).all(axis=0).any():
            continue
        both = baseline if centered is not None and setting in centered.ap else []
        if both:
            scores[str(CENTERED)] = centered.ap[setting][None, :]  # type: ignore[union-attr]
        tests = hierarchical_bootstrap(
            scores,
            pairs + both,
            units,
            first.language,
            resamples=sweep.bootstrap_samples,
            confidence=sweep.confidence,
        )
        for family, into in ((pairs, out), (both, against)):
            adjusted = holm([tests[p].p_value for p in family])
            into += [
                Comparison(setting, int(a), int(b), tests[(a, b)], q)
                for (a, b), q in zip(family, adjusted, strict=True)
            ]
    return out, against, unit


def curve_keys(prefix: str) -> tuple[str, str]:
    """The metrics a learning curve draws: the pooled task and language bias."""
    return flat_name(prefix, "multi.map"), flat_name(prefix, "bias.rank_distance")


def learning_curves(
    client: MlflowClient, trials: list[TrialRecord], keys: list[str], confidence: float
) -> dict[str, list[tuple[int, MeanCI]]]:
    """Each key's value at every evaluated step, over the trials (seeds): empty unless some step lies
    between the start and the end (a run with evaluation.curvePoints)."""
    out = {}
    for key in keys:
        by_step: dict[int, list[float]] = {}
        for t in trials:
            last = {m.step: m.value for m in client.get_metric_history(t.run_id, key)}  # the latest per step
            for step, value in last.items():
                by_step.setdefault(step, []).append(value)
        if len(by_step) > 2:
            out[key] = [(step, mean_ci(v, confidence)) for step, v in sorted(by_step.items())]
    return out


def summarize_sweep(client: MlflowClient, parent_run_id: str) -> SweepSummary:
    """Everything the report shows, recomputed from the parent run (its spec, its plan) and the trials."""
    parent = client.get_run(parent_run_id)
    plan = download_json(client, parent_run_id, "sweep/plan.json")
    sweep = SweepSpec.model_validate(plan["sweep"])
    prefix = prefix_of(sweep.metric)
    records = child_runs(client, parent_run_id)
    finished = [t for t in records if t.status == "FINISHED"]
    keys = {k for t in finished for k in t.metrics}
    suffix = CENTERED_SUFFIX.replace("-", "_")
    headline = sorted(k for k in keys if is_headline(k) and not prefix_of(k).endswith(suffix))
    # the baseline is logged once, at step 0, by every trial alike: the first finished trial's values, under
    # the plain names (xquad_r_centered/multi/map -> xquad_r/multi/map), for every suite
    centered = {
        with_prefix(k, prefix_of(k).removesuffix(suffix)): v
        for k, v in (finished[0].metrics.items() if finished else ())
        if prefix_of(k).endswith(suffix)
    }
    suites = [suite_prefix(suite["name"]) for suite in plan["experiment"]["spec"]["evaluation"]["suites"]]
    held_out = [p for p in suites if p != prefix and flat_name(p, "multi.map") in keys]
    source = centering_source(plan["experiment"]["spec"].get("evaluation", {}).get("centering"))
    zero_keys = [k for k in headline if prefix_of(k) in (prefix, *held_out)]
    wanted = [c.metric for c in sweep.constraints if c.at_least_zero_shot] + [
        flat_name(prefix, m) for m in BY_LANGUAGE
    ]
    for metric in wanted:
        zero_keys += per_language_keys(metric, keys).values()
    zero = zero_shot(client, finished[0].run_id, sorted(set(zero_keys))) if finished else {}
    base_sampling = plan["experiment"]["spec"]["sampling"]
    full_key = flat_name(full_prefix(prefix), "multi.map")
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
        p.curves = learning_curves(
            client, p.trials, [k for k in curve_keys(prefix) if k in keys], sweep.confidence
        )
    notes: list[str] = []
    comparisons: list[Comparison] = []
    against: list[Comparison] = []
    unit: str = "question"
    if flat_name(prefix, "multi.map") in keys:  # a LAReQA suite (XQuAD-R, MLQA-R): per-query AP exists
        comparisons, against, unit = _comparisons(client, points, prefix.replace("_", "-"), sweep, notes)
    sign = 1 if sweep.mode == "max" else -1
    ranked = [p for p in points if p.feasible and sweep.metric in p.stats and p.stats[sweep.metric].n]
    best = max(ranked, key=lambda p: sign * p.stats[sweep.metric].mean).index if ranked else None
    if not ranked and finished:
        notes.append(f"No point meets every constraint and logged {sweep.metric}.")
    return SweepSummary(
        name=parent.data.tags.get(SWEEP, parent.info.run_name),
        parent_run_id=parent_run_id,
        sweep=sweep,
        prefix=prefix,
        planned=len(plan["trials"]),
        points=points,
        zero_shot=zero,
        comparisons=comparisons,
        notes=notes,
        best=best,
        zero_shot_full={k: v for k, v in parent.data.metrics.items() if prefix_of(k) == full_prefix(prefix)},
        bootstrap_unit=unit,
        centered=centered,
        centering_source=source,
        held_out=held_out,
        against_centering=against,
    )
