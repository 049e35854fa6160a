"""Exact parameter counts of a model, from its config on the ``meta`` device or a built-in table of known
shapes (no weights, no hub access for the known ones)."""

from __future__ import annotations

from dataclasses import dataclass

from xling.api.errors import InputError
from xling.api.spec.base import DEMO_MODEL, TINY_MODEL


def _shape(
    model_type: str, vocab: int, hidden: int, layers: int, heads: int, ffn: int, **extra: int
) -> tuple:
    kwargs = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads)
    return model_type, kwargs | {"intermediate_size": ffn, **extra}


_E5_SMALL = _shape("bert", 250037, 384, 12, 12, 1536)
_XLMR_LARGE = _shape("xlm-roberta", 250002, 1024, 24, 16, 4096, max_position_embeddings=514)
#: Shapes known without hub access: (model_type, config kwargs). ``xling/xlm-roberta-30b`` is the
#: hypothetical 30B XLM-R-shaped encoder of the design notes (no such checkpoint exists: plan-only, refused by
#: ``xling run`` and the operator, ``ModelSpec.plan_only``).
KNOWN_SHAPES: dict[str, tuple[str, dict[str, int]]] = {
    TINY_MODEL: _shape("bert", 2000, 32, 2, 2, 64),
    DEMO_MODEL: _E5_SMALL,
    "intfloat/multilingual-e5-small": _E5_SMALL,
    "intfloat/multilingual-e5-large": _XLMR_LARGE,
    "BAAI/bge-m3": _XLMR_LARGE,
    "facebook/xlm-roberta-xl": _shape(
        "xlm-roberta-xl", 250880, 2560, 36, 32, 10240, max_position_embeddings=514
    ),
    "facebook/xlm-roberta-xxl": _shape(
        "xlm-roberta-xl", 250880, 4096, 48, 32, 16384, max_position_embeddings=514
    ),
    # bench/gpu_checks.py's randomly initialised encoder, whose GPU step issue 26 measured
    "xling/xlm-roberta-1.3b-bench": _shape(
        "xlm-roberta", 32768, 2048, 24, 16, 8192, max_position_embeddings=514, type_vocab_size=1
    ),
    "xling/xlm-roberta-30b": _shape("xlm-roberta", 250002, 7168, 48, 56, 28672, max_position_embeddings=514),
    "intfloat/e5-mistral-7b-instruct": _shape("mistral", 32000, 4096, 32, 32, 14336, num_key_value_heads=8),
    "Qwen/Qwen3-Embedding-8B": _shape(
        "qwen3", 151665, 4096, 36, 32, 12288, num_key_value_heads=8, head_dim=128
    ),
    "Qwen/Qwen2.5-32B": _shape("qwen2", 152064, 5120, 64, 40, 27648, num_key_value_heads=8),
}


@dataclass(frozen=True)
class ModelShape:
    name: str
    model_class: str
    total_params: int
    embedding_params: int  # lookups, no matmul FLOPs
    largest_layer_params: int  # the most parameters any one module owns (ZeRO-3 gathers it whole)
    hidden: int
    layers: int
    ffn: int
    gated_mlp: bool  # SwiGLU-style MLPs keep three ffn-wide tensors, not two
    module_params: tuple[
        int, ...
    ] = ()  # the direct parameters of each module that has any (ZeRO-3 fetch units)

    @property
    def dense_params(self) -> int:
        return self.total_params - self.embedding_params


def model_shape(name: str, revision: str | None = None, trust_remote_code: bool = False) -> ModelShape:
    """Exact counts from a config: the model is built on the meta device (no memory, no weights)."""
    import torch
    from transformers import AutoConfig, AutoModel

    if name in KNOWN_SHAPES:
        model_type, kwargs = KNOWN_SHAPES[name]
        config = AutoConfig.for_model(model_type, **kwargs)
    else:
        try:
            config = AutoConfig.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
        except OSError as err:
            known = ", ".join(sorted(KNOWN_SHAPES))
            raise InputError(
                None, f"model {name!r}: no config found offline ({err}); known shapes: {known}"
            ) from None
    with torch.device("meta"):
        model = AutoModel.from_config(config, trust_remote_code=trust_remote_code)
    embedding = sum(
        p.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()
    )
    sizes = [sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()]
    return ModelShape(
        name=name, model_class=type(model).__name__, total_params=sum(p.numel() for p in model.parameters()),
        embedding_params=embedding, largest_layer_params=max(sizes), hidden=config.hidden_size,
        layers=config.num_hidden_layers, ffn=config.intermediate_size,
        gated_mlp=getattr(config, "hidden_act", "") == "silu", module_params=tuple(n for n in sizes if n),
    )  # fmt: skip
