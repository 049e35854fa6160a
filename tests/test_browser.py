"""What people see: the sweep in MLflow's web UI, in a real headless Chromium.

Starts an MLflow server on loopback over the sweep-smoke store (the sweep from test_sweep_e2e, run here
if that module did not), then loads the experiment page, the parent run page with its metrics and plots,
and a trial's run page. Chromium is driven over the DevTools protocol on a pipe
(``--remote-debugging-pipe``): no webdriver, no websocket, nothing beyond Debian's ``chromium`` package.
Screenshots go to ``.cache/test-outputs/browser/`` (``XLING_TEST_OUTPUTS`` moves it).
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import ROOT
from tests.trainer.sweep.test_sweep_e2e import PLOTS, SmokeSweep, run_smoke_sweep
from xling.api.tags import DATA_FINGERPRINT, ROLE, ROLE_SWEEP

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
OUTPUTS = Path(os.environ.get("XLING_TEST_OUTPUTS", ROOT / ".cache" / "test-outputs")) / "browser"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None,
        reason="Chromium not installed: `apt-get install chromium` (Debian's package; .ci/run installs it)",
    ),
]


class Chromium:
    """Headless Chromium and one page, over the DevTools protocol (NUL-separated JSON on fds 3 and 4)."""

    def __init__(self, binary: str, profile: Path, width: int = 1400, height: int = 1000):
        # Above fd 9, so that moving them onto 3 and 4 in the child never overwrites one with the other.
        to_chrome, self._send_fd = (_above_9(fd) for fd in os.pipe())
        self._recv_fd, from_chrome = (_above_9(fd) for fd in os.pipe())

        def wire_fds() -> None:  # in the child, before exec: the protocol lives on fds 3 (in) and 4 (out)
            os.dup2(to_chrome, 3)
            os.dup2(from_chrome, 4)

        args = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--hide-scrollbars", "--remote-debugging-pipe", f"--user-data-dir={profile}",
                f"--window-size={width},{height}", "about:blank"]  # fmt: skip
        self.proc = subprocess.Popen(args, preexec_fn=wire_fds, close_fds=False,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        os.close(to_chrome)
        os.close(from_chrome)
        self._buffer = b""
        self._id = 0
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                  mobile=False, session=True)  # fmt: skip

    def call(self, method: str, session: bool = False, **params: Any) -> dict[str, Any]:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self._send_fd, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._receive()
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def _receive(self) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            if not select.select([self._recv_fd], [], [], 60)[0]:
                raise TimeoutError("Chromium did not answer within 60 s")
            chunk = os.read(self._recv_fd, 1 << 20)
            if not chunk:
                raise RuntimeError(f"Chromium exited (code {self.proc.poll()})")
            self._buffer += chunk
        raw, _, self._buffer = self._buffer.partition(b"\0")
        return json.loads(raw)

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, session=True)
        return result["result"].get("value")

    def goto(self, url: str, ready: str, timeout: float = 90) -> None:
        """Load ``url`` afresh (MLflow's app ignores some in-app route changes) and wait until the JavaScript
        expression ``ready`` is truthy (a React app renders late)."""
        self.call("Page.navigate", url="about:blank", session=True)
        self.call("Page.navigate", url=url, session=True)
        self.wait(ready, timeout, what=url)

    def wait(self, expression: str, timeout: float = 90, what: str = "") -> Any:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if value := self.evaluate(expression):
                return value
            time.sleep(0.5)
        text = self.evaluate("document.body ? document.body.innerText.slice(0, 2000) : ''")
        raise AssertionError(f"{what}: {expression} still false after {timeout:.0f}s; page text:\n{text}")

    def click(self, selector: str) -> None:
        """A real mouse click at the element's centre (some React handlers ignore element.click())."""
        x, y = self.wait(
            f"(e => e && (r => [r.x + r.width / 2, r.y + r.height / 2])(e.getBoundingClientRect()))"
            f"(document.querySelector({json.dumps(selector)}))",
            what=selector,
        )
        for kind in ("mousePressed", "mouseReleased"):
            self.call(
                "Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1, session=True
            )

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png", session=True)["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        os.close(self._send_fd)
        os.close(self._recv_fd)


def _above_9(fd: int) -> int:
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return moved


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> SmokeSweep:
    return run_smoke_sweep(tmp_path_factory.getbasetemp() / "sweep-smoke")


@pytest.fixture(scope="module")
def server(sweep: SmokeSweep) -> Iterator[str]:
    """``mlflow server`` on loopback over the sweep's store, in its own process group."""
    yield from _serve(sweep.uri, sweep.directory)


def _serve(uri: str, directory: Path) -> Iterator[str]:
    port = _free_port()
    log = open(directory / "mlflow-server.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", uri],
        cwd=directory, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                if urllib.request.urlopen(f"{url}/health", timeout=2).read() == b"OK":
                    break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise AssertionError((directory / "mlflow-server.log").read_text()[-3000:]) from None
                time.sleep(1)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chromium]:
    chrome = Chromium(CHROMIUM, tmp_path_factory.mktemp("chromium-profile"))
    yield chrome
    chrome.close()


def _runs(sweep: SmokeSweep) -> tuple[str, Any, list[Any]]:
    from mlflow import MlflowClient

    client = MlflowClient(sweep.uri)
    exp = client.get_experiment_by_name("sweep-smoke")
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.data.tags.get(ROLE) == ROLE_SWEEP)
    return exp.experiment_id, parent, [r for r in runs if r is not parent]


def shows(*texts: str) -> str:
    """A ready-expression: the page shows every one of ``texts``. The MLflow UI renders a page in parts
    (a run count before the grid rows, a parent's name after its own fetch), so wait for all of them."""
    return " && ".join(f"document.body.innerText.includes({json.dumps(t)})" for t in texts)


def _png_size(path: Path) -> tuple[int, int]:
    return struct.unpack(">II", path.read_bytes()[16:24])


def test_experiment_page_lists_the_parent_and_its_nested_trials(
    server: str, browser: Chromium, sweep: SmokeSweep
) -> None:
    exp_id, parent, children = _runs(sweep)
    # "0 matching runs" while the runs load, then one parent and four trials.
    browser.goto(f"{server}/#/experiments/{exp_id}/runs", shows("5 matching runs", parent.info.run_name))
    # The trials are nested under the parent: expand it.
    browser.click('[role="gridcell"][col-id*="Run Name"] button')
    names = [c.info.run_name for c in children]
    browser.wait(shows(*names), what="nested runs")
    browser.screenshot(OUTPUTS / "experiment.png")
    assert sorted(names) == [
        "alpha=0.25 seed=0",
        "alpha=0.25 seed=1",
        "alpha=0.75 seed=0",
        "alpha=0.75 seed=1",
    ]


def test_parent_run_page_shows_the_summary_metrics_and_plots(
    server: str, browser: Chromium, sweep: SmokeSweep
) -> None:
    exp_id, parent, _ = _runs(sweep)
    run_url = f"{server}/#/experiments/{exp_id}/runs/{parent.info.run_id}"
    browser.goto(
        run_url, shows("best/xquad_r/multi/map", "best/xquad_r/bias/rank_distance", "sweep/trials_finished")
    )
    browser.screenshot(OUTPUTS / "parent-run.png")
    local = Path(parent.info.artifact_uri.removeprefix("file://")) / "summary"
    for plot in PLOTS:
        selector = json.dumps(f'img[alt="summary/{plot}"]')
        browser.goto(f"{run_url}/artifacts/summary/{plot}",
                     f"(i => i && i.complete && i.naturalWidth > 0)(document.querySelector({selector}))")  # fmt: skip
        shown = browser.evaluate(
            f"(i => [i.naturalWidth, i.naturalHeight])(document.querySelector({selector}))"
        )
        assert tuple(shown) == _png_size(local / plot), f"{plot}: the UI shows the logged image"
        browser.screenshot(OUTPUTS / f"parent-{plot}")
    browser.goto(
        f"{run_url}/artifacts/summary/summary.md", shows("Points: mean", "Paired bootstrap over paragraphs")
    )
    browser.screenshot(OUTPUTS / "parent-summary-md.png")


def test_trial_run_page_shows_metrics_params_and_system_metrics(
    server: str, browser: Chromium, sweep: SmokeSweep
) -> None:
    exp_id, parent, children = _runs(sweep)
    child = min(children, key=lambda r: r.info.run_name)
    # the metrics, params, system metrics, and the parent run's name (linked from the page)
    ready = shows("xquad_r/multi/map", "sampling.alpha", "cpu_utilization_percentage", parent.info.run_name)
    browser.goto(f"{server}/#/experiments/{exp_id}/runs/{child.info.run_id}", ready)
    browser.screenshot(OUTPUTS / "trial-run.png")


def test_best_trial_run_page_shows_its_model_datasets_and_source(
    server: str, browser: Chromium, sweep: SmokeSweep
) -> None:
    """MLflow's own fields, filled: the logged (and, for the best trial, registered) model, the training and
    evaluation datasets, the source."""
    from mlflow import MlflowClient

    exp_id, _, children = _runs(sweep)
    [version] = MlflowClient(sweep.uri).search_model_versions("name = 'sweep-smoke'")
    best = next(c for c in children if c.info.run_id == version.run_id)
    fingerprint = best.data.tags[DATA_FINGERPRINT]
    ready = shows(
        "Logged models (1)", "sweep-smoke\nv1", f"training-pairs ({fingerprint})", "xling run sweep-smoke"
    )
    browser.goto(f"{server}/#/experiments/{exp_id}/runs/{best.info.run_id}", ready)
    browser.screenshot(OUTPUTS / "best-trial-run.png")


@pytest.fixture(scope="module")
def single_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, str]]:
    """A finished single run as ``xling run`` leaves it (zero-shot at step 0, trained at step 8, the
    description from ``curate_run``), served: (server URL, experiment id, run id)."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from xling.trainer.headline import describe
    from xling.trainer.tracking import start_run

    directory = tmp_path_factory.mktemp("single-run")
    uri = f"sqlite:///{directory}/mlflow.db"
    run_id = start_run(uri, "smoke", "smoke", {"sampling.strategy": "hybrid"}, {})
    client = MlflowClient(uri)
    client.log_batch(run_id, metrics=[Metric(k, v, 0, step) for k, pair in
                                      {"xquad_r/multi/map": (0.2148, 0.2215), "xquad_r/mono/map": (0.4, 0.42)}.items()
                                      for step, v in zip((0, 8), pair, strict=True)])  # fmt: skip
    describe(client, run_id, "smoke: xling/tiny-random, hybrid batches (alpha 0.5)")
    client.set_terminated(run_id, "FINISHED")
    for url in _serve(uri, directory):
        yield url, client.get_run(run_id).info.experiment_id, run_id


def test_single_run_page_shows_the_headline_at_the_top(
    single_run: tuple[str, str, str], browser: Chromium
) -> None:
    """The description (``mlflow.note.content``) heads the run page: the headline, then the before/after
    table, above the metrics."""
    url, exp_id, run_id = single_run
    headline = "xquad_r multilingual pool mAP 0.2148 → 0.2215 (+0.0067) from zero-shot to trained"
    browser.goto(f"{url}/#/experiments/{exp_id}/runs/{run_id}", shows(headline, "xquad_r/multi/map"))
    browser.screenshot(OUTPUTS / "single-run.png")
    top = """(t => {
        const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
        let node; while ((node = walker.nextNode())) if (node.textContent.includes(t)) {
            const range = document.createRange(); range.selectNodeContents(node);
            return range.getBoundingClientRect().top; }
        return null; })"""
    headline_top = browser.evaluate(f"{top}({json.dumps(headline)})")
    metrics_top = browser.evaluate(f"{top}('xquad_r/multi/map')")
    assert headline_top is not None and metrics_top is not None and headline_top < metrics_top
