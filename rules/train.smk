# Training stages: the initial model of a pair, then distributed contrastive fine-tuning.


rule prepare_model:
    input:
        unpack(prepare_model_inputs),
    output:
        directory("work/{dataset}/{model}/models/init"),
    params:
        script=workflow_script("prepare_model.py"),
        family=lambda wildcards: model_entry(wildcards)["family"],
        # JSON, because init is a name, a directory or a mapping of towers to either.
        init=lambda wildcards: quoted_json(model_entry(wildcards)["init"]),
        # the vocabulary split of a tiny model; the pretraining settings and data
        args=prepare_model_args,
    log:
        "logs/prepare_model/{dataset}/{model}.log",
    benchmark:
        "benchmarks/prepare_model/{dataset}/{model}.tsv"
    # Pretraining is one process; its matrix products use the job's cores.
    threads: lambda wildcards: FINETUNE_THREADS if pretrains(wildcards) else 1
    resources:
        mem_mb=lambda wildcards: 16000 if pretrains(wildcards) else 4000,
        runtime=lambda wildcards: 24 * 60 if pretrains(wildcards) else 30,
    conda:
        "../envs/cpu.yaml"
    shell:
        "python {params.script} --family {params.family} --init {params.init} {params.args}"
        " --out {output} > {log} 2>&1"


rule finetune:
    input:
        # the initial model and the training split, and its region store for region families
        unpack(finetune_inputs),
    output:
        model=directory("work/{dataset}/{model}/models/finetuned"),
        train_log="work/{dataset}/{model}/train_log.jsonl",
    params:
        script=workflow_script("finetune.py"),
        hparams=lambda wildcards: quoted_json(model_entry(wildcards)["train"]),
        # Checkpoints live outside the declared outputs, so a failed or killed job keeps them and
        # the rerun resumes instead of starting over.
        work_dir="work/{dataset}/{model}/checkpoints",
        # Ranks per node come from the config, not from the gpu resource: on several SLURM nodes the
        # profile asks for GPUs per node (gres) instead of the job's total. The script finds the nodes
        # and the GPUs each one shows in its environment.
        gpus=config["finetune"]["gpus"],
        cpu_ranks=config["finetune"]["cpu_ranks"],
        regions=finetune_args,
    log:
        "logs/finetune/{dataset}/{model}.log",
    benchmark:
        "benchmarks/finetune/{dataset}/{model}.tsv"
    threads: FINETUNE_THREADS
    resources:
        mem_mb=16000,
        runtime=24 * 60,
        gpu=config["finetune"]["gpus"],
        ranks=FINETUNE_RANKS,
    conda:
        "../envs/gpu.yaml" if config["finetune"]["gpus"] else "../envs/cpu.yaml"
    shell:
        "python {params.script} --model-dir {input.model} --train-data {input.train}"
        " --work-dir {params.work_dir} --final-dir {output.model} --train-log {output.train_log}"
        " --ranks {params.cpu_ranks} --gpus {params.gpus} --hparams {params.hparams} {params.regions} > {log} 2>&1"
