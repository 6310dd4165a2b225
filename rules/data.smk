# Data stages: demo archive generation, download, image fetching for CSV+URL corpora,
# serialization to LMDB, region features beside it.

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
        # Only the registry keys the step reads: editing anything else reruns nothing.
        entry=lambda wildcards: quoted_json(PIPELINE.download_entry(wildcards.dataset)),
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


rule fetch_url_corpus:
    input:
        "resources/{dataset}/download",
    output:
        directory("resources/{dataset}/raw"),
    params:
        script=workflow_script("fetch_url_corpus.py"),
        entry=lambda wildcards: quoted_json(PIPELINE.url_corpus_entry(wildcards.dataset)),
        on_bad_record=config["data"]["on_bad_record"],
        # Outside the output, which Snakemake deletes before a rerun: fetched images survive
        # failed and killed jobs, so the next run resumes instead of starting over.
        cache_dir=lambda wildcards: f"resources/image_cache/{wildcards.dataset}",
    log:
        "logs/fetch_url_corpus/{dataset}.log",
    benchmark:
        "benchmarks/fetch_url_corpus/{dataset}.tsv"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=1440,
    conda:
        "../envs/cpu.yaml"
    shell:
        "python {params.script} --entry {params.entry} --source {input} --out {output}"
        " --cache-dir {params.cache_dir} --on-bad-record {params.on_bad_record} > {log} 2>&1"


rule serialize:
    input:
        # A url_csv dataset is serialized from the raw layout fetch_url_corpus wrote, others from the download.
        serialize_source,
    output:
        directory("resources/{dataset}/lmdb/{split}"),
    params:
        script=workflow_script("serialize.py"),
        entry=lambda wildcards: quoted_json(PIPELINE.serialize_entry(wildcards.dataset)),
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



rule serialize_regions:
    input:
        # The split's image ids come from its serialized LMDB, so features are checked against
        # exactly the images that survived validation.
        source="resources/{dataset}/download",
        split_dir="resources/{dataset}/lmdb/{split}",
    output:
        # Beside the LMDB directory, not inside it: Snakemake forbids outputs nested in another output.
        directory("resources/{dataset}/regions/{split}"),
    params:
        script=workflow_script("serialize_regions.py"),
        entry=lambda wildcards: quoted_json(PIPELINE.region_entry(wildcards.dataset)),
        on_bad_record=config["data"]["on_bad_record"],
    log:
        "logs/serialize_regions/{dataset}/{split}.log",
    benchmark:
        "benchmarks/serialize_regions/{dataset}/{split}.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=240,
    conda:
        "../envs/cpu.yaml"
    shell:
        "python {params.script} --entry {params.entry} --source {input.source} --split-dir {input.split_dir}"
        " --split {wildcards.split} --out {output} --on-bad-record {params.on_bad_record} > {log} 2>&1"
