"""Dropout is on in every training step, whatever ran before it, and its RNG is per rank and replayed.

``from_pretrained`` returns its backbone in eval mode, so a run would train without dropout unless
something switches it on; an at-start evaluation must neither be that switch nor leave the model in
another mode than it found. A loss that differs under two torch seeds is the witness that dropout is
active (the batch is a pure function of the sampling seed and step, so only dropout draws from torch).
These tests run the real ``Trainer`` in one process (rank and world given, no Ray session).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.support import ROOT
from xling.api.spec.base import TINY_MODEL
from xling.api.spec.experiment import ExperimentSpec
from xling.trainer.data import prepare_corpus
from xling.trainer.job import Job
from xling.trainer.model import (
    BiEncoder,
    HFTextEncoder,
    Tokenize,
    load_backbone,
    load_tokenizer,
    resolve_model_path,
)
from xling.trainer.optim_engine import save_trainer_state
from xling.trainer.train_loop import Prefetch, Trainer


def spec_doc(cache: Path, seed: int = 0, workers: int = 1, grad_cache: bool = False) -> dict[str, Any]:
    """A tiny hybrid run on the bundled NTREX sample, with a small XQuAD-R slice to evaluate.
    The tiny BERT's config keeps transformers' dropout defaults (0.1)."""
    suite = {"name": "xquad-r", "path": str(ROOT / "data/demo/xquad-r"), "languages": ["de", "en"],
             "maxQueries": 4, "maxParagraphs": 4}  # fmt: skip
    return {
        "model": {"name": TINY_MODEL, "maxQueryLength": 16, "maxPassageLength": 24},
        "data": {
            "languages": ["de", "en"],
            "sources": [
                {"type": "ntrex", "path": str(ROOT / "data/demo/ntrex-128"), "maxPairsPerLanguage": 40}
            ],
        },
        "sampling": {"strategy": "hybrid", "seed": seed},
        "loss": {"gradCache": {"enabled": grad_cache, "chunkSize": 1}},
        "optimization": {"globalBatchSize": 4, "maxSteps": 4, "learningRate": 1e-3, "warmupSteps": 0},
        "distributed": {"numWorkers": workers},
        "evaluation": {"suites": [suite], "cacheDir": str(cache / "embeddings")},  # run by the tests
    }


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    cache = tmp_path_factory.mktemp("train_mode")
    prepared = prepare_corpus(ExperimentSpec.model_validate(spec_doc(cache)).data, str(cache / "data"))
    texts = [p.query for g in prepared.corpus.materialize().groups for p in g.values()]
    return {
        "cache": cache,
        "data": prepared.location,
        "model_path": resolve_model_path(TINY_MODEL, texts, cache),
    }


def make(
    setup: dict[str, Any], seed: int = 0, rank: int = 0, world: int = 1, grad_cache: bool = False
) -> Trainer:
    spec = ExperimentSpec.model_validate(spec_doc(setup["cache"], seed, world, grad_cache))
    return Trainer(Job(spec, setup["data"], setup["model_path"]), rank=rank, world=world)


def first_loss(setup: dict[str, Any], at_start: bool, torch_seed: int, grad_cache: bool) -> float:
    """The loss of step 0 on a fresh trainer, after fit's at-start evaluation or without it."""
    trainer = make(setup, grad_cache=grad_cache)
    if at_start:
        trainer.evaluate(0)
    torch.manual_seed(torch_seed)
    return trainer.train_step(0).loss.item()


@pytest.mark.parametrize("grad_cache", [False, True])
def test_dropout_is_on_in_training_with_and_without_at_start_evaluation(
    setup: dict[str, Any], grad_cache: bool
) -> None:
    without = [first_loss(setup, False, seed, grad_cache) for seed in (1, 2)]
    with_eval = [first_loss(setup, True, seed, grad_cache) for seed in (1, 2)]
    assert without[0] != without[1], "same loss under two seeds: dropout is off"
    assert with_eval == without, "the at-start evaluation changed how the model trains"


def test_resume_replays_the_dropout_stream(setup: dict[str, Any], tmp_path: Path) -> None:
    uninterrupted = make(setup)
    uninterrupted.train_step(0)
    uninterrupted.engine.save(tmp_path, 0)  # what Trainer.checkpoint writes for one rank
    save_trainer_state(tmp_path, 1, {}, 0)
    want = uninterrupted.train_step(1).loss.item()

    resumed = make(setup)
    torch.manual_seed(99)  # a wrong stream: only the checkpoint can restore the right one
    resumed.resume_from(tmp_path)
    assert resumed.start_step == 1
    assert resumed.train_step(1).loss.item() == want

    reseeded = make(setup)
    reseeded.resume_from(tmp_path)
    torch.manual_seed(99)
    assert reseeded.train_step(1).loss.item() != want, "a resumed run trains without dropout"


def test_each_rank_and_seed_draws_its_own_dropout_stream(setup: dict[str, Any]) -> None:
    def masks(seed: int, rank: int) -> torch.Tensor:
        make(setup, seed, rank, world=2)
        return torch.nn.functional.dropout(
            torch.ones(256), 0.5
        )  # the next draw a training forward would make

    drawn = {(seed, rank): masks(seed, rank) for seed in (0, 1) for rank in (0, 1)}
    for a, mask_a in drawn.items():
        for b, mask_b in drawn.items():
            assert torch.equal(mask_a, mask_b) == (a == b), (a, b)
    assert torch.equal(masks(1, 1), drawn[(1, 1)]), "a rank's stream is a function of seed and rank"


def test_evaluation_restores_every_submodule_mode(setup: dict[str, Any]) -> None:
    spec = ExperimentSpec.model_validate(spec_doc(setup["cache"])).model
    model = BiEncoder(load_backbone(setup["model_path"], spec))  # the wrapper trains, the backbone does not
    model.backbone.encoder.layer[0].train()
    before = {name: m.training for name, m in model.named_modules()}
    assert len(set(before.values())) == 2, "a mixed pattern, so the test can tell"
    HFTextEncoder(model, Tokenize(load_tokenizer(setup["model_path"], spec), spec)).encode(
        ["a b", "c"], "query"
    )
    assert {name: m.training for name, m in model.named_modules()} == before


def test_prefetching_the_next_batches_changes_no_loss(setup: dict[str, Any]) -> None:
    """Steps read and tokenised ahead in the background thread are the steps read in place."""
    losses = {}
    for ahead in (0, 2):
        trainer = make(setup)
        trainer.batches = Prefetch(trainer.read_batch, ahead)
        torch.manual_seed(0)
        losses[ahead] = [trainer.train_step(step).loss.item() for step in range(4)]
        trainer.batches.close()
        assert (trainer.batches.pool is None) == (ahead == 0)
    assert losses[0] == losses[2]


# ---------------------------------------------------------------------------- no host sync in a step (issue 26)


@pytest.mark.parametrize("grad_cache", [False, True])
def test_a_step_reads_no_value_back_from_the_device(
    setup: dict[str, Any], grad_cache: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a GPU, ``float(loss)`` or the grad norm's ``.item()`` in every step waits for the step to finish
    and stalls the launch queue. A CPU cannot show the wait, but it can show the reads: no xling code may
    turn a tensor into a Python number in a step (``float()``, ``.item()``); the loop reads the window's
    sum at log steps. (torch's AdamW reads its step counter, a host tensor, with ``.item()``: not counted.)
    The counts come from the host-side masks: the real tokens, and the token slots computed (padding
    included, what ``train/mfu`` counts)."""
    import sys

    import xling.trainer

    ours = str(Path(xling.trainer.__file__).parent)
    trainer = make(setup, grad_cache=grad_cache)
    trainer.train_step(0)  # the first step may set things up
    reads: list[str] = []

    def counted(name: str) -> Any:
        real = getattr(torch.Tensor, name)

        def read(t: torch.Tensor, *args: Any) -> Any:
            caller = sys._getframe(1).f_code
            if caller.co_filename.startswith(ours):
                reads.append(f"{name} in {caller.co_name}")
            return real(t, *args)

        return read

    for name in ("__float__", "item"):
        monkeypatch.setattr(torch.Tensor, name, counted(name))
    batch = trainer.read_batch(1)
    result = trainer.train_step(1)
    monkeypatch.undo()
    assert reads == []
    assert isinstance(result.loss, torch.Tensor) and result.loss.ndim == 0 and not result.loss.requires_grad
    masks = (batch.queries["attention_mask"], batch.passages["attention_mask"])
    assert result.tokens == sum(int(m.sum()) for m in masks)
    assert result.slots == sum(m.numel() for m in masks) >= result.tokens


def test_the_log_reads_the_window_once_and_counts_padding(setup: dict[str, Any]) -> None:
    """``train/loss`` is the window's mean loss; ``train/mfu`` counts every token slot the device computed
    (padding included), and ``train/padding_share`` says how many of them were padding."""
    from xling.trainer.capacity.flops import model_flops_utilization
    from xling.trainer.train_loop import StepResult, Window

    trainer = make(setup)
    window = Window()
    window.add(StepResult(torch.tensor(2.0), torch.tensor(3.0), 4, 60, 100), world=1)
    window.add(StepResult(torch.tensor(1.0), torch.tensor(5.0), 4, 90, 100), world=1)
    window.started -= 2.0  # two seconds ago
    m = window.metrics(trainer)
    assert m["train/loss"] == 1.5 and m["train/grad_norm"] == 5.0
    assert m["train/padding_share"] == pytest.approx(0.25)
    assert m["train/tokens_per_s"] == pytest.approx(75, rel=0.01) and m["train/pairs_per_s"] == pytest.approx(
        4, rel=0.01
    )
    want = model_flops_utilization(
        trainer.dense_params, 200, 2.0, trainer.peak_flops, trainer.trainable_params
    )
    assert m["train/mfu"] == pytest.approx(want, rel=0.01)


# ---------------------------------------------------------------------------- distributed.compile (issue 26)


def test_compiled_encoder_encodes_as_eager_and_trains(setup: dict[str, Any]) -> None:
    """``distributed.compile`` compiles the backbone in place (inductor; on CPU too, though it is meant
    for launch-bound GPUs): the same embeddings as eager, the same parameter names for checkpoints, and
    steps that train (inductor draws its own dropout masks, so training losses differ from eager's)."""
    trainers = {}
    for compiled in (False, True):
        doc = spec_doc(setup["cache"])
        doc["distributed"]["compile"] = compiled
        trainers[compiled] = Trainer(
            Job(ExperimentSpec.model_validate(doc), setup["data"], setup["model_path"]), 0, 1
        )
        assert (trainers[compiled].model.backbone._compiled_call_impl is not None) == compiled
    eager, compiled = trainers[False], trainers[True]
    assert list(compiled.model.state_dict()) == list(eager.model.state_dict())  # no _orig_mod prefix
    queries = eager.read_batch(0).queries
    with torch.no_grad():
        want = eager.model.eval()(**queries)
        got = compiled.model.eval()(**queries)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    compiled.model.train()
    before = [p.detach().clone() for p in compiled.model.parameters()]
    losses = [compiled.train_step(step).loss.item() for step in range(2)]
    assert all(0 < x < 10 for x in losses)
    assert any(not torch.equal(a, p) for a, p in zip(before, compiled.model.parameters(), strict=True))
    for t in trainers.values():
        t.batches.close()


def test_compile_is_refused_with_zero3() -> None:
    doc = spec_doc(Path("/nonexistent"))
    doc["distributed"] |= {"compile": True, "deepspeed": {"stage": 3}}
    with pytest.raises(ValueError, match=r"distributed\.compile: not with ZeRO-3"):
        ExperimentSpec.model_validate(doc)
