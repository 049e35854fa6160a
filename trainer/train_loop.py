"""The per-worker training loop that Ray Train runs on every rank.

Read top to bottom: build model and engine, restore from the last checkpoint if Ray hands one over,
then for each global step take this rank's slice of the sampler's batch, encode queries and passages,
compute the global-batch InfoNCE, step, log, and checkpoint. Evaluation runs on every rank (encoding is
sharded and collective), and rank 0 scores and logs.
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from xling.api.contracts import embedding_cache_dir, prepared_cache_dir
from xling.api.env import FAULT_KILL_ENV
from xling.api.errors import InputError
from xling.api.metrics import LOSS, is_headline, suite_prefix, train_metric
from xling.trainer.capacity.check import auto_stage
from xling.trainer.capacity.flops import count_dense_params, model_flops_utilization, peak_flops
from xling.trainer.checkpoint_layout import MODEL_DIR, job_meta, write_checkpoint_meta, write_results
from xling.trainer.console import detail, labelled, phase
from xling.trainer.data.index import key_hash
from xling.trainer.data.pairs import PairCorpus, text_key
from xling.trainer.data.store import PreparedCorpus, open_corpus
from xling.trainer.gradcache import cached_step
from xling.trainer.job import Job, job_of
from xling.trainer.losses import info_nce
from xling.trainer.model import BiEncoder, HFTextEncoder, Tokenize, load_backbone, load_tokenizer
from xling.trainer.optim_engine import TorchEngine, load_trainer_state, rank_seed, save_trainer_state
from xling.trainer.sampling import BatchPlan, Composition, build_sampler
from xling.trainer.tracking import StepLogger, log_dataset, log_model

log = logging.getLogger("xling.train")

#: What a rank reads its texts from: a prepared corpus on disk, or one in memory (tests).
Corpus = PreparedCorpus | PairCorpus


def batch_texts(
    corpus: Corpus, plan: BatchPlan, rank: int, world: int, hard_negatives: int
) -> tuple[list[str], list[str], list[str], list[bool]]:
    """Queries, passages and hard negatives (passage language) of this rank's slice of ``plan``, and which
    negatives count. A hard negative that is the text of any group in the global batch (an in-batch
    positive or a translation of one), or a mined passage of a group in the batch or sharing a conflict key
    with it, is skipped for the next one; a pair with too few is padded with empty texts that the loss
    masks out, never with its own positive."""
    index = corpus.index
    in_batch = {k for it in plan.items for k in index.keys(it.group)}
    groups = {it.group for it in plan.items}
    items = plan.shard(rank, world)
    targets = [(it.group, it.plang) for it in items]
    pairs = corpus.members([(it.group, it.qlang) for it in items] + targets)

    def fits(text: str, group: int | None) -> bool:
        if group is not None and (group in groups or not in_batch.isdisjoint(index.keys(group))):
            return False
        return key_hash(text_key(text)) not in in_batch

    negatives, valid = [], []
    if hard_negatives:
        for candidates in corpus.negatives(targets):
            negs = [text for text, group in candidates if fits(text, group)][:hard_negatives]
            valid += [True] * len(negs) + [False] * (hard_negatives - len(negs))
            negatives += negs + [""] * (hard_negatives - len(negs))
    return [p.query for p in pairs[: len(items)]], [p.passage for p in pairs[len(items) :]], negatives, valid


@dataclass(frozen=True)
class StepBatch:
    """One rank's tokenised slice of a global batch: the queries, then the passages and hard negatives."""

    plan: BatchPlan
    queries: dict[str, torch.Tensor]
    passages: dict[str, torch.Tensor]
    valid: list[bool]  # which hard negatives count (empty without hard negatives)
    tokens: int  # real (non-padding) tokens of the queries and passages
    slots: int  # token positions the encoder computes for them, padding included


class Prefetch:
    """Step -> its batch, read and tokenised ``ahead`` steps early in one background thread, so the texts
    and the tokenizer stay off the critical path (``data.prefetchSteps``; 0: in the step). Batches are a
    pure function of the step, so reading them early changes nothing; ``waited_s`` is the time steps
    spent waiting for theirs."""

    def __init__(self, read: Callable[[int], StepBatch], ahead: int):
        self.read, self.ahead = read, ahead
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="xling-batches") if ahead else None
        self.pending: dict[int, Future[StepBatch]] = {}
        self.waited_s = 0.0

    def get(self, step: int, end: int) -> StepBatch:
        started = time.perf_counter()
        if self.pool is None:
            batch = self.read(step)
        else:
            for s in range(step, min(step + self.ahead + 1, end)):
                if s not in self.pending:
                    self.pending[s] = self.pool.submit(self.read, s)
            batch = self.pending.pop(step).result()
        self.waited_s += time.perf_counter() - started
        return batch

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


def progress_line(step: int, total: int, loss: float, pairs_per_s: float, started: float) -> str:
    frac = step / total
    bar = "#" * int(20 * frac) + "." * (20 - int(20 * frac))
    eta = (time.time() - started) / max(frac, 1e-9) * (1 - frac)
    return f"[{bar}] {step}/{total} loss={loss:.4f} pairs/s={pairs_per_s:.1f} eta={eta:.0f}s"


class Trainer:
    """State for one rank of ``job``: spec, data, model, engine, sampler, logger."""

    def __init__(self, job: Job, rank: int | None = None, world: int | None = None):
        """``rank`` and ``world`` come from Ray Train's context unless given (one process, in tests)."""
        self.job = job
        self.spec = auto_stage(job.spec, job.model_path)  # stage: auto -> what fits on its GPUs
        ds = self.spec.distributed.deepspeed
        if self.spec.distributed.compile and ds is not None and ds.stage == 3:  # stage: auto chose ZeRO-3
            raise InputError(
                None, "not with ZeRO-3, which stage: auto chose here", field="distributed.compile"
            )
        self.zero_shot: dict[str, float] = {}  # the step-0 evaluation, for the model card
        if rank is None or world is None:
            import ray.train

            ctx = ray.train.get_context()
            rank, world = ctx.get_world_rank(), ctx.get_world_size()
        self.rank, self.world = rank, world
        self.corpus: Corpus = open_corpus(job.data, prepared_cache_dir())
        self.device = (
            torch.device("cuda", torch.cuda.current_device())
            if torch.cuda.is_available()
            else torch.device("cpu")
        )
        torch.manual_seed(self.spec.sampling.seed)  # a weight built at random is the same on every replica
        spec = self.spec
        if self.device.type == "cpu":  # Ray sets OMP_NUM_THREADS=1 for workers; use the CPUs asked for
            torch.set_num_threads(max(1, int(spec.distributed.cpus_per_worker)))
        model_path = job.local_model_path()
        self.tokenize = Tokenize(load_tokenizer(model_path, spec.model), spec.model)
        dtype = torch.bfloat16 if spec.distributed.precision == "bf16" else torch.float32

        def build_model() -> BiEncoder:
            backbone = load_backbone(model_path, spec.model, dtype=dtype)
            if spec.distributed.activation_checkpointing:  # reentrant breaks a shared encoder under ZeRO
                backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model = BiEncoder(backbone, spec.model.pooling, spec.model.normalize, spec.model.length_buckets)
            if spec.distributed.compile:  # in place: parameter names, checkpoints and export are unchanged
                backbone.compile(dynamic=True)  # texts are padded to each batch's longest: shapes vary
            return model

        if spec.distributed.deepspeed is not None:  # builds the model itself: partitioned under ZeRO-3
            from xling.trainer.deepspeed_engine import DeepSpeedEngine

            self.engine: TorchEngine | DeepSpeedEngine = DeepSpeedEngine(build_model, spec)
        else:
            self.engine = TorchEngine(build_model().to(self.device), spec)
        self.model = self.engine.module
        torch.manual_seed(rank_seed(spec.sampling.seed, self.rank))  # each rank its own dropout masks
        self.dense_params, self.peak_flops = count_dense_params(self.model), peak_flops()
        self.trainable_params = count_dense_params(
            self.model, trainable_only=True
        )  # freezeLayers: less backward
        self.sampler = build_sampler(
            self.corpus.index, spec.optimization.global_batch_size, spec.sampling, spec.optimization.max_steps
        )
        self.batches = Prefetch(self.read_batch, spec.data.prefetch_steps)
        self.composition = Composition()
        uri = job.run.uri if job.run else None
        self.logger = StepLogger(uri, job.run_id, self.rank == 0)
        self.start_step = 0

    # ----------------------------------------------------------------------------- checkpoints
    def restore(self) -> None:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is not None:
            with ckpt.as_directory() as d:
                self.resume_from(Path(d))

    def resume_from(self, directory: Path) -> None:
        """Engine, step, RNG state and batch counts from a checkpoint directory."""
        self.engine.load(directory)
        state = load_trainer_state(directory, self.rank)
        self.start_step = state["step"]
        self.composition = Composition.from_dict(state.get("composition", {}))
        log.info("rank %d resumed at step %d", self.rank, self.start_step)
        self.logger.log(
            self.start_step, {train_metric("resumed_at_step"): self.start_step}, force=True
        )  # restarts show in MLflow

    def checkpoint(self, step: int, metrics: dict[str, Any], final: bool = False, report: str = "") -> None:
        """Save engine + trainer state; the final one also holds the HF model and the results tables.
        Ray gets headline metrics only (per-language ones live in MLflow and results.txt)."""
        import ray.train

        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp)
            self.engine.save(d, self.rank)
            save_trainer_state(d, step, {"composition": self.composition.as_dict()}, self.rank)
            if final:
                self.engine.export(d / MODEL_DIR, self.rank)  # collective under ZeRO-3; rank 0 writes
            if self.rank == 0:
                write_results(d, report)
                write_checkpoint_meta(d, job_meta(self.job), metrics)  # what `xling export` needs
                if final:
                    self.publish(d / MODEL_DIR, metrics, report)
            if dist.is_initialized():
                dist.barrier()
            # every rank reports its own files (ZeRO shard, RNG); Ray merges them into one checkpoint
            ckpt = ray.train.Checkpoint.from_directory(tmp)
            headline = {k: v for k, v in metrics.items() if is_headline(k)}  # not xquad_r/mono/map/ar
            ray.train.report({**headline, "step": step}, checkpoint=ckpt)

    def publish(self, directory: Path, metrics: dict[str, Any], report: str) -> None:
        """Rank 0: the exported backbone becomes a sentence-transformers dir with a model card, logged to MLflow."""
        from xling.trainer.sentence_transformers_dir import write_model_card, write_sentence_transformers

        write_sentence_transformers(directory, self.spec.model, self.tokenize.tok, self.tokenize.append_eos)
        write_model_card(directory, self.spec, name=self.job.name or "xling-retriever", metrics=metrics,
                         composition=self.composition.as_dict(), report=report, run_id=self.job.run_id,
                         zero_shot=self.zero_shot)  # fmt: skip
        if self.logger.active and self.job.run:
            log_model(directory, self.spec, tracking_uri=self.job.run.uri, run_id=self.logger.run_id,
                      metrics=metrics)  # fmt: skip

    # ----------------------------------------------------------------------------- evaluation
    def evaluate(self, step: int) -> tuple[dict[str, float], str]:
        """Every rank encodes its shard; rank 0 scores and logs. Returns flat metrics and the tables, which
        rank 0 leaves in the log: the console shows the phase (``zero-shot``, ``evaluate step N``) with each
        suite's headline number."""
        from xling.trainer.evaluation.api import evaluate_with_centering, load_suite
        from xling.trainer.evaluation.report import format_table, headline_number, log_to_mlflow

        ev = self.spec.evaluation
        out: dict[str, float] = {}
        tables: list[str] = []
        encoder = HFTextEncoder(self.model, self.tokenize, ev.batch_size, fingerprint=self._fingerprint(step))
        cache = embedding_cache_dir(ev.cache_dir)
        name = "zero-shot" if step == 0 else f"evaluate step {step}"
        centering = ev.centering if step == 0 else None  # a property of the untrained model: step 0 only
        what = ", ".join(s.name for s in ev.suites) + (", with the centering baseline" if centering else "")
        with phase(name, what, show=self.rank == 0, label=self.job.trial) as running:
            numbers: list[str] = []
            for suite_spec in ev.suites:
                suite = load_suite(suite_spec)
                # A shared disk cache would let ranks disagree on which texts they encode: one rank only.
                evaluated = evaluate_with_centering(
                    suite, encoder, centering, index=ev.index, cache_dir=cache if self.world == 1 else None
                )
                if self.rank == 0:
                    if self.logger.active:
                        log_dataset(self.logger.client, self.logger.run_id, suite_spec.name, suite.fingerprint,
                                    [suite_spec.path], "evaluation")  # fmt: skip
                    for results in evaluated:
                        if self.logger.active:
                            log_to_mlflow(results, self.logger.client, self.logger.run_id, step)
                        out.update(results.flat_metrics(suite_prefix(results.suite)))
                        tables.append(format_table(results))
                        numbers.append(headline_number(results))
            running.note = ", ".join(numbers)
        table = "\n\n".join(tables)
        if self.rank == 0:
            detail(f"\n{name}: the tables (step {step})\n{table}\n")
        return out, table

    def _fingerprint(self, step: int) -> str:
        base = self.job.model_fingerprint
        return base if step == 0 else f"{self.job.run_id or 'local'}-step{step}"

    # ----------------------------------------------------------------------------- training
    def read_batch(self, step: int) -> StepBatch:
        """This rank's slice of global batch ``step``, read and tokenised (in the prefetch thread)."""
        plan = self.sampler.plan(step)
        queries, passages, negatives, valid = batch_texts(
            self.corpus, plan, self.rank, self.world, self.spec.loss.hard_negatives
        )
        q_in, p_in = self.tokenize(queries, "query"), self.tokenize(passages + negatives, "passage")
        masks = (q_in["attention_mask"], p_in["attention_mask"])
        tokens = int(sum(int(m.sum()) for m in masks))  # counted here, off the step's critical path
        slots = sum(self.model.token_slots(m, self.device.type) for m in masks)
        if self.device.type == "cuda":  # page-locked: the step's copies to the GPU do not block it
            q_in, p_in = ({k: v.pin_memory() for k, v in x.items()} for x in (q_in, p_in))
        return StepBatch(plan, q_in, p_in, valid, tokens, slots)

    def train_step(self, step: int) -> StepResult:
        """One optimizer step. Nothing here waits for the device: the loss and the gradient norm stay
        device tensors (``float()`` on them would sync every step; the loop reads them at log steps), and
        the prefetch thread counted the batch's tokens from its host-side masks."""
        spec = self.spec
        batch = self.batches.get(step, spec.optimization.max_steps)
        self.composition.add(batch.plan)
        cuda = self.device.type == "cuda"  # pinned in the prefetch thread: the copies overlap compute
        q_in = {k: v.to(self.device, non_blocking=cuda) for k, v in batch.queries.items()}
        p_in = {k: v.to(self.device, non_blocking=cuda) for k, v in batch.passages.items()}
        b = len(q_in["input_ids"])
        mask = torch.tensor(batch.valid).to(self.device, non_blocking=cuda) if batch.valid else None

        def loss_fn(q: torch.Tensor, p_all: torch.Tensor) -> torch.Tensor:
            negs = p_all[b:] if mask is not None else None
            return info_nce(q, p_all[:b], negs, spec.loss.temperature, spec.loss.symmetric, mask)

        if spec.loss.grad_cache.enabled:  # activation memory of one chunk, the same gradients
            loss = cached_step(self.engine, [q_in, p_in], loss_fn, spec.loss.grad_cache.chunk_size)
        else:
            loss = loss_fn(self.engine(**q_in), self.engine(**p_in))
            self.engine.backward(loss)
        grad_norm = self.engine.step()
        return StepResult(loss.detach(), grad_norm, b, batch.tokens, batch.slots)

    def fit(self) -> None:
        spec, opt = self.spec, self.spec.optimization
        self.restore()
        if spec.evaluation.at_start and self.start_step == 0 and spec.evaluation.suites:
            self.zero_shot, _ = self.evaluate(0)
        started = time.time()
        window = Window()
        curve = set(spec.evaluation.curve_steps(opt.max_steps)) if spec.evaluation.suites else set()
        metrics: dict[str, Any] = {}
        for step in range(self.start_step, opt.max_steps):
            inject_fault(step, self.rank, resumed=self.start_step > 0)
            window.add(self.train_step(step), self.world)
            done = step + 1
            if done % opt.log_every == 0 or done == opt.max_steps:
                metrics = window.metrics(self)  # the one device sync of the window
                self.logger.log(done, metrics)
                if self.rank == 0:
                    line = progress_line(done, opt.max_steps, metrics[LOSS], metrics[train_metric("pairs_per_s")],
                                         started)  # fmt: skip
                    print(labelled(line, self.job.trial), flush=True)
                window, self.batches.waited_s = Window(), 0.0
            if done in curve:  # a learning-curve point: logged at its step, not reported to Ray
                self.evaluate(done)
            if opt.checkpoint_every and done % opt.checkpoint_every == 0 and done < opt.max_steps:
                self.checkpoint(done, metrics)
        self.batches.close()
        final, table = dict(metrics), ""
        if spec.evaluation.suites:
            scores, table = self.evaluate(opt.max_steps)
            final.update(scores)
        if self.rank == 0:
            self.logger.log_dict(self.composition.as_dict(), "batch_composition.json")
        with phase("export", "the model and its card, to the final checkpoint and MLflow", show=self.rank == 0,
                   label=self.job.trial):  # fmt: skip
            self.checkpoint(opt.max_steps, final, final=True, report=table)


@dataclass(frozen=True)
class StepResult:
    """What one step leaves for the log: device tensors (read at log steps only) and host-side counts."""

    loss: torch.Tensor
    grad_norm: torch.Tensor | float | None  # None: the engine does not compute one (no clipping)
    pairs: int  # this rank's queries
    tokens: int  # real (non-padding) tokens of this rank's queries and passages
    slots: int  # token positions the device computed, padding included


class Window:
    """The steps since the last log step. Losses are summed on the device, so reading them costs one
    sync per window, not one per step; counts are summed over all ranks (every rank sees the same shapes
    of its own slice: the rank-0 counts times the world)."""

    def __init__(self) -> None:
        self.started = time.time()
        self.steps, self.pairs, self.tokens, self.slots = 0, 0, 0, 0
        self.loss_sum: torch.Tensor | float = 0.0
        self.grad_norm: torch.Tensor | float | None = None

    def add(self, r: StepResult, world: int) -> None:
        self.steps += 1
        self.pairs, self.tokens, self.slots = (
            self.pairs + r.pairs * world,
            self.tokens + r.tokens * world,
            self.slots + r.slots * world,
        )
        self.loss_sum = self.loss_sum + r.loss
        self.grad_norm = r.grad_norm

    def metrics(self, trainer: Trainer) -> dict[str, Any]:
        elapsed = max(time.time() - self.started, 1e-9)
        out = {
            LOSS: float(self.loss_sum) / self.steps,  # the mean over the window's steps
            train_metric("lr"): trainer.engine.lr,
            train_metric("pairs_per_s"): self.pairs / elapsed,
            train_metric("tokens_per_s"): self.tokens / elapsed,
            # model FLOPs (6N per token the device computed, padding included; less with frozen layers)
            # over the peak of all ranks' devices, and the share of those tokens that were padding
            train_metric("mfu"): model_flops_utilization(trainer.dense_params, self.slots, elapsed,
                                                 trainer.peak_flops * trainer.world, trainer.trainable_params),
            train_metric("padding_share"): 1 - self.tokens / max(self.slots, 1),
            # time a step waited for its texts and tokens (near 0 when prefetching keeps up)
            train_metric("data_wait_s"): trainer.batches.waited_s / self.steps,
            **trainer.composition.metrics(),
        }  # fmt: skip
        if self.grad_norm is not None:  # the last step's norm before clipping
            out[train_metric("grad_norm")] = float(self.grad_norm)
        if trainer.device.type == "cuda":
            out[train_metric("gpu_mem_gb")] = torch.cuda.max_memory_allocated() / 2**30
        return out


def inject_fault(step: int, rank: int, resumed: bool) -> None:
    """Fault-tolerance tests only: ``XLING_FAULT_KILL=STEP:RANK`` SIGKILLs that rank as it reaches STEP,
    in the first attempt (a restarted worker group resumes from a checkpoint and runs on).

    The kill waits until Ray Train has committed the last reported checkpoint: the controller polls
    workers every few seconds, and a worker that dies before the poll takes its report with it, so the
    replacement would start from scratch and hit the same kill again."""
    if not resumed and os.environ.get(FAULT_KILL_ENV) == f"{step}:{rank}":
        import ray.train

        ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
        os.kill(os.getpid(), signal.SIGKILL)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point (one call per rank); ``config`` holds the :class:`Job` alone."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    Trainer(job_of(config)).fit()
