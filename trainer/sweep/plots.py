"""A sweep's summary as figures: each metric against the swept parameter, the alpha curve, the Pareto
front of mAP against language bias, per-language bias and the language-pair heatmaps.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from xling.api.metrics import flat_name
from xling.trainer.evaluation.report import write_pngs
from xling.trainer.sweep.summary import PointSummary, SweepSummary, curve_keys, short_key


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
    ax.set_title(short_key(key, s.prefix))
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
    xk, yk = curve_keys(s.prefix)[::-1]
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


def _plot_heatmaps(s: SweepSummary, plt: Any) -> Any:
    langs = s.languages()
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
            [[p.mean(flat_name(s.prefix, "mono.map", a) if a == b else flat_name(s.prefix, "cross.map", f"{a}_{b}")) for b in langs]
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
    langs = s.languages()
    pts = sorted((p for p in s.points if p.trials), key=lambda p: x[p.index])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, metric, title in (
        (axes[0], "rank_distance", "rank distance (lower: less bias)"),
        (axes[1], "top10_own_share", "own-language share of the top 10"),
    ):
        for lang in langs:
            ax.plot([x[p.index] for p in pts], [p.mean(flat_name(s.prefix, f"bias.{metric}", lang)) for p in pts],
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
    keys = [k for k in curve_keys(s.prefix) if k in pts[0].stats]
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


def _plot_learning_curves(s: SweepSummary, plt: Any) -> Any:
    """Every point's multilingual mAP and rank distance against training steps, mean and seed interval;
    zero-shot dashed, the language-mean centering baseline dotted."""
    keys = [k for k in curve_keys(s.prefix) if any(k in p.curves for p in s.points)]
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 3.8), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        for i, p in enumerate(q for q in s.points if key in q.curves):
            steps = np.array([step for step, _ in p.curves[key]])
            mean, low, high = (
                np.array([getattr(c, f) for _, c in p.curves[key]]) for f in ("mean", "low", "high")
            )
            ax.plot(steps, mean, marker="o", ms=3, color=f"C{i}", label=p.label)
            ax.fill_between(steps, low, high, color=f"C{i}", alpha=0.15)
        if key in s.centered:
            ax.axhline(s.centered[key], color="black", ls=":", lw=1, label="language-mean centering")
        _metric_axis(s, ax, key, "training step")
    return _seed_ci_figure(s, fig, axes)


def save_plots(s: SweepSummary, directory: Path) -> list[Path]:
    """metric vs the swept parameter, Pareto, heatmaps and bias plots (those the metrics allow)."""
    if not any(p.trials for p in s.points):
        return []
    x_name = (primary_parameter(s) or "point").rsplit(".", 1)[-1]
    plots = [(f"metric_vs_{x_name}", _plot_metric_vs_parameter)]
    if _alpha_points(s) and x_name != "alpha":  # an alpha grid has its curve already: metric_vs_alpha
        plots.append(("alpha_curve", _plot_alpha_curve))
    if flat_name(s.prefix, "bias.rank_distance") in s.main_metrics():
        plots += [("pareto", _plot_pareto), ("bias", _plot_bias)]
    if s.languages():
        plots.append(("heatmaps", _plot_heatmaps))
    if any(p.curves for p in s.points):
        plots.append(("learning_curves", _plot_learning_curves))
    return write_pngs(s, plots, directory)
