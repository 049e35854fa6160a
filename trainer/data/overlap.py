"""The overlap guard: a training pair that shares a long n-gram with an evaluation text is dropped, with its
whole group, so no evaluation text is trained on in any translation (``data.dropEvalOverlap``)."""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Callable, Iterable

from xling.trainer.data.pairs import Pair, PairCorpus

#: Scripts without spaces between words -> (their characters, characters per word). Their overlap is measured
#: in character n-grams of ``n`` words' length: 2 characters per word for Chinese/Japanese, 4 for Thai (with
#: 2, everyday 20-character Thai phrases matched XQuAD-R in ~650 XNLI, NTREX and iapp pairs; with 4, none).
_UNSPACED_SCRIPTS = {
    "cjk": (re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uf900-\ufaff]"), 2),
    "thai": (re.compile(r"[\u0e00-\u0e7f]"), 4),
}
#: Languages written without spaces between words -> their script (``_UNSPACED_SCRIPTS``).
SCRIPT_OF = {"zh": "cjk", "ja": "cjk", "th": "thai"}


@functools.cache
def _separators() -> re.Pattern[str]:
    """Punctuation, symbols, spaces and controls (Unicode categories P, S, Z, C). Python's ``\\w`` would
    also split at the vowel signs of Devanagari and Thai, so the class is built from the categories."""
    ranges: list[list[int]] = []
    for code in range(0x10000):
        if unicodedata.category(chr(code))[0] in "PSZC":
            if ranges and ranges[-1][1] == code - 1:
                ranges[-1][1] = code
            else:
                ranges.append([code, code])
    return re.compile("[" + "".join(f"\\u{a:04x}-\\u{b:04x}" for a, b in ranges) + "]+")


def _tokens(text: str) -> list[str]:
    return _separators().sub(" ", text.lower()).split()


def _word_grams(tokens: list[str], n: int) -> set[int]:
    return {hash(tuple(tokens[i : i + n])) for i in range(len(tokens) - n + 1)}


def _char_grams(tokens: list[str], n: int) -> set[int]:
    chars = "".join(tokens)
    return {hash(chars[i : i + n]) for i in range(len(chars) - n + 1)}


def overlap_test(eval_texts: Iterable[str], n: int = 10) -> Callable[[Pair], bool]:
    """Whether a pair's query or passage shares a word ``n``-gram with an evaluation text (for zh/ja/th a
    character n-gram of ``n`` words' length, ignoring spaces and punctuation)."""
    words: set[int] = set()
    chars: dict[str, set[int]] = {script: set() for script in _UNSPACED_SCRIPTS}
    for text in eval_texts:
        tokens = _tokens(text)
        words |= _word_grams(tokens, n)
        for script, (pattern, per_word) in _UNSPACED_SCRIPTS.items():
            if pattern.search(text):
                chars[script] |= _char_grams(tokens, n * per_word)

    def overlaps(pair: Pair) -> bool:
        script = SCRIPT_OF.get(pair.language)
        for text in (t for t in (pair.query, pair.passage) if t is not None):
            tokens = _tokens(text)
            if script is None:
                grams, index = _word_grams(tokens, n), words
            else:
                grams, index = _char_grams(tokens, n * _UNSPACED_SCRIPTS[script][1]), chars[script]
            if not index.isdisjoint(grams):
                return True
        return False

    return overlaps


def drop_overlapping(corpus: PairCorpus, eval_texts: Iterable[str], n: int = 10) -> tuple[PairCorpus, int]:
    """Drop every group with a member that overlaps an evaluation text (:func:`overlap_test`), so no
    evaluation text is trained on, in any translation. Returns the filtered corpus and the groups dropped."""
    overlaps = overlap_test(eval_texts, n)
    kept = [g for g in corpus.groups if not any(overlaps(p) for p in g.values())]
    return PairCorpus(kept), len(corpus.groups) - len(kept)
