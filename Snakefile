# Image-text retrieval experiments, one DAG per (dataset, model) pair:
#   download -> serialize -> fine-tune -> extract -> rank -> score -> track
# `snakemake --cores all` builds the configured grid (the offline demo by default).

from pathlib import Path

from snakemake.utils import min_version, validate

min_version("9.0")


# Defaults come from the repository; --configfile and --config override them from anywhere.
configfile: Path(workflow.basedir) / "config" / "config.yaml"


validate(config, "config/schemas/config.schema.yaml", set_default=True)


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/arrow.smk"
include: "rules/train.smk"
include: "rules/evaluate.smk"
include: "rules/deploy.smk"
include: "rules/track.smk"
include: "rules/report.smk"
include: "rules/sweep.smk"


rule all:
    input:
        default_targets(),
    default_target: True
