"""Configuration: schema validation and defaults, pair overrides checked against the model schema,
and the real `snakemake -n` refusing a bad config before any job runs."""

from __future__ import annotations

import pytest
import yaml

from vlretrieval.config import (
    CONFIG_SCHEMA,
    MODELS_SCHEMA,
    fill_schema_defaults,
    load_datasets,
    load_models,
    pair_config,
    schema_default,
    validate_against_schema,
    validate_pair_overrides,
)
from vlretrieval.errors import ConfigError

from .conftest import REPO


@pytest.fixture(scope="module")
def registries():
    return load_datasets(REPO / "config" / "datasets.yaml"), load_models(REPO / "config" / "models.yaml")


@pytest.fixture(scope="module")
def repo_config():
    return yaml.safe_load((REPO / "config" / "config.yaml").read_text(encoding="utf-8"))


def _overrides(dataset, model, block):
    return {"pair_overrides": {dataset: {model: block}}}


# -- defaults ----------------------------------------------------------------------------------------


def test_schema_defaults_are_read_from_the_schema_files():
    schema = yaml.safe_load((REPO / "config" / "schemas" / "models.schema.yaml").read_text(encoding="utf-8"))
    eval_schema = schema["properties"]["eval"]["properties"]
    assert schema_default(MODELS_SCHEMA, "eval", "top_k") == eval_schema["top_k"]["default"] == 10
    assert schema_default(MODELS_SCHEMA, "eval", "engine") == "inference"
    assert schema_default(MODELS_SCHEMA, "eval", "candidates", "k") == 20
    assert schema_default(CONFIG_SCHEMA, "data", "download_timeout") == 60
    assert schema_default(CONFIG_SCHEMA, "data", "on_bad_record") == "error"
    with pytest.raises(KeyError, match="no default"):
        schema_default(MODELS_SCHEMA, "eval", "max_len")
    with pytest.raises(KeyError, match="describes no key eval.nope"):
        schema_default(MODELS_SCHEMA, "eval", "nope")


def test_library_and_scripts_take_their_defaults_from_the_schema(monkeypatch):
    from vlretrieval.retrieval import topk
    from vlretrieval.training.hparams import DEFAULT_HPARAMS, resolve_hparams

    assert topk.DEFAULT_CHUNK_SIZE == schema_default(MODELS_SCHEMA, "eval", "chunk_size")
    assert DEFAULT_HPARAMS == fill_schema_defaults({}, MODELS_SCHEMA, "train")
    assert resolve_hparams() == DEFAULT_HPARAMS
    assert DEFAULT_HPARAMS["learning_rate"] == 5e-5 and DEFAULT_HPARAMS["per_device_train_batch_size"] == 128
    # the rank command, called by hand without --top-k or --chunk-size, ranks with the schema's values
    calls = []
    monkeypatch.setattr(topk, "rank_features", lambda *args, **kwargs: calls.append(kwargs) or
                        {"texts": 0, "images": 0, "k": kwargs["k"]})
    assert topk.main(["--image-feats", "i", "--text-feats", "t", "--out-t2i", "o"]) in (0, None)
    assert calls[0]["k"] == 10 and calls[0]["chunk_size"] == 1024


def test_fill_schema_defaults_completes_a_partial_block_without_validating():
    filled = fill_schema_defaults({"candidates": {"model": "ernie_vil"}, "top_k": 20}, MODELS_SCHEMA, "eval")
    assert filled["top_k"] == 20 and filled["candidates"] == {"model": "ernie_vil", "k": 20}
    assert filled["engine"] == "inference" and filled["pair_batch_size"] == 256
    assert "max_len" not in filled


def test_validation_fills_copies_of_defaults_and_names_the_key():
    first = validate_against_schema({"family": "ernie_vil", "init": "tiny"}, MODELS_SCHEMA, "entry a")
    second = validate_against_schema({"family": "ernie_vil", "init": "tiny"}, MODELS_SCHEMA, "entry b")
    first["train"]["lr_multipliers"]["heads"] = 5
    assert second["train"]["lr_multipliers"] == {}
    assert first["eval"]["top_k"] == 10 and first["train"]["warmup_steps"] == 100
    with pytest.raises(ConfigError, match=r"^entry c: eval.top_kk: unknown key; known here: candidates, chunk_size"):
        validate_against_schema({"family": "x", "init": "tiny", "eval": {"top_kk": 5}}, MODELS_SCHEMA, "entry c")
    with pytest.raises(ConfigError, match=r"^--eval: image_batch_size: 0 is less than the minimum of 1$"):
        validate_against_schema({"image_batch_size": 0}, MODELS_SCHEMA, "--eval", keys=("eval",))


# -- pair overrides ---------------------------------------------------------------------------------


def test_repository_overrides_are_valid_and_resolved(registries, repo_config):
    datasets, models = registries
    effective = validate_pair_overrides(repo_config, models, datasets)
    # "*" reaches every model of the registry on that dataset
    assert {model for dataset, model in effective if dataset == "demo_cn"} == set(models)
    demo = effective[("demo_cn", "ernie_vil")]
    assert demo["init"] == "tiny" and demo["train"]["learning_rate"] == 5.0e-4
    # defaults the override does not touch come from the schema
    assert demo["train"]["save_total_limit"] == 3 and demo["eval"]["top_k"] == 10
    assert effective[("demo_en", "bridgetower")]["eval"]["candidates"] == {"head": "itc", "k": 16}


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ({"eval": {"top_kk": 5}}, "eval.top_kk: unknown key"),
        ({"eval": {"top_k": -3}}, "eval.top_k: -3 is less than the minimum of 10"),
        ({"train": {"learnig_rate": 1e-4}}, "train.learnig_rate: unknown key"),
        ({"train": {"warmup_ratio": 1.5}}, "train.warmup_ratio: 1.5 is greater than or equal to the maximum of 1"),
        ({"evl": {}}, "evl: unknown key"),
        ({"eval": {"candidates": {"head": "itc", "model": "ernie_vil"}}}, "eval.candidates"),
    ],
)
def test_a_bad_pair_override_names_the_key_and_the_pair(registries, repo_config, block, message):
    datasets, models = registries
    config = {**repo_config, **_overrides("demo_cn", "ernie_vil", block)}
    with pytest.raises(ConfigError) as caught:
        validate_pair_overrides(config, models, datasets)
    text = str(caught.value)
    assert text.startswith("config pair_overrides.demo_cn.ernie_vil (pair demo_cn/ernie_vil): ")
    assert message in text


def test_a_star_override_is_checked_with_every_model(registries):
    datasets, models = registries
    with pytest.raises(ConfigError, match=r"pair_overrides.demo_en.\* \(pair demo_en/bert_clip\): eval.top_k"):
        validate_pair_overrides(_overrides("demo_en", "*", {"eval": {"top_k": 2}}), models, datasets)


def test_an_unknown_model_key_is_refused_and_an_unknown_dataset_is_reported(registries, capsys):
    datasets, models = registries
    with pytest.raises(ConfigError, match=r"pair_overrides.demo_cn.ernie_vl: unknown model 'ernie_vl'; known: bert_clip"):
        validate_pair_overrides(_overrides("demo_cn", "ernie_vl", {}), models, datasets)
    # Config files merge key by key: a run with its own dataset registry keeps the repository's
    # overrides of the demo datasets, so an unknown dataset is a warning, and its entries are still checked.
    assert validate_pair_overrides(_overrides("elsewhere", "vinvl", {"eval": {"top_k": 12}}), models, datasets)[
        ("elsewhere", "vinvl")]["eval"]["top_k"] == 12
    assert "pair_overrides.elsewhere: 'elsewhere' is not in the dataset registry" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="elsewhere.vinvl"):
        validate_pair_overrides(_overrides("elsewhere", "vinvl", {"eval": {"top_k": 2}}), models, datasets)


def test_pair_config_layers_and_replaces_the_first_stage(registries):
    _, models = registries
    config = {"pair_overrides": {"d": {"*": {"eval": {"top_k": 20}},
                                       "bridgetower": {"eval": {"candidates": {"model": "ernie_vil"}}}}}}
    entry = pair_config(config, models, "d", "bridgetower")
    assert entry["eval"]["top_k"] == 20
    # replaced, not merged with the registry's {head: itc, k: 128}; k from the schema
    assert entry["eval"]["candidates"] == {"model": "ernie_vil", "k": 20}
    assert pair_config({}, models, "d", "bridgetower") is models["bridgetower"]


# -- the real workflow refuses a bad config before any job ------------------------------------------


def _dry_run_error(workflow, *targets):
    proc = workflow.run(*targets, "-n", check=False, timeout=600)
    assert proc.returncode != 0, proc.stdout
    return proc.stdout + proc.stderr


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ({"eval": {"top_kk": 5}}, "eval.top_kk: unknown key"),
        ({"eval": {"top_k": -3}}, "eval.top_k: -3 is less than the minimum of 10"),
        ({"train": {"learnig_rate": 1e-4}}, "train.learnig_rate: unknown key"),
    ],
)
def test_dry_run_refuses_a_bad_pair_override(workflow, block, message):
    workflow.write_config(_overrides("demo_cn", "ernie_vil", block))
    out = _dry_run_error(workflow)
    assert "config pair_overrides.demo_cn.ernie_vil (pair demo_cn/ernie_vil)" in out and message in out
    assert "Job stats" not in out  # refused while parsing, before any job is planned


@pytest.mark.parametrize(("target", "message"), [
    ("results/demo_cn/nope/", "unknown model 'nope'; known: bert_clip, bridgetower"),
    ("results/nope/ernie_vil/", "unknown dataset 'nope'; known: aic_icc"),
])
def test_dry_run_names_an_unknown_model_or_dataset(workflow, target, message):
    out = _dry_run_error(workflow, target)
    assert message in out and "MissingInputException" not in out


# -- sweeps -------------------------------------------------------------------------------------------


def _sweep_pipeline(repo_config, sweeps):
    from vlretrieval.pipeline import Pipeline

    config = validate_against_schema({**repo_config, "sweeps": sweeps}, CONFIG_SCHEMA, "config")
    return Pipeline(config, REPO)


GOOD_SWEEP = {"pairs": ["demo_cn/ernie_vil"], "seeds": [1, 2]}


@pytest.mark.parametrize(
    ("sweeps", "message"),
    [
        ({"bad-name": GOOD_SWEEP},
         "config sweeps.bad-name: 'bad-name' is not a valid sweep name: use letters, digits and single underscores"),
        ({"two__parts": GOOD_SWEEP}, "config sweeps.two__parts: 'two__parts' is not a valid sweep name"),
        ({"s": {**GOOD_SWEEP, "pairs": ["demo_cn/ernie_vl"]}},
         "config sweeps.s: pairs: unknown model 'ernie_vl' in pair 'demo_cn/ernie_vl'; known: bert_clip, bridgetower"),
        ({"s": {**GOOD_SWEEP, "pairs": ["demo_cnn/ernie_vil"]}},
         "config sweeps.s: pairs: unknown dataset 'demo_cnn' in pair 'demo_cnn/ernie_vil'; known: aic_icc"),
        ({"s": {**GOOD_SWEEP, "pairs": ["demo_cn"]}}, "config sweeps.s: pairs.0: 'demo_cn' does not match"),
        ({"s": {**GOOD_SWEEP, "seeds": []}}, "config sweeps.s: seeds: [] should be non-empty"),
        ({"s": {**GOOD_SWEEP, "seeds": [1, 1]}}, "config sweeps.s: seeds: [1, 1] has non-unique elements"),
        ({"s": {"pairs": ["demo_cn/ernie_vil"]}}, "config sweeps.s: (top level): 'seeds' is a required property"),
        ({"s": {**GOOD_SWEEP, "grid": {"train.learnig_rate": [1.0e-4]}}},
         "config sweeps.s (member ernie_vil__s__g0_s1 of pair demo_cn/ernie_vil): train.learnig_rate: unknown key; "
         "known here: amp, crop_scale"),
        ({"s": {**GOOD_SWEEP, "grid": {"train.learning_rate": [1.0e-4, -1]}}},
         "config sweeps.s (member ernie_vil__s__g1_s1 of pair demo_cn/ernie_vil): train.learning_rate: -1 is less "
         "than or equal to the minimum of 0"),
        ({"s": {**GOOD_SWEEP, "grid": {"evl.top_k": [20]}}},
         "config sweeps.s (member ernie_vil__s__g0_s1 of pair demo_cn/ernie_vil): evl: unknown key"),
        ({"s": {**GOOD_SWEEP, "grid": {"init.vision": ["openai/clip"]}}},
         "config sweeps.s (member ernie_vil__s__g0_s1 of pair demo_cn/ernie_vil): grid: init.vision: init is 'tiny' "
         "here, not a mapping of keys"),
        ({"s": {**GOOD_SWEEP, "grid": {"train.learning_rate": []}}},
         "config sweeps.s: grid.train.learning_rate: [] should be non-empty"),
        ({"s": {**GOOD_SWEEP, "grid": {"train.seed": [1]}}},
         "config sweeps.s: grid.train.seed: the members' seeds come from seeds, not from the grid"),
        ({"s": {**GOOD_SWEEP, "seed": [1]}}, "config sweeps.s: seed: unknown key; known here: description, grid"),
    ],
)
def test_a_bad_sweep_is_refused_naming_the_sweep_and_the_key(repo_config, sweeps, message):
    with pytest.raises(ConfigError) as caught:
        _sweep_pipeline(repo_config, sweeps)
    assert str(caught.value).startswith(message)


def test_dry_run_refuses_a_bad_sweep(workflow):
    workflow.write_config({"sweeps": {"lr": {"pairs": ["demo_cn/ernie_vil"], "seeds": [1],
                                             "grid": {"train.learnig_rate": [1.0e-4]}}}})
    out = _dry_run_error(workflow)  # the default target: the sweep need not be asked for
    assert "config sweeps.lr (member ernie_vil__lr__g0_s1 of pair demo_cn/ernie_vil): train.learnig_rate: unknown key" in out
    assert "Job stats" not in out
