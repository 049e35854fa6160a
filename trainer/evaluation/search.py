"""FAISS top-k search: exact inner product by default, IVF or HNSW for corpora too big for it.

Embeddings are unit vectors, so inner product is cosine. With a GPU build and a visible GPU the index
moves to the GPU (HNSW has no GPU version and stays on the CPU).
"""

from __future__ import annotations

import math
from typing import get_args

import faiss
import numpy as np

from xling.api.spec.base import IndexKind

INDEX_KINDS: tuple[IndexKind, ...] = get_args(IndexKind)


def _cpu_index(vectors: np.ndarray, kind: IndexKind, depth: int) -> faiss.Index:
    n, dim = vectors.shape
    if kind == "flat":
        return faiss.IndexFlatIP(dim)
    if kind == "ivf":
        # ~4 sqrt(n) lists, but at least 39 training points per list (FAISS's own minimum advice).
        nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
        index.nprobe = min(nlist, max(8, nlist // 16))
        return index
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = max(2 * depth, 128)
        return index
    raise ValueError(f"unknown index {kind!r}; choose one of {', '.join(INDEX_KINDS)}")


def build_index(vectors: np.ndarray, kind: IndexKind = "flat", depth: int = 100) -> faiss.Index:
    """An index holding ``vectors`` (float32, unit rows); ``depth`` sizes HNSW's search beam."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    index = _cpu_index(vectors, kind, depth)
    if kind != "hnsw" and faiss.get_num_gpus() > 0:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(vectors)
    return index


def search(index: faiss.Index, queries: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``depth`` (scores, ids) per query, best first; ``depth`` is capped at the index size."""
    k = min(depth, index.ntotal)
    scores, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return scores, ids
