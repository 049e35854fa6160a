"""The two calls the trainer, sweeps and ``xling eval`` share: load a suite, evaluate an encoder on it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from xling.api.errors import InputError
from xling.api.spec.base import IndexKind
from xling.api.spec.training import CenteringSpec, EvalSuite
from xling.trainer.evaluation.centering import CENTERED, LanguageMeans, language_means
from xling.trainer.evaluation.lareqa import LareqaSuite, load_lareqa, load_mlqa_holdout, load_ntrex_suite
from xling.trainer.evaluation.lareqa_scoring import evaluate_lareqa
from xling.trainer.evaluation.miracl import MiraclSuite, evaluate_miracl, load_miracl
from xling.trainer.evaluation.protocol import TextEncoder
from xling.trainer.evaluation.results import SuiteResults

Suite = LareqaSuite | MiraclSuite


def load_suite(suite: EvalSuite) -> Suite:
    """Read a suite's files. ``suite.path`` is used as given: resolve it against the spec file first."""
    if suite.name == "miracl":
        return load_miracl(
            suite.path,
            languages=suite.languages,
            max_queries=suite.max_queries,
            max_passages=suite.max_paragraphs,
        )
    if suite.name == "ntrex-r":
        return load_ntrex_suite(suite.name, suite.path, languages=suite.languages, first_line=suite.first_line,
                                lines=suite.max_paragraphs)  # fmt: skip
    if suite.hold_out is not None:
        return load_mlqa_holdout(suite.name, suite.path, languages=suite.languages, hold_out=suite.hold_out,
                                 max_queries=suite.max_queries)  # fmt: skip
    return load_lareqa(
        suite.name,
        suite.path,
        languages=suite.languages,
        candidate_context=suite.candidate_context,
        max_paragraphs=suite.max_paragraphs,
        max_queries=suite.max_queries,
    )


def suite_languages(suite: EvalSuite) -> list[str]:
    """The languages a suite's files hold, by the suite's own layout (what ``languages`` may name); raises
    EvalDataError naming the directory when it holds none."""
    from xling.trainer.data.builders import mlqa_context_languages, ntrex_languages
    from xling.trainer.evaluation.errors import EvalDataError
    from xling.trainer.evaluation.lareqa import discover_languages

    if suite.name == "ntrex-r":
        find = ntrex_languages
    elif suite.hold_out is not None:
        find = mlqa_context_languages
    else:
        return discover_languages(Path(suite.path))
    try:
        return find(suite.path)
    except OSError as err:
        raise EvalDataError(Path(suite.path), str(err).removeprefix(f"{Path(suite.path)}: ")) from None


def evaluate_suite(
    suite: Suite,
    encoder: TextEncoder,
    *,
    index: IndexKind = "flat",
    cache_dir: str | Path | None = None,
    depth: int = 100,
    centering: LanguageMeans | None = None,
) -> SuiteResults:
    """Evaluate ``encoder`` on a loaded suite; ``depth`` is the length of the kept top-k lists (run
    files; with IVF/HNSW also the cut-off of every metric); ``centering``: the language-mean baseline
    (LAReQA suites: its point is the pooled, multilingual index)."""
    if isinstance(suite, MiraclSuite):
        if centering is not None:
            raise InputError(
                None,
                "MIRACL is monolingual per language; centering is for LAReQA suites",
                field="evaluation.centering",
            )
        return evaluate_miracl(suite, encoder, index=index, cache_dir=cache_dir, depth=depth)
    return evaluate_lareqa(suite, encoder, index=index, cache_dir=cache_dir, depth=depth, centering=centering)


def evaluate_with_centering(
    suite: Suite,
    encoder: TextEncoder,
    centering: CenteringSpec | None,
    *,
    index: IndexKind = "flat",
    cache_dir: str | Path | None = None,
    depth: int = 100,
) -> list[SuiteResults]:
    """The model's results, then (``centering`` set, a LAReQA suite) the language-mean centering baseline's,
    as suite ``<name>-centered`` (metrics ``<name>_centered.*``); the suite's embeddings are encoded once."""
    out = [evaluate_suite(suite, encoder, index=index, cache_dir=cache_dir, depth=depth)]
    if centering is not None and isinstance(suite, LareqaSuite):
        means = language_means(encoder, centering, suite.languages, cache_dir)
        base = evaluate_lareqa(suite, encoder, index=index, cache_dir=cache_dir, depth=depth, centering=means)
        out.append(replace(base, suite=f"{suite.name}{CENTERED}"))
    return out
