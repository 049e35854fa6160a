"""Benchmark (not a test): xling's evaluator vs a plain baseline on the same model and data.

Encoding: the model's TextEncoder (length-bucketed batches, inference mode) vs the same model and
tokenisation fed in file order under ``torch.no_grad``, on the same texts (``--encode-sample`` per
language and kind, default all). Scoring: xling's exact engine (one GEMM per chunk, counting
comparisons, FAISS heap top-k) vs a brute force that fully sorts every ranking (pooled and per
language, scipy's rankdata), both on xling's embeddings, so their numbers must be identical.
Wall and CPU seconds are both reported: on a shared machine the CPU time is the steadier one.

    .venv/bin/python bench/bench_eval.py --languages de,en,zh --encode-sample 256       # encoding race
    .venv/bin/python bench/bench_eval.py --cache-dir .cache/embeddings --encode-sample 0  # full-pool scoring
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import rankdata

from xling.trainer.evaluation.lareqa import LareqaSuite, load_lareqa
from xling.trainer.evaluation.lareqa_scoring import encode_suite, evaluate_lareqa

METRICS = ("mono.map", "mono.r1", "cross.map", "cross.r1", "multi.map", "multi.r10", "bias.rank_distance")


class PlainEncoder:
    """The same model and tokenisation, batches in input order, ``torch.no_grad``: the baseline."""

    def __init__(self, model: Any, tokenize: Any, batch_size: int) -> None:
        self.model, self.tokenize, self.batch_size = model, tokenize, batch_size
        self.fingerprint = "plain"

    def encode(self, texts: Sequence[str], kind: str) -> np.ndarray:
        import torch

        self.model.eval()
        out = []
        with torch.no_grad():
            for i in range(0, len(texts), self.batch_size):
                out.append(
                    self.model(**self.tokenize(list(texts[i : i + self.batch_size]), kind)).float().numpy()
                )
        return np.concatenate(out)


def timed(fn: Callable[[], Any], repeat: int = 1) -> tuple[Any, dict[str, float]]:
    """``fn()`` and its best wall and CPU seconds over ``repeat`` runs (the machine may be shared)."""
    walls, cpus = [], []
    for _ in range(repeat):
        w, c = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return out, {"wall_s": min(walls), "cpu_s": min(cpus)}


def encode_sample(suite: LareqaSuite, encoder: Any, sample: int | None) -> np.ndarray:
    """The first ``sample`` candidates and queries of every language."""
    out = []
    for lang in suite.languages:
        data = suite.data[lang]
        out.append(encoder.encode(data.candidate_texts[:sample], "passage"))
        out.append(encoder.encode(data.query_texts[:sample], "query"))
    return np.vstack(out)


def race(a: dict[str, float], b: dict[str, float]) -> dict[str, Any]:
    """Timings of xling (a) and the baseline (b), and how many times faster xling is."""
    return {
        "xling": a,
        "baseline": b,
        "speedup_wall": b["wall_s"] / a["wall_s"],
        "speedup_cpu": b["cpu_s"] / a["cpu_s"],
    }


def _ranks(scores: np.ndarray) -> np.ndarray:
    """1-based rank of every column in every row from a full sort; tied items all get the worst rank
    of their group, as scikit-learn's average_precision_score counts them (XQuAD-R repeats a few
    sentences verbatim, so real runs have ties)."""
    return rankdata(-scores, method="max", axis=1)


def brute_force(suite: LareqaSuite, cands: list[np.ndarray], queries: list[np.ndarray]) -> dict[str, float]:
    """The headline metrics from full sorted rankings."""
    pool = np.vstack(cands)
    bounds = np.cumsum([0] + [len(c) for c in cands])
    n = len(suite.languages)
    ap_m, r1_m = np.zeros((n, n)), np.zeros((n, n))
    multi_map, multi_r10, rd = np.zeros(n), np.zeros(n), np.zeros(n)
    for i, lang in enumerate(suite.languages):
        scores = queries[i] @ pool.T
        rel = suite.relevant(lang)
        has = rel >= 0
        n_rel = has.sum(axis=1)
        pooled = np.where(has, np.take_along_axis(_ranks(scores), np.maximum(rel, 0), axis=1), np.inf)
        r = np.sort(pooled, axis=1)
        k = np.arange(1, r.shape[1] + 1)
        multi_map[i] = np.mean(np.sum(np.where(np.isfinite(r), k / r, 0), axis=1) / n_rel)
        multi_r10[i] = np.mean(np.sum(pooled <= 10, axis=1) / n_rel)
        spread = np.where(has, pooled, -np.inf).max(1) - np.where(has, pooled, np.inf).min(1)
        rd[i] = np.mean(spread[n_rel >= 2])
        for j in range(n):
            ok = has[:, j]
            block = _ranks(scores[ok, bounds[j] : bounds[j + 1]])
            rank = np.take_along_axis(block, (rel[ok, j] - bounds[j])[:, None], axis=1)[:, 0]
            ap_m[i, j], r1_m[i, j] = np.mean(1.0 / rank), np.mean(rank == 1)
    off = ~np.eye(n, dtype=bool)
    return {
        "mono.map": float(np.mean(np.diag(ap_m))),
        "mono.r1": float(np.mean(np.diag(r1_m))),
        "cross.map": float(np.mean(ap_m[off])),
        "cross.r1": float(np.mean(r1_m[off])),
        "multi.map": float(np.mean(multi_map)),
        "multi.r10": float(np.mean(multi_r10)),
        "bias.rank_distance": float(np.mean(rd)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=".cache/models/multilingual-e5-small")
    parser.add_argument("--data", default="data/demo/xquad-r")
    parser.add_argument("--languages", help="comma-separated subset")
    parser.add_argument("--max-paragraphs", type=int)
    parser.add_argument("--max-queries", type=int)
    parser.add_argument("--encode-sample", type=int, help="texts per language and kind to race (0: no race)")
    parser.add_argument("--cache-dir", help="embedding cache to reuse (e.g. the one `xling eval` filled)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3, help="scoring runs per side (best one counts)")
    parser.add_argument("--out", help="also write the report as JSON")
    args = parser.parse_args()

    from xling.trainer.model import load_text_encoder

    langs = args.languages.split(",") if args.languages else None
    suite = load_lareqa("xquad-r", args.data, languages=langs, max_paragraphs=args.max_paragraphs,
                        max_queries=args.max_queries)  # fmt: skip
    ours = load_text_encoder(args.model, batch_size=args.batch_size)
    plain = PlainEncoder(ours.model, ours.tokenize, args.batch_size)
    encoding = None
    if args.encode_sample != 0:
        ours_emb, ours_t = timed(lambda: encode_sample(suite, ours, args.encode_sample))
        plain_emb, plain_t = timed(lambda: encode_sample(suite, plain, args.encode_sample))
        encoding = race(ours_t, plain_t) | {"texts": len(ours_emb),
                                            "max_abs_embedding_diff": float(np.abs(ours_emb - plain_emb).max())}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:  # the brute force reads the engine's own embeddings back
        cache = args.cache_dir or tmp
        cands, queries = encode_suite(suite, ours, cache)
        xling, xling_t = timed(lambda: evaluate_lareqa(suite, ours, cache_dir=cache), args.repeat)
    brute, brute_t = timed(lambda: brute_force(suite, cands, queries), args.repeat)
    mine = xling.summary()
    report = {
        "suite": f"xquad-r {','.join(suite.languages)}",
        "queries": sum(xling.n_queries.values()),
        "pool": suite.pool_size,
        "options": suite.options,
        "encoding": encoding,
        "scoring": race(xling_t, brute_t),
        "metrics": {"xling": {k: mine[k] for k in METRICS}, "brute_force": brute},
        "max_abs_metric_diff": max(abs(mine[k] - brute[k]) for k in METRICS),
    }
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
