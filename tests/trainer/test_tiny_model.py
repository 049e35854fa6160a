"""The built-in tiny model (``xling/tiny-random``) on any script: its tokenizer is trained on the run's own
texts, and a Unigram vocabulary must hold every character it saw (Chinese alone has thousands)."""

from __future__ import annotations

from tests.support import ROOT
from xling.trainer.data.builders import mlqa_rows
from xling.trainer.model import bounded_alphabet, train_tiny_tokenizer


def test_the_tiny_tokenizer_trains_on_every_bundled_mlqa_language() -> None:
    """ar, de, es, hi, vi and zh questions and paragraphs of the bundled MLQA: 3,000 texts with more distinct
    characters than the 2,000-piece vocabulary ("The vocabulary is not large enough to contain all chars")."""
    pairs = [p for p, _ in mlqa_rows(ROOT / "data" / "demo" / "mlqa-test-gxlt")]
    texts = [t for p in pairs for t in (p.query, p.passage) if t][:3000]
    assert {p.language for p in pairs} == {"ar", "de", "es", "hi", "vi", "zh"}
    assert len(set("".join(texts))) > 2000
    tok = train_tiny_tokenizer(texts)
    for lang in ("zh", "hi", "ar"):
        text = next(p.query for p in pairs if p.language == lang and p.query)
        ids = tok(text)["input_ids"]
        assert sum(i == tok.unk_token_id for i in ids) < len(ids) / 2, (lang, tok.convert_ids_to_tokens(ids))


def test_a_small_alphabet_is_left_as_it_is() -> None:
    assert bounded_alphabet(["abc", "cab"], 3) == ["abc", "cab"]
    assert bounded_alphabet(["aab", "acc"], 2) == ["aa ", "acc"], "the rarest character goes"
