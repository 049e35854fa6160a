"""Optimisation engines behind one small interface: ``backward``, ``step``, ``save``, ``load``.

``TorchEngine`` is plain PyTorch (AdamW + scheduler, gradients all-reduced when several workers run
without DeepSpeed). ``DeepSpeedEngine`` wraps ``deepspeed.initialize`` for ZeRO stages 0-3. The training
loop only sees this interface, so it reads the same for both.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from xling.api.spec.experiment import ExperimentSpec
from xling.trainer.checkpoint_layout import ENGINE, read_trainer_state, rng_file, write_trainer_state


def make_scheduler(optimizer: torch.optim.Optimizer, spec: ExperimentSpec) -> Any:
    from transformers import get_scheduler

    opt = spec.optimization
    return get_scheduler(
        opt.scheduler, optimizer, num_warmup_steps=opt.warmup_steps, num_training_steps=opt.max_steps
    )


def make_optimizer(model: nn.Module, spec: ExperimentSpec) -> torch.optim.Optimizer:
    """AdamW without weight decay on biases and LayerNorms (standard for transformer fine-tuning)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:  # a ZeRO-3 partitioned parameter is flat; ds_shape is its real shape
            (
                no_decay
                if len(getattr(p, "ds_shape", p.shape)) < 2 or "LayerNorm" in name or "norm" in name
                else decay
            ).append(p)
    groups = [
        {"params": decay, "weight_decay": spec.optimization.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # fused: one kernel for all tensors instead of several per tensor (small models are launch-bound)
    return torch.optim.AdamW(groups, lr=spec.optimization.learning_rate, fused=torch.cuda.is_available())


class TorchEngine:
    """Plain PyTorch. With several workers, gradients are averaged by all-reduce before each step."""

    def __init__(self, model: nn.Module, spec: ExperimentSpec):
        self.module = model.train()  # from_pretrained returns eval mode: no dropout
        self.spec = spec
        self.optimizer = make_optimizer(model, spec)
        self.scheduler = make_scheduler(self.optimizer, spec)
        self.world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def accumulate(self) -> AbstractContextManager[None]:
        """Several backward calls per step (GradCache): nothing to do, gradients are reduced in step()."""
        return nullcontext()

    def step(self) -> torch.Tensor:
        """All-reduce (several workers), clip, step; the gradient norm before clipping, left on the device."""
        params = [p for p in self.module.parameters() if p.grad is not None]
        if self.world > 1:
            for p in params:
                dist.all_reduce(p.grad)
                p.grad /= self.world
        norm = torch.nn.utils.clip_grad_norm_(params, self.spec.optimization.max_grad_norm or float("inf"))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    @property
    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def save(self, directory: Path, rank: int) -> None:
        if rank == 0:  # replicas are identical
            state = {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                     "scheduler": self.scheduler.state_dict()}  # fmt: skip
            torch.save(state, directory / ENGINE)

    def load(self, directory: Path) -> None:
        state = torch.load(directory / ENGINE, map_location="cpu", weights_only=False)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def export(self, directory: Path, rank: int) -> None:
        """A standard Hugging Face model dir of the backbone (rank 0 writes)."""
        if rank == 0:
            self.module.backbone.save_pretrained(directory)


def rank_seed(seed: int, rank: int) -> int:
    """The torch seed of one rank's dropout stream: distinct per (seed, rank), unlike ``seed + rank``
    (seed 1 rank 0 would replay seed 0 rank 1)."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def save_trainer_state(directory: Path, step: int, extra: dict[str, Any], rank: int = 0) -> None:
    """Step (rank 0) and this rank's RNG state: with the stateless sampler this is all a resume needs
    beyond the engine. Every rank calls it; each writes its own RNG file (dropout streams differ)."""
    if rank == 0:
        write_trainer_state(directory, {"step": step, **extra})
    rng = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }
    torch.save(rng, directory / rng_file(rank))


def load_trainer_state(directory: Path, rank: int = 0) -> dict[str, Any]:
    state = read_trainer_state(directory)
    rng = directory / rng_file(rank)
    if rng.exists():
        saved = torch.load(rng, weights_only=False)
        torch.set_rng_state(saved["torch"])
        if saved["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(saved["cuda"])
    return state
