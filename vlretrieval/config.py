"""Loading and validating the workflow's registries (datasets, models).

The schemas in ``config/schemas/`` are the single description of every key; validation also
fills in their defaults, so the rest of the code never guesses a missing value.
"""

from __future__ import annotations

import copy
import functools
import sys
from pathlib import Path
from typing import Any, Iterable

import yaml

from .errors import ConfigError

#: Joins the parts of a sweep member's model name (MODEL__SWEEP__s1); sweep and model names have no
#: double underscore of their own, so a model name with one is a member.
SWEEP_MEMBER_SEPARATOR = "__"


def is_sweep_member(model_name: str) -> bool:
    """True for the model name of a sweep member (see :func:`vlretrieval.pipeline.member_model_name`)."""
    return SWEEP_MEMBER_SEPARATOR in model_name


SCHEMA_DIR = Path(__file__).resolve().parent.parent / "config" / "schemas"
CONFIG_SCHEMA = "config.schema.yaml"
DATASETS_SCHEMA = "datasets.schema.yaml"
MODELS_SCHEMA = "models.schema.yaml"
SWEEP_SCHEMA = "sweep.schema.yaml"


@functools.lru_cache(maxsize=None)
def load_schema(schema_name: str, schema_dir: Path = SCHEMA_DIR) -> dict[str, Any]:
    """A schema of ``config/schemas/``, parsed once per process (treat it as read-only)."""
    path = Path(schema_dir) / schema_name
    try:
        with open(path, encoding="utf-8") as handle:
            return yaml.safe_load(handle)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read schema: {exc.strerror}") from None


@functools.lru_cache(maxsize=None)
def _default_filling_validator(schema_name: str, schema_dir: Path, keys: tuple[str, ...] = ()):
    # The default-filling extension Snakemake's validate() uses for config.yaml (the jsonschema FAQ
    # recipe), so registries and config follow the same rules; here defaults are copied, so entries
    # never share a mutable default, and the validator is built once instead of per entry.
    from jsonschema import Draft202012Validator, validators

    validate_properties = Draft202012Validator.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, subschema in properties.items():
                if "default" in subschema and name not in instance:
                    instance[name] = copy.deepcopy(subschema["default"])
        yield from validate_properties(validator, properties, instance, schema)

    filling = validators.extend(Draft202012Validator, {"properties": set_defaults})
    return filling(_subschema(load_schema(schema_name, schema_dir), keys, schema_name))


def describe_schema_error(error) -> str:
    """A validation error as ``dotted.key: problem``; an unknown key is named with the known ones."""
    location = ".".join(str(part) for part in error.absolute_path)
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        known = sorted(error.schema.get("properties", {}))
        unknown = sorted(key for key in error.instance if key not in known)
        keys = ", ".join(".".join(filter(None, (location, str(key)))) for key in unknown)
        return f"{keys}: unknown key; known here: {', '.join(known) or 'none'}"
    problem = f"{location or '(top level)'}: {error.message}"
    if error.validator in ("not", "anyOf", "oneOf") and "description" in error.schema:
        # These messages repeat the subschema instead of the rule; the key's description states it.
        problem = f"{location or '(top level)'}: {error.instance!r} is not allowed: {error.schema['description']}"
    return problem


def validate_against_schema(obj: Any, schema_name: str, where: str, schema_dir: Path = SCHEMA_DIR,
                            keys: tuple[str, ...] = ()) -> Any:
    """A copy of ``obj`` checked against ``schema_name`` (or its part at ``keys``, e.g. ``("eval",)``)
    with the schema's defaults filled in; a ConfigError naming ``where`` and the offending key otherwise."""
    from jsonschema.exceptions import best_match

    checked = copy.deepcopy(obj)
    error = best_match(_default_filling_validator(schema_name, Path(schema_dir), tuple(keys)).iter_errors(checked))
    if error is not None:
        raise ConfigError(f"{where}: {describe_schema_error(error)}")
    return checked


def _subschema(schema: dict, keys: Iterable[str], schema_name: str) -> dict:
    for depth, key in enumerate(keys):
        try:
            schema = schema["properties"][key]
        except KeyError:
            raise KeyError(f"{schema_name} describes no key {'.'.join(list(keys)[:depth + 1])}") from None
    return schema


def schema_default(schema_name: str, *keys: str) -> Any:
    """The default the schema gives the key at ``keys`` (e.g. ``MODELS_SCHEMA, "eval", "top_k"``):
    where command-line tools and library entry points take a default, it comes from here."""
    subschema = _subschema(load_schema(schema_name), keys, schema_name)
    if "default" not in subschema:
        raise KeyError(f"{schema_name} gives {'.'.join(keys)} no default")
    return copy.deepcopy(subschema["default"])


def fill_schema_defaults(obj: dict, schema_name: str, *keys: str) -> dict:
    """A copy of the mapping ``obj`` (the part of an entry at ``keys``) with the schema's defaults of
    absent keys filled in, nested mappings included, without validating it: for callers handed a
    partial block that an already validated entry would have complete."""

    def fill(value: Any, schema: dict) -> Any:
        if not isinstance(value, dict):
            return value
        filled = copy.deepcopy(value)
        for name, subschema in schema.get("properties", {}).items():
            if name in filled:
                filled[name] = fill(filled[name], subschema)
            elif "default" in subschema:
                filled[name] = copy.deepcopy(subschema["default"])
        return filled

    return fill(obj, _subschema(load_schema(schema_name), keys, schema_name))


def _validate(obj: dict, schema_name: str, where: str, schema_dir: Path) -> dict:
    return validate_against_schema(obj, schema_name, where, schema_dir)


def _read_yaml(path: Path, what: str) -> Any:
    """The YAML document at ``path`` (an empty file is ``{}``), or a ConfigError naming it."""
    try:
        with open(path, encoding="utf-8") as handle:
            return yaml.safe_load(handle) or {}
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read {what}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None


def load_registry(path: str | Path, schema_name: str, schema_dir: Path = SCHEMA_DIR) -> dict[str, dict[str, Any]]:
    """Read a YAML registry (name -> entry) and validate each entry against ``schema_name``."""
    path = Path(path)
    data = _read_yaml(path, "registry")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of names to entries, got {type(data).__name__}")
    return {
        str(name): _validate(entry or {}, schema_name, f"{path}: entry {name!r}", schema_dir)
        for name, entry in data.items()
    }


WORKFLOW_CONFIG = SCHEMA_DIR.parent / "config.yaml"


def workflow_config(path: str | Path = WORKFLOW_CONFIG) -> dict[str, Any]:
    """The workflow's config file (the repository's by default), validated, with the schema's defaults."""
    path = Path(path)
    return _validate(_read_yaml(path, "config"), CONFIG_SCHEMA, str(path), SCHEMA_DIR)


def load_datasets(path: str | Path) -> dict[str, dict[str, Any]]:
    registry = load_registry(path, DATASETS_SCHEMA)
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
    return load_registry(path, MODELS_SCHEMA)


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
    ``pair_overrides[dataset][model]``. Each layer is validated against the model schema as it is
    applied, so a typo, a value out of range or a key in the wrong place is a ConfigError naming the
    override and the pair; the result has the schema's defaults filled in.
    """
    effective = require(models, model, "model")
    per_dataset = config.get("pair_overrides", {}).get(dataset, {})
    for key in ("*", model):
        if key not in per_dataset:
            continue
        override = per_dataset[key] or {}
        where = f"config pair_overrides.{dataset}.{key} (pair {dataset}/{model})"
        if not isinstance(override, dict):
            raise ConfigError(f"{where}: expected a mapping of model entry keys, got {type(override).__name__}")
        effective = deep_merge(effective, override)
        # A first stage is a dual encoder or the model's own head, never a mix of both entries.
        if "candidates" in override.get("eval", {}):
            effective["eval"]["candidates"] = copy.deepcopy(override["eval"]["candidates"])
        effective = validate_against_schema(effective, MODELS_SCHEMA, where)
    return effective


def set_dotted_key(entry: dict, dotted: str, value: Any, where: str) -> None:
    """Set ``entry[a][b][c] = value`` for ``dotted`` ``"a.b.c"``, creating missing mappings on the way.

    The value replaces what is there, a mapping included; whether the key exists is for the schema
    to say afterwards. A step through something that is not a mapping is a ConfigError naming ``where``.
    """
    *parents, leaf = dotted.split(".")
    node = entry
    for depth, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{where}: {dotted}: {'.'.join(parents[:depth + 1])} is {child!r} here, "
                              f"not a mapping of keys")
        node = child
    node[leaf] = copy.deepcopy(value)


def validate_pair_overrides(config: dict, models: dict[str, dict], datasets: dict[str, dict]) -> dict:
    """Every effective entry ``pair_overrides`` makes, checked before any job runs; returns them as
    ``{(dataset, model): entry}``.

    A model key is ``"*"`` or a model of the registry. A dataset outside the dataset registry is
    reported on stderr rather than refused: config files merge key by key, so a run with its own
    dataset registry still carries the repository's overrides of the demo datasets.
    """
    effective = {}
    for dataset, per_dataset in (config.get("pair_overrides") or {}).items():
        if dataset not in datasets:
            print(f"warning: config pair_overrides.{dataset}: {dataset!r} is not in the dataset registry "
                  f"(known: {', '.join(sorted(datasets))}); its overrides apply to no pair", file=sys.stderr)
        for key in per_dataset or {}:
            if key != "*" and key not in models:
                raise ConfigError(f"config pair_overrides.{dataset}.{key}: unknown model {key!r}; "
                                  f"known: {', '.join(sorted(models))} (or \"*\" for every model)")
        names = sorted(models) if "*" in (per_dataset or {}) else sorted(per_dataset or {})
        for model in names:
            effective[(dataset, model)] = pair_config(config, models, dataset, model)
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
# The image step of a url_csv dataset; the region step (an entry without ``regions`` stops that job
# with a clear error).
URL_CORPUS_KEYS = ("format", "root", "splits", "url_corpus")
REGION_KEYS = ("root", "regions")


def subset(entry: dict, keys: tuple[str, ...]) -> dict:
    return {key: entry[key] for key in keys if key in entry}


CROSS_ENCODER_PROTOCOLS = tuple(_subschema(load_schema(MODELS_SCHEMA), ("eval", "protocol"), MODELS_SCHEMA)["enum"])


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
    evaluation = fill_schema_defaults(entry.get("eval", {}), MODELS_SCHEMA, "eval")
    top_k = int(evaluation["top_k"])
    if kind == "dual_encoder":
        return {"name": "dense", "similarity": "inner product of L2-normalised features", "top_k": top_k}
    name = evaluation["protocol"]
    if name not in CROSS_ENCODER_PROTOCOLS:
        raise ConfigError(f"eval.protocol must be one of {', '.join(CROSS_ENCODER_PROTOCOLS)}, got {name!r}")
    protocol: dict[str, Any] = {"name": name, "score": "cross-encoder ITM match log-odds", "top_k": top_k}
    if name == "two_stage":
        from .models.registry import family_spec

        candidates = fill_schema_defaults(evaluation.get("candidates") or {}, MODELS_SCHEMA, "eval", "candidates")
        if ("model" in candidates) == ("head" in candidates):
            raise ConfigError("eval.protocol two_stage needs either eval.candidates.model (a dual encoder of the "
                              "registry) or eval.candidates.head (the cross encoder's own itc head)")
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
