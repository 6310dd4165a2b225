# Data stages: demo archive generation, download, serialization to LMDB.


rule demo_archive:
    output:
        archive="resources/sources/{dataset}.zip",
        checksum="resources/sources/{dataset}.zip.sha256",
    params:
        script=workflow_script("make_demo.py"),
        generator=lambda wildcards: quoted_json(dataset_entry(wildcards)["generator"]),
    log:
        "logs/demo_archive/{dataset}.log",
    benchmark:
        "benchmarks/demo_archive/{dataset}.tsv"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    conda:
        "../envs/cpu.yaml"
    shell:
        "python {params.script} --name {wildcards.dataset}"
        " --generator {params.generator} --out {output.archive} > {log} 2>&1"


rule download:
    input:
        unpack(generated_archive_inputs),
    output:
        directory("resources/{dataset}/download"),
    params:
        script=workflow_script("download.py"),
        entry=lambda wildcards: quoted_json(subset(dataset_entry(wildcards), DOWNLOAD_KEYS)),
        timeout=config["data"]["download_timeout"],
        retries=config["data"]["download_retries"],
    log:
        "logs/download/{dataset}.log",
    benchmark:
        "benchmarks/download/{dataset}.tsv"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=240,
    conda:
        "../envs/cpu.yaml"
    shell:
        "python {params.script} --name {wildcards.dataset} --entry {params.entry}"
        " --dest {output} --cache-dir resources/cache --checksum-dir resources/checksums"
        " --timeout {params.timeout} --retries {params.retries} > {log} 2>&1"


rule serialize:
    input:
        "resources/{dataset}/download",
    output:
        directory("resources/{dataset}/lmdb/{split}"),
    params:
        script=workflow_script("serialize.py"),
        entry=lambda wildcards: quoted_json(subset(dataset_entry(wildcards), SOURCE_KEYS)),
        on_bad_record=config["data"]["on_bad_record"],
    log:
        "logs/serialize/{dataset}/{split}.log",
    benchmark:
        "benchmarks/serialize/{dataset}/{split}.tsv"
    threads: 2
    resources:
        mem_mb=4000,
        runtime=120,
    conda:
        "../envs/cpu.yaml"
    shell:
        "python {params.script} --entry {params.entry} --source {input}"
        " --split {wildcards.split} --out {output} --on-bad-record {params.on_bad_record}"
        " --workers {threads} > {log} 2>&1"
