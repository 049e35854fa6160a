"""GradCache: a contrastive step whose activation memory is one chunk, not the whole batch.

The loss couples every example with every other (in-batch negatives), so a batch cannot simply be split
into accumulation steps. GradCache (Gao et al., 2021) splits the *encoder* work instead:

1. encode every chunk without a graph, remembering the RNG state each chunk started from;
2. compute the loss on the detached embeddings and backpropagate to them only: d loss / d embedding;
3. re-encode each chunk with a graph, under its remembered RNG state (identical dropout masks), and
   backpropagate ``sum(embedding * cached_grad)``, which gives the chunk's exact share of the parameter
   gradient.

Step 3 calls ``engine.backward`` once per chunk. Under ZeRO-3 every backward would reduce-scatter (and
average) its gradients; ``engine.accumulate()`` wraps DeepSpeed's ``coalesce_grad_reduction()`` so the
chunks accumulate locally and one reduction runs per step. With the plain engine gradients are reduced
in ``step()`` anyway.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Protocol

import torch

Inputs = dict[str, torch.Tensor]


class Engine(Protocol):
    """What GradCache needs of an engine (TorchEngine and DeepSpeedEngine both qualify)."""

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor: ...
    def backward(self, loss: torch.Tensor) -> None: ...
    def accumulate(self) -> AbstractContextManager[None]: ...


class RngState:
    """The CPU (and current CUDA device) RNG state at one moment, replayable later."""

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() else None

    @contextmanager
    def replay(self) -> Iterator[None]:
        """Run the block from this state; the caller's RNG stream is left as it was."""
        devices = [torch.cuda.current_device()] if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda)
            yield


def chunked(inputs: Inputs, size: int) -> list[Inputs]:
    n = next(iter(inputs.values())).shape[0]
    return [{k: v[i : i + size] for k, v in inputs.items()} for i in range(0, n, size)]


def cached_step(
    engine: Engine,
    batches: Sequence[Inputs],
    loss_fn: Callable[..., torch.Tensor],
    chunk_size: int,
) -> torch.Tensor:
    """One GradCache forward/backward. ``batches`` are encoder inputs (e.g. queries, passages) whose
    embeddings are passed to ``loss_fn`` in that order. Leaves gradients ready for ``engine.step()``;
    returns the detached loss."""
    chunks = [chunked(b, chunk_size) for b in batches]
    states: list[RngState] = []
    reps: list[torch.Tensor] = []
    with torch.no_grad():
        for batch_chunks in chunks:
            outs = []
            for c in batch_chunks:
                states.append(RngState())
                outs.append(engine(**c))
            reps.append(torch.cat(outs).float().requires_grad_())
    loss = loss_fn(*reps)
    loss.backward()  # only to the cached embeddings: no parameter is in this graph
    grads = [g for rep in reps for g in rep.grad.split(chunk_size)]
    with engine.accumulate():
        for c, state, grad in zip((c for b in chunks for c in b), states, grads, strict=True):
            with state.replay():
                emb = engine(**c)
            engine.backward((emb.float() * grad).sum())
    return loss.detach()
