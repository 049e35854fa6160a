"""Length-bucketed encoding (BiEncoder on CPU): the same embeddings and gradients as the padded batch.

A CPU pays for every token slot, padding included, so ``BiEncoder`` encodes a right-padded batch in
chunks of rows sorted by length, each trimmed to its longest text, when that saves enough FLOPs. The
texts never interact inside the encoder, so only fp32 rounding may differ from the padded batch.
"""

from __future__ import annotations

import pytest
import torch
from transformers import BertModel

from xling.trainer.model import BiEncoder, length_buckets, tiny_config


def right_padded(lengths: list[int], width: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
    ids = torch.randint(5, 100, (len(lengths), width), generator=g).masked_fill(mask == 0, 1)
    return {"input_ids": ids, "attention_mask": mask}


def model(bucket: bool, pooling: str = "mean") -> BiEncoder:
    torch.manual_seed(0)
    enc = BiEncoder(BertModel(tiny_config(100), add_pooling_layer=False), pooling, length_buckets=True).eval()  # type: ignore[arg-type]
    enc.bucket_rows = 3
    enc.bucket_min_flops = 0.0 if bucket else float("inf")
    return enc


def test_buckets_sort_rows_by_length_and_trim_each_to_its_longest() -> None:
    mask = right_padded([2, 7, 4, 7, 1, 5, 3], 9)["attention_mask"]
    buckets = length_buckets(mask, 3)
    assert buckets is not None
    assert [idx.tolist() for idx, _ in buckets] == [[1, 3, 5], [2, 6, 0], [4]]
    assert [n for _, n in buckets] == [7, 4, 1]
    assert length_buckets(mask, 7) is None, "one chunk: nothing to gain"
    assert length_buckets(mask.flip(1), 3) is None, "left padding stays as it is"


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_bucketed_embeddings_and_gradients_equal_the_padded_batch(pooling: str) -> None:
    inputs = right_padded([2, 7, 4, 7, 1, 5, 3, 6], 10)
    results = []
    for bucket in (False, True):
        enc = model(bucket, pooling)
        assert (enc._buckets(inputs["attention_mask"]) is not None) == bucket
        emb = enc(**inputs)
        (emb @ torch.linspace(-1, 1, emb.shape[1])).pow(2).sum().backward()
        results.append((emb.detach(), {n: p.grad for n, p in enc.named_parameters() if p.grad is not None}))
    (plain, plain_grads), (bucketed, bucketed_grads) = results
    torch.testing.assert_close(bucketed, plain, rtol=1e-5, atol=1e-6)
    assert bucketed_grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(bucketed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_no_buckets_when_the_saving_is_small_or_under_zero3() -> None:
    mask = right_padded([2, 7, 4, 7, 1, 5, 3, 6], 10)["attention_mask"]
    enc = model(bucket=True)
    enc.bucket_min_flops = BiEncoder.bucket_min_flops  # the default: a tiny model never pays for it
    assert enc._buckets(mask) is None
    zero3 = model(bucket=True)
    for p in zero3.parameters():
        p.ds_id = 0  # what a ZeRO-3 partitioned parameter carries
    assert zero3._buckets(mask) is None


def test_buckets_are_asked_for() -> None:
    """Off unless ``model.lengthBuckets``: losses then stay those of runs before the option existed."""
    assert not BiEncoder(BertModel(tiny_config(100), add_pooling_layer=False)).length_buckets
