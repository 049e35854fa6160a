"""``xling eval``: evaluate a model on one suite from the command line.

Registered by the main CLI through :func:`add_cli`; heavy imports happen inside the handler so that
``xling --help`` stays fast.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, get_args

from xling.api.contracts import EMBEDDING_CACHE_DEFAULT, embedding_cache_dir
from xling.api.errors import InputError, Problem, command
from xling.api.spec.base import CandidateContext, IndexKind, Pooling, SuiteName
from xling.api.spec.training import CenteringSpec, EvalSuite, EvaluationSpec, ModelSpec

if TYPE_CHECKING:
    from pydantic_core import ErrorDetails

    from xling.trainer.evaluation.protocol import TextEncoder
    from xling.trainer.evaluation.results import SuiteResults

#: The bundled (gzipped) copies in the source checkout, so that `xling eval` needs no --data on a fresh clone,
#: from any working directory.
_DEMO = Path(__file__).resolve().parents[2] / "data" / "demo"
DEFAULT_DATA = {"xquad-r": str(_DEMO / "xquad-r"), "ntrex-r": str(_DEMO / "ntrex-128"),
                "mlqa-holdout": str(_DEMO / "mlqa-test-gxlt")}  # fmt: skip


#: Encoding flags and their defaults for plain Hugging Face models: the spec's model defaults.
ENCODING_FLAGS = {
    "pooling": ModelSpec.model_fields["pooling"].default,
    "query_prefix": ModelSpec.model_fields["query_prefix"].default,
    "passage_prefix": ModelSpec.model_fields["passage_prefix"].default,
    "max_length": ModelSpec.model_fields["max_passage_length"].default,
}


def _languages(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def add_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``eval`` subcommand; its handler is stored as ``func`` and returns an exit code."""
    p = subparsers.add_parser(
        "eval",
        help="evaluate a model on XQuAD-R, MLQA-R, NTREX-R, the MLQA hold-out or MIRACL",
        description="Zero-shot or checkpoint evaluation: mono, cross and multilingual mAP, language bias, "
        "MIRACL nDCG@10 / Recall@100. Prints a table; optionally writes JSON, TREC files and MLflow.",
    )
    p.add_argument("--model", required=True, metavar="PATH_OR_NAME",
                   help="a sentence-transformers directory (xling's exported model/, or any, local or hub "
                   "name), a Hugging Face model path or name, or a built-in name")  # fmt: skip
    enc = p.add_argument_group(
        "encoding (plain Hugging Face models)",
        "A sentence-transformers model brings its own pooling, normalisation, prompts and lengths, and they win "
        "over these flags (which are then ignored, with a note). For any other model they apply, with the "
        "defaults shown.",
    )
    enc.add_argument("--pooling", choices=get_args(Pooling), help=f"default: {ENCODING_FLAGS['pooling']}")
    enc.add_argument("--query-prefix", help=f"default: {ENCODING_FLAGS['query_prefix']!r}")
    enc.add_argument("--passage-prefix", help=f"default: {ENCODING_FLAGS['passage_prefix']!r}")
    enc.add_argument(
        "--max-length",
        type=int,
        metavar="N",
        help=f"tokens, queries and passages (default: {ENCODING_FLAGS['max_length']})",
    )
    p.add_argument("--suite", required=True, choices=get_args(SuiteName))
    p.add_argument(
        "--data", metavar="DIR", help="suite directory (default for xquad-r: the bundled data/demo/xquad-r)"
    )
    p.add_argument("--languages", type=_languages, metavar="ar,de,...", help="only these languages")
    p.add_argument("--max-queries", type=int, metavar="N", help="first N queries per language")
    p.add_argument("--max-paragraphs", type=int, metavar="N",
                   help="first N paragraphs (MIRACL: passages; ntrex-r: lines)")  # fmt: skip
    p.add_argument("--first-line", type=int, default=0, metavar="N",
                   help="ntrex-r: 0-based first NTREX-128 line (default 0)")  # fmt: skip
    p.add_argument("--hold-out", type=float, metavar="FRACTION",
                   help="mlqa-holdout: the training source's holdOut.fraction (the split to score)")  # fmt: skip
    p.add_argument("--hold-out-seed", type=int, default=0, metavar="N",
                   help="mlqa-holdout: the training source's holdOut.seed (default 0)")  # fmt: skip
    p.add_argument(
        "--candidate-context",
        choices=get_args(CandidateContext),
        default=EvalSuite.model_fields["candidate_context"].default,
    )
    p.add_argument(
        "--index", choices=get_args(IndexKind), default=EvaluationSpec.model_fields["index"].default
    )
    p.add_argument("--depth", type=int, default=100, help="length of the top-k lists written to --run-file")
    p.add_argument(
        "--cache-dir",
        help=f"embedding cache ('' disables it; default: {EMBEDDING_CACHE_DEFAULT}, as for xling run)",
    )
    p.add_argument(
        "--centering-data",
        metavar="DIR",
        help="also evaluate the language-mean centering baseline (LAReQA suites), means from this NTREX-128 "
        "directory (e.g. data/demo/ntrex-128)",
    )
    p.add_argument(
        "--centering-sentences",
        type=int,
        default=CenteringSpec.model_fields["sentences"].default,
        metavar="N",
        help="NTREX-128 lines per language for the means (default: %(default)s)",
    )
    p.add_argument("--out", metavar="results.json", help="write every number as JSON (the baseline: "
                   "results-centered.json beside it)")  # fmt: skip
    p.add_argument("--run-file", metavar="run.trec", help="TREC run (query ids <lang>:<question id>)")
    p.add_argument("--qrels-file", metavar="qrels.trec", help="TREC qrels for --run-file")
    p.add_argument("--tracking-uri", help="also log to this MLflow tracking URI")
    p.add_argument("--experiment", default="xling-eval", help="MLflow experiment (with --tracking-uri)")
    p.set_defaults(func=run_eval)
    return p


def _log_mlflow(args: argparse.Namespace, results: SuiteResults, baseline: list[SuiteResults]) -> str:
    import mlflow

    from xling.trainer.evaluation.report import log_to_mlflow

    client = mlflow.MlflowClient(tracking_uri=args.tracking_uri)
    experiment = client.get_experiment_by_name(args.experiment)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(args.experiment)
    run = client.create_run(experiment_id, run_name=f"eval-{Path(args.model).name}-{args.suite}")
    for key in (
        "model",
        "suite",
        "data",
        "languages",
        "max_queries",
        "max_paragraphs",
        "candidate_context",
        "index",
    ):
        value = getattr(args, key)
        client.log_param(run.info.run_id, key, ",".join(value) if isinstance(value, list) else value)
    for logged in (results, *baseline):
        log_to_mlflow(logged, client, run.info.run_id, step=0)
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def _encoder(args: argparse.Namespace) -> TextEncoder:
    """A sentence-transformers model encodes as its directory says; any other as the flags say."""
    from xling.trainer.sentence_transformers_dir import read_sentence_transformers, sentence_transformers_dir

    directory = sentence_transformers_dir(args.model)
    if directory is None:
        from xling.trainer.model import load_text_encoder

        flags = {
            k: default if getattr(args, k) is None else getattr(args, k)
            for k, default in ENCODING_FLAGS.items()
        }
        return load_text_encoder(args.model, **flags)
    backbone, model_spec = read_sentence_transformers(directory)
    if ignored := [f"--{k.replace('_', '-')}" for k in ENCODING_FLAGS if getattr(args, k) is not None]:
        print(f"xling eval: ignoring {', '.join(ignored)}: {args.model} is a sentence-transformers model and "
              "its own settings win", file=sys.stderr)  # fmt: skip
    print(f"sentence-transformers model: pooling {model_spec.pooling}, normalize {model_spec.normalize}, prompts "
          f"{model_spec.query_prefix!r} / {model_spec.passage_prefix!r}, max length {model_spec.max_query_length} / {model_spec.max_passage_length}")  # fmt: skip
    from xling.trainer.model import encoder_for

    return encoder_for(backbone, model_spec)


def _suite_spec(args: argparse.Namespace) -> EvalSuite:
    """The flags as the spec's evaluation suite; a value it rejects is reported at its flag."""
    from pydantic import ValidationError

    data = args.data or DEFAULT_DATA.get(args.suite)
    if data is None:
        raise InputError("xling eval", f"--data DIR is required for --suite {args.suite}")
    try:
        return EvalSuite(
            name=args.suite,
            path=data,
            languages=args.languages,
            max_queries=args.max_queries,
            max_paragraphs=args.max_paragraphs,
            candidate_context=args.candidate_context,
            first_line=args.first_line,
            hold_out=None
            if args.hold_out is None
            else {"fraction": args.hold_out, "seed": args.hold_out_seed},
        )
    except ValidationError as err:
        raise InputError("xling eval", "invalid flags", problems=map(_flag_problem, err.errors())) from None


def _flag_problem(error: ErrorDetails) -> Problem:
    """A rejected value at its flag. A check across fields has no ``loc``: it names its field in the spec's
    spelling (``maxParagraphs``), whose flag is the same words (``--max-paragraphs``)."""
    cause = error.get("ctx", {}).get("error")
    if not error["loc"] and isinstance(cause, InputError):
        problem = cause.problems[0]
        return Problem(
            problem.message, "--" + re.sub(r"(?<=[a-z])(?=[A-Z])", "-", problem.field or "").lower()
        )
    return Problem(error["msg"], "--" + str(error["loc"][0]).replace("_", "-"))


@command
def run_eval(args: argparse.Namespace) -> int:
    """Load the suite (fail fast on bad data), then the model; evaluate, print, write what was asked."""
    from xling.trainer.evaluation.api import evaluate_with_centering, load_suite
    from xling.trainer.evaluation.report import format_table, write_results_json
    from xling.trainer.evaluation.trec import write_qrels, write_run

    suite = load_suite(_suite_spec(args))
    centering = _centering_spec(args)
    encoder = _encoder(args)
    cache = None if args.cache_dir == "" else embedding_cache_dir(args.cache_dir)
    results, *baseline = evaluate_with_centering(
        suite, encoder, centering, index=args.index, cache_dir=cache, depth=args.depth
    )
    print(format_table(results))
    print(f"encode {results.timings['encode_s']:.1f} s, score {results.timings['score_s']:.1f} s")
    for base in baseline:
        print(f"\nlanguage-mean centering baseline (means: {base.fingerprints['centering']})")
        print(format_table(base))
    if args.out:
        write_results_json(results, args.out)
        for base in baseline:
            out = Path(args.out)
            write_results_json(base, out.with_name(f"{out.stem}-centered{out.suffix}"))
    if args.run_file:
        write_run(results.ranked, args.run_file)
    if args.qrels_file:
        write_qrels(results.ranked, args.qrels_file)
    if args.tracking_uri:
        print(f"logged to MLflow run {_log_mlflow(args, results, baseline)}")
    return 0


def _centering_spec(args: argparse.Namespace) -> CenteringSpec | None:
    """--centering-data and --centering-sentences as the spec's section; refused for MIRACL at its flag."""
    if args.centering_data is None:
        return None
    if args.suite == "miracl":
        raise InputError(
            "xling eval", "--centering-data: centering is a baseline for the pooled LAReQA suites"
        )
    if args.centering_sentences < 1:
        raise InputError(
            "xling eval", f"--centering-sentences: must be at least 1, got {args.centering_sentences}"
        )
    return CenteringSpec(path=args.centering_data, sentences=args.centering_sentences)
