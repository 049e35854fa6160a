"""The exported model directory: sentence-transformers (pinned, real) loads it and embeds exactly as xling.

Twins of the three encoder families (BERT and XLM-R: mean pooling, right padding; Qwen2: last-token
pooling, EOS appended, left padding) and the converted multilingual-e5-small (``realmodel``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import get_args

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from tests.support import ROOT
from tests.trainer.test_deepspeed import tiny_model_dir
from tests.trainer.test_deepspeed_models import EOS, WORDS
from xling.api.spec.base import SuiteName
from xling.api.spec.experiment import ExperimentSpec
from xling.api.spec.loading import load_experiment
from xling.api.spec.training import ModelSpec
from xling.api.tags import RUN_ID
from xling.trainer.model import (
    BiEncoder,
    HFTextEncoder,
    Tokenize,
    load_backbone,
    load_tokenizer,
    train_tiny_tokenizer,
)
from xling.trainer.sentence_transformers_dir import (
    SUITE_DATASETS,
    model_index,
    write_model_card,
    write_sentence_transformers,
)

E5 = ROOT / ".cache" / "models" / "multilingual-e5-small"
SHORT = ["the cat", "dogs ran far away", "a mat", "the cat sat on a mat"]  # within the query length
LONG = [" ".join(WORDS * 6)]
TWINS = {"bert": "mean", "xlmr": "mean", "qwen2": "last_token", "bert-cls": "cls"}


def decoder_twin(path: Path) -> Path:
    """A Qwen2 twin with a byte-level BPE tokenizer in one directory: AutoTokenizer loads a real
    Qwen2Tokenizer from it (no pad token, no EOS added), as the trainer would."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModel, PreTrainedTokenizerFast, Qwen2Config

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([" ".join(WORDS)] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))  # fmt: skip
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS).save_pretrained(path)
    cfg = Qwen2Config(vocab_size=bpe.get_vocab_size(), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=32, num_key_value_heads=1, max_position_embeddings=128,
                      eos_token_id=bpe.token_to_id(EOS))  # fmt: skip
    torch.manual_seed(0)
    AutoModel.from_config(cfg).save_pretrained(path)
    return path


def twin(path: Path, kind: str) -> Path:
    """A tiny random model of ``kind`` and its tokenizer, in one directory (the trainer's model path)."""
    if kind == "qwen2":
        return decoder_twin(path)
    train_tiny_tokenizer([" ".join(WORDS)] * 20, vocab_size=60).save_pretrained(path)
    return tiny_model_dir(path, kind)


def export(backbone_dir: Path, tokenizer: object, model_spec: ModelSpec, out: Path) -> HFTextEncoder:
    """xling's encoder for ``backbone_dir`` and its export to ``out`` (as the trainer's final checkpoint)."""
    tokenize = Tokenize(tokenizer, model_spec)
    model = BiEncoder(
        load_backbone(str(backbone_dir), model_spec), model_spec.pooling, model_spec.normalize
    ).eval()
    model.backbone.save_pretrained(out)
    write_sentence_transformers(out, model_spec, tokenize.tok, tokenize.append_eos)
    return HFTextEncoder(model, tokenize, batch_size=3)


def assert_same_embeddings(encoder: HFTextEncoder, out: Path, short: list[str], long: list[str]) -> None:
    from sentence_transformers import SentenceTransformer

    spec = encoder.tokenize.model_spec
    assert encoder.tokenize(short, "query")["attention_mask"].sum(1).max() < spec.max_query_length, (
        "short fits"
    )
    assert encoder.tokenize(long, "passage")["attention_mask"].sum() == spec.max_passage_length, "long is cut"

    st = SentenceTransformer(str(out), device="cpu")
    for kind, prompt in (("query", "query"), ("passage", "passage")):
        want = encoder.encode(short, kind)
        got = st.encode(short, prompt_name=prompt, batch_size=3, convert_to_numpy=True)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0, err_msg=f"encode(prompt_name={prompt!r})")
    # Per-task truncation: encode_query cuts at maxQueryLength, encode_document at maxPassageLength.
    texts = short + long
    np.testing.assert_allclose(st.encode_query(texts), encoder.encode(texts, "query"), atol=1e-5, rtol=0)
    np.testing.assert_allclose(st.encode_document(texts), encoder.encode(texts, "passage"), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", list(TWINS))
def test_sentence_transformers_embeds_the_twin_as_xling(tmp_path: Path, kind: str) -> None:
    pooling = TWINS[kind]
    backbone = twin(tmp_path / "backbone", kind.removesuffix("-cls"))
    spec = ModelSpec(name=kind, pooling=pooling, query_prefix="the ", passage_prefix="a ", max_query_length=32,
                     max_passage_length=48, normalize=kind != "bert-cls")  # fmt: skip
    encoder = export(backbone, load_tokenizer(str(backbone)), spec, tmp_path / "export")
    assert_same_embeddings(encoder, tmp_path / "export", SHORT, LONG)
    files = json.loads((tmp_path / "export" / "modules.json").read_text())
    assert [m["path"] for m in files] == ["", "1_Pooling"] + ["2_Normalize"] * spec.normalize


def test_decoder_export_tokenizer_pads_left_and_appends_eos(tmp_path: Path) -> None:
    """What a plain AutoTokenizer user gets from the export: the inputs xling trained on."""
    spec = ModelSpec(
        name="qwen2", pooling="last_token", query_prefix="", max_query_length=6, max_passage_length=6
    )
    backbone = decoder_twin(tmp_path / "backbone")
    encoder = export(backbone, load_tokenizer(str(backbone)), spec, tmp_path / "export")
    tok = load_tokenizer(str(tmp_path / "export"))
    texts = ["the cat", "the cat sat on a mat while dogs ran"]
    got = tok(texts, padding=True, truncation=True, return_tensors="pt")
    want = encoder.tokenize(texts, "query")
    assert (
        type(tok).__name__ == "Qwen2Tokenizer" and want["input_ids"][:, -1].tolist() == [tok.eos_token_id] * 2
    )
    assert torch.equal(got["input_ids"], want["input_ids"]) and torch.equal(
        got["attention_mask"], want["attention_mask"]
    )
    assert Tokenize(tok, spec).append_eos is False, "the export tokenizer appends EOS itself"


@pytest.mark.realmodel
def test_sentence_transformers_embeds_e5_small_as_xling(tmp_path: Path) -> None:
    if not (E5 / "config.json").exists():
        pytest.skip("converted e5-small not built (make model)")
    spec = ModelSpec(
        name="xling/multilingual-e5-small"
    )  # the spec defaults: mean, query: / passage:, 32 / 128
    encoder = export(E5, load_tokenizer(str(E5)), spec, tmp_path / "export")
    short = ["How many people live in Berlin?", "¿Cuántas personas viven en Berlín?", "Wie viele Menschen leben in Berlin?",
             "برلين عاصمة ألمانيا", "柏林有多少人口？"]  # fmt: skip
    long = [" ".join(["Berlin is the capital and largest city of Germany by both area and population."] * 12)]
    assert_same_embeddings(encoder, tmp_path / "export", short, long)


def test_model_card_front_matter_and_numbers(tmp_path: Path) -> None:
    spec = ExperimentSpec.model_validate({
        "model": {"name": "xling/multilingual-e5-small"},
        "data": {"languages": ["en", "de", "ar"], "sources": [{"type": "hf", "path": "google/xquad"}]},
        "sampling": {"strategy": "hybrid", "alpha": 0.25},
        "evaluation": {"suites": [{"name": "xquad-r", "path": "data/demo/xquad-r", "languages": ["en", "de", "ar"]}]},
    })  # fmt: skip
    metrics = {"xquad_r/multi/map": 0.61234, "xquad_r/mono/map": 0.7, "xquad_r/cross/map": 0.5,
               "xquad_r/mono/map/en": 0.9, "train/loss": 1.5}  # fmt: skip
    composition = {"kinds": {"xx": 3, "xy": 9}, "languages": {"en": 4}, "pairs": {"en-de": 5, "de-de": 2}}
    card = write_model_card(tmp_path, spec, name="demo", metrics=metrics, composition=composition,
                            report="xquad-r: 3 languages\nmean 0.6123", run_id="abc123").read_text()  # fmt: skip
    head, body = card.removeprefix("---\n").split("\n---\n", 1)
    meta = yaml.safe_load(head)
    assert meta["language"] == ["en", "de", "ar"]
    assert meta["library_name"] == "sentence-transformers" and meta["pipeline_tag"] == "sentence-similarity"
    assert meta["base_model"] == "intfloat/multilingual-e5-small"
    assert meta["datasets"] == ["google/xquad"]
    [result] = meta["model-index"][0]["results"]
    assert result["dataset"]["type"] == "google-research-datasets/xquad_r"
    values = {m["name"]: m["value"] for m in result["metrics"]}
    assert values == {"X-X-multi mAP": 0.6123, "X-X-mono mAP": 0.7, "X-Y mAP": 0.5}, "summary metrics only"
    assert "| this model | 0.6123 | 0.7000 | 0.5000 |" in body or "0.6123" in body
    assert "alpha = 0.25" in body and "| xy | 9 | 0.750 |" in body
    assert "mean 0.6123" in body, "the results table the run printed"
    assert "strategy: hybrid" in body, "the training spec"


def test_the_card_names_every_suite_a_research_trial_logs() -> None:
    """A research trial logs ntrex-r too: its card raised KeyError 'ntrex-r' when the final model was exported."""
    spec = load_experiment(ROOT / "manifests/samples/research.yaml").spec
    names = [suite.name for suite in spec.evaluation.suites]
    metrics = {f"{name.replace('-', '_')}/multi/map": 0.5 for name in names}
    [index] = model_index("trial", spec, metrics)
    assert len(index["results"]) == len(names) == 3
    assert set(SUITE_DATASETS) == set(get_args(SuiteName)), "a card for every suite a spec can name"


def _eval_args(*argv: str) -> object:
    import argparse

    from xling.trainer.evaluation.cli import add_cli

    parser = argparse.ArgumentParser(prog="xling")
    add_cli(parser.add_subparsers())
    return parser.parse_args(["eval", "--suite", "xquad-r", *argv])


def test_eval_takes_pooling_prompts_and_lengths_from_the_exported_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from xling.trainer.evaluation.cli import _encoder

    backbone = twin(tmp_path / "backbone", "qwen2")
    spec = ModelSpec(name="qwen2", pooling="last_token", normalize=False, query_prefix="q: ", passage_prefix="p: ",
                     max_query_length=16, max_passage_length=24)  # fmt: skip
    want = export(backbone, load_tokenizer(str(backbone)), spec, tmp_path / "export")
    got = _encoder(_eval_args("--model", str(tmp_path / "export"), "--pooling", "mean", "--max-length", "8"))
    assert "ignoring --pooling, --max-length" in capsys.readouterr().err
    assert got.tokenize.model_spec.model_dump(exclude={"name"}) == spec.model_dump(exclude={"name"})
    texts = SHORT + LONG
    for kind in ("query", "passage"):
        np.testing.assert_allclose(got.encode(texts, kind), want.encode(texts, kind), atol=1e-6, rtol=0)


def test_eval_reads_a_directory_saved_by_sentence_transformers_itself(tmp_path: Path) -> None:
    """Not only xling's exports: a model sentence-transformers saved (CLS pooling, no Normalize)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    from xling.trainer.evaluation.cli import _encoder

    backbone = twin(tmp_path / "backbone", "xlmr")
    module = Transformer(str(backbone), max_seq_length=40, query_length=20)
    model = SentenceTransformer(
        modules=[module, Pooling(16, "cls")], prompts={"query": "q: ", "document": "d: "}
    )
    model.save(str(tmp_path / "st"))
    encoder = _encoder(_eval_args("--model", str(tmp_path / "st")))
    got = encoder.tokenize.model_spec
    assert (got.pooling, got.normalize, got.query_prefix, got.passage_prefix) == ("cls", False, "q: ", "d: ")
    assert (got.max_query_length, got.max_passage_length) == (20, 40)
    reloaded = SentenceTransformer(str(tmp_path / "st"), device="cpu")
    np.testing.assert_allclose(
        encoder.encode(SHORT, "query"), reloaded.encode_query(SHORT), atol=1e-5, rtol=0
    )


def test_eval_refuses_modules_it_cannot_run(tmp_path: Path) -> None:
    from xling.trainer.sentence_transformers_dir import read_sentence_transformers

    backbone = twin(tmp_path / "m", "bert")
    write_sentence_transformers(backbone, ModelSpec(name="b"), load_tokenizer(str(backbone)), False)
    (backbone / "1_Pooling" / "config.json").write_text('{"embedding_dimension": 16, "pooling_mode": "max"}')
    with pytest.raises(ValueError, match=r"1_Pooling/config.json: pooling mode 'max'"):
        read_sentence_transformers(backbone)


def test_logged_model_is_registered_tagged_and_serves_the_embeddings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The MLflow side, without Ray: a pyfunc model on the run, a registry version with the run's metrics."""
    import mlflow
    from sentence_transformers import SentenceTransformer

    from xling.trainer.tracking import log_model, start_run

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = start_run(uri, "export", "r", {}, {})
    spec = ExperimentSpec.model_validate({
        "model": {"name": "twin", "maxQueryLength": 32, "maxPassageLength": 48},
        "data": {"languages": ["en"], "sources": [{"type": "pairs", "path": "p.jsonl"}]},
        "sampling": {"strategy": "xx"},
        "evaluation": {"suites": [{"name": "xquad-r", "path": "x"}]},
        "tracking": {"registeredModelName": "retriever"},
    })  # fmt: skip
    backbone = twin(tmp_path / "backbone", "bert")
    export(backbone, load_tokenizer(str(backbone)), spec.model, tmp_path / "export")
    metrics = {"xquad_r/multi/map": 0.25, "xquad_r/mono/map/en": 0.5, "train/loss": 2.0}
    info = log_model(tmp_path / "export", spec, tracking_uri=uri, run_id=run_id, metrics=metrics)

    client = mlflow.MlflowClient(uri)
    [logged] = client.search_logged_models([client.get_run(run_id).info.experiment_id])
    assert logged.source_run_id == run_id and logged.model_id == info.model_id
    [version] = client.search_model_versions("name = 'retriever'")
    assert version.run_id == run_id and version.tags == {
        RUN_ID: run_id,
        "xquad_r/multi/map": "0.2500",
    }
    served = mlflow.pyfunc.load_model("models:/retriever/1")
    assert served.metadata.signature.params.to_dict()[0]["name"] == "kind"
    st = SentenceTransformer(str(tmp_path / "export"), device="cpu")
    texts = SHORT + LONG
    np.testing.assert_allclose(
        served.predict(pd.DataFrame({"text": texts})), st.encode_query(texts), atol=1e-6
    )
    np.testing.assert_allclose(
        served.predict(pd.DataFrame({"text": texts}), params={"kind": "passage"}),
        st.encode_document(texts),
        atol=1e-6,
    )


# --------------------------------------------------------------------------------------- xling export


def _experiment(model: Path, **model_fields: object) -> ExperimentSpec:
    return ExperimentSpec.model_validate({
        "model": {"name": str(model), "maxQueryLength": 32, "maxPassageLength": 48, **model_fields},
        "data": {"languages": ["en"], "sources": [{"type": "pairs", "path": "p.jsonl"}]},
        "sampling": {"strategy": "xx"},
        "optimization": {"maxSteps": 4},
    })  # fmt: skip


def test_export_an_intermediate_plain_pytorch_checkpoint(tmp_path: Path) -> None:
    """``engine.pt`` (no model/ yet) + the checkpoint's xling.json -> the same embeddings in sentence-transformers."""
    from xling.trainer.checkpoint_layout import write_checkpoint_meta
    from xling.trainer.cli import main
    from xling.trainer.optim_engine import TorchEngine, save_trainer_state

    backbone = twin(tmp_path / "backbone", "qwen2")
    spec = _experiment(backbone, pooling="last_token")
    tokenize = Tokenize(load_tokenizer(str(backbone)), spec.model)
    model = BiEncoder(load_backbone(str(backbone), spec.model), "last_token")
    with torch.no_grad():  # "training": weights that differ from the backbone's
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    ckpt = tmp_path / "checkpoint_000000"
    ckpt.mkdir()
    TorchEngine(model, spec).save(ckpt, 0)
    save_trainer_state(ckpt, 2, {"composition": {"kinds": {"xx": 2}}})
    write_checkpoint_meta(
        ckpt, {"spec": spec.model_dump(mode="json"), "model_path": str(backbone), "name": "mid"}, {}
    )
    assert main(["export", str(ckpt), "--out", str(tmp_path / "out")]) == 0
    assert_same_embeddings(HFTextEncoder(model.eval(), tokenize), tmp_path / "out", SHORT, LONG)
    assert "| xx | 2 | 1.000 |" in (tmp_path / "out" / "README.md").read_text()


def test_export_a_final_checkpoint_from_before_the_change_with_its_spec(tmp_path: Path) -> None:
    """An old final checkpoint: model/ is a bare backbone + tokenizer, no xling.json; --spec supplies the rest."""
    from xling.trainer.cli import main

    ckpt = tmp_path / "checkpoint_000001"
    backbone = twin(ckpt / "model", "bert")
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump({
        "apiVersion": "xling.io/v1alpha1", "kind": "RetrievalExperiment", "metadata": {"name": "old"},
        "spec": _experiment(Path("unused"), pooling="cls", normalize=False).model_dump(mode="json", by_alias=True),
    }))  # fmt: skip
    (ckpt / "results.txt").write_text("xquad-r: the table the run printed")
    assert main(["export", str(ckpt), "--out", str(tmp_path / "out")]) == 2, "no xling.json and no --spec"
    assert (
        main(["export", str(ckpt), "--out", str(tmp_path / "out"), "--spec", str(tmp_path / "exp.yaml")]) == 0
    )
    spec = _experiment(backbone, pooling="cls", normalize=False).model
    model = BiEncoder(load_backbone(str(backbone), spec), "cls", normalize=False)
    encoder = HFTextEncoder(model.eval(), Tokenize(load_tokenizer(str(backbone)), spec))
    assert_same_embeddings(encoder, tmp_path / "out", SHORT, LONG)
    assert "the table the run printed" in (tmp_path / "out" / "README.md").read_text()


def test_register_best_without_a_registered_model_name_fails_before_any_work(tmp_path: Path) -> None:
    from xling.api.spec.loading import load_experiment
    from xling.trainer.sweep.tune import run_sweep

    exp = load_experiment(ROOT / "manifests/samples/sweep-smoke.yaml")
    exp.spec.tracking.registered_model_name = None
    exp.spec.output_dir = str(tmp_path)
    with pytest.raises(ValueError, match=r"spec.sweep.registerBest: needs spec.tracking.registeredModelName"):
        run_sweep(exp, f"sqlite:///{tmp_path}/mlflow.db")
    assert not (tmp_path / "mlflow.db").exists()


def test_model_card_has_a_zero_shot_row_a_license_versions_and_no_local_paths(tmp_path: Path) -> None:
    """The card travels: the spec's paths as their last part, the base model's license, the versions that
    made it, and the base model's zero-shot numbers beside this model's."""
    source, suite = "/home/someone/xling/data/demo/ntrex-128", "/home/someone/xling/data/demo/xquad-r"
    spec = ExperimentSpec.model_validate({
        "model": {"name": "xling/multilingual-e5-small"},
        "data": {"languages": ["en", "de"], "sources": [{"type": "ntrex", "path": source}]},
        "sampling": {"strategy": "xy"},
        "evaluation": {"suites": [{"name": "xquad-r", "path": suite}]},
    })  # fmt: skip
    metrics = {"xquad_r/multi/map": 0.6, "xquad_r/mono/map": 0.7, "xquad_r/cross/map": 0.5}
    zero_shot = {"xquad_r/multi/map": 0.4, "xquad_r/mono/map": 0.8, "xquad_r/cross/map": 0.45}
    card = write_model_card(tmp_path, spec, name="demo", metrics=metrics, composition={}, zero_shot=zero_shot)
    head, body = card.read_text().removeprefix("---\n").split("\n---\n", 1)
    assert yaml.safe_load(head)["license"] == "mit"
    assert "| base model, zero-shot | 0.4000 | 0.8000 | 0.4500 |" in body
    assert "| this model | 0.6000 | 0.7000 | 0.5000 |" in body
    assert "/home/someone" not in card.read_text() and "path: ntrex-128" in body and "path: xquad-r" in body
    assert re.search(r"Trained with xling [\d.]+, torch [\d.]+", body), body
