# ViLT-style Arrow files (image, caption, image_id, split, text_ids), the data format of
# BridgeTower and ViLT, written from the validated LMDB split so every importer and check applies.


rule serialize_arrow:
    input:
        "resources/{dataset}/lmdb/{split}",
    output:
        directory("resources/{dataset}/arrow/{split}"),
    params:
        script=workflow_script("serialize_arrow.py"),
    log:
        "logs/serialize_arrow/{dataset}/{split}.log",
    benchmark:
        "benchmarks/serialize_arrow/{dataset}/{split}.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=120,
    conda:
        "../envs/cpu.yaml"
    shell:
        "python {params.script} --split-dir {input} --out {output}"
        " --name {wildcards.dataset} --split {wildcards.split} > {log} 2>&1"
