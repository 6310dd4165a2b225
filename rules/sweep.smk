# Sweeps, built by name: `snakemake results/sweeps/NAME/`. Each member is a derived model
# (MODEL__NAME__s1) that runs through the rules of any pair; these two rules gather them.


rule track_sweep:
    input:
        results=sweep_results,
        tracking=sweep_tracking_records,
    output:
        "work/sweeps/{sweep}/tracking.json",
    params:
        script=workflow_script("track_sweep.py"),
        uri=config["tracking"]["uri"],
        experiment=config["tracking"]["experiment"],
        plan=sweep_plan,
        repo=workflow.basedir,
    log:
        "logs/track_sweep/{sweep}.log",
    benchmark:
        "benchmarks/track_sweep/{sweep}.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    conda:
        "../envs/cpu.yaml"
    shell:
        "python {params.script} --uri '{params.uri}' --experiment {params.experiment}"
        " --plan {params.plan} --repo {params.repo} --out {output} > {log} 2>&1"


# After tracking, so summary.md names the sweep's MLflow run.
rule sweep_summary:
    input:
        results=sweep_results,
        tracking="work/sweeps/{sweep}/tracking.json",
    output:
        directory("results/sweeps/{sweep}"),
    params:
        script=workflow_script("sweep_summary.py"),
        plan=sweep_plan,
    log:
        "logs/sweep_summary/{sweep}.log",
    benchmark:
        "benchmarks/sweep_summary/{sweep}.tsv"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    conda:
        "../envs/cpu.yaml"
    shell:
        "python {params.script} --plan {params.plan} --tracking {input.tracking} --out {output} > {log} 2>&1"
