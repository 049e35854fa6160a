"""Hard-negative mining throughput: xling's ``mining.mine`` against sentence-transformers' ``mine_hard_negatives``.

Same model (multilingual-e5-small, mean pooling, normalised, "query: " / "passage: " prompts, 128 tokens for both
sides), same corpus (the first ``--pairs`` German question-paragraph pairs of the bundled MLQA research pool: one
language, so both search the same passages), top-k ``--top-k``, one negative per pair, the same positive-aware
filter (sentence-transformers' ``relative_margin=0.05`` keeps a candidate scoring at most 0.95 x the positive,
xling's ``maxScoreRatio: 0.95``), FAISS flat inner product in both, no embedding cache. Both run in this process
on the same torch threads, one after the other, ``--repeats`` rounds, best of each.

Printed: passages encoded per second and queries searched per second (xling's own timers for encoding and
search; for sentence-transformers the whole call, which also encodes the queries), the ratio, and how many
pairs got the same negative, with why the others differ (xling also drops candidates that share a conflict
key with the pair, such as another question's copy of the same MLQA paragraph).

    python bench/bench_mine.py [--pairs 1000] [--top-k 30] [--repeats 1]
    (needs sentence-transformers, not a project dependency: pip install sentence-transformers==6.2.0)
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MODEL = "xling/multilingual-e5-small"


def corpus(pairs: int, root: Path) -> Any:
    from xling.api.spec.training import DataSource, DataSpec
    from xling.trainer.data import prepare_corpus

    spec = DataSpec(languages=["de"], drop_eval_overlap=False, sources=[DataSource(
        type="mlqa", path=str(ROOT / "data/demo/mlqa-test-gxlt"), sides="both", pool="monolingual",
        max_pairs_per_language=pairs)])  # fmt: skip
    return prepare_corpus(spec, str(root)).corpus


def xling(prepared: Any, top_k: int, key: str) -> tuple[dict, float]:
    from xling.api.spec.training import MineSpec, ModelSpec
    from xling.trainer.mining import mine
    from xling.trainer.model import encoder_for, resolve_model_path

    spec = ModelSpec(name=MODEL, query_prefix="query: ", passage_prefix="passage: ", max_query_length=128,
                     max_passage_length=128)  # fmt: skip
    encoder = encoder_for(resolve_model_path(MODEL), spec, batch_size=32)
    started = time.perf_counter()
    meta = mine(prepared, MineSpec(per_pair=1, top_k=top_k, max_score_ratio=0.95), encoder, key)
    return meta, time.perf_counter() - started


def sentence_transformers(
    anchors: list[str], positives: list[str], top_k: int
) -> tuple[list[str | None], float]:
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Normalize, Pooling, Transformer
    from sentence_transformers.util import mine_hard_negatives

    from xling.trainer.model import resolve_model_path

    encoder = Transformer(resolve_model_path(MODEL), max_seq_length=128)
    model = SentenceTransformer(
        modules=[encoder, Pooling(encoder.get_embedding_dimension(), "mean"), Normalize()]
    )
    started = time.perf_counter()
    out = mine_hard_negatives(Dataset.from_dict({"anchor": anchors, "positive": positives}), model,
                              range_max=top_k, relative_margin=0.05, num_negatives=1, query_prompt="query: ",
                              corpus_prompt="passage: ", batch_size=32, use_faiss=True, output_format="triplet",
                              verbose=False)  # fmt: skip
    seconds = time.perf_counter() - started
    found = dict(zip(out["anchor"], out["negative"], strict=True))
    return [found.get(a) for a in anchors], seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=1000)
    parser.add_argument("--top-k", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import numpy as np
    import torch

    with tempfile.TemporaryDirectory() as d:
        prepared = corpus(args.pairs, Path(d))
        members = prepared.materialize().groups
        anchors = [g["de"].query for g in members]
        positives = [g["de"].passage for g in members]
        n_passages = len(set(positives))
        ours, theirs = {}, {}
        for r in range(args.repeats):
            meta, seconds = xling(prepared, args.top_k, f"bench{r}")
            ours = min(ours, {**meta, "seconds": seconds}, key=lambda m: m.get("seconds", np.inf))
            negatives, seconds = sentence_transformers(anchors, positives, args.top_k)
            theirs = min(
                theirs, {"negatives": negatives, "seconds": seconds}, key=lambda m: m.get("seconds", np.inf)
            )
        mined = type(prepared)(prepared.directory, ours["key"])
        xling_negs = [
            [t for t, _ in n][:1] for n in mined.negatives([(g, "de") for g in range(len(members))])
        ]
    xling_first = [n[0] if n else None for n in xling_negs]
    same = sum(a == b for a, b in zip(xling_first, theirs["negatives"], strict=True))
    only_st = sum(a is None and b is not None for a, b in zip(xling_first, theirs["negatives"], strict=True))
    print(f"\n{len(anchors)} pairs ({n_passages} distinct passages), top-k {args.top_k}, {torch.get_num_threads()} "
          f"torch threads, best of {args.repeats}; load {os.getloadavg()[0]:.1f}")  # fmt: skip
    enc, search = ours["encode_s"], ours["search_s"]
    print(f"  xling: encode {enc:.1f} s ({ours['texts']} distinct texts, {n_passages / enc:.1f} distinct passages/s with "
          f"their queries), search {search:.2f} s ({len(anchors) / search:.0f} queries/s), total "
          f"{ours['seconds']:.1f} s; removed {ours['removed']}")  # fmt: skip
    print(f"  sentence-transformers mine_hard_negatives: total {theirs['seconds']:.1f} s")
    print(f"  xling total / sentence-transformers total: {ours['seconds'] / theirs['seconds']:.2f}x")
    print(f"  the same negative for {same} of {len(anchors)} pairs; sentence-transformers found one where xling kept "
          f"none for {only_st}")  # fmt: skip


if __name__ == "__main__":
    main()
