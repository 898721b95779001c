rule extract:
    """One sample's tile folder -> per-tile feature CSV (+ provenance, rejected tiles)."""
    input:
        tiles=lambda wc: SAMPLES[wc.sample],
        weights=weights_input,
    output:
        csv=f"{OUTDIR}/features/{{sample}}.csv",
        provenance=f"{OUTDIR}/features/{{sample}}.provenance.yaml",
        rejected=f"{OUTDIR}/features/{{sample}}.rejected.tsv",
    log:
        "logs/extract/{sample}.log",
    benchmark:
        "benchmarks/extract/{sample}.tsv"
    wildcard_constraints:
        sample=r"[A-Za-z0-9][A-Za-z0-9._-]*",
    threads: EXTRACT["threads"]
    resources:
        **extract_resources(),
    params:
        tilefeat=TILEFEAT,
        options=extract_options(),
    shell:
        # The first log line says where the job ran: the Slurm job and the GPUs it was given.
        'echo "tilefeat extract {wildcards.sample}: host=$(hostname)'
        " SLURM_JOB_ID=${{SLURM_JOB_ID:-none}}"
        ' CUDA_VISIBLE_DEVICES=${{CUDA_VISIBLE_DEVICES-unset}}" > {log:q}; '
        "{params.tilefeat:q} extract {input.tiles:q} --output {output.csv:q}"
        " --sample {wildcards.sample:q} --threads {threads} {params.options}"
        " >> {log:q} 2>&1"
