"""InfoNCE against a hand-computed reference, and 2 gloo ranks against one process."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from xling.trainer.losses import info_nce


def reference(q, p, n=None, tau=0.05, symmetric=False) -> float:
    """Plain-Python InfoNCE: -log softmax of the positive among all positives (+ negatives)."""
    cands = list(p) + (list(n) if n is not None else [])

    def ce(anchors, targets):
        total = 0.0
        for i, a in enumerate(anchors):
            logits = [sum(x * y for x, y in zip(a, c, strict=True)) / tau for c in targets]
            m = max(logits)
            lse = m + math.log(sum(math.exp(v - m) for v in logits))
            total += lse - logits[i]
        return total / len(anchors)

    loss = ce(q, cands)
    return (loss + ce(p, list(q))) / 2 if symmetric else loss


def tensors(b=4, d=3, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, p, n = (
        F.normalize(torch.randn(m, d, generator=g, dtype=torch.float64), dim=-1) for m in (b, b, b * k)
    )
    return q, p, n


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("with_negatives", [False, True])
def test_loss_matches_hand_computed(symmetric, with_negatives) -> None:
    q, p, n = tensors()
    n = n if with_negatives else None
    got = info_nce(q, p, n, temperature=0.05, symmetric=symmetric)
    want = reference(q.tolist(), p.tolist(), n.tolist() if n is not None else None, 0.05, symmetric)
    assert got.item() == pytest.approx(want, rel=1e-10)


def test_masked_negatives_are_no_candidates() -> None:
    q, p, n = tensors(k=2)
    mask = torch.tensor([True, False, False, True, True, True, False, True])
    got = info_nce(q, p, n, temperature=0.05, negative_mask=mask)
    want = reference(q.tolist(), p.tolist(), n[mask].tolist(), 0.05)
    assert got.item() == pytest.approx(want, rel=1e-10)


def test_tiny_case_by_hand() -> None:
    # Two orthogonal unit pairs, tau = 1: loss = log(e + 1) - 1 for each query.
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    assert info_nce(q, q.clone(), temperature=1.0).item() == pytest.approx(math.log(math.e + 1) - 1)


def test_gradients_match_autograd_of_reference_formula() -> None:
    q, p, n = tensors()
    q1, p1, n1 = (t.clone().requires_grad_() for t in (q, p, n))
    info_nce(q1, p1, n1, temperature=0.1, symmetric=True).backward()
    q2, p2, n2 = (t.clone().requires_grad_() for t in (q, p, n))
    logits = q2 @ torch.cat([p2, n2]).T / 0.1
    lq = -(logits.diag() - logits.logsumexp(1)).mean()
    lp_logits = p2 @ q2.T / 0.1
    lp = -(lp_logits.diag() - lp_logits.logsumexp(1)).mean()
    ((lq + lp) / 2).backward()
    for a, b in ((q1, q2), (p1, p2), (n1, n2)):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)
    # and numerically, for one coordinate
    eps = 1e-6
    qp = q.clone()
    qp[0, 0] += eps
    num = (info_nce(qp, p, n, 0.1, True) - info_nce(q, p, n, 0.1, True)).item() / eps
    assert num == pytest.approx(q1.grad[0, 0].item(), rel=1e-4)


# ---------------------------------------------------------------------------- 2 ranks vs 1 process


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, q, p, n, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    b = q.shape[0] // world
    k = n.shape[0] // q.shape[0]
    sl, nsl = slice(rank * b, (rank + 1) * b), slice(rank * b * k, (rank + 1) * b * k)
    ql, pl, nl = (t[s].clone().requires_grad_() for t, s in ((q, sl), (p, sl), (n, nsl)))
    loss = info_nce(ql, pl, nl, temperature=0.05, symmetric=True)
    loss.backward()
    # average over ranks, as DeepSpeed / the plain engine do
    losses = [torch.zeros(()) for _ in range(world)]
    dist.all_gather(losses, loss.detach().float())
    out[rank] = (sum(losses) / world, ql.grad / world, pl.grad / world, nl.grad / world)
    dist.destroy_process_group()


def test_two_ranks_equal_single_process() -> None:
    q, p, n = (t.float() for t in tensors(b=8, d=5, k=1, seed=3))
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_worker, args=(2, _free_port(), q, p, n, out), nprocs=2, join=True)
    q1, p1, n1 = (t.clone().requires_grad_() for t in (q, p, n))
    single = info_nce(q1, p1, n1, temperature=0.05, symmetric=True)
    single.backward()
    assert out[0][0].item() == pytest.approx(single.item(), rel=1e-5)
    # Each rank's embedding gradient (already divided by the world size) matches the single-process one.
    torch.testing.assert_close(torch.cat([out[0][1], out[1][1]]), q1.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(torch.cat([out[0][2], out[1][2]]), p1.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(torch.cat([out[0][3], out[1][3]]), n1.grad, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------- bf16 embeddings (issue 26)


def close_bf16_pairs(b: int = 64, d: int = 64, spread: float = 0.005) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 unit queries and positives around one direction: every cosine is within about 0.005 of
    every other, below what a bf16 logit at temperature 0.05 resolves (steps of 0.125, i.e. 0.006),
    yet each query is closest to its own positive."""
    g = torch.Generator().manual_seed(0)
    base = F.normalize(torch.randn(d, generator=g), dim=0)
    u = torch.randn(b, d, generator=g) * spread
    q = F.normalize(base + u, dim=-1).bfloat16()
    p = F.normalize(base + u + 0.2 * spread * torch.randn(b, d, generator=g), dim=-1).bfloat16()
    return q, p


def test_bf16_embeddings_get_an_fp32_loss_and_gradient() -> None:
    q, p = close_bf16_pairs()
    cos = q.double() @ p.double().T
    assert cos.max() - cos.min() < 0.006  # the bf16 logits would all tie
    q1, p1 = q.clone().requires_grad_(), p.clone().requires_grad_()
    loss = info_nce(q1, p1, temperature=0.05)
    loss.backward()
    q2, p2 = q.double().requires_grad_(), p.double().requires_grad_()
    want = info_nce(q2, p2, temperature=0.05)
    want.backward()
    assert want.item() < math.log(64) - 0.02  # the positives are closest: the exact loss is below ln b
    assert loss.item() == pytest.approx(want.item(), abs=1e-4)
    # the gradient is the exact one (to bf16 rounding of the result), not that of tied logits
    for got, exact in ((q1.grad, q2.grad), (p1.grad, p2.grad)):
        assert got.abs().sum() > 0
        assert F.cosine_similarity(got.double().flatten(), exact.flatten(), dim=0) > 0.99


def test_bf16_encoder_pools_and_normalises_in_fp32() -> None:
    """A bf16 backbone's token states are mean-pooled and normalised in fp32, so the embeddings keep
    differences a bf16 mean and bf16 unit vectors would round away."""
    from types import SimpleNamespace

    from xling.trainer.model import BiEncoder

    g = torch.Generator().manual_seed(1)
    hidden = (1 + 1e-3 * torch.randn(2, 50, 16, generator=g)).bfloat16()

    class Backbone(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            return SimpleNamespace(last_hidden_state=hidden)

    mask = torch.ones(2, 50, dtype=torch.long)
    emb = BiEncoder(Backbone(), "mean", normalize=True)(torch.zeros(2, 50, dtype=torch.long), mask)
    assert emb.dtype == torch.float32
    want = F.normalize(hidden.double().mean(1), dim=-1)
    torch.testing.assert_close(emb.double(), want, rtol=0, atol=1e-6)
