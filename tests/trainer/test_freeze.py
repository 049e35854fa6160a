"""``model.freezeLayers``: the embedding block and the lowest layers get no gradient, so backward stops
above them (the lever that makes the research sweep fit 2 CPU cores), and the rest still trains."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from xling.api.spec.training import ModelSpec
from xling.trainer.model import build_tiny_model, load_backbone

TEXTS = [
    "Wie viele Menschen leben in Berlin?",
    "How many people live in Berlin?",
    "¿Cuánta gente vive en Berlín?",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(TEXTS * 20, tmp_path_factory.mktemp("freeze") / "tiny")


def test_frozen_layers_get_no_gradient_and_the_rest_does(tiny: Path) -> None:
    model = load_backbone(str(tiny), ModelSpec(name=str(tiny), freezeLayers=1))
    ids = torch.tensor([[0, 5, 6, 7, 2]])
    model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state.sum().backward()
    grads = {n: p.grad is not None for n, p in model.named_parameters()}
    assert not any(v for n, v in grads.items() if n.startswith(("embeddings.", "encoder.layer.0.")))
    assert all(v for n, v in grads.items() if n.startswith("encoder.layer.1."))
    assert not any(p.requires_grad for p in model.embeddings.parameters()), "positions and LayerNorm too"


def test_zero_frozen_layers_train_everything(tiny: Path) -> None:
    model = load_backbone(str(tiny), ModelSpec(name=str(tiny)))
    assert all(p.requires_grad for p in model.parameters())


def test_more_frozen_layers_than_the_model_has_is_refused(tiny: Path) -> None:
    with pytest.raises(ValueError, match="model.freezeLayers: 3 is more than the model's 2 layers"):
        load_backbone(str(tiny), ModelSpec(name=str(tiny), freezeLayers=3))


def test_mfu_counts_no_backward_for_frozen_layers(tiny: Path) -> None:
    """6N per token when everything trains; 2N + 4 x (the trainable part) when lower layers are frozen."""
    from xling.trainer.capacity.flops import count_dense_params, model_flops_utilization

    full = load_backbone(str(tiny), ModelSpec(name=str(tiny)))
    frozen = load_backbone(str(tiny), ModelSpec(name=str(tiny), freezeLayers=1))
    dense = count_dense_params(frozen)
    layer = sum(p.numel() for p in frozen.encoder.layer[1].parameters())
    assert count_dense_params(frozen, trainable_only=True) == layer < dense == count_dense_params(full)
    assert count_dense_params(full, trainable_only=True) == dense
    all_trained = model_flops_utilization(
        dense, 1000, 1.0, 1e9, count_dense_params(full, trainable_only=True)
    )
    assert all_trained == pytest.approx(6 * dense * 1000 / 1e9)
    assert model_flops_utilization(dense, 1000, 1.0, 1e9, layer) == pytest.approx(
        (2 * dense + 4 * layer) * 1000 / 1e9
    )
