"""A sweep's summary as tables: points with their intervals, comparisons, languages, the full pool.

Each :class:`~xling.trainer.sweep.markup.Table` renders to markdown (the terminal, summary.md) and to HTML
(summary.html) alike; the paper's claims (:mod:`~xling.trainer.sweep.claims`) come last.
"""

from __future__ import annotations

import math

from xling.api.metrics import flat_name
from xling.trainer.stats import MeanCI, mean_ci
from xling.trainer.sweep.claims import claims_table
from xling.trainer.sweep.markup import Table
from xling.trainer.sweep.summary import (
    BY_LANGUAGE,
    HEADLINE,
    HIGHER_IS_BETTER,
    Comparison,
    SweepSummary,
    curve_keys,
    full_prefix,
    short_key,
)


def _fmt(ci: MeanCI | None) -> str:
    if ci is None or ci.n == 0:
        return "-"
    return f"{ci.mean:.4f}" if ci.n == 1 else f"{ci.mean:.4f} ± {ci.half_width:.4f}"


def tables(s: SweepSummary) -> list[Table]:
    """Points (mean ± CI half-width over seeds), zero-shot, and the comparisons between points."""
    metrics = s.main_metrics()
    pct = round(100 * s.sweep.confidence)
    rows = []
    if s.zero_shot:  # the baseline every point is read against: first
        rows.append(["-", "zero-shot", "-"] + [_fmt(_single(s.zero_shot.get(k))) for k in metrics] + ["-"])
    if s.centered:  # the baseline without training that a trained arm must beat
        label = "zero-shot + language-mean centering"
        rows.append(["-", label, "-"] + [_fmt(_single(s.centered.get(k))) for k in metrics] + ["-"])
    for p in s.points:
        mark = "best" if p.index == s.best else ("yes" if p.feasible else "no: " + "; ".join(p.violations))
        rows.append(
            [str(p.index), p.label, str(len(p.trials))] + [_fmt(p.stats.get(k)) for k in metrics] + [mark]
        )
    out = [
        Table(
            f"Points: mean ± {pct}% t-interval half-width over seeds",
            ["#", "point", "seeds"] + [short_key(k, s.prefix) for k in metrics] + ["feasible"],
            rows,
        )
    ]
    if s.comparisons:
        out.append(
            Table(
                f"Paired bootstrap over {s.bootstrap_unit}s and seeds ({s.sweep.bootstrap_samples} resamples, macro over "
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
    out += [t for t in (_against_centering(s), _curves(s), _by_language(s), _full_pool(s)) if t is not None]
    out += _held_out(s)
    if (claims := claims_table(s)) is not None:
        out.append(claims)
    return out


def _against_centering(s: SweepSummary) -> Table | None:
    """Does each point beat the untrained model with language-mean centering? Paired bootstrap, Holm."""
    if not s.against_centering:
        return None
    alpha, pct = 1 - s.sweep.confidence, round(100 * s.sweep.confidence)

    def verdict(c: Comparison) -> str:
        better = c.test.diff > 0 if c.setting in HIGHER_IS_BETTER else c.test.diff < 0
        if c.p_holm >= alpha:
            return "not separable"
        return "beats centering" if better else "below centering"

    return Table(
        f"Against language-mean centering (means: {s.centering_source}): point - baseline, paired bootstrap "
        f"over {s.bootstrap_unit}s and seeds, {pct}% CI, Holm per setting",
        ["setting", "point", "point - centering", f"{pct}% CI", "p (Holm)", "verdict"],
        [[c.setting, s.points[c.a].label, f"{c.test.diff:+.4f}", _interval(c.test.low, c.test.high),
          f"{c.p_holm:.4f}", verdict(c)] for c in s.against_centering],
    )  # fmt: skip


def _held_out(s: SweepSummary) -> list[Table]:
    """The other suites (a held-out benchmark): zero-shot, centering and every point, mean ± CI over seeds.
    Read beside the main suite's tests: these numbers carry seed intervals only."""
    pct, out = round(100 * s.sweep.confidence), []
    for prefix in s.held_out:
        keys = [k for m in HEADLINE if any((k := flat_name(prefix, m)) in p.stats for p in s.points)]
        rows = [[name] + [_fmt(_single(values.get(k))) for k in keys]
                for name, values in (("zero-shot", s.zero_shot), ("zero-shot + language-mean centering", s.centered))
                if any(k in values for k in keys)]  # fmt: skip
        rows += [[p.label] + [_fmt(p.stats.get(k)) for k in keys] for p in s.points]
        out.append(Table(f"Held-out suite {prefix}: mean ± {pct}% t-interval half-width over seeds",
                         ["point"] + [short_key(k, prefix) for k in keys], rows))  # fmt: skip
    return out


def _curves(s: SweepSummary) -> Table | None:
    """The learning curves as numbers: each point at each evaluated step (learning_curves.png draws them)."""
    keys = [k for k in curve_keys(s.prefix) if any(k in p.curves for p in s.points)]
    if not keys:
        return None
    rows = []
    for p in s.points:
        at = {k: dict(p.curves.get(k, [])) for k in keys}
        for step in sorted({step for k in keys for step in at[k]}):
            rows.append([p.label, str(step)] + [_fmt(at[k].get(step)) for k in keys])
    pct = round(100 * s.sweep.confidence)
    return Table(f"Learning curves: mean ± {pct}% t-interval half-width over seeds",
                 ["point", "step"] + [short_key(k, s.prefix) for k in keys], rows)  # fmt: skip


def _by_language(s: SweepSummary) -> Table | None:
    """The best point against zero-shot, language by language: which languages gain or lose."""
    langs = s.languages()
    if s.best is None or not langs or not s.zero_shot:
        return None
    best, pct = s.points[s.best], round(100 * s.sweep.confidence)
    rows = []
    for lang in langs:
        row = [lang]
        for metric in BY_LANGUAGE:
            key = flat_name(s.prefix, metric, lang)
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
    keys = [flat_name(prefix, m) for m in HEADLINE]
    rows = (
        [["zero-shot", "-"] + [_fmt(_single(s.zero_shot_full.get(k))) for k in keys]]
        if s.zero_shot_full
        else []
    )
    rows += [[p.label, str(p.full.seed)] + [_fmt(_single(p.full.metrics.get(k))) for k in keys] for p in full]
    return Table("Full pool: the best seed of each point (by the objective) on the whole suite",
                 ["point", "seed"] + [short_key(k, prefix) for k in keys], rows)  # fmt: skip


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
