"""``xling export``: any xling checkpoint as a sentence-transformers directory with a model card.

The final checkpoint already holds that directory (``model/``); this command is for the others, a checkpoint
that is not final or predates the layout: ZeRO shards are consolidated one shard at a time, a plain
PyTorch ``engine.pt`` is unpacked, and the files and the card are written as the run would have
(:mod:`~xling.trainer.sentence_transformers_dir`), from the checkpoint's ``xling.json``
(:mod:`~xling.trainer.checkpoint_layout`) or, for a checkpoint older than that file, the experiment YAML.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from xling.api.errors import InputError
from xling.api.spec.experiment import ExperimentSpec
from xling.trainer.checkpoint_layout import (
    DEEPSPEED_DIR,
    DEEPSPEED_TAG,
    ENGINE,
    META,
    MODEL_DIR,
    CheckpointMeta,
    read_checkpoint_meta,
    read_results,
    read_trainer_state,
)
from xling.trainer.sentence_transformers_dir import write_json, write_model_card, write_sentence_transformers


def _checkpoint_meta(checkpoint: Path, spec_file: str | None) -> CheckpointMeta:
    """The checkpoint's own record, or (checkpoints from before it existed) the experiment file."""
    if spec_file is None:
        path = checkpoint / META
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: not found (a checkpoint from before xling wrote it): pass --spec FILE"
            )
        return read_checkpoint_meta(checkpoint)
    from xling.api.spec.loading import load_experiment
    from xling.trainer.model import resolve_model_path

    exp = load_experiment(spec_file)
    if (checkpoint / MODEL_DIR / "config.json").is_file():
        model_path = str(checkpoint / MODEL_DIR)
    else:  # config and tokenizer of the model trained from
        model_path = resolve_model_path(exp.spec.model.name)
    return CheckpointMeta(
        spec=exp.spec.model_dump(mode="json"), model_path=model_path, name=exp.metadata.name
    )


def consolidate_zero(ds_dir: Path, out: Path, dtype: Any, max_shard_size: str = "5GB") -> None:
    """A ZeRO (1-3) checkpoint's fp32 master weights as the backbone's sharded safetensors, one shard in
    memory at a time (the optimizer files are memory-mapped; DeepSpeed's lazy gather, renamed keys)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint, to_torch_tensor
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    lazy = get_fp32_state_dict_from_zero_checkpoint(str(ds_dir), tag=DEEPSPEED_TAG, lazy_mode=True)
    lazy = {k.removeprefix("backbone."): v for k, v in lazy.items() if k.startswith("backbone.")}
    split = split_torch_state_dict_into_shards(
        to_torch_tensor(lazy, return_empty_tensor=True, dtype=dtype), max_shard_size=max_shard_size,
        filename_pattern="model{suffix}.safetensors",
    )  # fmt: skip
    for filename, names in split.filename_to_tensors.items():
        shard = to_torch_tensor({name: lazy[name] for name in names}, dtype=dtype)
        save_file(shard, str(out / filename), metadata={"format": "pt"})
        del shard
    if split.is_sharded:
        write_json(
            out / "model.safetensors.index.json",
            {"metadata": split.metadata, "weight_map": split.tensor_to_filename},
        )


def export_checkpoint(checkpoint: str | Path, out: str | Path, spec_file: str | None = None) -> Path:
    """``xling export``: any xling checkpoint (final or not; plain PyTorch or DeepSpeed ZeRO 1-3) as a
    sentence-transformers directory with a model card."""
    import shutil

    import torch
    from transformers import AutoConfig

    from xling.trainer.model import Tokenize, load_tokenizer

    checkpoint, out = Path(checkpoint), Path(out)
    meta = _checkpoint_meta(checkpoint, spec_file)
    spec = ExperimentSpec.model_validate(meta.spec)
    out.mkdir(parents=True, exist_ok=True)
    source = Path(meta.model_path)  # config and tokenizer
    if (checkpoint / MODEL_DIR / "config.json").is_file():  # a final checkpoint: the backbone is there
        source = checkpoint / MODEL_DIR
        shutil.copytree(source, out, dirs_exist_ok=True)
    elif (checkpoint / DEEPSPEED_DIR).is_dir():
        if not any((checkpoint / DEEPSPEED_DIR / DEEPSPEED_TAG).glob("*zero_pp_rank_*")):
            raise InputError(checkpoint / DEEPSPEED_DIR, "a ZeRO stage 0 checkpoint has no shards to consolidate; "
                             "export the run's final checkpoint instead")  # fmt: skip
        dtype = torch.bfloat16 if spec.distributed.precision == "bf16" else torch.float32
        consolidate_zero(checkpoint / DEEPSPEED_DIR, out, dtype)
    elif (checkpoint / ENGINE).is_file():
        from safetensors.torch import save_file

        state = torch.load(checkpoint / ENGINE, map_location="cpu", mmap=True, weights_only=False)["model"]
        save_file({k.removeprefix("backbone."): v.contiguous() for k, v in state.items() if k.startswith("backbone.")},
                  str(out / "model.safetensors"), metadata={"format": "pt"})  # fmt: skip
    else:
        raise FileNotFoundError(
            f"{checkpoint}: no {MODEL_DIR}/, {DEEPSPEED_DIR}/ or {ENGINE}: not an xling checkpoint"
        )
    if source != checkpoint / MODEL_DIR:
        AutoConfig.from_pretrained(source, trust_remote_code=spec.model.trust_remote_code).save_pretrained(
            out
        )
    tokenize = Tokenize(load_tokenizer(str(source), spec.model), spec.model)
    write_sentence_transformers(out, spec.model, tokenize.tok, tokenize.append_eos)
    try:
        composition = read_trainer_state(checkpoint).get("composition", {})
    except FileNotFoundError:
        composition = {}
    write_model_card(out, spec, name=meta.name or "xling-retriever", metrics=meta.metrics,
                     composition=composition, report=read_results(checkpoint), run_id=meta.run_id)  # fmt: skip
    return out


def add_cli(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "export",
        help="a checkpoint as a sentence-transformers model directory with a model card",
        description="Turn any xling checkpoint (a Ray Train checkpoint_* directory: final or intermediate, plain "
        "PyTorch or DeepSpeed ZeRO 1-3, consolidated shard by shard) into the directory the final checkpoint "
        "holds under model/: loads with SentenceTransformer(DIR) and AutoModel.",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument(
        "--spec", metavar="FILE", help="the experiment YAML (checkpoints written before xling.json)"
    )
    p.set_defaults(func=lambda args: print(export_checkpoint(args.checkpoint, args.out, args.spec)) or 0)
