# Input functions and the values rules share. What they compute lives in vlretrieval.pipeline,
# which the tests import; here each one only unpacks the wildcards.
import os

from vlretrieval.pipeline import CROSS_ENCODER, DUAL_ENCODER, Pipeline, quoted_json

# Jobs import the package from this checkout, also inside the conda environments of --sdm conda,
# which install only the pinned dependencies.
os.environ.update(PYTHONPATH=os.pathsep.join(filter(None, [workflow.basedir, os.environ.get("PYTHONPATH")])))

# Loads the registries and validates every pair override: a bad config stops here, before any job.
PIPELINE = Pipeline(config, workflow.basedir)

DUAL_ENCODER_MODELS = PIPELINE.model_names_pattern(DUAL_ENCODER)
CROSS_ENCODER_MODELS = PIPELINE.model_names_pattern(CROSS_ENCODER)
FINETUNE_RANKS = PIPELINE.finetune_ranks
FINETUNE_THREADS = PIPELINE.finetune_threads


wildcard_constraints:
    # results/sweeps/{sweep} and work/sweeps/{sweep} belong to a sweep, never to a pair.
    dataset="(?!sweeps/)[A-Za-z0-9_]+",
    model="[A-Za-z0-9_]+",
    sweep="[A-Za-z][A-Za-z0-9_]*",
    split="train|valid|test",
    stage="zeroshot|finetuned",


workflow_path = PIPELINE.workflow_path
workflow_script = PIPELINE.workflow_script
grid_results = PIPELINE.grid_results
default_targets = PIPELINE.default_targets


def dataset_entry(wildcards):
    return PIPELINE.dataset_entry(wildcards.dataset)


def model_entry(wildcards):
    return PIPELINE.model_entry(wildcards.dataset, wildcards.model)


def generated_archive_inputs(wildcards):
    return PIPELINE.generated_archive_inputs(wildcards.dataset)


def serialize_source(wildcards):
    return PIPELINE.serialize_source(wildcards.dataset)


def eval_split_dir(wildcards):
    return PIPELINE.eval_split_dir(wildcards.dataset)


def prepare_model_inputs(wildcards):
    return PIPELINE.prepare_model_inputs(wildcards.dataset, wildcards.model)


def prepare_model_args(wildcards):
    return PIPELINE.prepare_model_args(wildcards.dataset, wildcards.model)


def pretrains(wildcards):
    return PIPELINE.pretrains(wildcards.dataset, wildcards.model)


def finetune_inputs(wildcards):
    return PIPELINE.finetune_inputs(wildcards.dataset, wildcards.model)


def finetune_args(wildcards):
    return PIPELINE.finetune_args(wildcards.dataset, wildcards.model)


def stage_model_dir(wildcards):
    return PIPELINE.stage_model_dir(wildcards.dataset, wildcards.model, wildcards.stage)


def stage_extraction_model(wildcards):
    return PIPELINE.stage_extraction_model(wildcards.dataset, wildcards.model, wildcards.stage)


def extraction_threads(wildcards):
    return PIPELINE.extraction_threads(wildcards.dataset, wildcards.model)


def extraction_params(wildcards):
    return quoted_json(PIPELINE.extraction_settings(wildcards.dataset, wildcards.model))


def export_eval_params(wildcards):
    return quoted_json(PIPELINE.export_settings(wildcards.dataset, wildcards.model))


def top_k(wildcards):
    return PIPELINE.top_k(wildcards.dataset, wildcards.model)


def rerank_inputs(wildcards):
    return PIPELINE.rerank_inputs(wildcards.dataset, wildcards.model, wildcards.stage)


def rerank_args(wildcards):
    return PIPELINE.rerank_args(wildcards.dataset, wildcards.model, wildcards.stage)


def protocol_arg(wildcards):
    return quoted_json(PIPELINE.protocol(wildcards.dataset, wildcards.model))


def stage_prediction_inputs(wildcards):
    return PIPELINE.stage_prediction_inputs(wildcards.dataset, wildcards.model)


def stage_prediction_args(wildcards):
    return PIPELINE.stage_prediction_args(wildcards.dataset, wildcards.model)


def tracking_inputs(wildcards):
    return PIPELINE.tracking_inputs(wildcards.dataset, wildcards.model)


def tracking_args(wildcards):
    return PIPELINE.tracking_args(wildcards.dataset, wildcards.model)


def tracked_config(wildcards):
    return quoted_json(PIPELINE.tracked_config(wildcards.dataset, wildcards.model))


def sweep_results(wildcards):
    return PIPELINE.sweep_results(wildcards.sweep)


def sweep_tracking_records(wildcards):
    return PIPELINE.sweep_tracking_records(wildcards.sweep)


def sweep_plan(wildcards):
    return quoted_json(PIPELINE.sweep_plan(wildcards.sweep))
