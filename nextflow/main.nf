#!/usr/bin/env nextflow
/*
 * tilefeat pipeline: tile folders -> per-sample ResNet50 feature files (CSV, HDF5, Parquet;
 * for the MIL tools: .pt bags (slideflow), STAMP's .h5, CLAM's h5_files/ + pt_files/) -> one
 * cohort file (CSV or Parquet) where `tilefeat join` reads the format (not pt, not stamp).
 *
 * Input, exactly one of:
 *   --input samplesheet.csv   columns `sample,tiles`, validated against assets/schema_input.json;
 *                             `tiles` is a tile folder, a .zip/.tar/.tar.gz/.tgz archive of tiles,
 *                             or a slide file (SLIDE_SUFFIXES; not .mrxs/.vms/.vmu/.dcm, whose
 *                             files beside them would not be staged), tiled by tilefeat with
 *                             --magnification/--mpp, --patch_size, --stride, --tissue;
 *                             a relative `tiles` path is resolved against the samplesheet's folder;
 *                             an optional `slide_mpp` column (else --slide_mpp) is passed as --slide-mpp
 *   --tiles_glob 'root/*'     one sample per matching folder, the folder name being the sample ID
 *
 * --model FILE.pt runs a TorchScript image encoder instead of the ResNet50 (not with --weights);
 * its sidecar FILE.json, when there is one, is staged beside it.
 *
 * --samples_per_task N > 1 runs N samples (in sample-ID order) per extract task, in one
 * tilefeat process (TILEFEAT_EXTRACT_BATCH); its outputs are re-keyed per sample, so the join
 * sees the same [ meta, file ] as with one sample per task (TILEFEAT_EXTRACT).
 *
 * See nextflow/README.md for laptop, Slurm + Apptainer and reuse-as-a-module instructions.
 */

include { validateParameters; paramsSummaryLog; samplesheetToList } from 'plugin/nf-schema'
include { TILEFEAT_EXTRACT       } from './modules/local/tilefeat/extract/main'
include { TILEFEAT_EXTRACT_BATCH } from './modules/local/tilefeat/extract_batch/main'
include { TILEFEAT_JOIN          } from './modules/local/tilefeat/join/main'

// [ batch meta, file or files ] -> one [ sample meta, file(s) ] for each sample of the batch
// (batch meta.samples) that has files `<sample ID><suffix>`, for the suffixes: a failed
// sample has none; clam's .h5 and .pt come as a list, as TILEFEAT_EXTRACT emits them.
def perSample(ch_batch, suffixes) {
    return ch_batch.flatMap { meta, files ->
        def found = [ files ].flatten()
        meta.samples
            .collect { sample -> [ sample, found.findAll { f -> suffixes.any { suffix -> f.name == "${sample.id}${suffix}".toString() } } ] }
            .findAll { row -> row[1] }
            .collect { row -> [ row[0], row[1].size() == 1 ? row[1][0] : row[1] ] }
    }
}

// The formats `tilefeat join` reads (clam: its .h5 files): a .pt bag holds no tile names,
// and join refuses STAMP's micrometre files (exit 3).
def joinable(format) {
    return format in [ 'csv', 'h5', 'parquet', 'clam' ]
}

// The samples a batch task could not extract (its *.failed.tsv: sample, exit_status, error):
// a warning for each as its task ends, all of them in <outdir>/pipeline_info/failed_samples.tsv,
// and one error line naming them when every task is done. The run itself goes on: the other
// samples are joined.
def reportFailedSamples(ch_failed) {
    def rows = ch_failed.flatMap { meta, tsv ->
        tsv.readLines().drop(1).findAll { line -> line }.collect { line -> line.split('\t', 3) as List }
    }
    rows.subscribe { row ->
        log.warn "Sample '${row[0]}' failed (tilefeat extract exit ${row[1]}): ${row[2]}. It has no output files and is left out of the cohort; the other samples of its task are kept."
    }
    rows
        .map { row -> row.join('\t') + '\n' }
        .collectFile( name: 'failed_samples.tsv', seed: 'sample\texit_status\terror\n', storeDir: "${params.outdir}/pipeline_info", sort: true )
    rows
        .map { row -> row[0] }
        .collect()
        .subscribe { ids ->
            log.error "${ids.size()} sample(s) failed and are NOT in the cohort: ${ids.toSorted().join(', ')}. Reasons: ${params.outdir}/pipeline_info/failed_samples.tsv"
        }
}

workflow {
    validateParameters()
    log.info paramsSummaryLog(workflow)

    if ( (params.input ? 1 : 0) + (params.tiles_glob ? 1 : 0) != 1 ) {
        error "Give exactly one of --input (a samplesheet CSV with columns sample,tiles) or --tiles_glob 'root/*'"
    }
    // --model (a TorchScript encoder) replaces the ResNet50, whose weights and layer do not
    // apply to it (tilefeat would refuse them: exit 2).
    if ( params.model && params.weights ) {
        error "Give --model or --weights, not both: --model '${params.model}' replaces the ResNet50, so --weights '${params.weights}' (the ResNet50's weights) does not apply to it"
    }
    if ( params.magnification != null && params.mpp != null ) {
        error "Give --magnification or --mpp, not both: both set the resolution slides are tiled at"
    }
    if ( params.model && params.layer != 'layer4' ) {
        error "--layer ${params.layer} picks a ResNet50 stage: it does not apply to --model '${params.model}' (leave --layer at its default)"
    }
    // --preset sets the ResNet50's layer, pool, normalize and size (tutorial: the defaults;
    // resnet50-trunc: layer3, avg, imagenet, 224); one of them at neither the default nor the
    // preset's value is refused, as tilefeat refuses it (exit 2).
    if ( params.preset && params.model ) {
        error "--preset ${params.preset} sets the ResNet50's settings: it does not apply to --model '${params.model}'"
    }
    if ( params.preset && params.layer != 'layer4' && (params.preset == 'tutorial' || params.layer != 'layer3') ) {
        error "--layer ${params.layer} disagrees with --preset ${params.preset}: leave --layer at its default"
    }
    if ( params.preset && params.pool != 'max' && (params.preset == 'tutorial' || params.pool != 'avg') ) {
        error "--pool ${params.pool} disagrees with --preset ${params.preset}: leave --pool at its default"
    }
    if ( params.preset && params.normalize != 'tutorial' && (params.preset == 'tutorial' || params.normalize != 'imagenet') ) {
        error "--normalize ${params.normalize} disagrees with --preset ${params.preset}: leave --normalize at its default"
    }
    if ( params.preset && params.size != 224 ) {
        error "--size ${params.size} disagrees with --preset ${params.preset} (224 px): leave --size at its default"
    }

    // Archives of tiles and whole-slide images (OpenSlide 4's formats; .ome.tif/.ome.tiff are
    // .tif/.tiff) by suffix, in any case; snakemake/workflow/rules/common.smk has the same lists.
    def TILE_ARCHIVE_SUFFIXES = [ '.zip', '.tar', '.tar.gz', '.tgz' ]
    def SLIDE_SUFFIXES = [ '.svs', '.tif', '.tiff', '.ndpi', '.vms', '.vmu', '.scn', '.mrxs', '.svslide', '.bif', '.dcm' ]
    // Slides whose data lie in files beside the named one (MIRAX's folder, Hamamatsu VMS/VMU's
    // image files, DICOM's other .dcm files): Nextflow stages the named file alone, so they are
    // refused (run them with the Snakemake workflow, which reads them in place).
    def UNSTAGEABLE_SLIDE_SUFFIXES = [ '.mrxs', '.vms', '.vmu', '.dcm' ]

    // [ meta, tile folder, archive or slide ] per sample, built eagerly so that bad input fails before
    // any task runs.
    def samples = []
    if ( params.input ) {
        def samplesheet = file(params.input, checkIfExists: true)
        samples = samplesheetToList(params.input, "${projectDir}/assets/schema_input.json").collect { row ->
            def meta = row[0]
            def tiles = row[1].toString()
            def location = (tiles.startsWith('/') || tiles.contains('://')) ? file(tiles) : samplesheet.parent.resolve(tiles)
            // A tile folder, an archive of tiles or a slide, which tilefeat reads in place (staged as a file).
            def name = location.name.toLowerCase()
            def archive = TILE_ARCHIVE_SUFFIXES.any { suffix -> name.endsWith(suffix) }
            def slide = SLIDE_SUFFIXES.any { suffix -> name.endsWith(suffix) }
            if ( !location.exists() ) {
                error "Sample '${meta.id}': tiles '${tiles}' (resolved to ${location}) does not exist"
            }
            if ( !location.isDirectory() && !archive && !slide ) {
                error "Sample '${meta.id}': tiles '${tiles}' (resolved to ${location}) is a file but neither a tile archive (${TILE_ARCHIVE_SUFFIXES.join(', ')}) nor a slide (${SLIDE_SUFFIXES.join(', ')}); give the sample's tile folder, an archive of its tiles or its slide file (suffixes in any case)"
            }
            if ( !location.isDirectory() && UNSTAGEABLE_SLIDE_SUFFIXES.any { suffix -> name.endsWith(suffix) } ) {
                error "Sample '${meta.id}': tiles '${tiles}' (resolved to ${location}) is a ${UNSTAGEABLE_SLIDE_SUFFIXES.join('/')} slide, whose data lie in files beside it that Nextflow does not stage: run it with the Snakemake workflow (which reads slides in place), or convert it to a single-file format (e.g. pyramidal TIFF)"
            }
            slide = slide && !location.isDirectory()
            // the slide's mpp: the samplesheet's slide_mpp (an empty cell is left out), else --slide_mpp
            // meta.slide: a slide file, which gets the slide flags (conf/modules.config)
            [ meta + [ slide_mpp: meta.slide_mpp ?: params.slide_mpp, slide: slide ], location ]
        }
    } else {
        samples = files(params.tiles_glob, type: 'dir').collect { dir -> [ [ id: dir.name, slide_mpp: params.slide_mpp, slide: false ], dir ] }
        if ( !samples ) {
            error "--tiles_glob '${params.tiles_glob}' matched no folder"
        }
    }
    def dupes = samples.countBy { row -> row[0].id }.findAll { id, n -> n > 1 }.keySet()
    if ( dupes ) {
        error "Duplicate sample IDs (the cohort CSV needs unique ones): ${dupes.join(', ')}"
    }
    // STAMP's layout holds micrometre coordinates: pixel tile names need each slide's mpp,
    // and tilefeat would refuse every sample without it (exit 3) deep in its task.
    def without_mpp = samples.findAll { row -> !row[0].slide_mpp }.collect { row -> row[0].id }
    if ( params.format == 'stamp' && without_mpp ) {
        error "--format stamp writes STAMP's coordinates in micrometres, which needs each slide's micrometres per pixel at level 0: give --slide_mpp F, or a slide_mpp column in the samplesheet; none for ${without_mpp.join(', ')}"
    }

    // Weights: a file is staged into each task, so that containers see it. `random:SEED` goes
    // through ext.args (conf/modules.config); no --weights means the torchvision cache ($TORCH_HOME).
    def weights = (params.weights && !params.weights.toString().startsWith('random:')) ? file(params.weights, checkIfExists: true) : []

    // Model (--model): a TorchScript encoder, staged into each task like the weights, and so is
    // its sidecar when there is one (FILE.json: the model's name with .json for its extension;
    // it sets the size and the normalization), beside it under the same stem, where tilefeat
    // looks for it.
    def model = params.model ? file(params.model, checkIfExists: true) : []
    def model_sidecar = []
    if ( model && model.resolveSibling(model.baseName + '.json').exists() ) {
        model_sidecar = model.resolveSibling(model.baseName + '.json')
    }

    // The feature cache is shared, mutable state: created here, passed as a string, never staged.
    def cache_dir = ''
    if ( params.cache_dir ) {
        def dir = file(params.cache_dir)
        dir.mkdirs()
        cache_dir = dir.toString()
    }

    // Per-sample [ meta, feature file ] and [ meta, provenance ], whichever way they were made.
    def ch_features = channel.empty()
    def ch_provenance = channel.empty()
    if ( params.samples_per_task == 1 ) {
        TILEFEAT_EXTRACT( channel.fromList(samples), weights, model, model_sidecar, cache_dir )
        ch_features = TILEFEAT_EXTRACT.out.features
        ch_provenance = TILEFEAT_EXTRACT.out.provenance
    } else {
        // Batches of samples_per_task samples in sample-ID order (the last one may be smaller),
        // each [ [ id: 'FIRST..LAST', samples: [ meta, ... ] ], [ tiles, ... ] ]. A sample that
        // fails on its own input or output leaves its task's other samples be (reported below).
        // One tilefeat process takes one --slide-mpp: samples of different slide mpps go to
        // different batches (the batches of before when all have the same, or none).
        // With slide flags given, slides and tile folders go to different batches too (the
        // flags are passed to slides only; tilefeat refuses them for tile folders, exit 2).
        def split_slides = [ params.magnification, params.mpp, params.patch_size, params.stride, params.tissue ].any { v -> v != null }
        def batches = samples
            .toSorted { a, b -> a[0].id <=> b[0].id }
            .groupBy { row -> [ row[0].slide_mpp, split_slides && row[0].slide ] }
            .values()
            .collectMany { group -> group.collate( params.samples_per_task as int ) }
            .collect { rows ->
                def ids = rows.collect { row -> row[0].id }
                def id = ids.size() == 1 ? ids[0] : "${ids.first()}..${ids.last()}".toString()
                [ [ id: id, samples: rows.collect { row -> row[0] }, slide_mpp: rows[0][0].slide_mpp, slide: rows.every { row -> row[0].slide } ], rows.collect { row -> row[1] } ]
            }
        TILEFEAT_EXTRACT_BATCH( channel.fromList(batches), weights, model, model_sidecar, cache_dir )
        ch_features = perSample( TILEFEAT_EXTRACT_BATCH.out.features, [ '.csv', '.h5', '.parquet', '.pt' ] )
        ch_provenance = perSample( TILEFEAT_EXTRACT_BATCH.out.provenance, [ '.provenance.yaml' ] )
        reportFailedSamples( TILEFEAT_EXTRACT_BATCH.out.failed )
    }

    // Join every feature file with its provenance file (tilefeat join reads it from beside the
    // feature file), in sample-ID order, so that the cohort does not depend on the order tasks
    // finish in. No sample left (every one failed): no join, an error. clam: the .h5 of each
    // sample (not its .pt bag). pt, stamp: no cohort (tilefeat join refuses them).
    if ( joinable(params.format) ) {
        def ch_join_input = ch_features
            .map { meta, files -> [ meta, [ files ].flatten().find { f -> !f.name.endsWith('.pt') } ] }
            .join( ch_provenance )
            .toSortedList { a, b -> a[0].id <=> b[0].id }
            .map { rows ->
                if ( !rows ) {
                    error "No sample was extracted: nothing to join (see the warnings above and ${params.outdir}/pipeline_info/failed_samples.tsv)"
                }
                [ [ id: params.cohort_id ], rows.collect { row -> row[1] }, rows.collect { row -> row[2] } ]
            }

        TILEFEAT_JOIN( ch_join_input )
    } else {
        log.info "--format ${params.format}: no cohort file (tilefeat join reads csv, h5, parquet and clam's .h5 files, not .pt bags nor STAMP files); the per-sample files are in ${params.outdir}/samples"
    }

    // Software versions from the `versions` topic, one YAML per run.
    channel.topic('versions')
        .map { process, tool, version -> "${process.tokenize(':').last()}:\n  ${tool}: ${version}\n" }
        .unique()
        .collectFile( name: 'software_versions.yml', storeDir: "${params.outdir}/pipeline_info", sort: true )
}
