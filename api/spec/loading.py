"""Reading a spec: a YAML file or a parsed document -> a validated :class:`RetrievalExperiment`, or one
:class:`SpecError` naming the file, the line where known, and every offending field path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from xling.api.errors import Problem
from xling.api.spec.base import KIND, SpecError, is_xling_model
from xling.api.spec.experiment import RetrievalExperiment


def _format_errors(err: ValidationError, source: str) -> SpecError:
    """One problem per pydantic error, at its field path; a validator's SpecError names its field relative to
    the model it checks, so that field is joined onto the location."""
    problems = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"])
        cause = (e.get("ctx") or {}).get("error")
        if isinstance(cause, SpecError):
            problems += [
                Problem(p.message, ".".join(filter(None, (path, p.field))) or "<root>")
                for p in cause.problems
            ]
        else:
            problems.append(Problem(e["msg"].removeprefix("Value error, "), path or "<root>"))
    return SpecError(source, f"invalid RetrievalExperiment ({err.error_count()} error(s))", problems=problems)


def parse_experiment(doc: dict[str, Any], source: str = "<spec>") -> RetrievalExperiment:
    """Validate a parsed document; raise SpecError naming each bad field."""
    if not isinstance(doc, dict):
        raise SpecError(source, f"expected a mapping (a RetrievalExperiment), got {type(doc).__name__}")
    try:
        return RetrievalExperiment.model_validate(doc)
    except ValidationError as err:
        raise _format_errors(err, source) from None


def resolve_paths(exp: RetrievalExperiment, base: Path) -> RetrievalExperiment:
    """A copy of ``exp`` with the data, evaluation and model paths that exist relative to ``base`` made
    absolute (hub names stay as they are)."""

    def fix(p: str) -> str:
        candidate = base / p
        return str(candidate.resolve()) if not Path(p).is_absolute() and candidate.exists() else p

    def moved(item: Any) -> Any:
        return item.model_copy(update={"path": fix(item.path)})

    spec = exp.spec
    update: dict[str, Any] = {
        "data": spec.data.model_copy(update={"sources": [moved(s) for s in spec.data.sources]}),
        "evaluation": spec.evaluation.model_copy(
            update={
                "suites": [moved(s) for s in spec.evaluation.suites],
                "centering": spec.evaluation.centering and moved(spec.evaluation.centering),
            }
        ),
    }
    if not is_xling_model(spec.model.name):
        update["model"] = spec.model.model_copy(update={"name": fix(spec.model.name)})
    return exp.model_copy(update={"spec": spec.model_copy(update=update)})


def load_experiment(path: str | Path) -> RetrievalExperiment:
    """Read and validate one experiment YAML file (the first document that is a RetrievalExperiment)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise SpecError(path, f"cannot read: {err.strerror}") from None
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as err:  # one line, at the line where the parser stopped
        mark, context, at = (getattr(err, k, None) for k in ("problem_mark", "context", "context_mark"))
        why = getattr(err, "problem", None) or str(err).splitlines()[0]
        if context and at is not None:
            why += f" ({context} at line {at.line + 1}, column {at.column + 1})"
        raise SpecError(path, f"not valid YAML: {why}", line=mark.line + 1 if mark else None) from None
    if not docs:
        raise SpecError(path, "empty file")
    exps = [d for d in docs if isinstance(d, dict) and d.get("kind") == KIND]
    doc = exps[0] if exps else docs[0]
    return resolve_paths(parse_experiment(doc, str(path)), path.parent)
