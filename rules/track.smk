# Tracking: one MLflow parent run per pair with a nested training run and an evaluation run per stage.


rule track:
    input:
        unpack(tracking_inputs),
        results="results/{dataset}/{model}",
        download="resources/{dataset}/download",
        split=eval_split_dir,
    output:
        "work/{dataset}/{model}/tracking.json",
    params:
        script=workflow_script("track.py"),
        uri=config["tracking"]["uri"],
        experiment=config["tracking"]["experiment"],
        pair_config=tracked_config,
        repo=workflow.basedir,
        # the fine-tuning log; a sweep member's tags
        args=tracking_args,
        artifacts=lambda wildcards, input: " ".join(input.artifacts),
        figures=lambda wildcards, input: " ".join(input.figures),
        # the jobs that evaluate each stage, whose benchmark files time its run
        stage_benchmarks=lambda wildcards: quoted_json(PIPELINE.stage_benchmarks(wildcards.dataset, wildcards.model)),
        # a fine-tuned dual encoder becomes the training run's MLflow model, encoding texts as extraction does
        model=lambda wildcards, input: (
            f"--finetuned-model {input.finetuned_model}"
            f" --model-max-len {PIPELINE.extraction_settings(wildcards.dataset, wildcards.model).get('max_len', 0)}"
            + (" --register-model" if config["tracking"]["register_model"] else "")
            if hasattr(input, "finetuned_model") else ""
        ),
    log:
        "logs/track/{dataset}/{model}.log",
    benchmark:
        "benchmarks/track/{dataset}/{model}.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    conda:
        "../envs/cpu.yaml"
    shell:
        "python {params.script} --uri '{params.uri}' --experiment {params.experiment}"
        " --dataset {wildcards.dataset} --model {wildcards.model} --results {input.results}"
        " --download {input.download} --validation-report {input.split}/validation_report.json"
        " --split-dir {input.split} --stage-benchmarks {params.stage_benchmarks}"
        " --pair-config {params.pair_config} --repo {params.repo} {params.args} {params.model}"
        " --artifacts {params.artifacts} --figures {params.figures} --out {output} > {log} 2>&1"
