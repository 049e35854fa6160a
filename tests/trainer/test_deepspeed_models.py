"""Large-encoder input paths on tiny random twins (no hub): a decoder LLM used as an encoder (Qwen2-style:
EOS appended, left padding, last-token pooling) and an XLM-R-style encoder (mean pooling, right padding).
Their ZeRO-3 training step is checked against one process in test_deepspeed.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.trainer.test_deepspeed import POOLING, build, tiny_model_dir
from xling.api.spec.training import ModelSpec
from xling.trainer.model import Tokenize, train_tiny_tokenizer

WORDS = ["the", "cat", "sat", "on", "a", "mat", "while", "dogs", "ran", "far", "away"]
EOS = "<|endoftext|>"


def decoder_tokenizer() -> object:
    """Qwen-style: word-level, no post-processor (no EOS added), an EOS token and no pad token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<pad-unused>": 1, EOS: 2} | {w: i + 3 for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, unk_token="<unk>")


def spec(pooling: str, max_len: int = 8) -> ModelSpec:
    return ModelSpec(name="twin", pooling=pooling, query_prefix="", max_query_length=max_len)


def test_decoder_inputs_end_in_eos_and_pad_left_even_when_truncated() -> None:
    tokenize = Tokenize(decoder_tokenizer(), spec("last_token", max_len=6))
    out = tokenize(["the cat", "the cat sat on a mat while dogs ran"], "query")
    ids, mask = out["input_ids"], out["attention_mask"]
    assert ids.shape == (2, 6)
    assert ids[:, -1].tolist() == [2, 2], "EOS is the last token of every row, the truncated one too"
    assert mask[0].tolist() == [0, 0, 0, 1, 1, 1], "padding on the left"
    assert mask[1].tolist() == [1] * 6


def _alone_vs_padded(model: torch.nn.Module, tokenize: Tokenize, short: str, long: str) -> None:
    model.eval()
    with torch.no_grad():
        padded = model(**tokenize([short, long], "query"))[0]
        alone = model(**tokenize([short], "query"))[0]
    torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-5)


def test_decoder_twin_embedding_ignores_left_padding(tmp_path: Path) -> None:
    """The last-token embedding of a text is the same alone or left-padded in a batch (RoPE is relative)."""
    model = build(tiny_model_dir(tmp_path / "qwen2", "qwen2"), POOLING["qwen2"])()
    _alone_vs_padded(
        model, Tokenize(decoder_tokenizer(), spec("last_token")), "cat sat", "the cat sat on a mat"
    )


@pytest.mark.parametrize("kind", ["xlmr", "bert"])
def test_encoder_twin_embedding_ignores_right_padding(tmp_path: Path, kind: str) -> None:
    tok = train_tiny_tokenizer([" ".join(WORDS)] * 20, vocab_size=60)
    model = build(tiny_model_dir(tmp_path / kind, kind), POOLING[kind])()
    _alone_vs_padded(model, Tokenize(tok, spec(POOLING[kind])), "cat sat", "the cat sat on a mat")
