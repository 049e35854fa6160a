"""What the evaluator needs from a model: texts in, unit vectors out.

The evaluator never imports torch; ``xling.trainer.model`` implements this protocol (length-bucketed
batches, inference mode, bf16 on GPU). Tests use :class:`~xling.trainer.evaluation.hashing.HashingEncoder`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol, runtime_checkable

import numpy as np

Kind = Literal["query", "passage"]


@runtime_checkable
class TextEncoder(Protocol):
    """A dual encoder. ``fingerprint`` must change whenever the weights or the text handling change,
    because it keys the on-disk embedding cache."""

    fingerprint: str

    def encode(self, texts: Sequence[str], kind: Kind) -> np.ndarray:
        """Float32 rows, one per text, L2-normalised; prefixes and max lengths are the encoder's job."""
        ...


def checked_embeddings(emb: np.ndarray, n: int, what: str) -> np.ndarray:
    """Validate an encoder's output: a wrong shape or unnormalised rows would silently skew every metric."""
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    if emb.ndim != 2 or emb.shape[0] != n:
        raise ValueError(f"{what}: encoder returned shape {emb.shape}, expected ({n}, dim)")
    if not np.isfinite(emb).all():
        raise ValueError(f"{what}: encoder returned non-finite values")
    norms = np.linalg.norm(emb, axis=1)
    if n and np.abs(norms - 1.0).max() > 1e-3:
        raise ValueError(
            f"{what}: encoder rows are not L2-normalised (norms {norms.min():.4f}..{norms.max():.4f})"
        )
    return emb
