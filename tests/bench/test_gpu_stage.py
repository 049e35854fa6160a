"""bench/gpu_stage.py + bench/gpu.sh --stage under the device rules, on this machine: parts written, each
carried in its own "call" (a fresh checkout holding only bench/gpu.sh and that part: ignored files do not
survive between calls), taken in to a folder outside the checkout, reassembled there and checked."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from tests.support import ROOT, load_bench

gs = load_bench("gpu_stage")


def device_call(tmp: Path, outside: Path, carry: dict[str, bytes]) -> str:
    """One device call: a fresh checkout with bench/gpu.sh and the carried .gpu/stage files, a fake
    nvidia-smi, and --stage (take in, reassemble, nothing run). The checkout is gone afterwards."""
    checkout = tmp / "checkout"
    shutil.rmtree(checkout, ignore_errors=True)
    (checkout / "bench").mkdir(parents=True)
    shutil.copy(ROOT / "bench" / "gpu.sh", checkout / "bench" / "gpu.sh")
    (checkout / ".gpu" / "stage").mkdir(parents=True)
    for name, data in carry.items():
        (checkout / ".gpu" / "stage" / name).write_bytes(data)
    smi = tmp / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'Fake GPU'\n")
    smi.chmod(0o755)
    env = {**os.environ, "XLING_NVIDIA_SMI": str(smi), "XLING_GPU_DIR": str(outside)}
    proc = subprocess.run(["bash", str(checkout / "bench" / "gpu.sh"), "--stage"], capture_output=True,
                          text=True, timeout=60, env=env)  # fmt: skip
    shutil.rmtree(checkout)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_parts_carried_one_a_call_are_reassembled_outside_the_checkout(tmp_path: Path) -> None:
    files = {}
    for i, size in enumerate((150_000, 70_000, 5)):
        path = tmp_path / "src" / f"pkg{i}-1.0-py3-none-any.whl"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(os.urandom(size))
        files[path.name] = path
    stage = tmp_path / "repo" / ".gpu" / "stage"
    lines = gs.write_parts([(p, f"wheels/{n}") for n, p in files.items()], stage, part_bytes=64_000)
    parts = sorted(p.name for p in stage.glob("part-*"))
    assert len(parts) == len(lines) - 1 >= 4 and all((stage / p).stat().st_size <= 64_000 for p in parts)
    manifest = (stage / "MANIFEST").read_bytes()
    outside = tmp_path / "outside"

    # a part damaged in transit is refused; the others keep waiting for it
    bad = bytearray((stage / parts[0]).read_bytes())
    bad[0] ^= 1
    out = device_call(tmp_path, outside, {"MANIFEST": manifest, parts[0]: bytes(bad)})
    assert f"{parts[0]}: sha256 differs from the MANIFEST: not taken" in out
    for i, name in enumerate(parts):
        out = device_call(tmp_path, outside, {"MANIFEST": manifest, name: (stage / name).read_bytes()})
        assert f"took in {name}" in out
        if i < len(parts) - 1:
            assert "staged parts still missing: " + " ".join(parts[i + 1 :]) in out
    assert "the reassembled tar matches its sha256: unpacking" in out
    for name, path in files.items():
        assert (outside / "unpacked" / "wheels" / name).read_bytes() == path.read_bytes()
    # a later call that carries nothing finds everything still there, and unpacks nothing again
    out = device_call(tmp_path, outside, {})
    assert "unpacking" not in out and "missing" not in out
    assert (outside / "unpacked" / "MANIFEST").read_bytes() == manifest
