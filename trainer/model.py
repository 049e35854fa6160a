"""The bi-encoder: one shared Hugging Face backbone, pooling, L2 normalisation, E5-style prefixes.

Also resolves the built-in model names (``xling/multilingual-e5-small``, ``xling/tiny-random``) and
implements the evaluation ``TextEncoder`` protocol (length-bucketed batches, inference mode, bf16 on GPU,
sharded across ranks when a process group is up, so a ZeRO-3 model larger than one device can encode).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from xling.api.errors import InputError
from xling.api.spec.base import DEMO_MODEL, TINY_MODEL, Pooling, SpecError
from xling.api.spec.training import ModelSpec
from xling.trainer.data.store import FORMAT, META, DataLocation, store_once

log = logging.getLogger(__name__)
Kind = Literal["query", "passage"]

TINY_SPECIAL = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # XLM-R order, as in e5-small


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """Reduce token states [B, T, H] to one vector per text."""
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "mean":
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    # last_token: the last non-padding position, right or left padded alike.
    last = mask.shape[1] - 1 - mask.flip(1).int().argmax(1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def length_buckets(mask: torch.Tensor, rows: int) -> list[tuple[torch.Tensor, int]] | None:
    """Rows of a right-padded batch sorted by length and cut into chunks of ``rows``, each with the length
    its longest text needs: ``[(row indices, columns), ...]``. None if the batch is not right-padded or
    is one chunk already."""
    b = mask.shape[0]
    if b <= rows or not bool((mask[:, 1:] <= mask[:, :-1]).all()):  # left padding or holes: leave as is
        return None
    lengths = mask.sum(1)
    order = torch.argsort(lengths, descending=True, stable=True)
    return [(idx, max(int(lengths[idx[0]]), 1)) for idx in order.split(rows)]


class BiEncoder(nn.Module):
    """Shared-weight encoder for queries and passages.

    With ``length_buckets`` (``model.lengthBuckets``), on CPU a batch is encoded in length buckets
    (``bucket_rows`` rows each, sorted by length, each trimmed to its longest text) when that saves at
    least ``bucket_min_flops`` of model FLOPs: a CPU
    spends its time per token slot, and padding to the batch's longest text wasted a fifth of the
    demo's (MLQA) step. The texts do not interact in the encoder, so the embeddings are those of the
    padded batch to fp32 rounding; only dropout draws its masks in another order. Not under ZeRO-3,
    where every forward gathers the weights again, nor on GPUs, where launches cost more than padding.
    """

    bucket_rows = 8
    bucket_min_flops = 1e10  # about 0.1 s on a CPU core: far above the cost of the extra forward calls

    def __init__(
        self,
        backbone: nn.Module,
        pooling: Pooling = "mean",
        normalize: bool = True,
        length_buckets: bool = False,
    ):
        super().__init__()
        self.backbone = backbone
        self.pooling: Pooling = pooling
        self.normalize = normalize
        self.length_buckets = length_buckets
        self._dense: int | None = None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        buckets = self._plan(attention_mask, input_ids.device.type)
        if buckets is None:
            return self._encode(input_ids, attention_mask)
        order = torch.cat([idx for idx, _ in buckets])
        emb = torch.cat([self._encode(input_ids[idx, :n], attention_mask[idx, :n]) for idx, n in buckets])
        return emb[torch.argsort(order)]  # back to the batch's order

    def _encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        # pooled and normalised in fp32: a bf16 mean over hundreds of tokens, and bf16 unit vectors,
        # lose the small cosine differences the contrastive loss learns from
        emb = pool(hidden.float(), attention_mask, self.pooling)
        return F.normalize(emb, dim=-1) if self.normalize else emb

    def token_slots(self, attention_mask: torch.Tensor, device_type: str) -> int:
        """Token positions a forward on ``device_type`` computes for this batch, padding included: the
        tokens the device actually processed (the trainer's MFU counts these)."""
        buckets = self._plan(attention_mask, device_type)
        return attention_mask.numel() if buckets is None else sum(len(idx) * n for idx, n in buckets)

    def _plan(self, mask: torch.Tensor, device_type: str) -> list[tuple[torch.Tensor, int]] | None:
        return self._buckets(mask) if self.length_buckets and device_type == "cpu" else None

    def _buckets(self, mask: torch.Tensor) -> list[tuple[torch.Tensor, int]] | None:
        if self._dense is None:  # non-embedding parameters; ZeRO-3 ones are empty here: never bucket
            zero3 = any(hasattr(p, "ds_id") for p in self.parameters())
            embedding = {id(p) for m in self.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
            self._dense = 0 if zero3 else sum(p.numel() for p in self.parameters() if id(p) not in embedding)
        if (
            not self._dense or 2 * self._dense * mask.numel() < self.bucket_min_flops
        ):  # ZeRO-3, or a small model
            return None
        buckets = length_buckets(mask, self.bucket_rows)
        if buckets is None:
            return None
        saved = mask.numel() - sum(len(idx) * n for idx, n in buckets)
        return buckets if 2 * self._dense * saved >= self.bucket_min_flops else None


class Tokenize:
    """Turns raw texts into model inputs: prefix, truncation, padding side, EOS for last-token pooling."""

    def __init__(self, tokenizer: Any, model_spec: ModelSpec):
        self.tok = tokenizer
        self.model_spec = model_spec
        self.append_eos = False
        if model_spec.pooling == "last_token":
            tokenizer.padding_side = "left"
            if tokenizer.pad_token is None:  # decoder LLMs (Mistral, Llama) ship none; pads are masked anyway
                tokenizer.pad_token = tokenizer.eos_token
            ids = tokenizer("a")["input_ids"]
            self.append_eos = tokenizer.eos_token is not None and ids[-1] != tokenizer.eos_token_id

    def __call__(self, texts: Sequence[str], kind: Kind) -> dict[str, torch.Tensor]:
        prefix = self.model_spec.query_prefix if kind == "query" else self.model_spec.passage_prefix
        max_len = self.model_spec.max_query_length if kind == "query" else self.model_spec.max_passage_length
        texts = [f"{prefix}{t}" for t in texts]
        if self.append_eos:  # truncate first, then append: a long text keeps the EOS its embedding is read at
            ids = self.tok(texts, max_length=max_len - 1, truncation=True)["input_ids"]
            batch = self.tok.pad(
                {"input_ids": [x + [self.tok.eos_token_id] for x in ids]}, return_tensors="pt"
            )
        else:
            batch = self.tok(texts, max_length=max_len, truncation=True, padding=True, return_tensors="pt")
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


# --------------------------------------------------------------------------------------- loading


def bounded_alphabet(texts: Iterable[str], size: int) -> list[str]:
    """``texts`` (NFKC, as the tokenizer reads them) with only their ``size`` most frequent characters, the
    others turned into spaces: a Unigram vocabulary must hold every character it was trained on, and Chinese
    alone has thousands. When encoding, the characters left out read as ``<unk>``."""
    texts = list(texts)
    normal = [unicodedata.normalize("NFKC", t) for t in texts]
    counts = Counter(ch for t in normal for ch in t)
    if len(counts) <= size:  # as they are: the same tokenizer as before the bound
        return texts
    keep = {ch for ch, _ in counts.most_common(size)}
    return ["".join(ch if ch in keep else " " for ch in t) for t in normal]


def train_tiny_tokenizer(texts: Iterable[str], vocab_size: int = 2000) -> Any:
    """A Unigram tokenizer trained in-process: tests and smoke runs need no hub. Any script: its alphabet is
    bounded to half the vocabulary (:func:`bounded_alphabet`)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    # no progress: without a terminal the trainer's Rust code prints empty lines to standard output
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=TINY_SPECIAL, unk_token="<unk>", show_progress=False
    )
    tok.train_from_iterator(bounded_alphabet(texts, vocab_size // 2), trainer)
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", bos), ("</s>", eos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        mask_token="<mask>", cls_token="<s>", sep_token="</s>", model_max_length=512,
    )  # fmt: skip


def tiny_config(vocab_size: int) -> Any:
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=512, pad_token_id=1,
    )  # fmt: skip


def build_tiny_model(texts: Iterable[str], out_dir: Path, seed: int = 0) -> Path:
    """Write a random-init BERT (85k params) + a tokenizer trained on ``texts`` as a standard HF dir."""
    from transformers import BertModel

    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists():
        return out_dir
    tokenizer = train_tiny_tokenizer(texts)
    torch.manual_seed(seed)
    model = BertModel(tiny_config(len(tokenizer)), add_pooling_layer=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    model.save_pretrained(out_dir)
    return out_dir


def resolve_model_path(name: str, tiny_texts: Iterable[str] | None = None, cache: Path | None = None) -> str:
    """Map built-in names to local directories; hub names and paths pass through unchanged."""
    if name == DEMO_MODEL:
        from xling.trainer.demo_model import ensure_demo_model

        return str(ensure_demo_model(cache))
    if name == TINY_MODEL:
        if tiny_texts is None:
            raise ValueError(f"model.name {TINY_MODEL!r} needs training texts to build its tokenizer")
        texts = list(tiny_texts)
        from xling.api.contracts import default_cache_dir

        digest = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:12]
        root = Path(cache or default_cache_dir()) / "models" / f"tiny-random-{digest}"
        return str(build_tiny_model(texts, root))
    return name


def stage_model(path: str, root: str, cache: Path) -> DataLocation | None:
    """A model directory on this machine's disk (a built-in model, a converted one, a local path) copied once,
    by content, into ``root`` in the run's shared storage, as the prepared corpus is (``data.store``): on a
    cluster the workers run on other nodes and load a node-local copy of it (``Job.local_model_path``). A hub
    name is not staged (None): every worker downloads it."""
    source = Path(path)
    if not source.is_dir():
        return None
    digest = hashlib.sha256()
    for f in sorted(p for p in source.rglob("*") if p.is_file()):
        digest.update(f"{f.relative_to(source)}\0{f.stat().st_size}\0".encode())
        with f.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
    fingerprint = f"model-{digest.hexdigest()[:16]}"

    def build(staging: Path) -> dict[str, Any]:
        shutil.copytree(source, staging, dirs_exist_ok=True)
        meta = {"format": FORMAT, "fingerprint": fingerprint, "source": str(source)}
        (staging / META).write_text(json.dumps(meta))
        return meta

    target = f"{root.rstrip('/')}/{fingerprint}"
    _, reused = store_once(target, cache, build)
    print(f"model: {'staged copy found' if reused else 'staged'} {path} at {target}", flush=True)
    return DataLocation(target, fingerprint)


def load_tokenizer(path: str, model_spec: ModelSpec | None = None) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        path,
        revision=model_spec.revision if model_spec else None,
        trust_remote_code=bool(model_spec and model_spec.trust_remote_code),
    )


def load_backbone(path: str, model_spec: ModelSpec, dtype: torch.dtype = torch.float32) -> nn.Module:
    """AutoModel.from_pretrained. Under a live HfDeepSpeedConfig (ZeRO-3) it is built already partitioned."""
    from transformers import AutoConfig, AutoModel

    kwargs: dict[str, Any] = {}
    config = AutoConfig.from_pretrained(
        path, revision=model_spec.revision, trust_remote_code=model_spec.trust_remote_code
    )
    if config.model_type in ("bert", "xlm-roberta", "xlm-roberta-xl", "roberta"):
        kwargs["add_pooling_layer"] = False  # retrieval pools itself; an unused pooler gets no gradient
    model = AutoModel.from_pretrained(
        path,
        revision=model_spec.revision,
        trust_remote_code=model_spec.trust_remote_code,
        dtype=dtype,
        **kwargs,
    )
    if model_spec.freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    if model_spec.freeze_layers:
        freeze_lower(model, model_spec.freeze_layers, config.num_hidden_layers)
    return model


def freeze_lower(model: nn.Module, n: int, depth: int) -> None:
    """No gradient for the embedding block and layers[:n]: autograd then never goes below layer n."""
    stacks = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == depth]
    if not stacks:
        raise InputError(
            None, f"found no stack of {depth} layers in {type(model).__name__}", field="model.freezeLayers"
        )
    if n > depth:
        raise InputError(None, f"{n} is more than the model's {depth} layers", field="model.freezeLayers")
    for module in [model.get_input_embeddings(), *stacks[0][:n]]:
        module.requires_grad_(False)
    embeddings = getattr(model, "embeddings", None)  # BERT-style: positions and the embedding LayerNorm too
    if isinstance(embeddings, nn.Module):
        embeddings.requires_grad_(False)


# --------------------------------------------------------------------------------------- encoding


def weights_fingerprint(model: nn.Module) -> str:
    """Cheap content hash of the weights (a slice of every tensor): keys the embedding cache."""
    h = hashlib.sha256()
    for name, p in model.state_dict().items():
        h.update(name.encode())
        flat = p.detach().reshape(-1)
        h.update(flat[:64].float().cpu().numpy().tobytes())
        h.update(str(tuple(p.shape)).encode())
    return h.hexdigest()[:16]


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode inside the block; after it, every submodule's own mode back. Restoring only the top
    module's flag would switch a whole tree to train (dropout on) when its parts were in eval."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


class HFTextEncoder:
    """Implements the evaluation TextEncoder protocol on a BiEncoder.

    Texts are sorted by length so batches pad little. With a process group of W ranks, rank r encodes
    every W-th batch and the results are all-gathered; every rank runs the same number of forwards, as
    ZeRO-3 requires (its parameters are gathered collectively).
    """

    def __init__(self, model: BiEncoder, tokenize: Tokenize, batch_size: int = 64, fingerprint: str = ""):
        self.model = model
        self.tokenize = tokenize
        self.batch_size = batch_size
        model_spec = tokenize.model_spec
        # The cache key covers everything that changes an embedding, not just the weights.
        settings = f"{model.pooling}|{model.normalize}|{model_spec.query_prefix}|{model_spec.passage_prefix}|{model_spec.max_query_length}|{model_spec.max_passage_length}"
        self.fingerprint = hashlib.sha256(
            f"{fingerprint or weights_fingerprint(model)}|{settings}".encode()
        ).hexdigest()[:16]

    def encode(self, texts: Sequence[str], kind: Kind) -> np.ndarray:
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        rank = dist.get_rank() if world > 1 else 0
        order = np.argsort([len(t) for t in texts], kind="stable")
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        rounds = -(-len(batches) // world)
        device = next(self.model.parameters()).device
        use_bf16 = device.type == "cuda"
        dim: int | None = None
        mine: list[torch.Tensor] = []
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)
        with eval_mode(self.model), torch.inference_mode(), autocast:
            for r in range(rounds):
                b = r * world + rank
                idx = batches[b] if b < len(batches) else batches[0]  # dummy batch keeps ranks in step
                inputs = {k: v.to(device) for k, v in self.tokenize([texts[i] for i in idx], kind).items()}
                emb = self.model(**inputs).float()
                dim = emb.shape[1]
                mine.append(emb if b < len(batches) else emb[:0])
        out = np.zeros((len(texts), dim or 0), dtype=np.float32)
        if world == 1:
            for b, emb in zip(batches, mine, strict=False):
                out[b] = emb.cpu().numpy()
            return out
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, [e.cpu().numpy() for e in mine])
        for r_rank, embs in enumerate(gathered):
            for r, emb in enumerate(embs):
                b = r * world + r_rank
                if b < len(batches):
                    out[batches[b]] = emb
        return out


def load_text_encoder(
    name_or_path: str,
    pooling: Pooling = "mean",
    query_prefix: str = "query: ",
    passage_prefix: str = "passage: ",
    max_length: int = 128,
    batch_size: int = 64,
) -> HFTextEncoder:
    """A ready TextEncoder for ``xling eval``: loads any HF encoder or built-in name onto the best device."""
    model_spec = ModelSpec(
        name=name_or_path, pooling=pooling, query_prefix=query_prefix, passage_prefix=passage_prefix,
        max_query_length=max_length, max_passage_length=max_length,
    )  # fmt: skip
    return encoder_for(resolve_model_path(name_or_path), model_spec, batch_size)


def encoder_for(path: str, model_spec: ModelSpec, batch_size: int = 64) -> HFTextEncoder:
    """The TextEncoder of the backbone at ``path``, encoding as ``model_spec`` says."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = (
        BiEncoder(load_backbone(path, model_spec), model_spec.pooling, model_spec.normalize).to(device).eval()
    )
    return HFTextEncoder(model, Tokenize(load_tokenizer(path, model_spec), model_spec), batch_size)


def model_fingerprint(model_path: str) -> str:
    """Identifies zero-shot weights for the embedding cache: path + config + weight file sizes/mtimes."""
    h = hashlib.sha256(model_path.encode())
    p = Path(model_path)
    if p.is_dir():
        for f in sorted(p.iterdir()):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:16]


def load_model_files(path: str, model: ModelSpec) -> None:
    """Load the config and tokenizer here, as every worker will: a model that cannot load fails now, in one
    line naming spec.model.name, not in each worker's traceback after Ray started."""
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(path, revision=model.revision, trust_remote_code=model.trust_remote_code)
        load_tokenizer(path, model)
    except (OSError, ValueError) as err:
        raise SpecError(
            None, f"{model.name!r} cannot be loaded: {' '.join(str(err).split())}", field="spec.model.name"
        ) from None
