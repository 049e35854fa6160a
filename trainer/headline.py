"""One run's headline: its main evaluation numbers zero-shot (step 0) and after training, read from MLflow.

What ``xling run`` prints last, what heads the MLflow run's description (the run page's first lines), and
what ``xling results`` shows for a run that is not a sweep. Read from the metric histories: a run evaluated
at its start (``evaluation.atStart``) logged the zero-shot numbers at step 0 under the same keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from xling.api.metrics import flat_name, prefix_of
from xling.api.tags import DESCRIPTION, ROLE

#: (metric key after the suite's prefix, label, lower is better): the pooled task first (the research
#: objective), then language bias, then the per-language-pair tasks.
HEADLINE = (
    ("multi.map", "multilingual pool mAP", False),
    ("multi.r10", "multilingual R@10", False),
    ("bias.rank_distance", "language bias: rank distance", True),
    ("bias.top10_own_share", "top-10 hits in the query's language", True),
    ("mono.map", "monolingual mAP", False),
    ("cross.map", "cross-lingual mAP", False),
)
#: A suite's centering baseline's metric prefix ends so (``evaluation.centering.CENTERED``, ``-`` as ``_``).
CENTERED = "_centered"


@dataclass(frozen=True)
class Row:
    suite: str  # the metric prefix: xquad_r, mlqa_r
    label: str
    zero_shot: float | None
    trained: float | None
    lower_is_better: bool


def headline(client: Any, run_id: str) -> tuple[list[Row], int | None]:
    """The headline rows of every suite the run evaluated, and the step of its last evaluation."""
    metrics = client.get_run(run_id).data.metrics
    suites = sorted({p for k in metrics if k == flat_name(p := prefix_of(k), "multi.map")})
    rows, last = [], None
    for suite in suites:
        for key, label, lower in HEADLINE:
            name = flat_name(suite, key)
            if name not in metrics:
                continue
            history = {m.step: m.value for m in client.get_metric_history(run_id, name)}
            final = max(history)
            last = final if final > 0 else last
            rows.append(Row(suite, label, history.get(0), history[final] if final > 0 else None, lower))
    return rows, last


def table(rows: list[Row], step: int | None) -> str:
    """A Markdown table (readable as plain text too): zero-shot, trained, change. A suite's language-mean
    centering baseline (``<suite>_centered``, step 0 only) is a column beside its zero-shot numbers."""
    plain = {(r.suite, r.label) for r in rows if not r.suite.endswith(CENTERED)}
    centered = {(r.suite.removesuffix(CENTERED), r.label): r.zero_shot for r in rows
                if r.suite.endswith(CENTERED) and (r.suite.removesuffix(CENTERED), r.label) in plain}  # fmt: skip
    trained = f"trained (step {step})" if step else "trained"
    extra = " zero-shot, centered |" if centered else ""
    lines = [f"| | zero-shot |{extra} {trained} | change |", "|---|---|" + "---|" * (2 + bool(centered))]
    for r in rows:
        if r.suite.endswith(CENTERED) and (r.suite.removesuffix(CENTERED), r.label) in centered:
            continue
        change = "" if r.zero_shot is None or r.trained is None else f"{r.trained - r.zero_shot:+.4f}"
        better = " (lower is better)" if r.lower_is_better else ""
        cells = [_num(r.zero_shot), *([_num(centered.get((r.suite, r.label)))] if centered else []),
                 _num(r.trained), change]  # fmt: skip
        lines.append(f"| {r.suite} {r.label}{better} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def summary_line(rows: list[Row]) -> str:
    """The one-line headline: the first suite's pooled mAP, zero-shot -> trained."""
    first = next((r for r in rows if r.label == HEADLINE[0][1]), None)
    if first is None or first.trained is None:
        return "no evaluation logged"
    if first.zero_shot is None:
        return f"{first.suite} multilingual pool mAP {first.trained:.4f} after training"
    return (f"{first.suite} multilingual pool mAP {first.zero_shot:.4f} → {first.trained:.4f} "
            f"({first.trained - first.zero_shot:+.4f}) from zero-shot to trained")  # fmt: skip


def describe(client: Any, run_id: str, spec_summary: str) -> str:
    """The run's MLflow description: the headline, what was trained, the before/after table; set on the run
    (``mlflow.note.content``, shown at the top of the run page) and returned."""
    rows, step = headline(client, run_id)
    text = (
        f"**{summary_line(rows)}**\n\n{spec_summary}\n\n{table(rows, step) if rows else ''}".rstrip() + "\n"
    )
    client.set_tag(run_id, DESCRIPTION, text)
    return text


def find_run(client: Any, name: str) -> str | None:
    """The newest run (not a sweep's) named ``name``: its run name, or its MLflow experiment's name."""
    experiments = client.search_experiments()
    ids = [e.experiment_id for e in experiments]
    if not ids:
        return None
    named = client.search_runs(
        ids, f"attributes.run_name = '{name}'", order_by=["attributes.start_time DESC"]
    )
    runs = [r for r in named if ROLE not in r.data.tags]
    if not runs and (exp := next((e for e in experiments if e.name == name), None)):
        runs = [r for r in client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])
                if ROLE not in r.data.tags]  # fmt: skip
    return runs[0].info.run_id if runs else None
