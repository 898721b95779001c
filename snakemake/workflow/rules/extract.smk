if EXTRACT["samples_per_job"] == 1:

    rule extract:
        """One sample's tile folder, tile archive or slide -> per-tile feature file (+ provenance, rejected tiles)."""
        input:
            tiles=lambda wc: SAMPLES[wc.sample],
            weights=weights_input,
            model=model_input,
            model_sidecar=model_sidecar_input,
        output:
            **extract_outputs(),
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
            output_flags=output_flags,
            slide_mpp_flag=lambda wc: slide_mpp_flag([wc.sample]),
            slide_flags=lambda wc: slide_flags([wc.sample]),
        shell:
            # The first log line says where the job ran: the Slurm job and the GPUs it was given.
            'echo "tilefeat extract {wildcards.sample}: host=$(hostname)'
            " SLURM_JOB_ID=${{SLURM_JOB_ID:-none}}"
            ' CUDA_VISIBLE_DEVICES=${{CUDA_VISIBLE_DEVICES-unset}}" > {log:q}; '
            "{params.tilefeat:q} extract {input.tiles:q} {params.output_flags}"
            " --sample {wildcards.sample:q}{params.slide_mpp_flag}{params.slide_flags} --threads {threads}"
            " {params.options} >> {log:q} 2>&1"

else:
    # Several samples per job (extract.samples_per_job): one `tilefeat extract` process per
    # batch sets the weights, the model and the GPU up once for all of its samples.
    for batch, names in enumerate(extract_batches()):

        rule:
            name:
                f"extract_batch{batch}"
            input:
                tiles=[SAMPLES[s] for s in names],
                weights=weights_input,
                model=model_input,
                model_sidecar=model_sidecar_input,
            output:
                **extract_outputs(names),
            log:
                f"logs/extract/batch{batch}.log",
            benchmark:
                f"benchmarks/extract/batch{batch}.tsv"
            threads: EXTRACT["threads"]
            resources:
                **extract_resources(len(names)),
            params:
                tilefeat=TILEFEAT,
                options=extract_options(),
                samples=" ".join(names),
                sample_flags=shlex.join(a for s in names for a in ("--sample", s)),
                outdir=f"{OUTDIR}/features",
                format_flag=format_flag(),
                slide_mpp_flag=slide_mpp_flag(names),
                slide_flags=slide_flags(names),
            shell:
                'echo "tilefeat extract {params.samples}: host=$(hostname)'
                " SLURM_JOB_ID=${{SLURM_JOB_ID:-none}}"
                ' CUDA_VISIBLE_DEVICES=${{CUDA_VISIBLE_DEVICES-unset}}" > {log:q}; '
                "{params.tilefeat:q} extract {input.tiles:q} --outdir {params.outdir:q}{params.format_flag}"
                " {params.sample_flags}{params.slide_mpp_flag}{params.slide_flags} --threads {threads} {params.options}"
                " >> {log:q} 2>&1"
