"""What ``xling`` says about itself: ``--version``, a help text without reST markup that lists every
subcommand, and ``xling plan`` on a CPU spec in CPU terms."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml

from tests.support import ROOT
from xling.trainer.cli import build_parser, main


def test_version_is_the_projects(capsys: pytest.CaptureFixture[str]) -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out == f"xling {version}\n"


def test_help_is_plain_text_and_lists_every_subcommand() -> None:
    text = build_parser().format_help()
    assert "``" not in text and ":func:" not in text
    for command in ("run", "data", "mine", "eval", "render", "results", "plan", "export"):
        assert re.search(rf"^    {command} ", text, re.M), command


def test_plan_of_a_cpu_spec_speaks_of_cpu_workers(capsys: pytest.CaptureFixture[str]) -> None:
    """The smoke sample trains on one CPU worker: no "1 GPUs x 80 GiB", "0.00B params" or "step time 0.00 s"."""
    assert main(["plan", str(ROOT / "manifests" / "samples" / "smoke.yaml")]) == 0
    out = capsys.readouterr().out
    assert "on 1 CPU worker(s), " in out and "GiB of host memory each" in out
    assert "GPUs x" not in out and "0.00B" not in out and "0.00 s" not in out
    assert re.search(r"xling/tiny-random \(BertModel\): \d+(\.\d+)?k params", out), out


def test_render_takes_the_platform_defaults_configmap_the_docs_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--defaults manifests/operator/platform-defaults.yaml`` (a ConfigMap) was refused ("expected keys
    spec, ..."): the document in its data is what the operator mounts, so that is what render reads."""
    smoke = str(ROOT / "manifests" / "samples" / "smoke.yaml")
    shipped = ROOT / "manifests" / "operator" / "platform-defaults.yaml"
    assert main(["render", smoke, "--defaults", str(shipped)]) == 2  # it sets no storage: smoke has 2 pods
    assert "spec.storage: required" in capsys.readouterr().err
    configmap = yaml.safe_load(shipped.read_text())
    configmap["data"]["defaults.yaml"] = yaml.safe_dump(
        {"spec": {"storage": {"checkpointUri": "s3://ckpt/xling"}}}
    )
    (tmp_path / "defaults.yaml").write_text(yaml.safe_dump(configmap))
    assert main(["render", smoke, "--defaults", str(tmp_path / "defaults.yaml")]) == 0
    assert "s3://ckpt/xling/smoke" in capsys.readouterr().out


def test_caches_go_to_the_users_cache_directory_outside_the_checkout(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run from elsewhere, xling wrote its caches (models, embeddings) into the source checkout it was
    imported from; inside the checkout (``make demo``) they stay in its .cache."""
    from xling.api.contracts import default_cache_dir
    from xling.api.env import CACHE_ENV
    from xling.api.spec.loading import parse_experiment
    from xling.trainer.driver import local_env

    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.chdir(tmp_path)
    assert default_cache_dir() == tmp_path / "xdg" / "xling"
    smoke = parse_experiment(yaml.safe_load((ROOT / "manifests" / "samples" / "smoke.yaml").read_text()))
    assert local_env(smoke.spec)[CACHE_ENV] == str(tmp_path / "xdg" / "xling"), (
        "Ray workers are told, not left to guess"
    )
    monkeypatch.chdir(ROOT / "docs")
    assert default_cache_dir() == ROOT / ".cache"


def test_eval_finds_the_bundled_data_from_any_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from xling.trainer.evaluation.cli import _suite_spec

    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(["eval", "--model", "xling/tiny-random", "--suite", "xquad-r"])
    suite = _suite_spec(args)
    assert (Path(suite.path) / "en.json.gz").is_file(), suite.path


@pytest.mark.parametrize("bug", [ValueError("an invariant broke"), KeyError("model")])
def test_a_bug_in_a_command_keeps_its_traceback(
    bug: Exception, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Only user errors are printed as one line: a ValueError of a bug used to exit 2 with ``error: ...``
    and no traceback, which hid where it came from."""
    import xling.trainer.preflight

    def broken(*args: object, **kwargs: object) -> None:
        raise bug

    monkeypatch.setattr(xling.trainer.preflight, "check", broken)
    with pytest.raises(type(bug)):
        main(["run", "--check", str(ROOT / "manifests" / "samples" / "smoke.yaml")])
    assert "error:" not in capsys.readouterr().err


def test_a_user_error_is_still_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A refusal of the user's input (here a pair file of no known format) is an InputError: one line, exit 2."""
    import xling.trainer.preflight
    from xling.api.errors import EXIT_INPUT
    from xling.trainer.data.loaders import format_of

    monkeypatch.setattr(
        xling.trainer.preflight, "check", lambda *args, **kwargs: format_of(Path("pairs.txt"))
    )
    assert main(["run", "--check", str(ROOT / "manifests" / "samples" / "smoke.yaml")]) == EXIT_INPUT
    err = capsys.readouterr().err
    assert err.startswith("pairs.txt: unknown pair-file format;") and err.count("\n") == 1, err
