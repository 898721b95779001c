#!/usr/bin/env nextflow
/*
 * tilefeat pipeline: tile folders -> per-sample ResNet50 feature CSVs -> one cohort CSV.
 *
 * Input, exactly one of:
 *   --input samplesheet.csv   columns `sample,tiles`, validated against assets/schema_input.json;
 *                             `tiles` is a tile folder or a .zip/.tar/.tar.gz/.tgz archive of tiles;
 *                             a relative `tiles` path is resolved against the samplesheet's folder
 *   --tiles_glob 'root/*'     one sample per matching folder, the folder name being the sample ID
 *
 * See nextflow/README.md for laptop, Slurm + Apptainer and reuse-as-a-module instructions.
 */

include { validateParameters; paramsSummaryLog; samplesheetToList } from 'plugin/nf-schema'
include { TILEFEAT_EXTRACT } from './modules/local/tilefeat/extract/main'
include { TILEFEAT_JOIN    } from './modules/local/tilefeat/join/main'

workflow {
    validateParameters()
    log.info paramsSummaryLog(workflow)

    if ( (params.input ? 1 : 0) + (params.tiles_glob ? 1 : 0) != 1 ) {
        error "Give exactly one of --input (a samplesheet CSV with columns sample,tiles) or --tiles_glob 'root/*'"
    }

    // [ meta, tile folder or archive ] per sample, built eagerly so that bad input fails before
    // any task runs.
    def samples = []
    if ( params.input ) {
        def samplesheet = file(params.input, checkIfExists: true)
        samples = samplesheetToList(params.input, "${projectDir}/assets/schema_input.json").collect { row ->
            def meta = row[0]
            def tiles = row[1].toString()
            def location = (tiles.startsWith('/') || tiles.contains('://')) ? file(tiles) : samplesheet.parent.resolve(tiles)
            // A tile folder, or an archive of tiles that tilefeat reads in place (staged as a file).
            def archive = ['.zip', '.tar', '.tar.gz', '.tgz'].any { suffix -> location.name.toLowerCase().endsWith(suffix) }
            if ( !location.exists() ) {
                error "Sample '${meta.id}': tiles '${tiles}' (resolved to ${location}) does not exist"
            }
            if ( !location.isDirectory() && !archive ) {
                error "Sample '${meta.id}': tiles '${tiles}' (resolved to ${location}) is a file but not a .zip, .tar, .tar.gz or .tgz archive; give the sample's tile folder or an archive of its tiles"
            }
            [ meta, location ]
        }
    } else {
        samples = files(params.tiles_glob, type: 'dir').collect { dir -> [ [ id: dir.name ], dir ] }
        if ( !samples ) {
            error "--tiles_glob '${params.tiles_glob}' matched no folder"
        }
    }
    def dupes = samples.countBy { row -> row[0].id }.findAll { id, n -> n > 1 }.keySet()
    if ( dupes ) {
        error "Duplicate sample IDs (the cohort CSV needs unique ones): ${dupes.join(', ')}"
    }

    // Weights: a file is staged into each task, so that containers see it. `random:SEED` goes
    // through ext.args (conf/modules.config); no --weights means the torchvision cache ($TORCH_HOME).
    def weights = (params.weights && !params.weights.toString().startsWith('random:')) ? file(params.weights, checkIfExists: true) : []

    // The feature cache is shared, mutable state: created here, passed as a string, never staged.
    def cache_dir = ''
    if ( params.cache_dir ) {
        def dir = file(params.cache_dir)
        dir.mkdirs()
        cache_dir = dir.toString()
    }

    TILEFEAT_EXTRACT( channel.fromList(samples), weights, cache_dir )

    // Join every CSV with its provenance file (tilefeat join reads it from beside the CSV), in
    // sample-ID order, so that the cohort CSV does not depend on the order tasks finish in.
    def ch_join_input = TILEFEAT_EXTRACT.out.csv
        .join( TILEFEAT_EXTRACT.out.provenance )
        .toSortedList { a, b -> a[0].id <=> b[0].id }
        .map { rows -> [ [ id: params.cohort_id ], rows.collect { row -> row[1] }, rows.collect { row -> row[2] } ] }

    TILEFEAT_JOIN( ch_join_input )

    // Software versions from the `versions` topic, one YAML per run.
    channel.topic('versions')
        .map { process, tool, version -> "${process.tokenize(':').last()}:\n  ${tool}: ${version}\n" }
        .unique()
        .collectFile( name: 'software_versions.yml', storeDir: "${params.outdir}/pipeline_info", sort: true )
}
