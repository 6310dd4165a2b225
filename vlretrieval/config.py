"""Loading and validating the workflow's registries (datasets, models).

The schemas in ``config/schemas/`` are the single description of every key; validation also
fills in their defaults, so the rest of the code never guesses a missing value.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "config" / "schemas"


def _validate(obj: dict, schema_name: str, where: str, schema_dir: Path) -> dict:
    # snakemake's validator is the one the Snakefile uses for config.yaml, so registries and
    # config follow the same rules, including default filling.
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    checked = copy.deepcopy(obj)
    try:
        validate(checked, str(schema_dir / schema_name), set_default=True)
    except WorkflowError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return checked


def load_registry(path: str | Path, schema_name: str, schema_dir: Path = SCHEMA_DIR) -> dict[str, dict[str, Any]]:
    """Read a YAML registry (name -> entry) and validate each entry against ``schema_name``."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle) or {}
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read registry: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of names to entries, got {type(data).__name__}")
    return {
        str(name): _validate(entry or {}, schema_name, f"{path}: entry {name!r}", schema_dir)
        for name, entry in data.items()
    }


def load_datasets(path: str | Path) -> dict[str, dict[str, Any]]:
    registry = load_registry(path, "datasets.schema.yaml")
    for name, entry in registry.items():
        if entry["eval_split"] not in entry["splits"]:
            raise ConfigError(
                f"{path}: entry {name!r}: eval_split {entry['eval_split']!r} is not one of its splits {entry['splits']}"
            )
        needs = {"coco_cn_data": ("split_files",), "aic_icc": ("split_files", "image_dirs"), "karpathy_json": ("split_files",)}
        for key in needs.get(entry["format"], ()):
            missing = [s for s in entry["splits"] if s not in entry[key]]
            if missing:
                raise ConfigError(f"{path}: entry {name!r}: format {entry['format']} needs {key} for {missing}")
    return registry


def load_models(path: str | Path) -> dict[str, dict[str, Any]]:
    return load_registry(path, "models.schema.yaml")


def require(registry: dict[str, dict], name: str, kind: str) -> dict:
    """The entry ``name`` of a registry, or a ConfigError listing the known names."""
    try:
        return registry[name]
    except KeyError:
        known = ", ".join(sorted(registry)) or "none"
        raise ConfigError(f"unknown {kind} {name!r}; known: {known}") from None


def deep_merge(base: dict, override: dict) -> dict:
    """``base`` updated by ``override``; nested mappings merge key by key instead of being replaced."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def pair_config(config: dict, models: dict[str, dict], dataset: str, model: str) -> dict:
    """The effective model entry for one (dataset, model) pair.

    The registry entry, then ``pair_overrides[dataset]["*"]`` (every model on that dataset), then
    ``pair_overrides[dataset][model]``.
    """
    effective = require(models, model, "model")
    per_dataset = config.get("pair_overrides", {}).get(dataset, {})
    for key in ("*", model):
        override = per_dataset.get(key, {})
        effective = deep_merge(effective, override)
        # A first stage is a dual encoder or the model's own head, never a mix of both entries.
        if "candidates" in override.get("eval", {}):
            effective["eval"]["candidates"] = copy.deepcopy(override["eval"]["candidates"])
    return effective


def configured_pairs(config: dict) -> list[tuple[str, str]]:
    """The grid's (dataset, model) pairs: the cross product of grid.datasets and grid.models, then
    grid.pairs ("dataset/model"), without repeats."""
    grid = config["grid"]
    pairs = [(dataset, model) for dataset in grid["datasets"] for model in grid["models"]]
    for extra in grid.get("pairs", []):
        dataset, sep, model = extra.partition("/")
        if not (dataset and sep and model):
            raise ConfigError(f"grid.pairs entry {extra!r} is not 'dataset/model'")
        if (dataset, model) not in pairs:
            pairs.append((dataset, model))
    return pairs


def evaluation_stages(dataset_entry: dict) -> list[str]:
    """Stages evaluated for a dataset: fine-tuning needs a train split (COCO-CN has only test)."""
    return ["zeroshot", "finetuned"] if "train" in dataset_entry["splits"] else ["zeroshot"]


# The registry keys each data step reads. Rules pass only these, so editing a description or the
# evaluation split does not rerun a download or a serialization.
DOWNLOAD_KEYS = ("files",)
SOURCE_KEYS = ("format", "root", "split_files", "image_dirs", "max_lines")
EXTRACTION_KEYS = ("engine", "max_len", "image_batch_size", "text_batch_size")


def subset(entry: dict, keys: tuple[str, ...]) -> dict:
    return {key: entry[key] for key in keys if key in entry}


CROSS_ENCODER_PROTOCOLS = ("exhaustive", "two_stage")


def required_extra_inputs(dataset_entry: dict, model_entry: dict, dataset: str, model: str) -> tuple[str, ...]:
    """The serialized data besides the LMDB split that ``model`` reads, checked against the dataset:
    a region family on a dataset without a ``regions`` block is refused before anything runs."""
    from .models.registry import family_spec

    extra = family_spec(model_entry["family"]).extra_inputs
    if "regions" in extra and "regions" not in dataset_entry:
        raise ConfigError(f"model {model!r} reads detector regions, but dataset {dataset!r} has no regions block")
    return extra


def model_names_pattern(models: dict[str, dict], kind: str) -> str:
    """A wildcard regex matching exactly the registry's models of ``kind`` (and nothing when none is)."""
    import re

    from .models.registry import family_spec

    names = sorted(name for name, entry in models.items() if family_spec(entry["family"]).kind == kind)
    return "|".join(re.escape(name) for name in names) if names else "(?!)"


def evaluation_protocol(entry: dict, kind: str, stages: list[str], models: dict[str, dict] | None = None) -> dict[str, Any]:
    """How a pair's rankings are made, as recorded in ``metrics.json``.

    Dual encoders rank by the inner product of L2-normalised features. Cross encoders score every
    pair (``exhaustive``) or re-rank the top ``k`` of a first stage (``two_stage``): a dual encoder
    (``eval.candidates: {model, stage, k}``) or their own contrastive head (``{head: itc, k}``,
    BridgeTower's ``k_test``). With ``models`` a candidate model is checked to be a dual encoder of
    that registry.
    """
    evaluation = entry.get("eval", {})
    top_k = int(evaluation.get("top_k", 10))
    if kind == "dual_encoder":
        return {"name": "dense", "similarity": "inner product of L2-normalised features", "top_k": top_k}
    name = evaluation.get("protocol", "exhaustive")
    if name not in CROSS_ENCODER_PROTOCOLS:
        raise ConfigError(f"eval.protocol must be one of {', '.join(CROSS_ENCODER_PROTOCOLS)}, got {name!r}")
    protocol: dict[str, Any] = {"name": name, "score": "cross-encoder ITM match log-odds", "top_k": top_k}
    if name == "two_stage":
        from .models.registry import family_spec

        candidates = dict(evaluation.get("candidates") or {})
        if ("model" in candidates) == ("head" in candidates):
            raise ConfigError("eval.protocol two_stage needs either eval.candidates.model (a dual encoder of the "
                              "registry) or eval.candidates.head (the cross encoder's own itc head)")
        candidates.setdefault("k", 20)
        if int(candidates["k"]) < top_k:
            raise ConfigError(f"eval.candidates.k={candidates['k']} is below top_k={top_k}")
        if "head" in candidates:
            candidates.pop("stage", None)
            protocol["candidates"] = candidates
            return protocol
        if models is not None:
            candidate = require(models, candidates["model"], "candidate model")
            if family_spec(candidate["family"]).kind != "dual_encoder":
                raise ConfigError(f"eval.candidates.model {candidates['model']!r} is not a dual encoder")
        # The model's fine-tuned features where the dataset fine-tunes, its zero-shot ones elsewhere.
        candidates.setdefault("stage", stages[-1])
        if candidates["stage"] not in stages:
            raise ConfigError(f"eval.candidates.stage {candidates['stage']!r} is not evaluated on this dataset "
                              f"(stages: {', '.join(stages)})")
        protocol["candidates"] = candidates
    return protocol
