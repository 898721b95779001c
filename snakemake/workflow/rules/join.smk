# The cohort file, only where `tilefeat join` reads the per-sample format (csv, h5, parquet
# and clam's h5_files/*.h5): a .pt bag holds no tile names, and join refuses STAMP's
# micrometre files (exit 3). For pt and stamp, rule all asks for the per-sample files.
if JOINABLE:

    rule join_list:
        """The per-sample feature files, one per line, for `tilefeat join --from-list` (no command-line limit)."""
        input:
            features=sample_features,
        output:
            f"{OUTDIR}/join/inputs.txt",
        log:
            "logs/join_list.log",
        localrule: True
        run:
            write_join_list(input.features, output[0], log[0])

    rule join:
        """All samples' feature files -> one cohort CSV or Parquet file (`sample,tile,0..D-1`, or one row per sample)."""
        input:
            listing=rules.join_list.output[0],
            features=sample_features,
            provenance=sample_provenances,
        output:
            cohort=COHORT,
        log:
            "logs/join.log",
        benchmark:
            "benchmarks/join.tsv"
        threads: 1
        resources:
            mem_mb=JOIN["mem_mb"],
            runtime=JOIN["runtime"],
        params:
            tilefeat=TILEFEAT,
            aggregate=JOIN["aggregate"],
        shell:
            'echo "tilefeat join: host=$(hostname) SLURM_JOB_ID=${{SLURM_JOB_ID:-none}}" > {log:q}; '
            "{params.tilefeat:q} join --from-list {input.listing:q} --output {output.cohort:q}"
            " --aggregate {params.aggregate} >> {log:q} 2>&1"


rule versions:
    """Record the versions that made the results (tilefeat, Snakemake)."""
    output:
        f"{OUTDIR}/versions.yaml",
    log:
        "logs/versions.log",
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    params:
        tilefeat=TILEFEAT,
        snakemake=SNAKEMAKE_VERSION,
    shell:
        'v=$({params.tilefeat:q} --version 2> {log:q}); test -n "$v"; '
        'printf \'tilefeat: "%s"\\nsnakemake: "%s"\\n\' "${{v#tilefeat }}" {params.snakemake:q}'
        " > {output:q}"
