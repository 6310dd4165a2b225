# Evaluation stages: features of the evaluation split and exact top-k ranking (dual encoders) or
# pair scoring (cross encoders), then recall scoring with bootstrap intervals.


rule extract_features:
    wildcard_constraints:
        model=DUAL_ENCODER_MODELS,
    input:
        # the saved model, or with eval.engine inference its export (rule export_stage)
        model=stage_extraction_model,
        split=eval_split_dir,
    output:
        directory("work/{dataset}/{model}/{stage}/features"),
    params:
        script=workflow_script("extract.py"),
        eval=extraction_params,
    log:
        "logs/extract_features/{dataset}/{model}/{stage}.log",
    benchmark:
        "benchmarks/extract_features/{dataset}/{model}/{stage}.tsv"
    threads: extraction_threads
    resources:
        mem_mb=8000,
        runtime=120,
    conda:
        "../envs/cpu.yaml"
    shell:
        "python {params.script} --model-dir {input.model} --split-dir {input.split}"
        " --eval {params.eval} --threads {threads} --out {output} > {log} 2>&1"


rule rank:
    wildcard_constraints:
        model=DUAL_ENCODER_MODELS,
    input:
        "work/{dataset}/{model}/{stage}/features",
    output:
        t2i="work/{dataset}/{model}/{stage}/predictions/t2i_predictions.jsonl",
        i2t="work/{dataset}/{model}/{stage}/predictions/i2t_predictions.jsonl",
    params:
        script=workflow_script("rank.py"),
        top_k=top_k,
        chunk_size=lambda wildcards: model_entry(wildcards)["eval"]["chunk_size"],
    log:
        "logs/rank/{dataset}/{model}/{stage}.log",
    benchmark:
        "benchmarks/rank/{dataset}/{model}/{stage}.tsv"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=60,
    conda:
        "../envs/cpu.yaml"
    shell:
        "python {params.script} --image-feats {input}/images --text-feats {input}/texts"
        " --out-t2i {output.t2i} --out-i2t {output.i2t} --top-k {params.top_k}"
        " --chunk-size {params.chunk_size} > {log} 2>&1"


rule rerank:
    wildcard_constraints:
        model=CROSS_ENCODER_MODELS,
    input:
        unpack(rerank_inputs),
    output:
        t2i="work/{dataset}/{model}/{stage}/predictions/t2i_predictions.jsonl",
        i2t="work/{dataset}/{model}/{stage}/predictions/i2t_predictions.jsonl",
    params:
        script=workflow_script("rerank.py"),
        args=rerank_args,
        top_k=top_k,
    log:
        "logs/rerank/{dataset}/{model}/{stage}.log",
    benchmark:
        "benchmarks/rerank/{dataset}/{model}/{stage}.tsv"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=24 * 60,
    conda:
        "../envs/cpu.yaml"
    shell:
        "python {params.script} --model-dir {input.model} --split-dir {input.split} {params.args}"
        " --top-k {params.top_k} --out-t2i {output.t2i} --out-i2t {output.i2t} > {log} 2>&1"


rule score:
    input:
        unpack(stage_prediction_inputs),
        split=eval_split_dir,
    output:
        directory("results/{dataset}/{model}"),
    params:
        script=workflow_script("score.py"),
        split=lambda wildcards: dataset_entry(wildcards)["eval_split"],
        stages=stage_prediction_args,
        top_k=top_k,
        protocol=protocol_arg,
        resamples=config["evaluation"]["bootstrap"]["resamples"],
        seed=config["evaluation"]["bootstrap"]["seed"],
    log:
        "logs/score/{dataset}/{model}.log",
    benchmark:
        "benchmarks/score/{dataset}/{model}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        "../envs/cpu.yaml"
    shell:
        "python {params.script} --dataset {wildcards.dataset} --model {wildcards.model}"
        " --split {params.split} --split-dir {input.split} {params.stages} --top-k {params.top_k}"
        " --protocol {params.protocol} --bootstrap-resamples {params.resamples}"
        " --bootstrap-seed {params.seed} --out {output} > {log} 2>&1"
