# Leaderboard, figures and retrieval galleries for `snakemake --report report.html` (or report.zip).


report: "../report/workflow.rst"


rule leaderboard:
    input:
        grid_results(),
        reported=workflow_path("config/reported.yaml"),
    output:
        csv=report("results/summary.csv", caption="../report/leaderboard_csv.rst", category="Leaderboard"),
        md="results/summary.md",
        # The report shows an HTML page inline; a CSV it can only offer for download.
        html=report("results/summary.html", caption="../report/leaderboard.rst", category="Leaderboard"),
    params:
        script=workflow_script("leaderboard.py"),
        resamples=config["evaluation"]["bootstrap"]["resamples"],
        seed=config["evaluation"]["bootstrap"]["seed"],
    log:
        "logs/leaderboard.log",
    benchmark:
        "benchmarks/leaderboard.tsv"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    conda:
        "../envs/cpu.yaml"
    shell:
        "python {params.script} --results-dir results --reported {input.reported}"
        " --csv {output.csv} --md {output.md} --html {output.html}"
        " --resamples {params.resamples} --seed {params.seed}"
        " > {log} 2>&1"


rule recall_curves:
    input:
        results="results/{dataset}/{model}",
        split=eval_split_dir,
    output:
        report(
            "results/figures/{dataset}/{model}/recall_at_k.png",
            caption="../report/recall_curves.rst",
            category="Recall@k",
            subcategory="{dataset} / {model}",
        ),
    params:
        script=workflow_script("plot_recall.py"),
        resamples=config["evaluation"]["bootstrap"]["resamples"],
        seed=config["evaluation"]["bootstrap"]["seed"],
    log:
        "logs/recall_curves/{dataset}/{model}.log",
    benchmark:
        "benchmarks/recall_curves/{dataset}/{model}.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../envs/cpu.yaml"
    shell:
        "python {params.script} --results {input.results} --gold {input.split}/texts.jsonl"
        " --title '{wildcards.dataset} / {wildcards.model}' --resamples {params.resamples}"
        " --seed {params.seed} --out {output} > {log} 2>&1"


rule loss_curve:
    input:
        "work/{dataset}/{model}/train_log.jsonl",
    output:
        report(
            "results/figures/{dataset}/{model}/train_loss.png",
            caption="../report/loss_curve.rst",
            category="Training",
            subcategory="{dataset} / {model}",
        ),
    params:
        script=workflow_script("plot_loss.py"),
    log:
        "logs/loss_curve/{dataset}/{model}.log",
    benchmark:
        "benchmarks/loss_curve/{dataset}/{model}.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../envs/cpu.yaml"
    shell:
        "python {params.script} --train-log {input} --title '{wildcards.dataset} / {wildcards.model}'"
        " --out {output} > {log} 2>&1"


rule gallery:
    input:
        results="results/{dataset}/{model}",
        split=eval_split_dir,
    output:
        report(
            "results/galleries/{dataset}/{model}.html",
            caption="../report/gallery.rst",
            category="Retrievals",
            subcategory="{dataset} / {model}",
        ),
    params:
        script=workflow_script("gallery.py"),
        queries=config["report"]["gallery"]["queries"],
        top=config["report"]["gallery"]["top"],
        seed=config["report"]["gallery"]["seed"],
        thumbnail=config["report"]["gallery"]["thumbnail"],
    log:
        "logs/gallery/{dataset}/{model}.log",
    benchmark:
        "benchmarks/gallery/{dataset}/{model}.tsv"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    conda:
        "../envs/cpu.yaml"
    shell:
        "python {params.script} --results {input.results} --split {input.split} --out {output}"
        " --queries {params.queries} --top {params.top} --seed {params.seed} --thumbnail {params.thumbnail}"
        " > {log} 2>&1"
