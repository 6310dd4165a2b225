"""What the workflow's rules need computed: the registries and pair entries of a run, file paths,
input sets, and the command-line arguments of each step.

The rules (``rules/*.smk``) stay declarative and call these through thin input functions. The
Snakefile is parsed by every job, so nothing here may import paddle: model families are known by
:func:`vlretrieval.models.registry.family_spec` (kind and extra inputs) without importing them.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

from .config import (
    DOWNLOAD_KEYS,
    EXTRACTION_KEYS,
    REGION_KEYS,
    SOURCE_KEYS,
    URL_CORPUS_KEYS,
    configured_pairs,
    evaluation_protocol,
    evaluation_stages,
    load_datasets,
    load_models,
    model_names_pattern,
    pair_config,
    require,
    required_extra_inputs,
    subset,
    validate_pair_overrides,
)
from .errors import ConfigError
from .models.registry import family_spec

CROSS_ENCODER = "cross_encoder"
DUAL_ENCODER = "dual_encoder"
DIRECTIONS = ("t2i", "i2t")


def quoted_json(obj: Any) -> str:
    """A shell-safe JSON argument; as a rule param it also reruns the job when the value changes."""
    return shlex.quote(json.dumps(obj, sort_keys=True, ensure_ascii=False))


def stage_model_name(stage: str) -> str:
    """The model directory a stage evaluates: the initial model for zero-shot, else the fine-tuned one."""
    return "init" if stage == "zeroshot" else "finetuned"


class Pipeline:
    """One run's configuration, resolved and validated when the Snakefile is parsed.

    ``config`` is Snakemake's config after schema validation; ``basedir`` is the workflow's own
    directory, from which registry paths and scripts are taken. Every pair override is checked
    against the model schema here, before any job runs.
    """

    def __init__(self, config: dict, basedir: str | Path):
        self.config = config
        self.basedir = Path(basedir)
        self.datasets = load_datasets(self.workflow_path(config["datasets_file"]))
        self.models = load_models(self.workflow_path(config["models_file"]))
        self._entries = validate_pair_overrides(config, self.models, self.datasets)
        self.grid = configured_pairs(config)
        for name in dict.fromkeys(dataset for dataset, _ in self.grid):
            require(self.datasets, name, "dataset")
        for name in dict.fromkeys(model for _, model in self.grid):
            require(self.models, name, "model")

    # ---------------------------------------------------------------------------------------------
    # Registries and pair entries
    # ---------------------------------------------------------------------------------------------

    def workflow_path(self, path: str | Path) -> Path:
        """Registry paths in the config are relative to the workflow's own directory."""
        return self.basedir / path

    def workflow_script(self, name: str) -> str:
        """Scripts are addressed from the workflow's directory so it also runs with --directory elsewhere."""
        return str(self.basedir / "workflow_scripts" / name)

    def dataset_entry(self, dataset: str) -> dict:
        return require(self.datasets, dataset, "dataset")

    def model_entry(self, dataset: str, model: str) -> dict:
        """The model's registry entry with this dataset's pair_overrides applied (read-only)."""
        if (dataset, model) not in self._entries:
            self._entries[(dataset, model)] = pair_config(self.config, self.models, dataset, model)
        return self._entries[(dataset, model)]

    def kind(self, dataset: str, model: str) -> str:
        return family_spec(self.model_entry(dataset, model)["family"]).kind

    def model_names_pattern(self, kind: str) -> str:
        """A wildcard regex of the registry's models of ``kind``: which rules rank a pair depends on it."""
        return model_names_pattern(self.models, kind)

    def stages(self, dataset: str) -> list[str]:
        return evaluation_stages(self.dataset_entry(dataset))

    def extra_inputs(self, dataset: str, model: str) -> tuple[str, ...]:
        return required_extra_inputs(self.dataset_entry(dataset), self.model_entry(dataset, model), dataset, model)

    def reads_regions(self, dataset: str, model: str) -> bool:
        return "regions" in self.extra_inputs(dataset, model)

    def pretrains(self, dataset: str, model: str) -> bool:
        return bool(self.model_entry(dataset, model).get("pretrain"))

    @property
    def finetune_ranks(self) -> int:
        """Processes of a fine-tuning job: one per GPU, else the CPU ranks."""
        return self.config["finetune"]["gpus"] or self.config["finetune"]["cpu_ranks"]

    # On GPUs each rank drives a device and needs one core; on CPU each rank is a busy process.
    finetune_threads = finetune_ranks

    # ---------------------------------------------------------------------------------------------
    # Data
    # ---------------------------------------------------------------------------------------------

    def generated_archive_inputs(self, dataset: str) -> dict[str, str]:
        """Demo datasets are produced by the generator rule, then fetched like any other archive."""
        if "generator" in self.dataset_entry(dataset):
            return {
                "archive": f"resources/sources/{dataset}.zip",
                "checksum": f"resources/sources/{dataset}.zip.sha256",
            }
        return {}

    def download_entry(self, dataset: str) -> dict:
        return subset(self.dataset_entry(dataset), DOWNLOAD_KEYS)

    def url_corpus_entry(self, dataset: str) -> dict:
        return subset(self.dataset_entry(dataset), URL_CORPUS_KEYS)

    def region_entry(self, dataset: str) -> dict:
        return subset(self.dataset_entry(dataset), REGION_KEYS)

    def serialize_source(self, dataset: str) -> str:
        """A url_csv dataset is serialized from the raw layout fetch_url_corpus wrote, others from the download."""
        folder = "raw" if self.dataset_entry(dataset)["format"] == "url_csv" else "download"
        return f"resources/{dataset}/{folder}"

    def serialize_entry(self, dataset: str) -> dict:
        """The registry keys serialization reads; the raw layout of a url_csv dataset is plain raw_tsv."""
        entry = self.dataset_entry(dataset)
        return {"format": "raw_tsv"} if entry["format"] == "url_csv" else subset(entry, SOURCE_KEYS)

    def eval_split_dir(self, dataset: str) -> str:
        return f"resources/{dataset}/lmdb/{self.dataset_entry(dataset)['eval_split']}"

    # ---------------------------------------------------------------------------------------------
    # Training
    # ---------------------------------------------------------------------------------------------

    def prepare_model_inputs(self, dataset: str, model: str) -> dict[str, str]:
        """A tiny model builds its vocabulary from the training captions (pretrained models bring
        theirs); an entry with ``pretrain`` pretrains on the training split, with its region store
        for region families."""
        entry = self.model_entry(dataset, model)
        inputs = {}
        if entry["init"] == "tiny":
            inputs["vocab_split"] = f"resources/{dataset}/lmdb/train"
        if entry.get("pretrain"):
            splits = self.dataset_entry(dataset)["splits"]
            if "train" not in splits:
                raise ConfigError(f"{dataset}/{model}: pretrain needs a train split, and {dataset} has only {splits}")
            inputs["train"] = f"resources/{dataset}/lmdb/train"
            if self.reads_regions(dataset, model):
                inputs["regions"] = f"resources/{dataset}/regions/train"
        return inputs

    def prepare_model_args(self, dataset: str, model: str) -> str:
        """The vocabulary split of a tiny model, the pretraining settings and data, the image size."""
        entry = self.model_entry(dataset, model)
        inputs = self.prepare_model_inputs(dataset, model)
        args = [f"--vocab-split {inputs['vocab_split']}"] if "vocab_split" in inputs else []
        if "train" in inputs:
            args.append(f"--pretrain {quoted_json(entry['pretrain'])} --train-split {inputs['train']}")
        if "regions" in inputs:
            args.append(f"--regions {inputs['regions']}")
        if entry.get("image_size") is not None:
            args.append(f"--image-size {entry['image_size']}")
        return " ".join(args)

    def finetune_inputs(self, dataset: str, model: str) -> dict[str, str]:
        """The initial model and the training split, and its region store for region families."""
        inputs = {
            "model": f"work/{dataset}/{model}/models/init",
            "train": f"resources/{dataset}/lmdb/train",
        }
        if self.reads_regions(dataset, model):
            inputs["regions"] = f"resources/{dataset}/regions/train"
        return inputs

    def finetune_args(self, dataset: str, model: str) -> str:
        inputs = self.finetune_inputs(dataset, model)
        return f"--regions {inputs['regions']}" if "regions" in inputs else ""

    # ---------------------------------------------------------------------------------------------
    # Evaluation
    # ---------------------------------------------------------------------------------------------

    def stage_model_dir(self, dataset: str, model: str, stage: str) -> str:
        return f"work/{dataset}/{model}/models/{stage_model_name(stage)}"

    def stage_export_dir(self, dataset: str, model: str, stage: str) -> str:
        return f"work/{dataset}/{model}/{stage}/export"

    def stage_extraction_model(self, dataset: str, model: str, stage: str) -> str:
        """What extraction reads: the stage's saved model, or its export when eval.engine is inference."""
        if self.model_entry(dataset, model)["eval"]["engine"] == "inference":
            return self.stage_export_dir(dataset, model, stage)
        return self.stage_model_dir(dataset, model, stage)

    def extraction_settings(self, dataset: str, model: str) -> dict:
        return subset(self.model_entry(dataset, model)["eval"], EXTRACTION_KEYS)

    def export_settings(self, dataset: str, model: str) -> dict:
        """The context length an export records for the texts it will be given."""
        return subset(self.model_entry(dataset, model)["eval"], ("max_len",))

    def protocol(self, dataset: str, model: str) -> dict[str, Any]:
        """How the pair's predictions are made, as recorded in metrics.json."""
        return evaluation_protocol(self.model_entry(dataset, model), self.kind(dataset, model), self.stages(dataset),
                                   self.models)

    def rerank_inputs(self, dataset: str, model: str, stage: str) -> dict[str, str]:
        """A cross encoder's stage model and evaluation split, its region store, and for two-stage
        ranking against a dual encoder that encoder's features of the same split."""
        split = self.dataset_entry(dataset)["eval_split"]
        inputs = {"model": self.stage_model_dir(dataset, model, stage), "split": self.eval_split_dir(dataset)}
        if self.reads_regions(dataset, model):
            inputs["regions"] = f"resources/{dataset}/regions/{split}"
        protocol = evaluation_protocol(self.model_entry(dataset, model), CROSS_ENCODER, self.stages(dataset), self.models)
        if protocol["name"] == "two_stage" and "model" in protocol["candidates"]:
            candidates = protocol["candidates"]
            inputs["candidates"] = f"work/{dataset}/{candidates['model']}/{candidates['stage']}/features"
        return inputs

    def rerank_args(self, dataset: str, model: str, stage: str) -> str:
        evaluation = self.model_entry(dataset, model)["eval"]
        inputs = self.rerank_inputs(dataset, model, stage)
        protocol = evaluation_protocol(self.model_entry(dataset, model), CROSS_ENCODER, self.stages(dataset), self.models)
        args = [f"--protocol {protocol['name']}", f"--batch-size {evaluation['pair_batch_size']}"]
        if "regions" in inputs:
            args.append(f"--regions {inputs['regions']}")
        if protocol["name"] == "two_stage":
            first_stage = inputs.get("candidates", protocol["candidates"].get("head"))
            args.append(f"--candidates {first_stage} --candidates-k {protocol['candidates']['k']}")
        if "max_len" in evaluation:
            args.append(f"--max-len {evaluation['max_len']}")
        return " ".join(args)

    def top_k(self, dataset: str, model: str) -> int:
        return self.model_entry(dataset, model)["eval"]["top_k"]

    def stage_predictions_dir(self, dataset: str, model: str, stage: str) -> str:
        return f"work/{dataset}/{model}/{stage}/predictions"

    def stage_prediction_inputs(self, dataset: str, model: str) -> dict[str, str]:
        """Both prediction files of every evaluated stage; an unknown dataset or model is named here,
        where a target such as results/{dataset}/{model}/ first reaches the registries."""
        stages = self.stages(dataset)
        self.model_entry(dataset, model)
        return {
            f"{stage}_{direction}": f"{self.stage_predictions_dir(dataset, model, stage)}/{direction}_predictions.jsonl"
            for stage in stages
            for direction in DIRECTIONS
        }

    def stage_prediction_args(self, dataset: str, model: str) -> str:
        return " ".join(
            f"--stage {stage}={self.stage_predictions_dir(dataset, model, stage)}" for stage in self.stages(dataset)
        )

    # ---------------------------------------------------------------------------------------------
    # Tracking, report and the default targets
    # ---------------------------------------------------------------------------------------------

    def tracking_inputs(self, dataset: str, model: str) -> dict[str, Any]:
        """The fine-tuning log (when the pair fine-tunes) and the pair's Snakemake benchmark files,
        which are named after the rules that ran: extraction and ranking, or re-ranking."""
        stages = self.stages(dataset)
        if self.kind(dataset, model) == CROSS_ENCODER:
            artifacts = [f"benchmarks/rerank/{dataset}/{model}/{stage}.tsv" for stage in stages]
        else:
            artifacts = [f"benchmarks/extract_features/{dataset}/{model}/{stage}.tsv" for stage in stages]
            artifacts += [f"benchmarks/rank/{dataset}/{model}/{stage}.tsv" for stage in stages]
        artifacts += [f"benchmarks/score/{dataset}/{model}.tsv", f"benchmarks/prepare_model/{dataset}/{model}.tsv"]
        inputs: dict[str, Any] = {}
        if "finetuned" in stages:
            inputs["train_log"] = f"work/{dataset}/{model}/train_log.jsonl"
            artifacts.append(f"benchmarks/finetune/{dataset}/{model}.tsv")
        inputs["artifacts"] = artifacts
        return inputs

    def tracking_args(self, dataset: str, model: str) -> str:
        inputs = self.tracking_inputs(dataset, model)
        return f"--train-log {inputs['train_log']}" if "train_log" in inputs else ""

    def tracked_config(self, dataset: str, model: str) -> dict:
        """The effective configuration of a pair, as logged with its runs."""
        return {
            "dataset": self.dataset_entry(dataset),
            "model": self.model_entry(dataset, model),
            "finetune": self.config["finetune"],
        }

    def grid_results(self) -> list[str]:
        return [f"results/{dataset}/{model}" for dataset, model in self.grid]

    def pair_figures(self, dataset: str, model: str) -> list[str]:
        figures = [f"results/figures/{dataset}/{model}/recall_at_k.png"]
        if "finetuned" in self.stages(dataset):
            figures.append(f"results/figures/{dataset}/{model}/train_loss.png")
        return figures

    def default_targets(self) -> list[str]:
        targets = self.grid_results() + ["results/summary.csv"]
        for dataset, model in self.grid:
            targets += self.pair_figures(dataset, model)
            targets.append(f"work/{dataset}/{model}/tracking.json")
        return targets
