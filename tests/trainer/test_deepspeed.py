"""The DeepSpeed engine on 2 gloo ranks (real DeepSpeed, CPU accelerator) against one plain process.

Each test spawns two processes that build the same tiny model through ``DeepSpeedEngine`` (ZeRO-3 builds
it partitioned), run one step on their half of a global batch, and report the loss and the full
(gathered) parameter gradients; the single-process reference runs plain PyTorch on the whole batch.
"""

from __future__ import annotations

import os
import socket
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from tests.support import ROOT

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))  # shm op JIT once

GLOBAL_BATCH, VOCAB, Q_LEN, P_LEN = 8, 100, 6, 10
#: Tiny random twins of the encoder families, and how each pools (decoders: last token, left padding).
POOLING = {"bert": "mean", "xlmr": "mean", "qwen2": "last_token"}


# ---------------------------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn: Callable, args: tuple, out: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))  # fmt: skip
    torch.set_num_threads(1)
    try:
        out[rank] = fn(rank, world, *args)
    except BaseException:  # noqa: BLE001 - shown by the parent, which fails the test
        out[rank] = RuntimeError(traceback.format_exc())


def spawn(fn: Callable, *args: Any, world: int = 2) -> list[Any]:
    """Run ``fn(rank, world, *args)`` in ``world`` fresh processes with a torch.distributed env; results by rank."""
    out = mp.Manager().dict()
    mp.spawn(_entry, args=(world, free_port(), fn, args, out), nprocs=world, join=True)
    results = [out[r] for r in range(world)]
    for r in results:
        if isinstance(r, Exception):
            raise r
    return results


def tiny_model_dir(path: Path, kind: str = "bert", dropout: float = 0.0) -> Path:
    """A random-init encoder saved as a standard HF dir (no tokenizer needed: inputs are random ids)."""
    from transformers import AutoModel, BertConfig, Qwen2Config, XLMRobertaConfig

    common = dict(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32
    )
    if kind == "qwen2":
        cfg = Qwen2Config(**common, num_key_value_heads=1, max_position_embeddings=64, attention_dropout=dropout,
                          eos_token_id=2, pad_token_id=1)  # fmt: skip
    else:
        cls = XLMRobertaConfig if kind == "xlmr" else BertConfig
        cfg = cls(**common, max_position_embeddings=64, pad_token_id=1, hidden_dropout_prob=dropout,
                  attention_probs_dropout_prob=dropout)  # fmt: skip
    torch.manual_seed(0)
    pooler = {} if kind == "qwen2" else {"add_pooling_layer": False}  # as load_backbone builds encoders
    AutoModel.from_config(cfg, **pooler).save_pretrained(path)
    return path


def experiment_spec(stage: int, **overrides: Any) -> Any:
    """An ExperimentSpec around the given DeepSpeed stage; ``overrides`` set dotted camelCase keys. ZeRO-3
    partitions every parameter (the default persistence threshold would keep all of a tiny model's whole)."""
    from xling.api.spec.experiment import ExperimentSpec

    doc: dict[str, Any] = {
        "model": {"name": "unused", "pooling": "mean"},
        "data": {"languages": ["en"], "sources": [{"type": "pairs", "path": "unused"}]},
        "sampling": {"strategy": "xx"},
        "optimization": {
            "globalBatchSize": GLOBAL_BATCH,
            "maxSteps": 10,
            "learningRate": 1e-2,
            "maxGradNorm": 0,
        },
        "distributed": {
            "numWorkers": 2,
            "deepspeed": {"stage": stage, "paramPersistenceThreshold": 0},
        },
    }
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = doc
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return ExperimentSpec.model_validate(doc)


def batch(seed: int = 1, left: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A global batch of query and passage inputs (random ids, some padding on the right or left)."""
    g = torch.Generator().manual_seed(seed)

    def inputs(length: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(3, VOCAB, (GLOBAL_BATCH, length), generator=g)
        mask = torch.ones_like(ids)
        for i in range(GLOBAL_BATCH):
            mask[i, slice(0, i % 3) if left else slice(length - i % 3, length)] = 0
        return {"input_ids": ids.masked_fill(mask == 0, 1), "attention_mask": mask}

    return inputs(Q_LEN), inputs(P_LEN)


def shard(inputs: dict[str, torch.Tensor], rank: int, world: int) -> dict[str, torch.Tensor]:
    per = GLOBAL_BATCH // world
    return {k: v[rank * per : (rank + 1) * per] for k, v in inputs.items()}


def build(model_dir: Path, pooling: str = "mean") -> Callable[[], torch.nn.Module]:
    def make() -> torch.nn.Module:
        from xling.api.spec.training import ModelSpec
        from xling.trainer.model import BiEncoder, load_backbone

        return BiEncoder(load_backbone(str(model_dir), ModelSpec(name=str(model_dir))), pooling)

    return make


def loss_fn(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    from xling.trainer.losses import info_nce

    return info_nce(q, p, temperature=0.1)


def full_grads(engine: Any) -> dict[str, torch.Tensor]:
    """Every parameter's averaged gradient, gathered from the ZeRO partitions."""
    from deepspeed.utils import safe_get_full_grad

    return {n: safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()}


def reference(model_dir: Path, kind: str = "bert") -> tuple[float, dict[str, torch.Tensor]]:
    """Plain single-process loss and gradients on the whole global batch."""
    model = build(model_dir, POOLING[kind])()
    q_in, p_in = batch(left=POOLING[kind] == "last_token")
    loss = loss_fn(model(**q_in), model(**p_in))
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_grads_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(
            got[name], want[name], rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}"
        )


# ---------------------------------------------------------------------------------------- tests


def _step(engine: Any, rank: int, world: int, seed: int, left: bool = False) -> torch.Tensor:
    q_in, p_in = (shard(x, rank, world) for x in batch(seed, left))
    loss = loss_fn(engine(**q_in), engine(**p_in))
    engine.backward(loss)
    return loss.detach()


def _equivalence(rank: int, world: int, model_dir: Path, spec: Any, kind: str = "bert") -> tuple[float, dict]:
    from xling.trainer.deepspeed_engine import DeepSpeedEngine

    engine = DeepSpeedEngine(build(model_dir, POOLING[kind]), spec)
    if engine.stage == 3:  # built partitioned: each rank holds only its slice of every weight
        assert all(p.numel() == 0 and p.ds_numel > 0 for p in engine.module.parameters())
    loss = _step(engine, rank, world, seed=1, left=POOLING[kind] == "last_token")
    torch.distributed.all_reduce(loss)
    return loss.item() / world, full_grads(engine)


def _resume_and_export(rank: int, world: int, model_dir: Path, ckpt: Path) -> tuple[list, list]:
    """Train 2 steps, checkpoint, train 2 more. A fresh engine restored from the checkpoint must repeat
    the last two steps exactly (weights, AdamW moments, warmup schedule, dropout RNG). Both export.
    The engine trains with dropout on (checked first), so a stream not restored would change the losses."""
    from xling.trainer.deepspeed_engine import DeepSpeedEngine
    from xling.trainer.optim_engine import load_trainer_state, save_trainer_state

    spec = experiment_spec(3, **{"optimization.warmupSteps": 3})

    def train(engine: DeepSpeedEngine, steps: range) -> list[tuple[float, float]]:
        out = []
        for step in steps:
            loss = _step(engine, rank, world, seed=step)
            engine.step()
            out.append((loss.item(), engine.lr))
        return out

    torch.manual_seed(rank)
    first = DeepSpeedEngine(build(model_dir), spec)
    queries = shard(batch()[0], rank, world)
    with torch.no_grad():
        assert not torch.equal(first(**queries), first(**queries)), "dropout must be active"
    with torch.inference_mode():  # evaluation before training (at_start) must not poison ZeRO-3's buffers
        first.module(**queries)
    train(first, range(2))
    first.save(ckpt, rank)
    save_trainer_state(ckpt, 2, {}, rank)
    first.export(ckpt / "at-save", rank)  # what `xling export` must rebuild from the shards
    torch.distributed.barrier()
    uninterrupted = train(first, range(2, 4))
    first.export(ckpt / "uninterrupted", rank)

    torch.manual_seed(1234)  # a different stream: only the checkpoint can restore the right one
    resumed = DeepSpeedEngine(build(model_dir), spec)
    resumed.load(ckpt)
    start = load_trainer_state(ckpt, rank)["step"]
    replayed = train(resumed, range(start, 4))
    resumed.export(ckpt / "resumed", rank)
    return uninterrupted, replayed


@pytest.fixture(scope="module")
def zero3(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One 2-rank ZeRO-3 session shared by the tests below (each spawn costs ~20 s of imports)."""
    root = tmp_path_factory.mktemp("zero3")
    twins = {kind: tiny_model_dir(root / kind, kind) for kind in POOLING}
    dropout = tiny_model_dir(root / "dropout", dropout=0.1)
    return {"root": root, "twins": twins, "results": spawn(_zero3_session, twins, dropout, root / "ckpt")}


def _zero3_session(rank: int, world: int, twins: dict[str, Path], dropout: Path, ckpt: Path) -> tuple:
    equivalence = {
        kind: _equivalence(rank, world, path, experiment_spec(3), kind) for kind, path in twins.items()
    }
    return equivalence, _resume_and_export(rank, world, dropout, ckpt)


@pytest.mark.parametrize("kind", list(POOLING))
def test_zero3_two_ranks_equal_single_process(zero3: dict[str, Any], kind: str) -> None:
    want_loss, want_grads = reference(zero3["twins"][kind], kind)
    for equivalence, _ in zero3["results"]:
        loss, grads = equivalence[kind]
        assert loss == pytest.approx(want_loss, rel=1e-5)
        assert_grads_close(grads, want_grads)


def test_zero3_resume_repeats_the_uninterrupted_steps(zero3: dict[str, Any]) -> None:
    ckpt = zero3["root"] / "ckpt"
    assert {p.name for p in ckpt.glob("deepspeed/state/*optim_states.pt")} == {
        f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(2)
    }, "one optimizer shard per rank"
    for _, (uninterrupted, replayed) in zero3["results"]:
        assert replayed == uninterrupted  # bit-identical losses and learning rates


def test_zero3_export_is_a_consolidated_hf_model(zero3: dict[str, Any]) -> None:
    from transformers import AutoModel

    ckpt = zero3["root"] / "ckpt"
    initial, uninterrupted, resumed = (
        AutoModel.from_pretrained(d, add_pooling_layer=False).state_dict()
        for d in (zero3["root"] / "dropout", ckpt / "uninterrupted", ckpt / "resumed")
    )
    assert uninterrupted.keys() == initial.keys()
    for name, value in uninterrupted.items():
        assert value.shape == initial[name].shape, name  # whole tensors, not rank-0 partitions
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=0)
    assert any(not torch.equal(uninterrupted[k], initial[k]) for k in initial), "training changed the weights"


def test_zero3_checkpoint_consolidates_shard_by_shard_into_a_sentence_transformers_dir(
    zero3: dict[str, Any], tmp_path: Path
) -> None:
    """`xling export` on the ZeRO-3 shards: the fp32 master weights, written one safetensors shard at a time,
    equal the live engine's consolidated export at the same step."""
    import shutil

    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    from xling.trainer.checkpoint_layout import write_checkpoint_meta
    from xling.trainer.export import consolidate_zero, export_checkpoint
    from xling.trainer.model import train_tiny_tokenizer

    ckpt, base = zero3["root"] / "ckpt", tmp_path / "base"
    shutil.copytree(zero3["root"] / "dropout", base)  # the model trained from: config + a tokenizer
    train_tiny_tokenizer(["the cat sat on a mat"] * 20, vocab_size=40).save_pretrained(base)
    spec = experiment_spec(3, **{"optimization.warmupSteps": 3, "model.name": str(base)})
    write_checkpoint_meta(ckpt, {"spec": spec.model_dump(mode="json"), "model_path": str(base)}, {})
    export_checkpoint(ckpt, tmp_path / "out")
    want = AutoModel.from_pretrained(ckpt / "at-save", add_pooling_layer=False).state_dict()
    for out in (tmp_path / "out", tmp_path / "sharded"):
        if out.name == "sharded":  # several shards and an index, as a large model gets
            consolidate_zero(ckpt / "deepspeed", out.parent / "sharded", torch.float32, max_shard_size=4000)
            assert (
                len(list(out.glob("model-*.safetensors"))) > 3
                and (out / "model.safetensors.index.json").exists()
            )
            shutil.copy(base / "config.json", out)
        got = AutoModel.from_pretrained(out, add_pooling_layer=False).state_dict()
        assert got.keys() == want.keys()
        for name, value in want.items():
            torch.testing.assert_close(got[name], value, rtol=0, atol=0)
    assert SentenceTransformer(str(tmp_path / "out"), device="cpu").encode(["the cat"]).shape == (1, 16)


def _low_stages_session(rank: int, world: int, model_dir: Path) -> dict[int, tuple[float, dict]]:
    """``stage: auto`` as the trainer resolves it (plan.auto_stage: a tiny model on CPU needs no
    sharding: ZeRO-0), and ZeRO-2, each through DeepSpeedEngine on 2 gloo ranks."""
    from xling.trainer.capacity.check import auto_stage

    auto = auto_stage(experiment_spec("auto"), str(model_dir))
    return {spec.distributed.deepspeed.stage: _equivalence(rank, world, model_dir, spec)
            for spec in (auto, experiment_spec(2))}  # fmt: skip


def test_auto_resolves_to_zero0_and_zero0_and_zero2_equal_single_process(tmp_path: Path) -> None:
    model_dir = tiny_model_dir(tmp_path / "bert")
    want_loss, want_grads = reference(model_dir)
    for by_stage in spawn(_low_stages_session, model_dir):
        assert sorted(by_stage) == [0, 2]
        for loss, grads in by_stage.values():
            assert loss == pytest.approx(want_loss, rel=1e-5)
            assert_grads_close(grads, want_grads)
