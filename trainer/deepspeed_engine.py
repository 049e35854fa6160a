"""DeepSpeed behind the engine interface of ``xling.trainer.optim_engine`` (ZeRO stages 0-3).

The engine owns model construction, because under ZeRO-3 a model larger than one device must be built
already partitioned: a live ``HfDeepSpeedConfig`` makes ``from_pretrained`` / ``_from_config`` shard each
parameter as it is created (a bare ``deepspeed.zero.Init`` breaks transformers' weight init). The config
object is kept on the engine for its lifetime, as transformers only holds a weak reference to it.

Checkpoints are DeepSpeed's own: every rank writes its ZeRO shard (optimizer state included) into the
checkpoint directory, and Ray Train merges the ranks' files into one checkpoint. The final export is a
consolidated Hugging Face model, gathered layer by layer onto rank 0.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from xling.api.spec.experiment import ExperimentSpec
from xling.api.spec.training import OffloadSpec
from xling.trainer.capacity.check import PlanError
from xling.trainer.checkpoint_layout import DEEPSPEED_DIR, DEEPSPEED_TAG
from xling.trainer.optim_engine import make_optimizer, make_scheduler


def _offload(off: OffloadSpec) -> dict[str, Any] | None:
    if off.device == "none":
        return None
    out: dict[str, Any] = {"device": off.device, "pin_memory": torch.cuda.is_available()}
    if off.device == "nvme":
        out["nvme_path"] = off.nvme_path
    return out


def deepspeed_config(spec: ExperimentSpec, world: int) -> dict[str, Any]:
    """The DeepSpeed config dict for one experiment on ``world`` ranks."""
    dist_spec, opt = spec.distributed, spec.optimization
    ds = dist_spec.deepspeed
    if ds is None:
        raise ValueError("distributed.deepspeed is not set")
    if ds.stage == "auto":  # plan.auto_stage resolves it wherever the model shape and device size are known
        raise PlanError(
            None,
            "auto: neither the driver nor this worker could size the devices "
            "(GPU memory unknown: set XLING_GPU_MEM_GB) or the model; give the stage (0, 1, 2 or 3)",
            field="distributed.deepspeed.stage",
        )
    zero: dict[str, Any] = {"stage": ds.stage}
    if ds.stage >= 1:
        zero |= {"overlap_comm": ds.overlap_comm, "reduce_bucket_size": ds.reduce_bucket_size,
                 "contiguous_gradients": True}  # fmt: skip
    if ds.stage == 3:
        zero |= {
            "stage3_prefetch_bucket_size": ds.prefetch_bucket_size,
            "stage3_param_persistence_threshold": ds.param_persistence_threshold,
            # needed for the consolidated export at the end
            "stage3_gather_16bit_weights_on_model_save": True,
        }
        if ds.hpz_partition_size > 1:
            zero["zero_hpz_partition_size"] = ds.hpz_partition_size
    for key, off in (("offload_optimizer", ds.offload_optimizer), ("offload_param", ds.offload_param)):
        if (cfg := _offload(off)) is not None:
            zero[key] = cfg
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": opt.global_batch_size // world,
        "gradient_accumulation_steps": 1,
        "bf16": {"enabled": dist_spec.precision == "bf16"},
        "zero_optimization": zero,
        # the optimizer is a client torch.optim one (no JIT-built fused ops needed)
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if opt.max_grad_norm > 0:
        config["gradient_clipping"] = opt.max_grad_norm
    if ds.offload_optimizer.device != "none" and not torch.cuda.is_available():
        # DeepSpeedCPUAdam would be JIT-compiled; on a CPU-only box torch's AdamW does the same job
        config["zero_force_ds_cpu_optimizer"] = False
    return config


def _optimizer(model: nn.Module, spec: ExperimentSpec) -> torch.optim.Optimizer:
    """AdamW; with optimizer offload on GPU nodes, DeepSpeed's vectorised CPU Adam over the same groups."""
    torch_adamw = make_optimizer(model, spec)
    ds = spec.distributed.deepspeed
    if ds is None or ds.offload_optimizer.device == "none" or not torch.cuda.is_available():
        return torch_adamw
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    return DeepSpeedCPUAdam(torch_adamw.param_groups, lr=spec.optimization.learning_rate, adamw_mode=True)


class DeepSpeedEngine:
    """``deepspeed.initialize`` with the TorchEngine interface (call, backward, step, save, load, export)."""

    sharded = True  # every rank writes part of each checkpoint

    def __init__(self, build_model: Callable[[], nn.Module], spec: ExperimentSpec):
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        self.spec = spec
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.config = deepspeed_config(spec, self.world)
        self._hf_config = None
        if self.stage == 3:
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_config = HfDeepSpeedConfig(
                self.config
            )  # keep alive: from_pretrained partitions while it lives
        model = build_model().train()  # from_pretrained returns eval mode: no dropout
        optimizer = _optimizer(model, spec)
        self.ds, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=make_scheduler(optimizer, spec), config=self.config
        )
        self.module: nn.Module = self.ds.module

    @property
    def stage(self) -> int:
        return self.config["zero_optimization"]["stage"]

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.ds(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)

    @contextmanager
    def accumulate(self) -> Iterator[None]:
        """Several ``backward`` calls, one gradient reduction (GradCache's chunked re-forward).

        ZeRO 1-3 use ``coalesce_grad_reduction``: grads stay local inside the block and one reduce(-scatter)
        runs on exit. Stage 0 has no such hook: skip the per-backward all-reduce and all-reduce once after.
        """
        if self.stage > 0:
            with self.ds.coalesce_grad_reduction():
                yield
            return
        with self.ds.no_sync():
            yield
        self.ds.allreduce_gradients()

    def step(self) -> torch.Tensor | float | None:
        """The optimizer step; DeepSpeed's gradient norm (None without clipping), not read here: a
        device tensor's ``float()`` would wait for the step."""
        self.ds.step()
        return self.ds.get_global_grad_norm()

    @property
    def lr(self) -> float:
        return float(self.ds.get_lr()[0])

    def save(self, directory: Path, rank: int) -> None:
        """Every rank writes its own shard (collective)."""
        self.ds.save_checkpoint(str(directory / DEEPSPEED_DIR), tag=DEEPSPEED_TAG)

    def load(self, directory: Path) -> None:
        path, _ = self.ds.load_checkpoint(
            str(directory / DEEPSPEED_DIR), tag=DEEPSPEED_TAG, load_lr_scheduler_states=True
        )
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {directory / DEEPSPEED_DIR}")

    def export(self, directory: Path, rank: int) -> None:
        """A consolidated Hugging Face model of the backbone, in the training dtype (collective; rank 0 writes)."""
        if self.stage == 3:
            state = self.ds._zero3_consolidated_16bit_state_dict()
        else:
            state = self.module.state_dict() if rank == 0 else None
        if rank == 0:
            prefix = "backbone."
            backbone_state = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
            self.module.backbone.save_pretrained(directory, state_dict=backbone_state)
