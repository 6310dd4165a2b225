# Static inference models of the dual encoders, for paddle.inference: per evaluated stage (read by
# extract_features when eval.engine is inference) and the deployable fine-tuned one under results/.


rule export_stage:
    wildcard_constraints:
        model=DUAL_ENCODER_MODELS,
    input:
        model=stage_model_dir,
    output:
        directory("work/{dataset}/{model}/{stage}/export"),
    params:
        script=workflow_script("export.py"),
        eval=export_eval_params,
    log:
        "logs/export_stage/{dataset}/{model}/{stage}.log",
    benchmark:
        "benchmarks/export_stage/{dataset}/{model}/{stage}.tsv"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=30,
    conda:
        "../envs/cpu.yaml"
    shell:
        "python {params.script} --model-dir {input.model} --eval {params.eval} --threads {threads}"
        " --out {output} > {log} 2>&1"


# Under results/exports/ rather than results/{dataset}/{model}/export: the score rule owns
# results/{dataset}/{model} as a directory output, and nothing may be nested inside it.
rule export:
    wildcard_constraints:
        model=DUAL_ENCODER_MODELS,
    input:
        model="work/{dataset}/{model}/models/finetuned",
    output:
        directory("results/exports/{dataset}/{model}"),
    params:
        script=workflow_script("export.py"),
        eval=export_eval_params,
    log:
        "logs/export/{dataset}/{model}.log",
    benchmark:
        "benchmarks/export/{dataset}/{model}.tsv"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=30,
    conda:
        "../envs/cpu.yaml"
    shell:
        "python {params.script} --model-dir {input.model} --eval {params.eval} --threads {threads}"
        " --out {output} > {log} 2>&1"
