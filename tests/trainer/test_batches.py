"""What a training step sees: the texts of a batch plan, and the hard negatives that may count."""

from __future__ import annotations

import torch

from xling.trainer.data.pairs import Pair, PairCorpus
from xling.trainer.losses import info_nce
from xling.trainer.sampling import BatchPlan, Item
from xling.trainer.train_loop import batch_texts


def test_hard_negatives_never_the_positive_nor_an_in_batch_text() -> None:
    c = PairCorpus([
        {"en": Pair("a", "en", "qa", "pa", hard_negatives=("pb", "Pa ", "na1")), "de": Pair("a", "de", "qa_de", "pa_de")},
        {"en": Pair("b", "en", "qb", "pb", hard_negatives=("pa_de",))},  # a translation of a's positive
        {"en": Pair("c", "en", "qc", "pc")},  # no hard negatives at all
    ])  # fmt: skip
    plan = BatchPlan(0, "mixed", tuple(Item(g, "en", "en") for g in range(3)))
    queries, passages, negatives, valid = batch_texts(c, plan, 0, 1, hard_negatives=2)
    assert queries == ["qa", "qb", "qc"] and passages == ["pa", "pb", "pc"]
    # a: "pb" is b's positive, "Pa " its own (normalised): skipped for na1, then padded
    assert negatives == ["na1", "", "", "", "", ""]
    assert valid == [True, False, False, False, False, False]
    assert not set(negatives) & set(passages)


def test_a_perfect_encoder_has_no_loss_left_when_negatives_are_missing() -> None:
    """Padding a missing hard negative with the positive (as before) kept the loss at log 2 however good the
    encoder was; a masked pad leaves it near 0."""
    q = torch.eye(4, dtype=torch.float64)
    pad = q.clone()  # what a pad equal to the positive would embed to
    loss = info_nce(q, q.clone(), pad, temperature=0.01, negative_mask=torch.zeros(4, dtype=torch.bool))
    assert loss.item() < 1e-6
