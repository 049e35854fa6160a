"""On-disk embedding cache, so repeated evaluations of one checkpoint encode each text list once.

The key hashes the encoder fingerprint, the kind and the exact texts (which already reflect the data
file, the subset options and the candidate context), so a stale entry can never be read back. The
file name keeps the suite, language and context readable.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from xling.trainer.evaluation.protocol import Kind, TextEncoder, checked_embeddings


def cache_key(fingerprint: str, kind: Kind, texts: Sequence[str]) -> str:
    digest = hashlib.sha256(f"{fingerprint}\0{kind}\0{len(texts)}".encode())
    for text in texts:
        digest.update(text.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:24]


def encode_cached(
    encoder: TextEncoder, texts: Sequence[str], kind: Kind, *, tag: str, cache_dir: str | Path | None
) -> np.ndarray:
    """``encoder.encode(texts, kind)``, read from / written to ``cache_dir`` when one is given.

    ``tag`` (e.g. ``xquad-r.de.sentence``) names the file; writes are atomic, so ranks sharing a
    cache directory never see half-written arrays.
    """
    if cache_dir is None:
        return checked_embeddings(encoder.encode(texts, kind), len(texts), tag)
    path = Path(cache_dir) / f"{tag}.{kind}.{cache_key(encoder.fingerprint, kind, texts)}.npy"
    if path.is_file():
        return checked_embeddings(np.load(path), len(texts), str(path))
    emb = checked_embeddings(encoder.encode(texts, kind), len(texts), tag)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "wb") as fh:
        np.save(fh, emb)
    os.chmod(tmp, 0o644)  # mkstemp makes it private; other ranks or users may share the cache
    os.replace(tmp, path)
    return emb
