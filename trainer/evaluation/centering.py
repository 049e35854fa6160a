"""Language-mean centering: the baseline without training that a trained arm must beat.

A multilingual encoder puts each language's texts around their own offset; part of its language bias on
a pooled index is that offset. Subtracting each language's mean embedding (separately for queries and
passages: their prefixes move the mean too) and re-normalising removes it without any training. The
means come from unlabelled NTREX-128 sentences (the same source lines in every language), which are
neither training data of the research pools nor test data of XQuAD-R or MLQA-R.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xling.api.spec.training import CenteringSpec
from xling.trainer.evaluation.cache import encode_cached
from xling.trainer.evaluation.errors import EvalDataError
from xling.trainer.evaluation.protocol import Kind, TextEncoder

KINDS: tuple[Kind, ...] = ("query", "passage")
#: The baseline's suite name is the suite's plus this (metrics: ``xquad_r_centered.*``).
CENTERED = "-centered"


@dataclass(frozen=True)
class LanguageMeans:
    """Each (language, kind)'s mean embedding, and where it came from (shown beside every centered row)."""

    path: str
    source: str
    means: dict[tuple[str, Kind], np.ndarray]

    def center(self, embeddings: np.ndarray, language: str, kind: Kind) -> np.ndarray:
        """Rows minus the language's mean, re-normalised (a row equal to the mean stays zero)."""
        if (language, kind) not in self.means:
            languages = sorted({lang for lang, _ in self.means})
            raise EvalDataError(
                self.path, f"evaluation.centering: no mean for {language!r} (has {languages})"
            )
        x = embeddings - self.means[(language, kind)]
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        return np.ascontiguousarray(x / np.where(norms > 0, norms, 1.0), dtype=np.float32)


def language_means(
    encoder: TextEncoder,
    centering: CenteringSpec,
    languages: Sequence[str],
    cache_dir: str | Path | None = None,
) -> LanguageMeans:
    """Encode ``centering.sentences`` NTREX-128 lines per language as queries and as passages (through the
    embedding cache: every trial of a sweep starts from the same weights); average each."""
    from xling.trainer.data.builders import ntrex_sentences

    lines = range(centering.first_line, centering.first_line + centering.sentences)
    try:
        texts = ntrex_sentences(centering.path, languages, lines)
    except (OSError, ValueError) as err:
        raise EvalDataError(Path(centering.path), f"evaluation.centering: {err}") from None
    means = {}
    for language, sentences in texts.items():
        for kind in KINDS:
            emb = encode_cached(encoder, sentences, kind, tag=f"centering.{language}", cache_dir=cache_dir)
            means[(language, kind)] = emb.mean(axis=0)
    source = f"{centering.path} lines {lines.start + 1}-{lines.stop} (NTREX-128, {centering.sentences} per language)"
    return LanguageMeans(centering.path, source, means)
