# Shared helpers and input functions. Everything with logic lives in the vlretrieval package.
import json
import shlex
from pathlib import Path

from vlretrieval.config import load_datasets, load_models, require

def workflow_path(path):
    """Registry paths in the config are relative to the workflow's own directory."""
    return Path(workflow.basedir) / path


DATASETS = load_datasets(workflow_path(config["datasets_file"]))
MODELS = load_models(workflow_path(config["models_file"]))

for _name in config["grid"]["datasets"]:
    require(DATASETS, _name, "dataset")
for _name in config["grid"]["models"]:
    require(MODELS, _name, "model")


wildcard_constraints:
    dataset="[A-Za-z0-9_]+",
    model="[A-Za-z0-9_]+",
    split="train|valid|test",


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


def serialized_splits(dataset):
    return expand("resources/{dataset}/lmdb/{split}", dataset=dataset, split=DATASETS[dataset]["splits"])


def default_targets():
    return [path for dataset in config["grid"]["datasets"] for path in serialized_splits(dataset)]
