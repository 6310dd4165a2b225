"""What the rules compute (vlretrieval.pipeline): paths, inputs, protocol arguments and targets, on
the repository's own configuration and registries."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys

import pytest
import yaml

from vlretrieval.config import CONFIG_SCHEMA, validate_against_schema
from vlretrieval.errors import ConfigError
from vlretrieval.pipeline import EXTRACTION_THREADS, Pipeline, grid_points, member_model_name, quoted_json

from .conftest import REPO


def _pipeline(**changes) -> Pipeline:
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text(encoding="utf-8"))
    config.update(changes)
    return Pipeline(validate_against_schema(config, CONFIG_SCHEMA, "config"), REPO)


@pytest.fixture(scope="module")
def pipeline() -> Pipeline:
    return _pipeline()


def test_quoted_json_is_one_sorted_shell_word():
    word = quoted_json({"b": "it's", "a": "图"})
    assert word == """'{"a": "图", "b": "it'"'"'s"}'"""
    assert json.loads(shlex.split(word)[0]) == {"a": "图", "b": "it's"}


def test_the_package_imports_no_paddle_for_the_snakefile():
    code = "import sys, vlretrieval.pipeline; print([m for m in sys.modules if m.split('.')[0] in ('paddle', 'paddlenlp')])"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_grid_and_default_targets(pipeline):
    assert pipeline.grid == [("demo_cn", "ernie_vil"), ("demo_cn", "chinese_clip"), ("demo_cn", "bert_clip")]
    targets = pipeline.default_targets()
    assert targets[:4] == ["results/demo_cn/ernie_vil", "results/demo_cn/chinese_clip", "results/demo_cn/bert_clip",
                           "results/summary.csv"]
    assert "results/figures/demo_cn/bert_clip/train_loss.png" in targets
    assert "work/demo_cn/ernie_vil/tracking.json" in targets
    # a test-only dataset has no fine-tuning, so no loss curve
    assert pipeline.pair_figures("coco_cn", "ernie_vil") == ["results/figures/coco_cn/ernie_vil/recall_at_k.png"]


def test_an_unknown_grid_name_is_refused_when_parsed():
    with pytest.raises(ConfigError, match="unknown model 'nope'; known: bert_clip"):
        _pipeline(grid={"datasets": ["demo_cn"], "models": ["nope"]})
    with pytest.raises(ConfigError, match="unknown dataset 'nope'"):
        _pipeline(grid={"datasets": ["nope"], "models": ["ernie_vil"]})


def test_model_kinds_and_wildcard_patterns(pipeline):
    # the registry's models and the members of the repository's demo sweep
    assert pipeline.model_names_pattern("dual_encoder") == (
        "bert_clip|chinese_clip|ernie_vil|ernie_vil__demo_seeds__s1|ernie_vil__demo_seeds__s2|ernie_vil__demo_seeds__s3")
    assert pipeline.model_names_pattern("cross_encoder") == "bridgetower|vinvl"
    assert pipeline.kind("demo_en", "vinvl") == "cross_encoder" and pipeline.kind("demo_cn", "ernie_vil") == "dual_encoder"
    assert pipeline.finetune_ranks == pipeline.finetune_threads == 2
    gpu = _pipeline(finetune={"gpus": 4, "cpu_ranks": 2})
    assert gpu.finetune_ranks == 4


def test_data_paths_and_entries(pipeline):
    assert pipeline.generated_archive_inputs("demo_cn") == {
        "archive": "resources/sources/demo_cn.zip", "checksum": "resources/sources/demo_cn.zip.sha256"}
    assert pipeline.generated_archive_inputs("flickr30k_cn") == {}
    assert list(pipeline.download_entry("flickr30k_cn")) == ["files"]
    assert pipeline.serialize_source("flickr30k_cn") == "resources/flickr30k_cn/download"
    assert pipeline.serialize_source("clip_chinese_140w") == "resources/clip_chinese_140w/raw"
    assert pipeline.serialize_entry("clip_chinese_140w") == {"format": "raw_tsv"}
    assert pipeline.serialize_entry("demo_cn")["format"] == "raw_tsv"
    assert set(pipeline.url_corpus_entry("clip_chinese_140w")) <= {"format", "root", "splits", "url_corpus"}
    assert pipeline.eval_split_dir("coco_cn") == "resources/coco_cn/lmdb/test"


def test_training_inputs_and_arguments(pipeline):
    assert pipeline.prepare_model_inputs("demo_cn", "ernie_vil") == {"vocab_split": "resources/demo_cn/lmdb/train"}
    assert pipeline.prepare_model_args("demo_cn", "ernie_vil") == "--vocab-split resources/demo_cn/lmdb/train"
    assert pipeline.prepare_model_inputs("flickr30k_cn", "ernie_vil") == {}
    assert pipeline.prepare_model_args("flickr30k", "bridgetower") == "--image-size 384"
    # VinVL on the English demo pretrains on the training split with its regions first
    vinvl = pipeline.prepare_model_inputs("demo_en", "vinvl")
    assert vinvl == {"vocab_split": "resources/demo_en/lmdb/train", "train": "resources/demo_en/lmdb/train",
                     "regions": "resources/demo_en/regions/train"}
    args = pipeline.prepare_model_args("demo_en", "vinvl")
    assert args.startswith("--vocab-split resources/demo_en/lmdb/train --pretrain ")
    assert args.endswith(" --train-split resources/demo_en/lmdb/train --regions resources/demo_en/regions/train")
    assert json.loads(shlex.split(args)[3]) == {"steps": 600, "batch_size": 64, "learning_rate": 5.0e-4, "max_len": 64}
    assert pipeline.pretrains("demo_en", "vinvl") and not pipeline.pretrains("demo_en", "bridgetower")
    assert pipeline.finetune_inputs("coco2014", "vinvl") == {
        "model": "work/coco2014/vinvl/models/init", "train": "resources/coco2014/lmdb/train",
        "regions": "resources/coco2014/regions/train"}
    assert pipeline.finetune_args("coco2014", "vinvl") == "--regions resources/coco2014/regions/train"
    assert pipeline.finetune_args("coco2014", "ernie_vil") == ""


def test_pretraining_needs_a_train_split():
    overrides = {"coco_cn": {"vinvl": {"pretrain": {"steps": 1}}}}
    with pytest.raises(ConfigError, match="coco_cn/vinvl: pretrain needs a train split"):
        _pipeline(pair_overrides=overrides).prepare_model_inputs("coco_cn", "vinvl")


def test_extraction_reads_the_export_only_with_the_inference_engine(pipeline):
    assert pipeline.stage_model_dir("demo_cn", "ernie_vil", "zeroshot") == "work/demo_cn/ernie_vil/models/init"
    assert pipeline.stage_model_dir("demo_cn", "ernie_vil", "finetuned") == "work/demo_cn/ernie_vil/models/finetuned"
    # the schema's default engine is inference
    assert pipeline.stage_extraction_model("demo_cn", "ernie_vil", "finetuned") == "work/demo_cn/ernie_vil/finetuned/export"
    dynamic = _pipeline(pair_overrides={"demo_cn": {"ernie_vil": {"eval": {"engine": "dynamic"}}}})
    assert dynamic.stage_extraction_model("demo_cn", "ernie_vil", "finetuned") == "work/demo_cn/ernie_vil/models/finetuned"
    assert pipeline.extraction_settings("demo_cn", "ernie_vil") == {
        "engine": "inference", "max_len": 52, "image_batch_size": 64, "text_batch_size": 256}
    assert pipeline.export_settings("demo_cn", "ernie_vil") == {"max_len": 52, "precision": "float32"}


def test_a_tiny_models_extraction_takes_one_core(pipeline):
    assert pipeline.model_entry("demo_cn", "ernie_vil")["init"] == "tiny"
    assert pipeline.extraction_threads("demo_cn", "ernie_vil") == 1
    published = _pipeline(pair_overrides={"demo_cn": {"ernie_vil": {"init": "random"}}})
    assert published.extraction_threads("demo_cn", "ernie_vil") == EXTRACTION_THREADS > 1


def test_protocols_and_rerank_arguments(pipeline):
    assert pipeline.protocol("demo_cn", "ernie_vil") == {
        "name": "dense", "similarity": "inner product of L2-normalised features", "top_k": 10}
    assert pipeline.protocol("demo_en", "bridgetower")["candidates"] == {"head": "itc", "k": 16}
    assert pipeline.rerank_inputs("demo_en", "bridgetower", "zeroshot") == {
        "model": "work/demo_en/bridgetower/models/init", "split": "resources/demo_en/lmdb/test"}
    assert pipeline.rerank_args("demo_en", "bridgetower", "zeroshot") == (
        "--protocol two_stage --batch-size 128 --candidates itc --candidates-k 16 --max-len 40")
    assert pipeline.rerank_args("demo_en", "vinvl", "finetuned") == (
        "--protocol exhaustive --batch-size 256 --regions resources/demo_en/regions/test --max-len 64")
    # two-stage VinVL: a dual encoder's features of the same split become an input
    two_stage = _pipeline(pair_overrides={"coco2014": {"vinvl": {"eval": {
        "protocol": "two_stage", "candidates": {"model": "ernie_vil"}}}}})
    inputs = two_stage.rerank_inputs("coco2014", "vinvl", "finetuned")
    assert inputs["candidates"] == "work/coco2014/ernie_vil/finetuned/features"
    assert two_stage.rerank_args("coco2014", "vinvl", "finetuned") == (
        "--protocol two_stage --batch-size 256 --regions resources/coco2014/regions/test"
        " --candidates work/coco2014/ernie_vil/finetuned/features --candidates-k 20 --max-len 70")
    assert pipeline.top_k("demo_en", "vinvl") == 10


def test_a_region_model_on_a_dataset_without_regions_is_refused(pipeline):
    with pytest.raises(ConfigError, match="model 'vinvl' reads detector regions, but dataset 'demo_cn' has no regions"):
        pipeline.finetune_inputs("demo_cn", "vinvl")


def test_scoring_inputs_per_stage(pipeline):
    assert pipeline.stage_prediction_inputs("coco_cn", "ernie_vil") == {
        "zeroshot_t2i": "work/coco_cn/ernie_vil/zeroshot/predictions/t2i_predictions.jsonl",
        "zeroshot_i2t": "work/coco_cn/ernie_vil/zeroshot/predictions/i2t_predictions.jsonl",
    }
    assert pipeline.stage_prediction_args("demo_cn", "ernie_vil") == (
        "--stage zeroshot=work/demo_cn/ernie_vil/zeroshot/predictions"
        " --stage finetuned=work/demo_cn/ernie_vil/finetuned/predictions")
    with pytest.raises(ConfigError, match="unknown model 'nope'"):
        pipeline.stage_prediction_inputs("demo_cn", "nope")
    with pytest.raises(ConfigError, match="unknown dataset 'nope'"):
        pipeline.stage_prediction_inputs("nope", "ernie_vil")


def test_tracking_inputs_name_the_benchmarks_of_the_rules_that_ran(pipeline):
    dual = pipeline.tracking_inputs("demo_cn", "ernie_vil")
    assert dual["train_log"] == "work/demo_cn/ernie_vil/train_log.jsonl"
    assert dual["artifacts"] == [
        "benchmarks/extract_features/demo_cn/ernie_vil/zeroshot.tsv",
        "benchmarks/extract_features/demo_cn/ernie_vil/finetuned.tsv",
        "benchmarks/rank/demo_cn/ernie_vil/zeroshot.tsv",
        "benchmarks/rank/demo_cn/ernie_vil/finetuned.tsv",
        "benchmarks/score/demo_cn/ernie_vil.tsv",
        "benchmarks/prepare_model/demo_cn/ernie_vil.tsv",
        "benchmarks/finetune/demo_cn/ernie_vil.tsv",
    ]
    assert pipeline.tracking_args("demo_cn", "ernie_vil") == "--train-log work/demo_cn/ernie_vil/train_log.jsonl"
    cross = pipeline.tracking_inputs("demo_en", "vinvl")["artifacts"]
    assert cross[:2] == ["benchmarks/rerank/demo_en/vinvl/zeroshot.tsv", "benchmarks/rerank/demo_en/vinvl/finetuned.tsv"]
    test_only = pipeline.tracking_inputs("coco_cn", "ernie_vil")
    assert "train_log" not in test_only and pipeline.tracking_args("coco_cn", "ernie_vil") == ""
    tracked = pipeline.tracked_config("demo_cn", "ernie_vil")
    assert tracked["finetune"] == {"gpus": 0, "cpu_ranks": 2}
    assert tracked["model"]["train"]["learning_rate"] == 5.0e-4 and tracked["model"]["init"] == "tiny"


# -- sweeps ------------------------------------------------------------------------------------------


def test_the_demo_sweep_expands_into_three_seeded_members(pipeline):
    members = pipeline.sweep_members("demo_seeds")
    assert [m.model for m in members] == ["ernie_vil__demo_seeds__s1", "ernie_vil__demo_seeds__s2",
                                          "ernie_vil__demo_seeds__s3"]
    assert {m.seed for m in members} == {1, 2, 3}
    base = pipeline.model_entry("demo_cn", "ernie_vil")
    for member in members:
        assert (member.dataset, member.base_model, member.point, member.overrides) == ("demo_cn", "ernie_vil", None, {})
        assert member.configuration == "demo_cn/ernie_vil"
        # the pair's effective entry (demo overrides included), only the seed differs
        entry = pipeline.model_entry("demo_cn", member.model)
        assert entry["train"]["seed"] == member.seed and base["train"]["seed"] == 1
        assert {**entry["train"], "seed": 1} == base["train"] and entry["eval"] == base["eval"]
        assert entry["init"] == "tiny" and entry["train"]["learning_rate"] == 5.0e-4
        assert pipeline.kind("demo_cn", member.model) == "dual_encoder"
    assert pipeline.sweep_results("demo_seeds") == [f"results/demo_cn/ernie_vil__demo_seeds__s{s}" for s in (1, 2, 3)]
    assert pipeline.sweep_tracking_records("demo_seeds")[0] == "work/demo_cn/ernie_vil__demo_seeds__s1/tracking.json"
    # every rule applies to a member as to a pair, in folders of its own
    assert pipeline.finetune_inputs("demo_cn", "ernie_vil__demo_seeds__s2")["model"] == (
        "work/demo_cn/ernie_vil__demo_seeds__s2/models/init")
    # built by name only: the default targets and the grid are the plain pairs'
    assert not any("__" in target for target in pipeline.default_targets())
    # a member exists only on its sweep's dataset
    with pytest.raises(ConfigError, match="unknown model 'ernie_vil__demo_seeds__s1'"):
        pipeline.model_entry("demo_en", "ernie_vil__demo_seeds__s1")
    with pytest.raises(ConfigError, match="unknown sweep 'nope'; known: demo_seeds"):
        pipeline.sweep_members("nope")


def test_a_member_is_tracked_with_its_sweep_tags_and_settings(pipeline):
    args = pipeline.tracking_args("demo_cn", "ernie_vil__demo_seeds__s2")
    assert args.startswith("--train-log work/demo_cn/ernie_vil__demo_seeds__s2/train_log.jsonl --tags ")
    assert json.loads(shlex.split(args)[3]) == {
        "sweep": "demo_seeds", "sweep_configuration": "demo_cn/ernie_vil", "seed": "2", "base_model": "ernie_vil"}
    tracked = pipeline.tracked_config("demo_cn", "ernie_vil__demo_seeds__s2")
    assert tracked["sweep"] == {"sweep": "demo_seeds", "configuration": "demo_cn/ernie_vil", "overrides": {}, "seed": 2}
    assert tracked["model"]["train"]["seed"] == 2
    plan = pipeline.sweep_plan("demo_seeds")
    assert (plan["name"], plan["pairs"], plan["seeds"], plan["grid"]) == ("demo_seeds", ["demo_cn/ernie_vil"], [1, 2, 3], {})
    assert plan["members"][2] == {
        "sweep": "demo_seeds", "dataset": "demo_cn", "model": "ernie_vil__demo_seeds__s3", "base_model": "ernie_vil",
        "configuration": "demo_cn/ernie_vil", "point": None, "overrides": {}, "seed": 3,
        "results": "results/demo_cn/ernie_vil__demo_seeds__s3", "tracking": "work/demo_cn/ernie_vil__demo_seeds__s3/tracking.json"}


def test_a_grid_sweep_covers_the_product_in_written_order():
    assert grid_points({"a": [1, 2], "b": ["x", "y", "z"]})[:4] == [
        {"a": 1, "b": "x"}, {"a": 1, "b": "y"}, {"a": 1, "b": "z"}, {"a": 2, "b": "x"}]
    assert member_model_name("ernie_vil", "lr", 3, 7) == "ernie_vil__lr__g3_s7"
    sweep = {"pairs": ["demo_cn/ernie_vil", "demo_en/bridgetower"], "seeds": [5, 6],
             "grid": {"train.learning_rate": [1.0e-4, 2.0e-4], "eval.candidates": [{"head": "itc", "k": 32}]}}
    pipeline = _pipeline(sweeps={"lr": sweep})
    members = pipeline.sweep_members("lr")
    assert len(members) == 2 * 2 * 1 * 2
    assert [m.model for m in members[:4]] == ["ernie_vil__lr__g0_s5", "ernie_vil__lr__g0_s6",
                                              "ernie_vil__lr__g1_s5", "ernie_vil__lr__g1_s6"]
    g1 = pipeline.model_entry("demo_cn", "ernie_vil__lr__g1_s6")
    assert g1["train"]["learning_rate"] == 2.0e-4 and g1["train"]["seed"] == 6
    assert g1["train"]["num_train_epochs"] == 3  # the rest of the demo recipe stays
    assert members[2].configuration == "demo_cn/ernie_vil/g1"
    assert members[2].overrides == {"train.learning_rate": 2.0e-4, "eval.candidates": {"head": "itc", "k": 32}}
    # a mapping value replaces the entry's whole mapping (here the demo's {head: itc, k: 16})
    bridgetower = pipeline.model_entry("demo_en", "bridgetower__lr__g0_s5")
    assert bridgetower["eval"]["candidates"] == {"head": "itc", "k": 32}
    assert bridgetower["train"]["max_grad_norm"] == 1.0  # demo_en's bridgetower override is kept
    assert pipeline.kind("demo_en", "bridgetower__lr__g0_s5") == "cross_encoder"
    assert "bridgetower__lr__g0_s5" in pipeline.model_names_pattern("cross_encoder").split("|")
    assert "bridgetower__lr__g0_s5" not in pipeline.model_names_pattern("dual_encoder").split("|")


def test_a_run_with_its_own_registry_leaves_out_sweeps_it_cannot_resolve(tmp_path, capsys):
    registry = yaml.safe_load((REPO / "config" / "datasets.yaml").read_text(encoding="utf-8"))
    own = tmp_path / "datasets.yaml"
    own.write_text(yaml.safe_dump({"demo_en": registry["demo_en"]}), encoding="utf-8")
    # config files merge key by key, so the repository's demo sweep comes along
    pipeline = _pipeline(datasets_file=str(own), grid={"datasets": ["demo_en"], "models": ["ernie_vil"]},
                         pair_overrides={})
    assert "config sweeps.demo_seeds: unknown dataset 'demo_cn' in pair 'demo_cn/ernie_vil'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="sweep 'demo_seeds' is left out of this run: unknown dataset 'demo_cn'"):
        pipeline.sweep_members("demo_seeds")
    assert pipeline.model_names_pattern("dual_encoder") == "bert_clip|chinese_clip|ernie_vil"

