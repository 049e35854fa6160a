"""The trained retriever as a sentence-transformers model directory with a Hugging Face model card.

The final checkpoint's ``model/`` is a Hugging Face backbone directory (``AutoModel`` loads it) and, beside
it, the files sentence-transformers >= 6 reads: ``modules.json`` (Transformer, Pooling, Normalize when the
spec normalises), ``sentence_bert_config.json`` (per-task lengths), ``1_Pooling/config.json`` and
``config_sentence_transformers.json`` (the query/passage prompts). The tokenizer is saved as training
used it: ``model_max_length`` = ``maxPassageLength``, left padding and an EOS-appending post-processor for
last-token pooling, so ``SentenceTransformer(dir)`` embeds exactly as xling evaluated.

``write_model_card`` adds ``README.md``: YAML front matter (languages, base model, datasets, a
``model-index`` of the run's results), the spec, the realised batch composition and the results tables.

Also here: reading any sentence-transformers directory back (``xling eval``, the full-pool evaluation), so
this one module owns the format both ways. Logging the directory to MLflow is ``tracking``'s;
``xling export`` (``export``) builds the directory from any checkpoint.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from xling.api.errors import InputError
from xling.api.metrics import flat_name, suite_prefix
from xling.api.spec.base import DEMO_MODEL, TINY_MODEL, is_xling_model
from xling.api.spec.experiment import ExperimentSpec
from xling.api.spec.training import ModelSpec

#: The model card, in the directory's root (where the Hugging Face hub reads it).
CARD_FILE = "README.md"
#: spec.model.pooling -> sentence-transformers' Pooling mode.
POOLING_MODES = {"cls": "cls", "mean": "mean", "last_token": "lasttoken"}
#: Built-in names -> the hub model they stand for (the card's ``base_model``).
BASE_MODELS = {DEMO_MODEL: "intfloat/multilingual-e5-small"}
#: Licenses of known base models (Hugging Face ids); a fine-tuned model keeps its base model's.
BASE_LICENSES = {
    "intfloat/multilingual-e5-small": "mit",
    "intfloat/multilingual-e5-large": "mit",
    "BAAI/bge-m3": "mit",
}
#: The packages whose versions a model card records (what produced the weights, what loads them).
CARD_PACKAGES = ("xling", "torch", "transformers", "sentence-transformers", "deepspeed", "ray")
#: Evaluation suites -> (display name, hub dataset id or None).
SUITE_DATASETS = {
    "xquad-r": ("XQuAD-R", "google-research-datasets/xquad_r"),
    "mlqa-r": ("MLQA-R", None),
    "miracl": ("MIRACL", "miracl/miracl"),
    "ntrex-r": ("NTREX-R (NTREX-128 sentences)", None),
    "mlqa-holdout": ("MLQA hold-out (held-out MLQA groups, paragraph level)", None),
}
#: Summary metrics of a LAReQA-style suite (suffixes of flat metric names) and how the card names them.
CARD_METRICS = {
    "mono.map": ("map", "X-X-mono mAP"),
    "cross.map": ("map", "X-Y mAP"),
    "multi.map": ("map", "X-X-multi mAP"),
    "multi.r10": ("recall_at_10", "X-X-multi Recall@10"),
    "mono.r1": ("recall_at_1", "X-X-mono Recall@1"),
    "cross.r1": ("recall_at_1", "X-Y Recall@1"),
    "ndcg10": ("ndcg_at_10", "nDCG@10"),
    "recall100": ("recall_at_100", "Recall@100"),
}


def write_json(path: Path, data: Any) -> None:
    """Indented JSON with a final newline, its folder made (the files sentence-transformers reads)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def export_tokenizer(tokenizer: Any, model_spec: ModelSpec, append_eos: bool) -> Any:
    """A copy of the training tokenizer that tokenizes on its own as ``Tokenize`` does: truncation at the
    passage length, and for last-token pooling left padding and EOS appended after truncation."""
    tok = copy.deepcopy(tokenizer)
    settings: dict[str, Any] = {"model_max_length": model_spec.max_passage_length}
    if model_spec.pooling == "last_token":
        settings["padding_side"] = "left"
    for key, value in settings.items():
        setattr(tok, key, value)
        tok.init_kwargs[key] = value  # what save_pretrained writes to tokenizer_config.json
    if append_eos:
        from tokenizers import processors

        eos = tok.eos_token
        add_eos = processors.TemplateProcessing(
            single=f"$A {eos}", pair=f"$A {eos} $B {eos}", special_tokens=[(eos, tok.eos_token_id)]
        )
        backend = tok.backend_tokenizer
        current = backend.post_processor
        backend.post_processor = add_eos if current is None else processors.Sequence([current, add_eos])
    return tok


def write_sentence_transformers(
    directory: Path, model_spec: ModelSpec, tokenizer: Any, append_eos: bool
) -> None:
    """Add the sentence-transformers files and the export tokenizer to the HF model dir ``directory``."""
    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    dim = config.get("hidden_size") or config["d_model"]
    export_tokenizer(tokenizer, model_spec, append_eos).save_pretrained(directory)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.base.modules.transformer.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling",
         "type": "sentence_transformers.sentence_transformer.modules.pooling.Pooling"},
    ]  # fmt: skip
    if model_spec.normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                        "type": "sentence_transformers.base.modules.normalize.Normalize"})  # fmt: skip
        write_json(directory / "2_Normalize" / "config.json", {})
    write_json(directory / "modules.json", modules)
    # encode_query / encode_document truncate at these; plain encode() at model_max_length (passages)
    write_json(directory / "sentence_bert_config.json", {
        "transformer_task": "feature-extraction",
        "modality_config": {"text": {"method": "forward", "method_output_name": "last_hidden_state"}},
        "module_output_name": "token_embeddings",
        "query_length": model_spec.max_query_length,
        "document_length": model_spec.max_passage_length,
    })  # fmt: skip
    write_json(directory / "1_Pooling" / "config.json",
          {"embedding_dimension": dim, "pooling_mode": POOLING_MODES[model_spec.pooling], "include_prompt": True})  # fmt: skip
    write_json(directory / "config_sentence_transformers.json", {
        "model_type": "SentenceTransformer",
        # "document" too: else sentence-transformers fills in "" and encode_document would drop the prefix
        "prompts": {"query": model_spec.query_prefix, "passage": model_spec.passage_prefix, "document": model_spec.passage_prefix},
        "default_prompt_name": None,
        "similarity_fn_name": "cosine" if model_spec.normalize else "dot",
    })  # fmt: skip


def embedding_dimension(directory: Path) -> int:
    """The vector size the directory's pooling module declares."""
    return json.loads((Path(directory) / "1_Pooling" / "config.json").read_text())["embedding_dimension"]


def is_sentence_transformers_dir(path: str | Path) -> bool:
    return (Path(path) / "modules.json").is_file()


def sentence_transformers_dir(name_or_path: str) -> Path | None:
    """The local directory of a sentence-transformers model: ``name_or_path`` itself, or the hub snapshot of
    a hub name whose repository has a ``modules.json``; None for anything else (a plain HF model)."""
    if is_sentence_transformers_dir(name_or_path):
        return Path(name_or_path)
    if Path(name_or_path).exists() or is_xling_model(name_or_path) or name_or_path.count("/") != 1:
        return None
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        hf_hub_download(name_or_path, "modules.json")
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError):
        return None
    return Path(snapshot_download(name_or_path))


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _pooling_mode(config: dict[str, Any]) -> str:
    """``pooling_mode`` (sentence-transformers >= 6) or the older ``pooling_mode_*`` booleans."""
    if mode := config.get("pooling_mode"):
        return mode if isinstance(mode, str) else "+".join(mode)
    legacy = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean", "pooling_mode_lasttoken": "lasttoken",
              "pooling_mode_max_tokens": "max", "pooling_mode_weightedmean_tokens": "weightedmean",
              "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens"}  # fmt: skip
    return "+".join(mode for key, mode in legacy.items() if config.get(key)) or "mean"


def read_sentence_transformers(path: str | Path) -> tuple[str, ModelSpec]:
    """The backbone directory and the encoding settings (pooling, normalisation, prompts, lengths) that a
    sentence-transformers model directory declares, for xling's own encoder. Modules xling cannot run
    (Dense, a pooling mode other than cls / mean / last token) are refused by name."""
    root = Path(path)
    modules = json.loads((root / "modules.json").read_text())
    kinds = [m["type"].rsplit(".", 1)[-1] for m in modules]
    if kinds[:2] != ["Transformer", "Pooling"] or set(kinds[2:]) - {"Normalize"}:
        raise InputError(
            root / "modules.json", f"modules {kinds}; xling evaluates Transformer, Pooling[, Normalize]"
        )
    backbone, pooling_dir = (root / modules[i]["path"] for i in (0, 1))
    mode = _pooling_mode(_read(pooling_dir / "config.json"))
    pooling = {v: k for k, v in POOLING_MODES.items()}.get(mode)
    if pooling is None:
        raise InputError(
            pooling_dir / "config.json",
            f"pooling mode {mode!r}; xling supports {sorted(POOLING_MODES.values())}",
        )
    st = _read(root / "config_sentence_transformers.json")
    prompts = st.get("prompts") or {}
    module = _read(backbone / "sentence_bert_config.json")
    longest = (
        module.get("max_seq_length")
        or _read(backbone / "tokenizer_config.json").get("model_max_length")
        or 512
    )
    longest = min(int(longest), 8192)
    model_spec = ModelSpec(
        name=str(root), pooling=pooling, normalize="Normalize" in kinds,
        query_prefix=prompts.get("query", ""),
        passage_prefix=next((prompts[k] for k in ("passage", "document", "corpus") if k in prompts), ""),
        max_query_length=module.get("query_length") or longest,
        max_passage_length=module.get("document_length") or longest,
    )  # fmt: skip
    return str(backbone), model_spec


# --------------------------------------------------------------------------------------- model card


def _suite_metrics(metrics: Mapping[str, float], suite: str) -> dict[str, float]:
    """The summary metrics of one suite (``xquad_r/multi/map``) under the card's keys (``multi.map``), not
    per-language ones."""
    keys = {flat_name(suite_prefix(suite), key): key for key in CARD_METRICS}
    return {keys[name]: float(v) for name, v in metrics.items() if name in keys}  # in the run's order


def headline_metrics(spec: ExperimentSpec, metrics: Mapping[str, float]) -> dict[str, float]:
    """The suites' summary metrics (the card's) under their flat names (``xquad_r/multi/map``)."""
    return {flat_name(suite_prefix(suite.name), k): v for suite in spec.evaluation.suites
            for k, v in _suite_metrics(metrics, suite.name).items()}  # fmt: skip


def model_index(name: str, spec: ExperimentSpec, metrics: Mapping[str, float]) -> list[dict[str, Any]]:
    """Hugging Face ``model-index``: one result per evaluated suite, its summary metrics."""
    results = []
    for suite in spec.evaluation.suites:
        values = _suite_metrics(metrics, suite.name)
        if not values:
            continue
        display, hub = SUITE_DATASETS[suite.name]
        dataset: dict[str, Any] = {"name": display, "type": hub or suite.name}
        if suite.languages:
            dataset["config"] = ",".join(suite.languages)
        results.append({
            "task": {"type": "sentence-similarity", "name": "Multilingual retrieval"},
            "dataset": dataset,
            "metrics": [{"type": CARD_METRICS[k][0], "value": round(v, 4), "name": CARD_METRICS[k][1]}
                        for k, v in values.items()],
        })  # fmt: skip
    return [{"name": name, "results": results}] if results else []


def _dataset_name(kind: str, path: str) -> str:
    """Hub names as they are; local files by their name only (a card must not carry this machine's paths)."""
    return path if kind == "hf" else Path(path).name


def front_matter(name: str, spec: ExperimentSpec, metrics: Mapping[str, float]) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "language": list(spec.data.languages),
        "library_name": "sentence-transformers",
        "pipeline_tag": "sentence-similarity",
        "tags": ["sentence-transformers", "sentence-similarity", "feature-extraction", "dense-retrieval",
                 "multilingual", "xling", f"sampling-{spec.sampling.strategy}"],
        "datasets": sorted({_dataset_name(source.type, source.path) for source in spec.data.sources}),
    }  # fmt: skip
    base = BASE_MODELS.get(spec.model.name, spec.model.name)
    meta["license"] = BASE_LICENSES.get(base, "other")
    if spec.model.name != TINY_MODEL:
        meta["base_model"] = Path(base).name if Path(base).is_absolute() else base  # no local paths
    if index := model_index(name, spec, metrics):
        meta["model-index"] = index
    return meta


def _results_table(
    spec: ExperimentSpec, metrics: Mapping[str, float], zero_shot: Mapping[str, float] | None = None
) -> list[str]:
    """Per suite: the base model zero-shot (when the run evaluated it at its start), then this model."""
    lines = []
    for suite in spec.evaluation.suites:
        values = _suite_metrics(metrics, suite.name)
        before = _suite_metrics(zero_shot or {}, suite.name)
        if values:
            lines += [f"| {SUITE_DATASETS[suite.name][0]} | " + " | ".join(CARD_METRICS[k][1] for k in values) + " |",
                      "|---|" + "---:|" * len(values),
                      *(["| base model, zero-shot | " + " | ".join(f"{before[k]:.4f}" if k in before else "" for k in values) + " |"]
                        if before else []),
                      "| this model | " + " | ".join(f"{v:.4f}" for v in values.values()) + " |", ""]  # fmt: skip
    return lines or ["No evaluation suites were configured for this run.", ""]


def _portable_spec(spec: ExperimentSpec) -> dict[str, Any]:
    """The spec's non-default fields with this machine's paths reduced to their last part (a card travels)."""
    doc = spec.model_dump(mode="json", by_alias=True, exclude_defaults=True)
    for source in (doc.get("data") or {}).get("sources", []):
        source["path"] = _dataset_name(source.get("type", ""), source["path"])
    for suite in (doc.get("evaluation") or {}).get("suites", []):
        suite["path"] = Path(suite["path"]).name
    for key in ("outputDir",):
        doc.pop(key, None)
    if Path(spec.model.name).is_absolute():
        doc["model"]["name"] = Path(spec.model.name).name
    return doc


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for package in CARD_PACKAGES:
        try:
            found.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            continue
    return ", ".join(found)


def _composition(composition: Mapping[str, Mapping[str, int]]) -> list[str]:
    kinds = dict(composition.get("kinds", {}))
    total = sum(kinds.values())
    if not total:
        return ["(not recorded)", ""]
    lines = ["| batch kind | batches | fraction |", "|---|---:|---:|"]
    lines += [f"| {k} | {n} | {n / total:.3f} |" for k, n in sorted(kinds.items())]
    pairs = dict(composition.get("pairs", {}))
    if pairs:
        top = sorted(pairs.items(), key=lambda kv: -kv[1])[:12]
        lines += ["", "Most frequent (query language - passage language) pairs: "
                  + ", ".join(f"{k} {n}" for k, n in top)]  # fmt: skip
    return [*lines, ""]


def _sampling(spec: ExperimentSpec) -> str:
    s = spec.sampling
    text = {
        "xx": "every global batch is monolingual (X-X-mono): one language for queries and passages",
        "xy": "every global batch is cross-lingual (X-Y): query and passage languages differ",
        "hybrid": f"each global batch is X-X-mono with probability alpha = {s.alpha}, else X-Y",
        "mixed": "mixed: same-language pairs, languages mixed within a batch (LAReQA X-X)",
    }[s.strategy]
    weighting = s.language_weighting + (
        f", temperature {s.language_temperature}" if s.language_weighting == "size" else ""
    )
    return f"**{s.strategy}** (alpha = {s.alpha}): {text}. Language weighting: {weighting}; seed {s.seed}."


def write_model_card(
    directory: Path,
    spec: ExperimentSpec,
    *,
    name: str,
    metrics: Mapping[str, float],
    composition: Mapping[str, Mapping[str, int]],
    report: str = "",
    run_id: str | None = None,
    zero_shot: Mapping[str, float] | None = None,
) -> Path:
    """``README.md`` in Hugging Face conventions; every number comes from ``metrics`` / ``report`` (and
    ``zero_shot``: the base model's, evaluated at the run's start)."""
    m = spec.model
    usage = [
        "```python",
        "from sentence_transformers import SentenceTransformer",
        "",
        'model = SentenceTransformer("path/to/this/directory")',
        'queries = model.encode_query(["How many people live in Berlin?"])',
        'passages = model.encode_document(["Berlin has 3.7 million inhabitants."])',
        "print(model.similarity(queries, passages))",
        "```",
    ]
    body = [
        f"# {name}",
        "",
        f"A multilingual dense retriever fine-tuned with xling from `{m.name}`"
        + (f" (MLflow run `{run_id}`)." if run_id else "."),
        "",
        "## Usage",
        "",
        *usage,
        "",
        f"Prompts: query `{m.query_prefix!r}`, passage `{m.passage_prefix!r}` (`prompt_name=\"query\"` / "
        f"`\"passage\"` with `encode`; `encode_query` / `encode_document` apply them). Pooling: `{m.pooling}`; "
        f"normalised: {m.normalize}. Maximum lengths: queries {m.max_query_length} tokens (`encode_query`), "
        f"passages {m.max_passage_length} (`encode_document` and plain `encode`). Requires "
        "sentence-transformers >= 6.",
        "",
        "## Training",
        "",
        f"Sampling strategy: {_sampling(spec)}",
        "",
        f"InfoNCE at temperature {spec.loss.temperature}"
        + (" (symmetric)" if spec.loss.symmetric else "")
        + f", {spec.loss.hard_negatives} hard negatives per query, global batch {spec.optimization.global_batch_size}, "
        f"{spec.optimization.max_steps} steps, learning rate {spec.optimization.learning_rate} ({spec.optimization.scheduler}), "
        f"{spec.distributed.num_workers} worker(s), precision {spec.distributed.precision}.",
        "",
        "### Realised batch composition",
        "",
        *_composition(composition),
        "### Training data",
        "",
        *[f"- `{s.type}`: `{_dataset_name(s.type, s.path)}`" + (f" ({', '.join(s.languages)})" if s.languages else "")
          for s in spec.data.sources],
        "",
        "## Results",
        "",
        *_results_table(spec, metrics, zero_shot),
        *(["```", report.strip(), "```", ""] if report.strip() else []),
        "## Training spec",
        "",
        "The fields that differ from xling's defaults:",
        "",
        "```yaml",
        yaml.safe_dump(_portable_spec(spec), sort_keys=False).strip(),
        "```",
        "",
        "## License and versions",
        "",
        f"License: {BASE_LICENSES.get(BASE_MODELS.get(m.name, m.name), 'that of the base model')} (the base model's); "
        "the training and evaluation data keep their own licenses (see each dataset's card).",
        "",
        f"Trained with {_versions()}.",
        "",
    ]  # fmt: skip
    meta = yaml.safe_dump(front_matter(name, spec, metrics), sort_keys=False, allow_unicode=True)
    path = Path(directory) / CARD_FILE
    path.write_text(f"---\n{meta}---\n\n" + "\n".join(body))
    return path
