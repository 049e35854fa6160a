"""A sweep's summary as files (summary.md/html/json, points.csv, the plots), and on the parent run.

:func:`publish` puts them on the sweep's parent run in MLflow, with the best point's numbers as the parent's
metrics; :func:`write_report` writes them to a folder (``xling results --out``).
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xling.api.metrics import BEST, join
from xling.api.tags import BEST_POINT, TRIALS_FINISHED
from xling.trainer.sweep.plots import save_plots
from xling.trainer.sweep.summary import SweepSummary
from xling.trainer.sweep.tables import header_lines, markdown, tables

if TYPE_CHECKING:
    from mlflow import MlflowClient

#: Artifact folder of the summary on the parent run.
SUMMARY_DIR = "summary"


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
        "centering": {"source": s.centering_source, "metrics": s.centered,
                      "against": [{"setting": c.setting, "point": c.a, **_finite_or_none(asdict(c.test)),
                                   "p_holm": c.p_holm} for c in s.against_centering]},
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
    metrics = {
        join("sweep", "trials_finished"): float(s.finished),
        join("sweep", "points"): float(len(s.points)),
    }
    tags = [RunTag(TRIALS_FINISHED, f"{s.finished}/{s.planned}")]
    if s.best is not None:
        best = s.points[s.best]
        tags.append(RunTag(BEST_POINT, best.label))
        for key in s.main_metrics():
            ci = best.stats[key]
            metrics[join(BEST, key)] = ci.mean
            if math.isfinite(ci.low):
                metrics[join(BEST, key, "ci_low")], metrics[join(BEST, key, "ci_high")] = ci.low, ci.high
    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, 0) for k, v in metrics.items() if math.isfinite(v)]
    client.log_batch(s.parent_run_id, metrics=batch, tags=tags)
