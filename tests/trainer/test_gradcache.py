"""GradCache gives the gradients of the plain step: in one process, with dropout (RNG replay), and on
2 ranks under ZeRO-3 through ``coalesce_grad_reduction``."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

from tests.trainer.test_deepspeed import (
    GLOBAL_BATCH,
    assert_grads_close,
    batch,
    build,
    experiment_spec,
    full_grads,
    loss_fn,
    reference,
    shard,
    spawn,
    tiny_model_dir,
)
from xling.trainer.gradcache import RngState, cached_step, chunked


class PlainEngine:
    """The smallest engine GradCache accepts: a module, autograd backward, no reduction."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def __call__(self, **inputs: torch.Tensor) -> torch.Tensor:
        return self.module(**inputs)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def accumulate(self) -> nullcontext:
        return nullcontext()


def grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters()}


def test_chunked_splits_every_input_alike() -> None:
    q, _ = batch()
    parts = chunked(q, 3)
    assert [c["input_ids"].shape[0] for c in parts] == [3, 3, 2]
    torch.testing.assert_close(torch.cat([c["attention_mask"] for c in parts]), q["attention_mask"])


def test_rng_replay_repeats_dropout_and_leaves_the_stream_alone() -> None:
    state = RngState()
    first = torch.nn.functional.dropout(torch.ones(64), 0.5)
    after = torch.get_rng_state()
    with state.replay():
        again = torch.nn.functional.dropout(torch.ones(64), 0.5)
    torch.testing.assert_close(again, first)
    assert torch.equal(torch.get_rng_state(), after)


@pytest.mark.parametrize("chunk_size", [1, 3, GLOBAL_BATCH])
def test_cached_equals_plain_without_dropout(tmp_path: Path, chunk_size: int) -> None:
    model_dir = tiny_model_dir(tmp_path / "m")
    want_loss, want = reference(model_dir)
    model = build(model_dir)()
    loss = cached_step(PlainEngine(model), batch(), loss_fn, chunk_size)
    assert loss.item() == pytest.approx(want_loss, rel=1e-6)
    assert_grads_close(grads(model), want)


def test_cached_replays_dropout_of_the_first_pass(tmp_path: Path) -> None:
    """With dropout on, GradCache must equal a plain step that encodes the same chunks in the same order
    from the same RNG state: pass 2 replays exactly the masks that produced the cached embeddings.
    (``from_pretrained`` returns eval mode: both models are switched to train, as the engines do.)"""
    model_dir = tiny_model_dir(tmp_path / "m", dropout=0.3)
    chunk = 3

    def plain_loss(model: torch.nn.Module, seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return loss_fn(*(torch.cat([model(**c) for c in chunked(x, chunk)]) for x in batch()))

    plain = build(model_dir)().train()
    with torch.no_grad():
        assert plain_loss(plain, 8) != plain_loss(plain, 7), "dropout must be active, or any RNG would do"
    want_loss = plain_loss(plain, 7)
    want_loss.backward()

    cached = build(model_dir)().train()
    torch.manual_seed(7)
    loss = cached_step(PlainEngine(cached), batch(), loss_fn, chunk)
    assert loss.item() == pytest.approx(want_loss.item(), rel=1e-6)
    assert_grads_close(grads(cached), grads(plain))


def _zero3_plain_and_cached(rank: int, world: int, model_dir: Path) -> tuple[dict, dict]:
    from xling.trainer.deepspeed_engine import DeepSpeedEngine

    q_in, p_in = (shard(x, rank, world) for x in batch())
    engine = DeepSpeedEngine(build(model_dir), experiment_spec(3))
    engine.backward(loss_fn(engine(**q_in), engine(**p_in)))
    plain = full_grads(engine)
    engine = DeepSpeedEngine(build(model_dir), experiment_spec(3))
    cached_step(engine, [q_in, p_in], loss_fn, chunk_size=1)
    return plain, full_grads(engine)


def test_cached_equals_plain_on_two_ranks_under_zero3(tmp_path: Path) -> None:
    model_dir = tiny_model_dir(tmp_path / "m")
    _, want = reference(model_dir)
    for plain, cached in spawn(_zero3_plain_and_cached, model_dir):
        assert_grads_close(plain, want)
        assert_grads_close(cached, plain)


VARIANTS = {  # name: (stage, spec overrides)
    "stage0": (0, {}),
    "stage1": (1, {}),
    "stage2": (2, {}),
    "zero3-offload": (3, {"distributed.deepspeed.offloadOptimizer": {"device": "cpu"},
                          "distributed.deepspeed.offloadParam": {"device": "cpu"}}),
    "zero3-bf16": (3, {"distributed.precision": "bf16"}),
}  # fmt: skip


def _cached_variants(rank: int, world: int, model_dir: Path) -> dict[str, dict]:
    from xling.trainer.deepspeed_engine import DeepSpeedEngine

    q_in, p_in = (shard(x, rank, world) for x in batch())
    out = {}
    for name, (stage, overrides) in VARIANTS.items():
        engine = DeepSpeedEngine(build(model_dir), experiment_spec(stage, **overrides))
        cached_step(engine, [q_in, p_in], loss_fn, chunk_size=1)
        out[name] = {k: v.float() for k, v in full_grads(engine).items()}
        engine.step()  # the optimizer step after one coalesced window works in every variant
    return out


@pytest.mark.slow
def test_cached_equals_plain_on_two_ranks_for_every_stage_offload_and_bf16(tmp_path: Path) -> None:
    model_dir = tiny_model_dir(tmp_path / "m")
    _, want = reference(model_dir)
    for result in spawn(_cached_variants, model_dir):
        for name, got in result.items():
            if name.endswith("bf16"):  # 8-bit mantissa: compare the whole gradient vector
                flat = torch.cat([got[k].flatten() for k in want])
                ref = torch.cat([want[k].flatten() for k in want])
                assert (flat - ref).norm() / ref.norm() < 0.05, name
            else:
                assert_grads_close(got, want)
