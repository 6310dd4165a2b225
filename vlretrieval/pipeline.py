"""What the workflow's rules need computed: the registries and pair entries of a run, file paths,
input sets, and the command-line arguments of each step.

Sweeps expand here too: each (pair, grid point, seed) of a sweep becomes a member, a derived model
entry under a model name of its own (``ernie_vil__demo_seeds__s1``), which every rule takes as it
takes a pair.

The rules (``rules/*.smk``) stay declarative and call these through thin input functions. The
Snakefile is parsed by every job, so nothing here may import paddle: model families are known by
:func:`vlretrieval.models.registry.family_spec` (kind and extra inputs) without importing them.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .config import (
    CONFIG_SCHEMA,
    DOWNLOAD_KEYS,
    EXTRACTION_KEYS,
    MODELS_SCHEMA,
    REGION_KEYS,
    SOURCE_KEYS,
    SWEEP_SCHEMA,
    SWEEP_MEMBER_SEPARATOR,
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
    schema_default,
    set_dotted_key,
    subset,
    validate_against_schema,
    validate_pair_overrides,
)
from .errors import ConfigError
from .models.prepare import CAPTION_VOCABULARY_INITS
from .models.registry import family_spec

CROSS_ENCODER = "cross_encoder"
DUAL_ENCODER = "dual_encoder"
DIRECTIONS = ("t2i", "i2t")


# Cores of an extraction job at real size: the encoder's math threads, and batch preparation in
# worker processes beside it.
EXTRACTION_THREADS = 2


def quoted_json(obj: Any) -> str:
    """A shell-safe JSON argument; as a rule param it also reruns the job when the value changes."""
    return shlex.quote(json.dumps(obj, sort_keys=True, ensure_ascii=False))


def stage_model_name(stage: str) -> str:
    """The model directory a stage evaluates: the initial model for zero-shot, else the fine-tuned one."""
    return "init" if stage == "zeroshot" else "finetuned"


# ---------------------------------------------------------------------------------------------------
# Sweeps: each (pair, grid point, seed) becomes a member, a derived model entry with a model name of
# its own, so every rule applies to it unchanged and it gets work/ and results/ folders of its own.
# ---------------------------------------------------------------------------------------------------

# Letters, digits and single underscores: the double underscore then only ever separates the parts
# of a member's name (MODEL__SWEEP__s1).
SWEEP_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9]*(_[A-Za-z0-9]+)*$")
# The folder of the sweep summaries, results/sweeps/NAME, so no dataset may have this name.
SWEEPS_FOLDER = "sweeps"


def member_model_name(model: str, sweep: str, point: int | None, seed: int) -> str:
    """``ernie_vil__demo_seeds__s1``, or with a grid ``ernie_vil__lr__g0_s1`` (grid point 0, seed 1)."""
    point_part = "" if point is None else f"g{point}_"
    return SWEEP_MEMBER_SEPARATOR.join((model, sweep, f"{point_part}s{seed}"))


@dataclass(frozen=True)
class SweepMember:
    """One run of a sweep: a pair's effective model entry with a grid point's overrides and a seed."""

    sweep: str
    dataset: str
    base_model: str
    point: int | None  # index into the grid's cartesian product; None for a sweep without a grid
    overrides: dict[str, Any]  # dotted key -> value
    seed: int
    entry: dict = field(repr=False, compare=False)

    @property
    def model(self) -> str:
        return member_model_name(self.base_model, self.sweep, self.point, self.seed)

    @property
    def configuration(self) -> str:
        """What the seeds repeat: the pair, and the grid point when there is a grid."""
        pair = f"{self.dataset}/{self.base_model}"
        return pair if self.point is None else f"{pair}/g{self.point}"

    @property
    def results_dir(self) -> str:
        return f"results/{self.dataset}/{self.model}"

    @property
    def tracking_record(self) -> str:
        return f"work/{self.dataset}/{self.model}/tracking.json"

    def describe(self) -> dict[str, Any]:
        """The member as the sweep scripts and the tracked config see it (JSON)."""
        return {
            "sweep": self.sweep, "dataset": self.dataset, "model": self.model, "base_model": self.base_model,
            "configuration": self.configuration, "point": self.point, "overrides": copy.deepcopy(self.overrides),
            "seed": self.seed, "results": self.results_dir, "tracking": self.tracking_record,
        }

    def tags(self) -> dict[str, str]:
        """MLflow tags of the member's runs, so a search such as ``tags.sweep = 'NAME'`` lines them up."""
        return {"sweep": self.sweep, "sweep_configuration": self.configuration, "seed": str(self.seed),
                "base_model": self.base_model}


def grid_points(grid: dict[str, list]) -> list[dict[str, Any]]:
    """The cartesian product of the grid's value lists, keys in the order written, the last fastest."""
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


def expand_sweep(name: str, spec: Any, pair_entry: Callable[[str, str], dict]) -> list[SweepMember]:
    """The members of the sweep ``name``, each entry validated against the models schema.

    ``spec`` is the sweep's config (sweep.schema.yaml); ``pair_entry(dataset, model)`` gives a pair's
    effective entry (registry entry and pair_overrides). The pairs' names are checked by the caller.
    """
    where = f"config sweeps.{name}"
    if not SWEEP_NAME.match(str(name)):
        raise ConfigError(f"{where}: {name!r} is not a valid sweep name: use letters, digits and single "
                          f"underscores, starting with a letter (members are named MODEL__{name}__s<seed>)")
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: expected a mapping with pairs, seeds and optionally grid, "
                          f"got {type(spec).__name__}")
    spec = validate_against_schema(spec, SWEEP_SCHEMA, where)
    if "train.seed" in spec["grid"]:
        raise ConfigError(f"{where}: grid.train.seed: the members' seeds come from seeds, not from the grid")
    points = grid_points(spec["grid"]) if spec["grid"] else [{}]
    members = []
    for pair in spec["pairs"]:
        dataset, model = pair.split("/")
        base = pair_entry(dataset, model)
        for index, overrides in enumerate(points):
            point = index if spec["grid"] else None
            for seed in spec["seeds"]:
                member_name = member_model_name(model, name, point, seed)
                member_where = f"{where} (member {member_name} of pair {pair})"
                entry = copy.deepcopy(base)
                for key, value in overrides.items():
                    set_dotted_key(entry, key, value, f"{member_where}: grid")
                entry.setdefault("train", {})["seed"] = seed
                entry = validate_against_schema(entry, MODELS_SCHEMA, member_where)
                members.append(SweepMember(name, dataset, model, point, overrides, seed, entry))
    return members


def expand_sweeps(config: dict, datasets: dict[str, dict], models: dict[str, dict],
                  pair_entry: Callable[[str, str], dict], *, own_registries: bool) -> tuple[dict, dict]:
    """Every sweep of ``config``: ``({name: [SweepMember]}, {name: why it is left out})``.

    A pair outside the registries is an error, except in a run with registries of its own
    (``own_registries``): config files merge key by key, so such a run still carries the repository's
    sweeps, and one naming a dataset or model it does not have is left out with a warning instead.
    """
    sweeps: dict[str, list[SweepMember]] = {}
    left_out: dict[str, str] = {}
    for name, spec in (config.get("sweeps") or {}).items():
        unknown = []
        for pair in (spec or {}).get("pairs", []) if isinstance(spec, dict) else []:
            dataset, _, model = str(pair).partition("/")
            for kind, registry, value in (("dataset", datasets, dataset), ("model", models, model)):
                if model and value not in registry:
                    unknown.append(f"unknown {kind} {value!r} in pair {pair!r}; known: {', '.join(sorted(registry))}")
        if unknown and own_registries and SWEEP_NAME.match(str(name)):
            left_out[name] = unknown[0]
            print(f"warning: config sweeps.{name}: {unknown[0]}; the sweep is left out of this run", file=sys.stderr)
            continue
        if unknown:
            raise ConfigError(f"config sweeps.{name}: pairs: {unknown[0]}")
        sweeps[name] = expand_sweep(name, spec, pair_entry)
    return sweeps, left_out


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
        if SWEEPS_FOLDER in self.datasets:
            raise ConfigError(f"dataset name {SWEEPS_FOLDER!r} is reserved: results/{SWEEPS_FOLDER}/ holds the sweeps")
        self.sweeps, self._left_out_sweeps = expand_sweeps(
            config, self.datasets, self.models, self.model_entry, own_registries=self._own_registries())
        self._members: dict[tuple[str, str], SweepMember] = {}
        for members in self.sweeps.values():
            for member in members:
                if member.model in self.models or (member.dataset, member.model) in self._members:
                    raise ConfigError(f"config sweeps.{member.sweep}: member name {member.model!r} is taken "
                                      f"by another model or sweep member on {member.dataset}")
                self._members[(member.dataset, member.model)] = member
                self._entries[(member.dataset, member.model)] = member.entry

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
        """A wildcard regex of the models of ``kind``, sweep members included: which rules rank a pair
        depends on it."""
        members = {member.model: member.entry for member in self._members.values()}
        return model_names_pattern({**self.models, **members}, kind)

    def _own_registries(self) -> bool:
        """Whether this run reads registries other than the repository's (see expand_sweeps)."""
        return any(
            self.workflow_path(self.config[key]).resolve() != self.workflow_path(schema_default(CONFIG_SCHEMA, key)).resolve()
            for key in ("datasets_file", "models_file")
        )

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
        if entry["init"] in CAPTION_VOCABULARY_INITS:
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

    def extraction_threads(self, dataset: str, model: str) -> int:
        """Cores of an extraction job. A tiny model's job is almost all start-up (imports, loading),
        which a second thread does not speed up; with one, two such jobs share two cores."""
        return 1 if self.model_entry(dataset, model)["init"] == "tiny" else EXTRACTION_THREADS

    def extraction_settings(self, dataset: str, model: str) -> dict:
        return subset(self.model_entry(dataset, model)["eval"], EXTRACTION_KEYS)

    def export_settings(self, dataset: str, model: str) -> dict:
        """The context length an export records for the texts it will be given, and its precision."""
        return subset(self.model_entry(dataset, model)["eval"], ("max_len", "precision"))

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
        """The fine-tuning log and a dual encoder's fine-tuned model (when the pair fine-tunes), the
        pair's Snakemake benchmark files, which are named after the rules that ran (extraction and
        ranking, or re-ranking), and the pair's figures (a sweep member has none: its sweep's summary
        shows it)."""
        stages = self.stages(dataset)
        timed = self.stage_benchmarks(dataset, model).values()
        # Each rule's files together: extraction of every stage, then ranking (or re-ranking).
        artifacts = [paths[index] for index in range(max(map(len, timed), default=0)) for paths in timed]
        artifacts += [f"benchmarks/score/{dataset}/{model}.tsv", f"benchmarks/prepare_model/{dataset}/{model}.tsv"]
        inputs: dict[str, Any] = {}
        if "finetuned" in stages:
            inputs["train_log"] = f"work/{dataset}/{model}/train_log.jsonl"
            artifacts.append(f"benchmarks/finetune/{dataset}/{model}.tsv")
            if self.kind(dataset, model) == DUAL_ENCODER:
                # logged as the training run's MLflow model, which encodes images and texts
                inputs["finetuned_model"] = self.stage_model_dir(dataset, model, "finetuned")
        inputs["artifacts"] = artifacts
        inputs["figures"] = [] if (dataset, model) in self._members else self.pair_figures(dataset, model)
        return inputs

    def stage_benchmarks(self, dataset: str, model: str) -> dict[str, list[str]]:
        """Per evaluated stage, the benchmark files of the jobs that evaluate it, which time its run."""
        if self.kind(dataset, model) == CROSS_ENCODER:
            return {stage: [f"benchmarks/rerank/{dataset}/{model}/{stage}.tsv"] for stage in self.stages(dataset)}
        return {stage: [f"benchmarks/extract_features/{dataset}/{model}/{stage}.tsv",
                        f"benchmarks/rank/{dataset}/{model}/{stage}.tsv"] for stage in self.stages(dataset)}

    def tracking_args(self, dataset: str, model: str) -> str:
        """The fine-tuning log, and for a sweep member the tags that line its runs up with the sweep."""
        inputs = self.tracking_inputs(dataset, model)
        args = [f"--train-log {inputs['train_log']}"] if "train_log" in inputs else []
        member = self._members.get((dataset, model))
        if member is not None:
            args.append(f"--tags {quoted_json(member.tags())}")
        return " ".join(args)

    def tracked_config(self, dataset: str, model: str) -> dict:
        """The effective configuration of a pair, as logged with its runs."""
        tracked = {
            "dataset": self.dataset_entry(dataset),
            "model": self.model_entry(dataset, model),
            "finetune": self.config["finetune"],
        }
        member = self._members.get((dataset, model))
        if member is not None:
            tracked["sweep"] = {key: member.describe()[key] for key in ("sweep", "configuration", "overrides", "seed")}
        return tracked

    def grid_results(self) -> list[str]:
        return [f"results/{dataset}/{model}" for dataset, model in self.grid]

    def pair_figures(self, dataset: str, model: str) -> list[str]:
        figures = [f"results/figures/{dataset}/{model}/recall_at_k.png"]
        if "finetuned" in self.stages(dataset):
            figures.append(f"results/figures/{dataset}/{model}/train_loss.png")
        return figures

    def pair_gallery(self, dataset: str, model: str) -> str:
        """The report's page of what each stage of the pair retrieves for a fixed sample of queries."""
        return f"results/galleries/{dataset}/{model}.html"

    def default_targets(self) -> list[str]:
        targets = self.grid_results() + ["results/summary.csv"]
        for dataset, model in self.grid:
            targets += self.pair_figures(dataset, model)
            targets.append(self.pair_gallery(dataset, model))
            targets.append(f"work/{dataset}/{model}/tracking.json")
        return targets

    # ---------------------------------------------------------------------------------------------
    # Sweeps (built by name, never part of the default targets)
    # ---------------------------------------------------------------------------------------------

    def sweep_members(self, sweep: str) -> list[SweepMember]:
        if sweep in self._left_out_sweeps:
            raise ConfigError(f"sweep {sweep!r} is left out of this run: {self._left_out_sweeps[sweep]}")
        return require(self.sweeps, sweep, "sweep")

    def sweep_member(self, dataset: str, model: str) -> SweepMember | None:
        return self._members.get((dataset, model))

    def sweep_results(self, sweep: str) -> list[str]:
        return [member.results_dir for member in self.sweep_members(sweep)]

    def sweep_tracking_records(self, sweep: str) -> list[str]:
        return [member.tracking_record for member in self.sweep_members(sweep)]

    def sweep_plan(self, sweep: str) -> dict[str, Any]:
        """What the sweep's scripts read: its settings and every member with its folders."""
        spec = validate_against_schema(self.config["sweeps"][sweep], SWEEP_SCHEMA, f"config sweeps.{sweep}")
        return {"name": sweep, **spec, "members": [member.describe() for member in self.sweep_members(sweep)]}

