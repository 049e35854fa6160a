"""What ``xling`` says about itself: ``--version``, a help text without reST markup that lists every
subcommand, and ``xling plan`` on a CPU spec in CPU terms."""

from __future__ import annotations

import re
import tomllib

import pytest

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
    tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--defaults manifests/operator/platform-defaults.yaml`` (a ConfigMap) was refused ("expected keys
    spec, ..."): the document in its data is what the operator mounts, so that is what render reads."""
    import yaml

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
