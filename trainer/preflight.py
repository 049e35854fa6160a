"""``xling run --check`` and the start of every ``xling run``: what would fail later, found before any work.

The spec's own validation (:mod:`xling.api.spec`) checks a file without looking at anything else; this looks at what
the file names: every data and evaluation path (resolved against the spec file), the languages the sources
and suites actually have, the model as the run will load it, and the fields the chosen strategy ignores.
Each problem names its field. Cheap: file names and directory listings, no data row is read (a language a
JSONL file lacks is found after preparation, :func:`missing_languages`).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path
from urllib.parse import urlparse

from xling.api.env import EXPERIMENT_UID_ENV
from xling.api.errors import InputError, Problem
from xling.api.spec.base import SpecError, is_xling_model
from xling.api.spec.experiment import ExperimentSpec, RetrievalExperiment
from xling.api.spec.training import DataSource, ModelSpec

#: The field every model problem names.
MODEL = "spec.model.name"
#: Source types whose ``path`` is a hub name, not a file.
HUB_SOURCES = ("hf",)


def check(
    exp: RetrievalExperiment,
    spec_file: str | Path,
    *,
    run: bool = True,
    ahead: bool = True,
    points: Sequence[tuple[str, ExperimentSpec]] = (),
) -> None:
    """Raise SpecError (naming ``spec_file`` and each field) if the run cannot do what the spec asks, fields
    it would ignore included. ``run=False`` checks for data preparation only (no memory plan, no model).
    ``ahead=False``: leave loading the model's files to the run that follows (``driver.resolve_model`` loads
    them before Ray starts), so they are not loaded twice. ``points``: a sweep's (label, spec) pairs, each
    checked to fit (default: the spec itself)."""
    if run:  # spec-only, so they go first: a model shape with nothing to load; PlanError, with the plan
        from xling.trainer.capacity.check import check_each_fits

        if problem := exp.spec.model.plan_only():
            raise SpecError(spec_file, problem, field=MODEL)
        check_each_fits(exp, points)
    base = Path(spec_file).resolve().parent
    spec = exp.spec
    errors = list(path_problems(spec, base))
    if not os.environ.get(EXPERIMENT_UID_ENV):  # the operator writes every default out: none reads as set
        errors += ignored_fields(spec)
    if not errors:  # languages are looked up in the paths just checked
        errors += language_problems(spec)
    if run and not errors:
        errors += model_problems(spec.model, base, load=ahead)
    if len(errors) == 1:
        raise SpecError(spec_file, errors[0].message, field=errors[0].field)
    if errors:
        raise SpecError(spec_file, f"cannot run ({len(errors)} problems)", problems=errors)


# ----------------------------------------------------------------------------------------------- paths


def path_problems(spec: ExperimentSpec, base: Path) -> Iterator[Problem]:
    """Each data source and evaluation suite path that does not exist (``load_experiment`` made the ones
    that exist relative to the spec file absolute; a missing one is still as written)."""
    for i, source in enumerate(spec.data.sources):
        if source.type not in HUB_SOURCES:
            yield from _missing(source.path, f"spec.data.sources[{i}].path", base)
    for i, suite in enumerate(spec.evaluation.suites):
        yield from _missing(suite.path, f"spec.evaluation.suites[{i}].path", base)


def _missing(path: str, field: str, base: Path) -> Iterator[Problem]:
    """Where the run looks: relative to the spec file, else to the working directory."""
    if "://" in path:  # a bucket: the cluster's storage, not looked at here
        return
    p = Path(path)
    if not (p.exists() or (base / p).exists()):
        where = p if p.is_absolute() else f"{(base / p).resolve()}, relative to the spec file"
        yield Problem(f"{path!r} does not exist ({where})", field)


# ------------------------------------------------------------------------------------------- languages


def source_languages(source: DataSource, skip_bad_rows: bool = False) -> set[str] | None:
    """The languages a source's files give, from their names, or for pair files from their rows (each row is
    checked as preparation will: a bad row raises BadRowError unless ``data.skipBadRows``); None for a hub
    dataset."""
    from xling.trainer.data.builders import _MLQA_NAME, _TYDI_NAME, NTREX_LANGUAGES
    from xling.trainer.data.loaders import read_pairs
    from xling.trainer.data.pairs import BadRows

    root = Path(source.path)
    names = [root.name] if root.is_file() else [p.name for p in root.iterdir()] if root.is_dir() else []
    match source.type:
        case "ntrex":
            return {lang for code, lang in NTREX_LANGUAGES.items()
                    if {f"newstest2019-ref.{code}.txt", f"newstest2019-ref.{code}.txt.gz"} & set(names)}  # fmt: skip
        case "mlqa":
            found = [m for n in names if (m := _MLQA_NAME.match(n))]
            return {m[k] for m in found if source.split in (None, m["split"]) for k in ("c", "q")}
        case "tydiqa":
            found = [m for n in names if (m := _TYDI_NAME.match(n))]
            return {m["lang"] for m in found if source.split in (None, m["split"])}
        case "xnli":
            split = source.split or "dev"
            return {n.removeprefix(f"{split}-").split(".")[0] for n in names if n.startswith(f"{split}-")}
        case "squad":
            return {source.language} if source.language else None
        case "iapp":
            return {"th"}
        case "pairs":
            return {pair.language for pair, _ in read_pairs(root, BadRows() if skip_bad_rows else None)}
    return None


def language_problems(spec: ExperimentSpec) -> Iterator[Problem]:
    """A training language no source has, and an evaluation language its suite's files lack."""
    from xling.trainer.data.pairs import BadRowError

    found: list[set[str] | None] = []
    for i, source in enumerate(spec.data.sources):
        try:
            found.append(source_languages(source, spec.data.skip_bad_rows))
        except InputError as err:  # a bad row (BadRowError), or a folder without pair files
            hint = (
                "; rerun with --skip-bad-rows to skip and count such rows"
                if isinstance(err, BadRowError)
                else ""
            )
            yield Problem(f"{err}{hint}", f"spec.data.sources[{i}]")
            return
    if None not in found:  # else only the rows know: checked after preparation
        offered = set().union(*(langs & set(s.languages or spec.data.languages)
                                for langs, s in zip(found, spec.data.sources, strict=True)))  # fmt: skip
        if missing := [lang for lang in spec.data.languages if lang not in offered]:
            yield Problem(f"{', '.join(missing)}: in none of the sources (they have "
                          f"{', '.join(sorted(offered)) or 'no language'})", "spec.data.languages")  # fmt: skip
    yield from _suite_language_problems(spec)


def _suite_language_problems(spec: ExperimentSpec) -> Iterator[Problem]:
    from xling.trainer.evaluation.api import suite_languages
    from xling.trainer.evaluation.errors import EvalDataError

    for i, suite in enumerate(spec.evaluation.suites):
        if suite.name == "miracl":
            continue
        try:
            have = suite_languages(suite)
        except EvalDataError as err:
            yield Problem(str(err.problems[0]), f"spec.evaluation.suites[{i}].path")
            continue
        if missing := sorted(set(suite.languages or ()) - set(have)):
            yield Problem(
                f"{', '.join(missing)} not in {suite.path} (it has {', '.join(have)})",
                f"spec.evaluation.suites[{i}].languages",
            )


def missing_languages(spec: ExperimentSpec, present: set[str]) -> None:
    """After preparation: raise SpecError naming each training language the prepared corpus has no row in
    (rather than training on the others without a word)."""
    if missing := [lang for lang in spec.data.languages if lang not in present]:
        raise SpecError(
            None,
            f"{', '.join(missing)}: no source has rows in {'this language' if len(missing) == 1 else 'these languages'}"
            f" (the data has {', '.join(sorted(present)) or 'none'})",
            field="spec.data.languages",
        )


# ---------------------------------------------------------------------------------------------- fields


def ignored_fields(spec: ExperimentSpec) -> Iterator[Problem]:
    """Fields the file sets that the run would silently ignore (a sweep that varies the strategy uses them)."""
    sampling, strategy = spec.sampling, spec.sampling.strategy
    swept = spec.sweep is not None and any(
        "strategy" in p for p in [*spec.sweep.parameters, *(k for point in spec.sweep.points for k in point)]
    )
    written = sampling.model_fields_set
    if not swept:
        if "alpha" in written and strategy != "hybrid":
            yield Problem(
                f"set, but strategy {strategy!r} ignores it (only hybrid draws X-X batches with probability "
                "alpha); remove it or use strategy: hybrid",
                "spec.sampling.alpha",
            )
        if "language_weighting" in written and strategy in ("xy", "mixed"):
            yield Problem(
                f"set, but strategy {strategy!r} draws no X-X batch language",
                "spec.sampling.languageWeighting",
            )
        if "pair_weighting" in written and strategy in ("xx", "mixed"):
            yield Problem(
                f"set, but strategy {strategy!r} draws no X-Y language pair", "spec.sampling.pairWeighting"
            )
    if "language_temperature" in written and "size" not in (
        sampling.language_weighting,
        sampling.pair_weighting,
    ):
        yield Problem("set, but only size weighting uses it (languageWeighting or pairWeighting: size)",
                      "spec.sampling.languageTemperature")  # fmt: skip
    if "chunk_size" in spec.loss.grad_cache.model_fields_set and not spec.loss.grad_cache.enabled:
        yield Problem("set, but loss.gradCache.enabled is false", "spec.loss.gradCache.chunkSize")
    for i, source in enumerate(spec.data.sources):
        if source.language is not None and source.type != "squad":
            yield Problem(f"only a squad source reads it ({source.type!r} rows carry their own)",
                          f"spec.data.sources[{i}].language")  # fmt: skip


# ----------------------------------------------------------------------------------------------- model


def model_problems(model: ModelSpec, base: Path, load: bool = True) -> Iterator[Problem]:
    """The model as the run loads it: a built-in name, a local directory with a config (its files loaded
    unless ``load`` is False), or a hub name in the local cache, or else on a hub that answers (offline,
    HF_HUB_OFFLINE=1, the cache alone decides)."""
    field, name = MODEL, model.name
    if is_xling_model(name):  # a built-in model (plan_only checked the rest)
        return
    local = Path(name).expanduser()
    if not local.exists() and not local.is_absolute():
        local = base / local  # where the run looks first (load_experiment resolves what exists there)
    if local.exists() or name.startswith((".", "/", "~")):
        if not (local / "config.json").is_file():
            yield Problem(f"{local.resolve()} has no config.json (not a Hugging Face model directory)", field)
        elif load:
            from xling.trainer.model import load_model_files

            try:
                load_model_files(str(local), model)
            except SpecError as err:
                yield err.problems[0]
        return
    if reason := hub_model_problem(model):
        yield Problem(reason, field)


def hub_model_problem(model: ModelSpec) -> str | None:
    """Why the run could not load hub model ``model`` here, or None if it can."""
    from transformers import AutoConfig

    kwargs = {"revision": model.revision, "trust_remote_code": model.trust_remote_code}
    try:
        AutoConfig.from_pretrained(model.name, local_files_only=True, **kwargs)
        return None
    except (OSError, ValueError):
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return (f"{model.name!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: the run "
                "could not load it (download it once online, or give a local directory)")  # fmt: skip
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = (
        endpoint.hostname or "huggingface.co",
        endpoint.port or (443 if endpoint.scheme == "https" else 80),
    )
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError as err:
        return (f"{model.name!r} is not in the local Hugging Face cache and the hub ({host}) is unreachable "
                f"({err.strerror or err}): the run could not load it")  # fmt: skip
    try:
        AutoConfig.from_pretrained(model.name, **kwargs)
    except (OSError, ValueError) as err:
        return f"{model.name!r}: the hub cannot give it: {str(err).splitlines()[0]}"
    return None
