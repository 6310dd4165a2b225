"""Export of a dual encoder to static inference models, and extraction through paddle.inference."""

from __future__ import annotations

import json
import shutil

import numpy as np
import paddle
import pytest

from vlretrieval.data.demo import DemoSpec, write_demo_archive
from vlretrieval.data.download import safe_extract
from vlretrieval.data.lmdb_store import SplitStore, serialize_split
from vlretrieval.errors import ConfigError
from vlretrieval.models.base import MODEL_INFO_FILE, load_model_dir
from vlretrieval.models.registry import DUAL_ENCODER
from vlretrieval.models.export import (
    MANIFEST_FILE,
    InferenceEncoder,
    export_model,
    feature_agreement,
    read_export_manifest,
)
from vlretrieval.models.prepare import prepare_initial_model, vocab_texts_from_split
from vlretrieval.models.registry import list_families
from vlretrieval.retrieval.extract import extract_split, feature_paths
from vlretrieval.retrieval.features import load_features

from .conftest import tiny_demo_entry

ATOL = 1e-4
MIN_COSINE = 0.9999


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    write_demo_archive(DemoSpec(name="ex", sizes={"test": 9}, seed=5), root / "ex.zip")
    safe_extract(root / "ex.zip", root / "raw")
    serialize_split("raw_tsv", root / "raw", "test", root / "lmdb", entry={"format": "raw_tsv", "root": "ex"},
                    progress=False)
    prepare_initial_model("ernie_vil", "tiny", root / "model", vocab_texts=vocab_texts_from_split(root / "lmdb"))
    manifest = export_model(root / "model", root / "export", threads=1)
    return root / "lmdb", root / "model", root / "export", manifest


def _assert_same_features(got, expected):
    assert got.shape == expected.shape
    max_abs, min_cos = feature_agreement(got, expected)
    assert max_abs <= ATOL and min_cos >= MIN_COSINE, (max_abs, min_cos)


def test_manifest_and_layout(exported):
    _, model_dir, export_dir, manifest = exported
    assert manifest == read_export_manifest(export_dir)
    info = json.loads((model_dir / MODEL_INFO_FILE).read_text(encoding="utf-8"))
    assert manifest["family"] == "ernie_vil" and manifest["kind"] == "dual_encoder"
    assert manifest["image_size"] == info["image_size"] == 64
    assert manifest["embedding_dim"] == info["embedding_dim"]
    assert manifest["max_len"] == info["eval_max_len"] and manifest["max_text_len"] == info["max_text_len"]
    assert manifest["paddle_version"] == paddle.__version__
    assert manifest["precision"] == "float32"
    assert manifest["source_model_dir"] == str(model_dir.resolve())
    image, text = manifest["encoders"]["image"], manifest["encoders"]["text"]
    assert [(i["name"], i["shape"], i["dtype"]) for i in image["inputs"]] == [("pixel_values", [-1, 3, 64, 64], "float32")]
    assert [(i["name"], i["shape"], i["dtype"]) for i in text["inputs"]] == [
        ("input_ids", [-1, -1], "int64"), ("attention_mask", [-1, -1], "int64")
    ]
    for entry in (image, text):
        assert entry["output"] == {"shape": [-1, info["embedding_dim"]], "dtype": "float32", "l2_normalized": True}
    # paddle 3 writes PIR programs as json next to the parameters
    for entry in (image, text):
        assert (entry["program"], entry["params"], entry["program_format"]) == (
            "inference.json", "inference.pdiparams", "pir_json")
        assert (export_dir / entry["dir"] / entry["program"]).is_file()
    # the tokenizer and configs travel with the export, the dynamic weights do not
    assets = sorted(p.name for p in (export_dir / "assets").iterdir())
    assert "vocab.txt" in assets and MODEL_INFO_FILE in assets
    assert not any(name.endswith(".pdparams") for name in assets)
    assert manifest["verification"]["image_min_cosine"] >= MIN_COSINE
    assert not [p for p in export_dir.parent.iterdir() if p.name.startswith(".export.")]


@pytest.mark.parametrize("onednn", [True, False], ids=["onednn", "plain_cpu"])
def test_exported_encoders_match_the_dynamic_model_at_any_batch_size_and_length(exported, onednn):
    _, model_dir, export_dir, manifest = exported
    family, model, tokenizer, _ = load_model_dir(model_dir)
    engine = InferenceEncoder(export_dir, device="cpu", threads=2, onednn=onednn)
    rng = np.random.default_rng(1)
    size = manifest["image_size"]
    with paddle.no_grad():
        for batch in (1, 2, 5, 13):
            pixels = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
            _assert_same_features(engine.encode_images(pixels), model.encode_images(paddle.to_tensor(pixels)).numpy())
        vocab_size = tokenizer.vocab_size
        # real captions at several context lengths, and random in-vocabulary ids with padding
        with SplitStore(exported[0]) as store:
            captions = [t.text for t in store.texts()]
        for batch, max_len in ((1, 4), (3, 9), (7, 23), (16, 64)):
            encoded = family.tokenize(tokenizer, captions[:batch], max_len=max_len)
            ids, mask = encoded["input_ids"], encoded["attention_mask"]
            expected = model.encode_texts(paddle.to_tensor(ids), attention_mask=paddle.to_tensor(mask)).numpy()
            _assert_same_features(engine.encode_texts(ids, mask), expected)
        for batch, length in ((2, 2), (6, 31), (4, 64)):
            ids = rng.integers(1, vocab_size, (batch, length)).astype(np.int64)
            mask = np.ones_like(ids)
            for row in range(batch):
                keep = int(rng.integers(2, length + 1))
                ids[row, keep:], mask[row, keep:] = 0, 0
            expected = model.encode_texts(paddle.to_tensor(ids), attention_mask=paddle.to_tensor(mask)).numpy()
            _assert_same_features(engine.encode_texts(ids, mask), expected)
    with pytest.raises(ValueError, match="limit of 64"):
        engine.encode_texts(np.ones((1, 65), np.int64), np.ones((1, 65), np.int64))
    with pytest.raises(ValueError, match=r"\[n, 3, 64, 64\]"):
        engine.encode_images(np.zeros((1, 3, 32, 32), np.float32))


def test_inference_extraction_matches_dynamic_extraction(exported, tmp_path):
    split, model_dir, export_dir, _ = exported
    dynamic = extract_split(model_dir, split, tmp_path / "dynamic", engine="dynamic", image_batch_size=4, text_batch_size=7,
                            progress=False)
    inference = extract_split(export_dir, split, tmp_path / "inference", engine="inference", threads=2,
                              image_batch_size=4, text_batch_size=7, progress=False)
    assert inference["engine"] == "inference" and dynamic["engine"] == "dynamic"
    assert inference["device"] == "cpu (2 threads)"
    assert (inference["num_images"], inference["num_texts"], inference["max_len"]) == (9, 45, dynamic["max_len"])
    for ours, theirs in zip(feature_paths(tmp_path / "inference"), feature_paths(tmp_path / "dynamic")):
        got, expected = load_features(ours), load_features(theirs)
        np.testing.assert_array_equal(got.ids, expected.ids)
        _assert_same_features(got.vectors, expected.vectors)
    # a context length other than the recorded one is honoured, and bounded by the model's limit
    short = extract_split(export_dir, split, tmp_path / "short", engine="inference", image_batch_size=64, text_batch_size=256, max_len=4, progress=False)
    assert short["max_len"] == 4
    with pytest.raises(ConfigError, match="exceeds"):
        extract_split(export_dir, split, tmp_path / "long", engine="inference", image_batch_size=64, text_batch_size=256, max_len=65, progress=False)


@pytest.mark.parametrize("family_name", [name for name in list_families(DUAL_ENCODER) if name != "ernie_vil"])
def test_every_dual_encoder_family_exports(exported, family_name, tmp_path):
    split = exported[0]
    prepare_initial_model(family_name, "tiny", tmp_path / "model", vocab_texts=vocab_texts_from_split(split))
    manifest = export_model(tmp_path / "model", tmp_path / "export", threads=1)
    assert manifest["family"] == family_name
    extract_split(tmp_path / "model", split, tmp_path / "dynamic", engine="dynamic", image_batch_size=4, text_batch_size=7,
                  progress=False)
    extract_split(tmp_path / "export", split, tmp_path / "inference", engine="inference", threads=1,
                  image_batch_size=4, text_batch_size=7, progress=False)
    for ours, theirs in zip(feature_paths(tmp_path / "inference"), feature_paths(tmp_path / "dynamic")):
        got, expected = load_features(ours), load_features(theirs)
        np.testing.assert_array_equal(got.ids, expected.ids)
        _assert_same_features(got.vectors, expected.vectors)


def test_bad_inputs_give_clear_errors(exported, tmp_path):
    split, model_dir, export_dir, _ = exported
    with pytest.raises(ConfigError, match="model directory not found"):
        export_model(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="not a model directory"):
        export_model(tmp_path / "empty", tmp_path / "out")
    # a model directory whose weights are gone
    shutil.copytree(model_dir, tmp_path / "noweights")
    for weights in (tmp_path / "noweights").glob("*.pdparams"):
        weights.unlink()
    with pytest.raises(ConfigError, match="cannot load the model"):
        export_model(tmp_path / "noweights", tmp_path / "out")
    with pytest.raises(ConfigError, match="already an exported model"):
        export_model(export_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()

    with pytest.raises(ConfigError, match="saved model directory, not an exported one"):
        extract_split(model_dir, split, tmp_path / "f", engine="inference", image_batch_size=64, text_batch_size=256, progress=False)
    with pytest.raises(ConfigError, match="not an exported model"):
        InferenceEncoder(tmp_path / "empty")
    with pytest.raises(ConfigError, match="exported model directory not found"):
        InferenceEncoder(tmp_path / "missing")
    with pytest.raises(ConfigError, match="an exported model; extract from it with the inference engine"):
        extract_split(export_dir, split, tmp_path / "f", engine="dynamic", image_batch_size=64, text_batch_size=256, progress=False)
    with pytest.raises(ConfigError, match="unknown extraction engine 'static'"):
        extract_split(export_dir, split, tmp_path / "f", engine="static", image_batch_size=64, text_batch_size=256, progress=False)

    broken = tmp_path / "broken"
    shutil.copytree(export_dir, broken)
    (broken / "text" / "inference.pdiparams").unlink()
    with pytest.raises(ConfigError, match=r"text/inference\.pdiparams: missing"):
        InferenceEncoder(broken)
    shutil.rmtree(broken / "assets")
    shutil.copy2(export_dir / "text" / "inference.pdiparams", broken / "text" / "inference.pdiparams")
    with pytest.raises(ConfigError, match="assets: missing"):
        extract_split(broken, split, tmp_path / "f", engine="inference", image_batch_size=64, text_batch_size=256, progress=False)
    manifest = json.loads((broken / MANIFEST_FILE).read_text(encoding="utf-8"))
    (broken / MANIFEST_FILE).write_text(json.dumps({**manifest, "version": 99}), encoding="utf-8")
    with pytest.raises(ConfigError, match="version 99 is not supported"):
        InferenceEncoder(broken)
    assert not (tmp_path / "f").exists()


def _job_counts(out: str) -> dict[str, int]:
    counts = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit() and parts[0] != "total":
            counts[parts[0]] = int(parts[1])
    return counts


def _write_tiny_pair_config(workflow, engine: str) -> None:
    train = {"max_steps": 2, "per_device_train_batch_size": 4, "warmup_steps": 0, "recompute": False,
             "hflip": False, "save_steps": 50}
    workflow.write_config(
        {
            "grid": {"datasets": ["demo_tiny"], "models": ["ernie_vil"]},
            "finetune": {"gpus": 0, "cpu_ranks": 1},
            "pair_overrides": {"demo_tiny": {"*": {"init": "tiny", "train": train,
                                                   "eval": {"engine": engine, "max_len": 40}}}},
        },
        datasets={"demo_tiny": tiny_demo_entry({"train": 8, "test": 4})},
    )


@pytest.mark.parametrize("engine", ["dynamic", "inference"])
def test_inference_engine_extracts_from_each_stage_export(workflow, engine):
    _write_tiny_pair_config(workflow, engine)
    proc = workflow.run("results/demo_tiny/ernie_vil", "results/exports/demo_tiny/ernie_vil", "-n", "--quiet", "rules")
    counts = _job_counts(proc.stdout)
    assert counts["export"] == 1 and counts["extract_features"] == 2
    assert counts.get("export_stage", 0) == (2 if engine == "inference" else 0)


@pytest.mark.slow
def test_export_rule_builds_the_deployable_fine_tuned_export(workflow):
    _write_tiny_pair_config(workflow, "inference")
    deploy = "results/exports/demo_tiny/ernie_vil"
    workflow.run(deploy)
    root = workflow.workdir
    finetuned = root / "work/demo_tiny/ernie_vil/models/finetuned"
    manifest = read_export_manifest(root / deploy)
    assert manifest["source_model_dir"] == str(finetuned.resolve())
    assert manifest["max_len"] == 40
    assert (root / "logs/export/demo_tiny/ernie_vil.log").is_file()
    assert (root / "benchmarks/export/demo_tiny/ernie_vil.tsv").is_file()
    # the deployed towers give the fine-tuned model's features
    family, model, _, _ = load_model_dir(finetuned)
    engine = InferenceEncoder(root / deploy, device="cpu", threads=1)
    transform = family.image_transform(manifest["image_size"], train=False)
    with SplitStore(root / "resources/demo_tiny/lmdb/train") as store:
        pixels = np.stack([transform(store.open_image(i)) for i in store.image_ids()[:3]])
    with paddle.no_grad():
        expected = model.encode_images(paddle.to_tensor(pixels)).numpy()
    _assert_same_features(engine.encode_images(pixels), expected)
