"""InfoNCE with in-batch negatives over the *global* batch.

Convention (sentence-transformers' "local anchors"): each rank scores its own queries against the
passages of every rank, all-gathered with gradients. Each rank's loss is the mean over its local queries;
DeepSpeed/all-reduce then average gradients over ranks, which equals the gradient of the mean loss over
the global batch. No world-size factor is needed (tests/trainer/test_losses.py checks 2 ranks == 1 process).

Candidates are all positives plus all hard negatives of the global batch (the usual reading; the
hybrid-batch paper's printed formula lists negatives only).

The loss runs in fp32 (at least) whatever the encoder's dtype: at temperature 0.05 a bf16 logit near 20
is resolved in steps of 0.125, so cosines closer than about 0.006 tie and the loss sits at ln(batch)
(issue 26: 4.15625 at every step of a bf16 run).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank; gradients flow back to the rank that produced each row."""
    _, world = _world()
    if world == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim=0)


def _fp32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in fp32, or fp64 if it is that already (the hand-computed reference tests run in fp64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def info_nce(
    q: torch.Tensor,
    p: torch.Tensor,
    negatives: torch.Tensor | None = None,
    temperature: float = 0.05,
    symmetric: bool = False,
    negative_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean InfoNCE of local queries ``q`` [b, d] against the global positives (+ hard negatives).

    ``p`` [b, d] holds each local query's positive; ``negatives`` [b*k, d] the local hard negatives, of which
    ``negative_mask`` [b*k] (bool) says which count: a masked one (padding, or a text that is an in-batch
    positive) is no candidate for any query. ``symmetric`` adds the passage -> query term (hard negatives
    play no part in that direction).
    """
    rank, _ = _world()
    q, p = _fp32(q), _fp32(p)
    negatives = None if negatives is None else _fp32(negatives)
    b = q.shape[0]
    all_p = gather_with_grad(p)
    candidates = all_p if negatives is None else torch.cat([all_p, gather_with_grad(negatives)])
    labels = torch.arange(b, device=q.device) + rank * b
    logits = q @ candidates.T / temperature
    if negatives is not None and negative_mask is not None:
        keep = torch.cat([torch.ones(len(all_p), device=q.device), gather_with_grad(negative_mask.float())])
        logits = logits.masked_fill(keep[None, :] == 0, float("-inf"))
    loss = F.cross_entropy(logits, labels)
    if symmetric:
        all_q = gather_with_grad(q)
        loss = (loss + F.cross_entropy(p @ all_q.T / temperature, labels)) / 2
    return loss
