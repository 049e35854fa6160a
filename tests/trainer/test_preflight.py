"""``xling run --check`` on broken experiment files, as a new user writes them: each is refused (exit 2) with a
first line that names the field (or file and line), never a traceback; the smoke sample passes.

Each case is ``(id, how the smoke sample is broken, exit code, pattern of the message's first line after the
file name)``. A case is a function of the spec document and the scratch directory (the spec file's folder)."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import ROOT
from xling.trainer.cli import main

DEMO = ROOT / "data" / "demo"
SMOKE = yaml.safe_load((ROOT / "manifests" / "samples" / "smoke.yaml").read_text())

Doc = dict[str, Any]


def _set(path: str, value: Any) -> Callable[[Doc, Path], None]:
    """A case that sets one dotted path of the document (list items by number)."""

    def apply(doc: Doc, _: Path) -> None:
        *parents, leaf = [int(p) if p.isdigit() else p for p in path.split(".")]
        node = doc
        for key in parents:
            node = node[key]
        node[leaf] = value

    return apply


def _pairs(rows: list[str], **source: Any) -> Callable[[Doc, Path], None]:
    """A case training on a JSONL file with ``rows`` (written beside the spec)."""

    def apply(doc: Doc, folder: Path) -> None:
        (folder / "pairs.jsonl").write_text("".join(r + "\n" for r in rows))
        doc["spec"]["data"]["sources"] = [{"type": "pairs", "path": "pairs.jsonl", **source}]

    return apply


def _row(pid: str, lang: str) -> str:
    return json.dumps(
        {"pair_id": pid, "language": lang, "query": f"q {pid} {lang}", "passage": f"p {pid} {lang}"}
    )


def _sweep(metric: str) -> Callable[[Doc, Path], None]:
    return _set("spec.sweep", {"parameters": {"sampling.alpha": {"grid": [0.25, 0.75]}}, "metric": metric})


def _raw(text: str) -> Callable[[Doc, Path], None]:
    """A case whose whole file is ``text`` (the document is ignored)."""

    def apply(doc: Doc, _: Path) -> None:
        doc.clear()
        doc["__raw__"] = text

    return apply


def _eval_copy(langs: list[str]) -> Callable[[Doc, Path], None]:
    """XQuAD-R with only ``langs``' files, evaluated in the smoke's four languages."""

    def apply(doc: Doc, folder: Path) -> None:
        (folder / "xq").mkdir()
        for lang in langs:
            (folder / "xq" / f"{lang}.json.gz").symlink_to(DEMO / "xquad-r" / f"{lang}.json.gz")
        doc["spec"]["evaluation"]["suites"][0]["path"] = "xq"

    return apply


CASES: list[tuple[str, Callable[[Doc, Path], None], int, str]] = [
    # --- what the spec alone refuses (these worked before the preflight)
    ("yaml-syntax", _raw("apiVersion: xling.io/v1alpha1\nspec: [unclosed\n"), 2, r"not valid YAML: expected ',' or '\]', but got '<stream end>' \(while parsing a flow sequence at line 2, column 7\)$"),
    ("empty-file", _raw(""), 2, r"empty file$"),
    ("wrong-kind", _set("kind", "Experiment"), 2, r"invalid RetrievalExperiment"),
    ("alpha-above-1", _set("spec.sampling.alpha", 1.5), 2, r"invalid RetrievalExperiment"),
    ("unknown-field", _set("spec.sampling.alfa", 0.5), 2, r"invalid RetrievalExperiment"),
    ("strategy-typo", _set("spec.sampling.strategy", "hybird"), 2, r"invalid RetrievalExperiment"),
    ("no-languages", _set("spec.data.languages", []), 2, r"invalid RetrievalExperiment"),
    ("xy-one-language", _set("spec.data.languages", ["en"]), 2, r"invalid RetrievalExperiment"),
    ("batch-not-divisible", _set("spec.distributed.numWorkers", 3), 2, r"invalid RetrievalExperiment"),
    ("warmup-too-long", _set("spec.optimization.warmupSteps", 100), 2, r"invalid RetrievalExperiment"),
    ("source-language-not-trained", _set("spec.data.sources.0.languages", ["fr"]), 2, r"invalid RetrievalExperiment"),
    ("suite-language-unknown", _set("spec.evaluation.suites.0.languages", ["fi"]), 2, r"invalid RetrievalExperiment"),
    ("bad-name", _set("metadata.name", "Smoke_Test"), 2, r"invalid RetrievalExperiment"),
    ("inline-credentials", _set("spec.tracking.trackingUri", "http://u:p@mlflow:5000"), 2, r"invalid RetrievalExperiment"),
    ("source-type", _set("spec.data.sources.0.type", "csv"), 2, r"invalid RetrievalExperiment"),
    ("sweep-metric-typo", _sweep("xquad.multi.map"), 2, r"invalid RetrievalExperiment"),
    # --- what only looking at the files, the data and the model finds
    ("unknown-code-qq", _set("spec.data.languages", ["ar", "de", "en", "qq"]), 2, r"invalid RetrievalExperiment"),
    ("language-absent-from-data", _set("spec.data.languages", ["ar", "de", "en", "fi"]), 2,
     r"spec\.data\.languages: fi: in none of the sources \(they have ar, de, en\)"),
    ("language-absent-from-mlqa", lambda d, f: d["spec"]["data"].update(
        languages=["de", "en"], sources=[{"type": "mlqa", "path": str(DEMO / "mlqa-test-gxlt")}]), 2,
     r"spec\.data\.languages: en: in none of the sources"),
    ("language-absent-from-pairs", _pairs([_row("1", "en"), _row("1", "de"), _row("2", "en")]), 2,
     r"spec\.data\.languages: ar, es: in none of the sources \(they have de, en\)"),
    ("relative-ntrex-missing", _set("spec.data.sources.0.path", "../data/ntrex-128"), 2,
     r"spec\.data\.sources\[0\]\.path: '\.\./data/ntrex-128' does not exist \(.*/data/ntrex-128, relative to the spec file\)"),
    ("eval-path-missing", _set("spec.evaluation.suites.0.path", "xquad-r"), 2,
     r"spec\.evaluation\.suites\[0\]\.path: 'xquad-r' does not exist"),
    ("eval-language-files-missing", _eval_copy(["ar", "de"]), 2,
     r"spec\.evaluation\.suites\[0\]\.languages: en, es not in .*xq \(it has ar, de\)"),
    ("alpha-with-xx", lambda d, f: d["spec"]["sampling"].update(strategy="xx", alpha=0.3), 2,
     r"spec\.sampling\.alpha: set, but strategy 'xx' ignores it"),
    ("temperature-without-size", _set("spec.sampling.languageTemperature", 2.0), 2,
     r"spec\.sampling\.languageTemperature: set, but only size weighting uses it"),
    ("malformed-jsonl", _pairs([_row("1", "en"), '{"pair_id": "2", "language": "en" "query": "q"}']), 2,
     r"spec\.data\.sources\[0\]: .*pairs\.jsonl:2:35: invalid JSON \(Expecting ',' delimiter\); rerun with --skip-bad-rows"),
    ("pairs-not-utf8", lambda d, f: (_pairs([])(d, f), (f / "pairs.jsonl").write_bytes(b'{"pair_id": "\xff"}\n')), 2,
     r"spec\.data\.sources\[0\]: .*pairs\.jsonl: cannot be read as jsonl: 'utf-8' codec can't decode byte 0xff"),
    ("model-not-offline", _set("spec.model.name", "intfloat/no-such-model"), 2,
     r"spec\.model\.name: 'intfloat/no-such-model' is not in the local Hugging Face cache and HF_HUB_OFFLINE is set"),
    ("model-dir-without-config", lambda d, f: ((f / "model").mkdir(), _set("spec.model.name", "./model")(d, f)), 2,
     r"spec\.model\.name: .*/exp/model has no config\.json \(not a Hugging Face model directory\)"),
    ("model-of-unknown-architecture", lambda d, f: ((f / "model").mkdir(), (f / "model" / "config.json").write_text(
        '{"model_type": "no-such-architecture"}'), _set("spec.model.name", "./model")(d, f)), 2,
     r"spec\.model\.name: '.*/exp/model' cannot be loaded: .*no-such-architecture"),
    ("unknown-built-in-model", _set("spec.model.name", "xling/tiny"), 2,
     r"spec\.model\.name: 'xling/tiny' is not a built-in model"),
]  # fmt: skip


def _write(case: Callable[[Doc, Path], None], folder: Path) -> Path:
    doc = copy.deepcopy(SMOKE)
    doc["spec"]["data"]["sources"][0]["path"] = str(DEMO / "ntrex-128")
    doc["spec"]["evaluation"]["suites"][0]["path"] = str(DEMO / "xquad-r")
    case(doc, folder)
    file = folder / "exp.yaml"
    file.write_text(doc["__raw__"] if "__raw__" in doc else yaml.safe_dump(doc))
    return file


@pytest.mark.parametrize("case,code,first", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_check_refuses_a_broken_file_in_one_line_naming_the_field(
    case: Callable[[Doc, Path], None], code: int, first: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tmp_path / "exp"
    folder.mkdir()
    file = _write(case, folder)
    assert main(["run", "--check", str(file)]) == code
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err
    line = out.err.splitlines()[0]
    assert re.match(rf"{re.escape(str(file))}(:\d+)?: {first}", line), line


def test_the_unknown_code_is_named_with_its_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``qq`` passed the code pattern: the spec now names it, at its field, with the codes it knows."""
    file = _write(_set("spec.data.languages", ["ar", "de", "en", "qq"]), tmp_path)
    assert main(["run", "--check", str(file)]) == 2
    assert "  spec.data.languages: unknown language code 'qq' (known: ar, bn, " in capsys.readouterr().err


@pytest.mark.parametrize(("sample", "name"), [("smoke", "smoke"), ("research", "research-e5-small-v2")])
def test_the_cpu_samples_pass_the_check(sample: str, name: str, capsys: pytest.CaptureFixture[str]) -> None:
    """research.yaml scores NTREX-128 and the MLQA hold-out, whose files are not ``<lang>.json``: the check
    refused it ("no <lang>.json or <lang>.json.gz files") before it read each suite by its own layout."""
    file = ROOT / "manifests" / "samples" / f"{sample}.yaml"
    assert main(["run", "--check", str(file)]) == 0, capsys.readouterr().err
    assert capsys.readouterr().out == f"{file}: ready to run RetrievalExperiment '{name}'\n"


NTREX_SLICE = {"name": "ntrex-r", "firstLine": 1000, "maxParagraphs": 50}


@pytest.mark.parametrize(
    ("suite", "message"),
    [({**NTREX_SLICE, "path": "xquad-r"}, "no NTREX-128 files newstest2019-ref.<code>.txt[.gz]"),
     ({**NTREX_SLICE, "path": "arabic-only", "languages": ["ar", "de"]}, "de not in"),
     ({"name": "xquad-r", "path": "ntrex-128"}, "no <lang>.json or <lang>.json.gz files")],
)  # fmt: skip
def test_each_suite_is_checked_by_its_own_layout(
    suite: dict, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    arabic_only = tmp_path / "arabic-only"  # an NTREX copy with one language's file
    arabic_only.mkdir()
    for name in ("DOCUMENT_IDS.tsv", "newstest2019-ref.arb.txt.gz"):
        (arabic_only / name).symlink_to(DEMO / "ntrex-128" / name)
    path = arabic_only if suite["path"] == "arabic-only" else DEMO / suite["path"]
    file = _write(_set("spec.evaluation.suites", [{**suite, "path": str(path)}]), tmp_path)
    assert main(["run", "--check", str(file)]) == 2
    assert message in capsys.readouterr().err


def test_an_unreachable_hub_is_said(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Online (no HF_HUB_OFFLINE) with a hub that does not answer: the check says so in one line at once,
    instead of the run's workers retrying for half a minute each."""
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    file = _write(_set("spec.model.name", "intfloat/no-such-model"), tmp_path)
    assert main(["run", "--check", str(file)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{file}: spec.model.name: 'intfloat/no-such-model' is not in the local Hugging Face "
                          "cache and the hub (127.0.0.1) is unreachable"), err  # fmt: skip


def test_a_language_left_without_rows_after_preparation_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """fr has rows, but only a query of a group of its own: the shared pool drops it. The run used to train on
    en and de without a word; preparation now names fr and the field."""
    monkeypatch.chdir(tmp_path)
    rows = [_row(str(i), lang) for i in range(40) for lang in ("en", "de")]
    rows.append(json.dumps({"pair_id": "x", "language": "fr", "query": "une question", "passage": None}))
    file = _write(_pairs(rows), tmp_path)
    doc = yaml.safe_load(file.read_text())
    doc["spec"]["data"]["languages"] = ["de", "en", "fr"]
    doc["spec"]["evaluation"] = {}
    file.write_text(yaml.safe_dump(doc))
    assert main(["data", "prepare", str(file)]) == 2
    err = capsys.readouterr().err
    assert "spec.data.languages: fr: no source has rows in this language (the data has de, en)" in err, err


def test_a_spec_written_out_by_the_operator_is_not_refused_for_its_defaults(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The RayJob's driver runs ``xling run`` on the operator's ConfigMap, where every default (alpha
    included) is written out: no field reads as set by the user there, so none is reported as ignored."""
    from xling.api.env import EXPERIMENT_UID_ENV
    from xling.api.spec.loading import parse_experiment
    from xling.operator.manifests import Owner, resolved_document

    file = _write(_set("spec.sampling.strategy", "xx"), tmp_path)
    exp = parse_experiment(yaml.safe_load(file.read_text()))
    file.write_text(yaml.safe_dump(resolved_document(exp, Owner("smoke", "ns", "uid-1"))))
    assert main(["run", "--check", str(file)]) == 2, "alpha, written out, reads as set in a user's file"
    assert "spec.sampling.alpha: set, but strategy 'xx' ignores it" in capsys.readouterr().err
    monkeypatch.setenv(EXPERIMENT_UID_ENV, "uid-1")
    assert main(["run", "--check", str(file)]) == 0
