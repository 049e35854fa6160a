"""The training-data path at scale: the prepared, memory-mapped corpus against the in-memory one.

Synthetic JSONL corpora of 10 languages, questions of ~100 characters and passages of ~1,000 (every text
unique), in parallel groups of 2 (40 %), 3 (30 %), 5 (20 %) and 10 (10 %) languages, every member with a
question and a passage. For each size:

- preparation: wall time, and how much the preparing process grew (peak RSS over its RSS after imports);
- a worker's start-up to step 1 (open the corpus, build the hybrid sampler, read and tokenise the first
  global batch) and what it then holds: private (anonymous) memory and the file-backed pages it mapped,
  which the OS shares between the workers of a node;
- per global batch of ``--batch`` (4,096): sampling, text fetch and tokenisation (e5-small's tokenizer,
  query 32 / passage 128 tokens), median of ``--batches`` batches;

and the same for the in-memory path (the corpus as Python objects, pickled to each worker, as
``train_loop_config`` carried it before the prepared corpus), which is run only up to ``--in-memory-max``
pairs because it does not fit this machine's memory beyond that. Each measurement is its own process.

    python bench/bench_data.py                       # 0.2M, 2M, 10M pairs (about 25 min, 25 GB of disk)
    python bench/bench_data.py --sizes 200000 --in-memory-max 200000
    python bench/bench_data.py --demo 14 [--repeats 2]   # the demo's step time, prefetch off / on
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
LANGUAGES = ["ar", "de", "en", "es", "hi", "ru", "th", "tr", "vi", "zh"]
WIDTHS = [2] * 4 + [3] * 3 + [5] * 2 + [10]  # group widths, one drawn per group


def random_text(chars: int, seed: int) -> str:
    """Lowercase words of 2-9 letters, like the generated corpus's."""
    import random

    rng = random.Random(seed)
    words = ["".join(rng.choices("abcdefghijklmnoprstuvwyz", k=rng.randint(2, 9))) for _ in range(chars // 5)]
    return " ".join(words)[:chars]


def generate(path: Path, pairs: int, seed: int = 0) -> None:
    """``pairs`` JSONL rows in groups; texts from a pool, made unique by the row number."""
    import numpy as np

    rng = np.random.default_rng(seed)
    words = [
        "".join(rng.choice(list("abcdefghijklmnoprstuvwyz"), size=int(n))) for n in rng.integers(2, 10, 5000)
    ]

    def text(chars: int) -> str:
        out, n = [], 0
        while n < chars:
            w = words[int(rng.integers(len(words)))]
            out.append(w)
            n += len(w) + 1
        return " ".join(out)

    queries = [json.dumps(text(95))[1:-1] for _ in range(2000)]
    passages = [json.dumps(text(990))[1:-1] for _ in range(2000)]
    widths = rng.choice(WIDTHS, size=pairs)
    langs = [rng.permutation(LANGUAGES) for _ in range(1000)]
    with path.open("w") as f:
        row = group = 0
        while row < pairs:
            chosen = langs[group % 1000][: min(int(widths[group]), pairs - row)]
            f.write("".join(
                f'{{"pair_id":"g{group}","language":"{lang}","query":"{row + i} {queries[(row + i) % 2000]}",'
                f'"passage":"{row + i} {passages[(row + i) % 1999]}"}}\n' for i, lang in enumerate(chosen)
            ))  # fmt: skip
            row += len(chosen)
            group += 1


def data_spec(path: Path) -> Any:
    from xling.api.spec.training import DataSource, DataSpec

    return DataSpec(
        languages=LANGUAGES, sources=[DataSource(type="pairs", path=str(path))], drop_eval_overlap=False
    )


def memory() -> dict[str, int]:
    """This process's resident memory: private (RssAnon) and file-backed (RssFile), in bytes."""
    fields = dict(
        line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line
    )
    return {k: int(fields[k].split()[0]) * 1024 for k in ("RssAnon", "RssFile", "VmRSS")}


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Batches:
    """Times the three parts of a global batch on one worker that holds all of it (world size 1)."""

    def __init__(self, corpus: Any, batch: int):
        from xling.api.spec.training import ModelSpec
        from xling.trainer.model import Tokenize, load_tokenizer, resolve_model_path

        self.corpus, self.batch = corpus, batch
        spec = ModelSpec(name="xling/multilingual-e5-small", query_prefix="query: ", passage_prefix="passage: ",
                         max_query_length=32, max_passage_length=128)  # fmt: skip
        path = resolve_model_path(spec.name)
        self.tokenize = Tokenize(load_tokenizer(path, spec), spec)

    def sampler(self) -> Any:
        from xling.api.spec.training import SamplingSpec
        from xling.trainer.sampling import build_sampler

        return build_sampler(
            self.corpus.index, self.batch, SamplingSpec(strategy="hybrid", alpha=0.5, seed=0)
        )

    def step(self, sampler: Any, step: int) -> dict[str, float]:
        from xling.trainer.train_loop import batch_texts

        t0 = time.perf_counter()
        plan = sampler.plan(step)
        t1 = time.perf_counter()
        queries, passages, _, _ = batch_texts(self.corpus, plan, 0, 1, 0)
        t2 = time.perf_counter()
        self.tokenize(queries, "query"), self.tokenize(passages, "passage")
        t3 = time.perf_counter()
        return {"sample_s": t1 - t0, "fetch_s": t2 - t1, "tokenize_s": t3 - t2}


def worker(corpus_of: Any, batch: int, batches: int) -> dict[str, Any]:
    """Start-up to step 1, then ``batches`` more, in a process that has done its imports."""
    import torch  # noqa: F401  (a training worker has it loaded)

    from xling.trainer import sampling, train_loop  # noqa: F401

    tok = Batches(None, batch)  # the tokenizer belongs to the model's start-up, not the data's
    # its buffers too: a batch of texts like the corpus's, before measuring
    tok.tokenize([random_text(95, i) for i in range(batch)], "query")
    tok.tokenize([random_text(990, i) for i in range(batch)], "passage")
    before = memory()
    started = time.perf_counter()
    tok.corpus = corpus_of()
    sampler = tok.sampler()
    first = tok.step(sampler, 0)
    startup = time.perf_counter() - started
    after = memory()
    steps = [tok.step(sampler, s) for s in range(1, batches + 1)]
    return {"startup_s": startup, "first": first, "anon": after["RssAnon"] - before["RssAnon"],
            "file": after["RssFile"] - before["RssFile"],
            **{k: statistics.median(s[k] for s in steps) for k in steps[0]}}  # fmt: skip


def child(kind: str, args: dict[str, Any]) -> dict[str, Any]:
    from xling.trainer.data import open_corpus, prepare_corpus

    if kind == "prepare":
        import numpy  # noqa: F401
        import pyarrow  # noqa: F401

        base, started = memory()["VmRSS"], time.perf_counter()
        prepared = prepare_corpus(data_spec(Path(args["source"])), args["root"])
        meta = prepared.corpus.meta
        return {"seconds": time.perf_counter() - started, "grew": peak_rss() - base, "pairs": meta["pairs"],
                "groups": meta["groups"], "index_bytes": meta["index_bytes"],
                "location": [prepared.location.uri, prepared.location.fingerprint]}  # fmt: skip
    if kind == "worker":
        from xling.trainer.data import DataLocation

        location = DataLocation(*args["location"])
        return worker(
            lambda: open_corpus(location, Path(args["root"]) / "cache"), args["batch"], args["batches"]
        )
    if kind == "in-memory-driver":  # load into memory, pickle it as the object store held it
        from xling.trainer.data import load_corpus

        base, started = memory()["VmRSS"], time.perf_counter()
        corpus = load_corpus(data_spec(Path(args["source"])))
        blob = pickle.dumps(corpus, protocol=5)
        Path(args["blob"]).write_bytes(blob)
        return {
            "seconds": time.perf_counter() - started,
            "grew": peak_rss() - base,
            "pickle_bytes": len(blob),
        }
    if kind == "in-memory-worker":

        def unpickle() -> Any:
            corpus = pickle.loads(Path(args["blob"]).read_bytes())
            corpus.index  # noqa: B018  (built by the sampler on the worker)
            return corpus

        return worker(unpickle, args["batch"], args["batches"])
    raise ValueError(kind)


def run_child(kind: str, **args: Any) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, "--child", kind, json.dumps(args)], check=True,
                         capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def row(name: str, n: int, prep: dict[str, Any] | None, work: dict[str, Any]) -> str:
    per = lambda b: f"{b / n:.1f}"  # noqa: E731
    prep_s = f"{prep['seconds']:.0f}" if prep else "–"
    prep_b = per(prep["grew"]) if prep else "–"
    ms = lambda k: f"{1000 * work[k]:.0f}"  # noqa: E731
    return (f"| {n / 1e6:g}M | {name} | {prep_s} | {prep_b} | {work['startup_s']:.1f} | {per(work['anon'])} | "
            f"{per(work['file'])} | {ms('sample_s')} | {ms('fetch_s')} | {ms('tokenize_s')} |")  # fmt: skip


def demo_step_seconds(prefetch: int, steps: int, work: Path) -> float:
    """Median step time of the demo recipe (bench_train's: no evaluation, every step logged) with ``prefetch``
    steps read ahead, from MLflow's per-step timestamps (the first two steps left out)."""
    from bench_train import demo_experiment, steady_rate
    from mlflow import MlflowClient

    from xling.trainer.run import run_experiment

    exp = demo_experiment(f"demo-prefetch-{prefetch}", steps, 32, {"numWorkers": 1, "cpusPerWorker": 2})
    exp.spec.data.prefetch_steps = prefetch
    exp.spec.model.length_buckets = False  # the demo as it ships
    exp.spec.output_dir = str(work / "runs")
    uri = f"sqlite:///{work}/mlflow.db"
    result = run_experiment(exp, tracking_uri=uri)
    history = sorted(MlflowClient(uri).get_metric_history(result.run_id, "train/loss"), key=lambda m: m.step)
    return 32 / steady_rate([m.timestamp / 1000 for m in history], 32, 2)


def demo(steps: int, repeats: int) -> None:
    """The demo's step time with and without prefetching, interleaved rounds, best of each."""
    from xling.trainer.driver import LOCAL_ENV

    for key, value in LOCAL_ENV.items():
        os.environ.setdefault(key, value)
    best: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as d:
        for i, prefetch in enumerate([0, 1] * repeats):
            work = Path(d) / str(i)
            work.mkdir()
            seconds = demo_step_seconds(prefetch, steps, work)
            best[prefetch] = min(best.get(prefetch, seconds), seconds)
            print(f"prefetchSteps {prefetch}: {seconds:.2f} s/step", flush=True)
    print(
        f"\ndemo step (median, best of {repeats}): in the step {best[0]:.2f} s, prefetched {best[1]:.2f} s, "
        f"prefetched / in the step {best[1] / best[0]:.3f}; load {os.getloadavg()[0]:.1f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="200000,2000000,10000000")
    parser.add_argument("--in-memory-max", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--batches", type=int, default=5)
    parser.add_argument("--workdir", help="where corpora are written (default: a temporary directory)")
    parser.add_argument(
        "--demo", type=int, metavar="STEPS", help="instead: the demo's step time, prefetch off/on"
    )
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.demo:
        demo(args.demo, args.repeats)
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.child:
        print(json.dumps(child(args.child[0], json.loads(args.child[1]))))
        return
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-data-"))
    lines = []
    for n in map(int, args.sizes.split(",")):
        d = work / str(n)
        d.mkdir(parents=True, exist_ok=True)
        source = d / "pairs.jsonl"
        started = time.perf_counter()
        generate(source, n)
        print(
            f"{n}: generated {source.stat().st_size / 2**30:.1f} GiB in {time.perf_counter() - started:.0f}s",
            flush=True,
        )
        prep = run_child("prepare", source=str(source), root=str(d / "data"))
        print(f"{n}: prepared {prep}", flush=True)
        w = run_child(
            "worker", location=prep["location"], root=str(d), batch=args.batch, batches=args.batches
        )
        print(f"{n}: worker {w}", flush=True)
        lines.append(row("prepared, memory-mapped", n, prep, w))
        if n <= args.in_memory_max:
            blob = str(d / "corpus.pickle")
            drv = run_child("in-memory-driver", source=str(source), blob=blob)
            print(f"{n}: in-memory driver {drv}", flush=True)
            w = run_child("in-memory-worker", blob=blob, batch=args.batch, batches=args.batches)
            print(f"{n}: in-memory worker {w}", flush=True)
            lines.append(row("in memory, pickled to the worker", n, drv, w))
        shutil.rmtree(d)
    print(
        f"\nglobal batch {args.batch}, median of {args.batches} batches; bytes per pair; load {os.getloadavg()[0]:.1f}"
    )
    print(
        "| pairs | path | prepare (s) | driver/preparer grew (B/pair) | worker start-up to step 1 (s) | "
        "worker private (B/pair) | worker mapped, shared (B/pair) | sample (ms) | fetch (ms) | tokenise (ms) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
