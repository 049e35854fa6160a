"""Who may reach what (issue 22): tracking allow-lists that fail closed, the operator's metrics after a restart,
deletion without a finalizer, image-pull errors as a reason."""

from __future__ import annotations

from pathlib import Path

import yaml

from tests.support.k8s_emulator import experiment
from xling.operator import conditions as cnd
from xling.operator import manifests as mf
from xling.operator.checks import cluster_problems
from xling.operator.defaults import Platform


def _platform(tmp_path: Path, doc: dict) -> Platform:
    path = tmp_path / "defaults.yaml"
    path.write_text(yaml.safe_dump(doc))
    return Platform.load(path)


def test_an_empty_tracking_allow_list_allows_no_host(tmp_path: Path) -> None:
    exp = mf.validate(experiment(tracking={"trackingUri": "http://collector.example:5000"}))
    for closed in ({"allowedTrackingHosts": []}, {}):  # the kustomize base's default, and no key at all
        ((reason, message),) = cluster_problems(exp, _platform(tmp_path, closed))
        assert reason == "TrackingHostNotAllowed" and "none: the list is empty" in message
    assert not cluster_problems(exp, _platform(tmp_path, {"allowedTrackingHosts": ["collector.example"]}))
    assert not cluster_problems(exp, _platform(tmp_path, {"allowedTrackingHosts": ["*"]}))  # explicit opt-out
    assert not cluster_problems(exp, Platform())  # no defaults file at all (xling render, tests)
    local = mf.validate(experiment(tracking={"trackingUri": "sqlite:///mlflow.db"}))
    assert not cluster_problems(local, _platform(tmp_path, {}))


def test_a_submitter_that_cannot_pull_its_image_leaves_the_cluster_ready_but_not_running() -> None:
    pods = [
        {
            "metadata": {"name": "exp-x7k2p"},
            "status": {
                "containerStatuses": [
                    {"name": "ray-job-submitter", "state": {"waiting": {"reason": "ErrImagePull"}}}
                ]
            },
        },
        {
            "metadata": {"name": "exp-head"},
            "status": {"containerStatuses": [{"name": "ray-head", "state": {"running": {}}}]},
        },
    ]
    failure = cnd.image_pull_failure(pods)
    assert failure == "pod exp-x7k2p, container ray-job-submitter: ErrImagePull"
    conds = {c.type: c for c in cnd.from_rayjob({"jobDeploymentStatus": "Running"}, failure)}
    assert (conds["ClusterReady"].status, conds["ClusterReady"].reason) == ("True", "ClusterReady")
    assert (conds["Running"].status, conds["Running"].reason, conds["Running"].warning) == (
        "False",
        "ImagePullFailed",
        True,
    )
    starting = {c.type: c for c in cnd.from_rayjob({"jobDeploymentStatus": "Initializing"}, failure)}
    assert (starting["ClusterReady"].status, starting["ClusterReady"].reason) == ("False", "ImagePullFailed")
