# Shared helpers and input functions. Everything with logic lives in the vlretrieval package.
import json
import os
import shlex
from pathlib import Path

from vlretrieval.config import (
    DOWNLOAD_KEYS,
    EXTRACTION_KEYS,
    SOURCE_KEYS,
    configured_pairs,
    evaluation_protocol,
    required_extra_inputs,
    evaluation_stages,
    load_datasets,
    load_models,
    model_names_pattern,
    pair_config,
    require,
    subset,
)
from vlretrieval.errors import ConfigError
from vlretrieval.models.registry import family_spec

# Jobs import the package from this checkout, also inside the conda environments of --sdm conda,
# which install only the pinned dependencies.
os.environ.update(PYTHONPATH=os.pathsep.join(filter(None, [workflow.basedir, os.environ.get("PYTHONPATH")])))


def workflow_path(path):
    """Registry paths in the config are relative to the workflow's own directory."""
    return Path(workflow.basedir) / path


DATASETS = load_datasets(workflow_path(config["datasets_file"]))
MODELS = load_models(workflow_path(config["models_file"]))


def grid_pairs():
    return configured_pairs(config)


for _name in {dataset for dataset, _ in grid_pairs()}:
    require(DATASETS, _name, "dataset")
for _name in {model for _, model in grid_pairs()}:
    require(MODELS, _name, "model")


# Which rules rank a pair depends on its model's kind: dual encoders extract features and rank
# them; cross encoders score pairs (rule rerank). Both write the same prediction files.
DUAL_ENCODER_MODELS = model_names_pattern(MODELS, "dual_encoder")
CROSS_ENCODER_MODELS = model_names_pattern(MODELS, "cross_encoder")


wildcard_constraints:
    dataset="[A-Za-z0-9_]+",
    model="[A-Za-z0-9_]+",
    split="train|valid|test",
    stage="zeroshot|finetuned",


def workflow_script(name):
    """Scripts are addressed from the Snakefile so the workflow also runs with --directory elsewhere."""
    return str(Path(workflow.basedir) / "workflow_scripts" / name)


def quoted_json(obj):
    """A shell-safe JSON argument; as a rule param it also reruns the job when the entry changes."""
    return shlex.quote(json.dumps(obj, sort_keys=True, ensure_ascii=False))


def dataset_entry(wildcards):
    return require(DATASETS, wildcards.dataset, "dataset")


def generated_archive_inputs(wildcards):
    """Demo datasets are produced by the generator rule, then fetched like any other archive."""
    if "generator" in dataset_entry(wildcards):
        return {
            "archive": f"resources/sources/{wildcards.dataset}.zip",
            "checksum": f"resources/sources/{wildcards.dataset}.zip.sha256",
        }
    return {}


def model_entry(wildcards):
    """The model's registry entry with this dataset's pair_overrides applied."""
    return pair_config(config, MODELS, wildcards.dataset, wildcards.model)


FINETUNE_RANKS = config["finetune"]["gpus"] or config["finetune"]["cpu_ranks"]
# On GPUs each rank drives a device and needs one core; on CPU each rank is a busy process.
FINETUNE_THREADS = config["finetune"]["gpus"] or config["finetune"]["cpu_ranks"]


def family_extra_inputs(wildcards):
    return required_extra_inputs(dataset_entry(wildcards), model_entry(wildcards), wildcards.dataset, wildcards.model)


def finetune_inputs(wildcards):
    """The initial model and the training split, and its region store for region families."""
    inputs = {
        "model": f"work/{wildcards.dataset}/{wildcards.model}/models/init",
        "train": f"resources/{wildcards.dataset}/lmdb/train",
    }
    if "regions" in family_extra_inputs(wildcards):
        inputs["regions"] = f"resources/{wildcards.dataset}/regions/train"
    return inputs


def rerank_inputs(wildcards):
    """A cross encoder's stage model and evaluation split, its region store, and for two-stage
    ranking the candidate dual encoder's features of the same split."""
    entry = model_entry(wildcards)
    split = dataset_entry(wildcards)["eval_split"]
    inputs = {"model": stage_model_dir(wildcards), "split": eval_split_dir(wildcards)}
    if "regions" in family_extra_inputs(wildcards):
        inputs["regions"] = f"resources/{wildcards.dataset}/regions/{split}"
    protocol = evaluation_protocol(entry, "cross_encoder", pair_stages(wildcards), MODELS)
    if protocol["name"] == "two_stage" and "model" in protocol["candidates"]:
        candidates = protocol["candidates"]
        inputs["candidates"] = f"work/{wildcards.dataset}/{candidates['model']}/{candidates['stage']}/features"
    return inputs


def rerank_args(wildcards, input):
    entry = model_entry(wildcards)
    protocol = evaluation_protocol(entry, "cross_encoder", pair_stages(wildcards), MODELS)
    args = [f"--protocol {protocol['name']}", f"--batch-size {entry['eval']['pair_batch_size']}"]
    if "regions" in input.keys():
        args.append(f"--regions {input.regions}")
    if protocol["name"] == "two_stage":
        first_stage = input.candidates if "candidates" in input.keys() else protocol["candidates"]["head"]
        args.append(f"--candidates {first_stage} --candidates-k {protocol['candidates']['k']}")
    if "max_len" in entry["eval"]:
        args.append(f"--max-len {entry['eval']['max_len']}")
    return " ".join(args)


def protocol_arg(wildcards):
    """How the pair's predictions were made, recorded in metrics.json."""
    entry = model_entry(wildcards)
    kind = family_spec(entry["family"]).kind
    return quoted_json(evaluation_protocol(entry, kind, pair_stages(wildcards), MODELS))


def prepare_model_inputs(wildcards):
    """A tiny model builds its vocabulary from the training captions (pretrained models bring theirs);
    a model entry with `pretrain` pretrains on the training split, and its region store for region
    families."""
    entry = model_entry(wildcards)
    inputs = {}
    if entry["init"] == "tiny":
        inputs["vocab_split"] = f"resources/{wildcards.dataset}/lmdb/train"
    if entry.get("pretrain"):
        if "train" not in dataset_entry(wildcards)["splits"]:
            raise ConfigError(f"{wildcards.dataset}/{wildcards.model}: pretrain needs a train split, and "
                              f"{wildcards.dataset} has only {dataset_entry(wildcards)['splits']}")
        inputs["train"] = f"resources/{wildcards.dataset}/lmdb/train"
        if "regions" in family_extra_inputs(wildcards):
            inputs["regions"] = f"resources/{wildcards.dataset}/regions/train"
    return inputs


def prepare_model_args(wildcards, input):
    args = [f"--vocab-split {input.vocab_split}"] if "vocab_split" in input.keys() else []
    if "train" in input.keys():
        args.append(f"--pretrain {quoted_json(model_entry(wildcards)['pretrain'])} --train-split {input.train}")
    if "regions" in input.keys():
        args.append(f"--regions {input.regions}")
    if model_entry(wildcards).get("image_size") is not None:
        args.append(f"--image-size {model_entry(wildcards)['image_size']}")
    return " ".join(args)


def eval_split_dir(wildcards):
    return f"resources/{wildcards.dataset}/lmdb/{dataset_entry(wildcards)['eval_split']}"


def stage_model_dir(wildcards):
    name = "init" if wildcards.stage == "zeroshot" else "finetuned"
    return f"work/{wildcards.dataset}/{wildcards.model}/models/{name}"


def pair_stages(wildcards):
    return evaluation_stages(dataset_entry(wildcards))


def stage_prediction_inputs(wildcards):
    return {
        f"{stage}_{direction}": f"work/{wildcards.dataset}/{wildcards.model}/{stage}/predictions/{direction}_predictions.jsonl"
        for stage in pair_stages(wildcards)
        for direction in ("t2i", "i2t")
    }


def stage_prediction_args(wildcards):
    return " ".join(
        f"--stage {stage}=work/{wildcards.dataset}/{wildcards.model}/{stage}/predictions"
        for stage in pair_stages(wildcards)
    )


def grid_results():
    return [f"results/{dataset}/{model}" for dataset, model in grid_pairs()]


def pair_figures(dataset, model):
    figures = [f"results/figures/{dataset}/{model}/recall_at_k.png"]
    if "finetuned" in evaluation_stages(DATASETS[dataset]):
        figures.append(f"results/figures/{dataset}/{model}/train_loss.png")
    return figures


def tracking_inputs(wildcards):
    """The fine-tuning log (when the pair fine-tunes) and the pair's Snakemake benchmark files."""
    d, m = wildcards.dataset, wildcards.model
    stages = pair_stages(wildcards)
    inputs = {}
    if family_spec(model_entry(wildcards)["family"]).kind == "cross_encoder":
        artifacts = [f"benchmarks/rerank/{d}/{m}/{stage}.tsv" for stage in stages]
    else:
        artifacts = [f"benchmarks/extract_features/{d}/{m}/{stage}.tsv" for stage in stages]
        artifacts += [f"benchmarks/rank/{d}/{m}/{stage}.tsv" for stage in stages]
    artifacts += [f"benchmarks/score/{d}/{m}.tsv", f"benchmarks/prepare_model/{d}/{m}.tsv"]
    if "finetuned" in stages:
        inputs["train_log"] = f"work/{d}/{m}/train_log.jsonl"
        artifacts.append(f"benchmarks/finetune/{d}/{m}.tsv")
    inputs["artifacts"] = artifacts
    return inputs


def default_targets():
    targets = grid_results() + ["results/summary.csv"]
    for dataset, model in grid_pairs():
        targets += pair_figures(dataset, model)
        targets.append(f"work/{dataset}/{model}/tracking.json")
    return targets


def stage_export_dir(wildcards):
    return f"work/{wildcards.dataset}/{wildcards.model}/{wildcards.stage}/export"


def stage_extraction_model(wildcards):
    """What extraction reads: the stage's saved model, or its export when eval.engine is inference."""
    if model_entry(wildcards)["eval"].get("engine", "dynamic") == "inference":
        return stage_export_dir(wildcards)
    return stage_model_dir(wildcards)


def export_eval_params(wildcards):
    """The context length an export records for the texts it will be given."""
    return quoted_json(subset(model_entry(wildcards)["eval"], ("max_len",)))
