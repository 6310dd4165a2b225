# Tracking: one MLflow parent run per pair with a nested run per stage.


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
        " --pair-config {params.pair_config} --repo {params.repo} {params.args}"
        " --artifacts {params.artifacts} --out {output} > {log} 2>&1"
