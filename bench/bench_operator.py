"""Operator throughput: apply N RetrievalExperiments to the API emulator, time until every one has its RayJob
and a Validated condition, and report the operator process's peak memory (VmHWM).

    .venv/bin/python bench/bench_operator.py [--count 500] [--concurrency 20]

The emulator (tests/support/k8s_emulator.py) and the operator (python -m xling.operator) run as separate processes,
so the memory figure is the operator's alone. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))  # last: the repository's operator/ folder must not shadow the stdlib's operator

from tests.support.k8s_emulator import experiment, kubeconfig  # noqa: E402
from xling.operator.conditions import ConditionType  # noqa: E402
from xling.operator.crd import GROUP, PLURAL, VERSION  # noqa: E402

EXPERIMENTS = f"/apis/{GROUP}/{VERSION}/namespaces/default/{PLURAL}"
RAYJOBS = "/apis/ray.io/v1/namespaces/default/rayjobs"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _memory_kib(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            fields[key] = int(value.split()[0])
    return fields


async def _wait_http(session: aiohttp.ClientSession, url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            async with session.get(url) as resp:
                if resp.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.2)
    raise TimeoutError(url)


async def _done(session: aiohttp.ClientSession, base: str, count: int) -> tuple[int, int]:
    async with session.get(base + RAYJOBS) as resp:
        jobs = len((await resp.json())["items"])
    async with session.get(base + EXPERIMENTS) as resp:
        items = (await resp.json())["items"]
    validated = sum(
        any(c.get("type") == ConditionType.VALIDATED for c in (i.get("status") or {}).get("conditions", []))
        for i in items
    )
    return jobs, validated


async def bench(count: int, concurrency: int) -> dict[str, object]:
    tmp = Path(tempfile.mkdtemp(prefix="xling-bench-"))
    emulator = subprocess.Popen(
        [sys.executable, "-m", "tests.support.k8s_emulator", str(_free_port())],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    base = emulator.stdout.readline().strip()
    probe = f"http://127.0.0.1:{_free_port()}/healthz"
    env = {
        **os.environ,
        "KUBECONFIG": str(kubeconfig(base, tmp / "kubeconfig")),
        "XLING_WATCHDOG_INTERVAL": "3600",
    }
    with (tmp / "operator.log").open("w") as log:
        op = subprocess.Popen(
            [sys.executable, "-m", "xling.operator", "--liveness", probe, "--log-format", "plain"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            await _wait_http(session, probe)
            await asyncio.sleep(2)  # let the watches settle before objects arrive
            idle = _memory_kib(op.pid)
            gate = asyncio.Semaphore(concurrency)

            async def apply(i: int) -> None:
                async with gate, session.post(base + EXPERIMENTS, json=experiment(f"bench-{i:04d}")) as resp:
                    assert resp.status == 201, await resp.text()

            start = time.monotonic()
            await asyncio.gather(*(apply(i) for i in range(count)))
            applied = time.monotonic() - start
            while (progress := await _done(session, base, count)) != (count, count):
                if time.monotonic() - start > 600:
                    raise TimeoutError(f"only {progress} of {count} after 600 s")
                await asyncio.sleep(1.0)  # listing 1000 objects loads the emulator: poll gently
            elapsed = time.monotonic() - start
            memory = _memory_kib(op.pid)
    finally:
        op.terminate()
        op.wait(30)
        emulator.terminate()
        emulator.wait(30)
    return {
        "experiments": count,
        "apply_s": round(applied, 2),
        "all_rayjobs_and_validated_s": round(elapsed, 2),
        "per_experiment_ms": round(1000 * elapsed / count, 1),
        "operator_rss_idle_mib": round(idle["VmRSS"] / 1024, 1),
        "operator_peak_rss_mib": round(memory["VmHWM"] / 1024, 1),
        "cpus": os.cpu_count(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=500)
    p.add_argument("--concurrency", type=int, default=20)
    args = p.parse_args()
    print(json.dumps(asyncio.run(bench(args.count, args.concurrency))))


if __name__ == "__main__":
    main()
