// TILEFEAT_EXTRACT_BATCH: several samples' tile folders (or tile archives) -> one per-tile
// feature file per sample, in ONE `tilefeat extract DIR... --outdir .` process, which sets
// the weights, the model and the GPU up once for all of them (on a GPU, start-up costs more
// than a small slide's compute).
//
// No conda/environment.yml: tilefeat is a Rust binary linked against libtorch and is not
// packaged on Bioconda or conda-forge (see the extract module).
//
// Inputs
//   tuple val(meta), path(tiles) : meta.id names the batch (tag, ${prefix}.failed.tsv);
//                                  meta.samples is the list of the samples' meta maps
//                                  (meta.samples[i].id is a sample ID); tiles is the list of
//                                  their tile folders or archives, in the same order. Each is
//                                  staged in its own folder (tiles01/, tiles02/, ...), so two
//                                  samples' folders may have the same name.
//   path weights                 : as in TILEFEAT_EXTRACT ([] for the default weights).
//   path model                   : as in TILEFEAT_EXTRACT (a TorchScript FILE.pt, [] for the
//                                  ResNet50).
//   path model_sidecar           : as in TILEFEAT_EXTRACT (its FILE.json, [] for none).
//   val cache_dir                : as in TILEFEAT_EXTRACT (a string, never staged).
//
// A sample that fails on its own input or output (tilefeat exit 3 or 6: no tiles, a bad tile
// with --on-error fail, an unwritable file) leaves no files and does not fail the task: the
// other samples are written and emitted, and the failed ones are listed in
// ${prefix}.failed.tsv (`sample<TAB>exit_status<TAB>error`, header only when none). Any other
// exit status (weights, device, cache, usage, a crash) fails the task as usual.
//
// task.ext.format: as TILEFEAT_EXTRACT's (csv, h5, parquet, pt, stamp or clam). Each sample's
// files are <id>.<format> (stamp: <id>.h5; clam: <id>.h5 and <id>.pt, tilefeat's h5_files/
// and pt_files/ moved up into the task folder, published back into them by
// conf/modules.config), <id>.provenance.yaml, <id>.rejected.tsv, and for a .pt bag
// <id>.index.npz when the tiles have coordinates.
//
// meta.slide_mpp (optional): the batch's slides' micrometres per pixel at level 0, passed as
// --slide-mpp (one per tilefeat process: main.nf batches samples of the same slide_mpp).
//
// Outputs are per batch: [ meta, file(s) ]. A caller re-keys them to [ sample meta, file ]
// by name: each sample's files are <id>.<format>, <id>.provenance.yaml, <id>.rejected.tsv
// (nextflow/main.nf, perSample).
process TILEFEAT_EXTRACT_BATCH {
    tag "$meta.id"
    label 'process_gpu'

    // As TILEFEAT_EXTRACT: the CUDA image when a GPU is requested, the CPU image otherwise;
    // Apptainer/Singularity always use the CUDA SIF.
    container "${ workflow.containerEngine in ['singularity', 'apptainer'] ?
        'oras://ghcr.io/tilefeat/tilefeat:0.1.0-cuda13.0-sif' :
        (task.accelerator ? 'ghcr.io/tilefeat/tilefeat:0.1.0-cuda13.0' : 'ghcr.io/tilefeat/tilefeat:0.1.0-cpu') }"

    input:
    tuple val(meta), path(tiles, stageAs: 'tiles??/*')
    path weights
    path model
    path model_sidecar
    val cache_dir

    output:
    tuple val(meta), path("*.{csv,h5,parquet,pt}"), optional: true, emit: features
    tuple val(meta), path("*.index.npz"), optional: true, emit: index
    tuple val(meta), path("*.provenance.yaml"), optional: true, emit: provenance
    tuple val(meta), path("*.rejected.tsv"), optional: true, emit: rejected
    tuple val(meta), path("*.tissue.png"), optional: true, emit: tissue
    tuple val(meta), path("*.failed.tsv"), emit: failed
    tuple val("${task.process}"), val('tilefeat'), eval("tilefeat --version | sed 's/tilefeat //'"), topic: versions, emit: versions_tilefeat

    when:
    task.ext.when == null || task.ext.when

    script:
    def args = task.ext.args ?: ''
    def prefix = task.ext.prefix ?: "${meta.id}"
    def format = task.ext.format ?: 'csv'
    // Ask for CUDA only when the task was given a GPU (as TILEFEAT_EXTRACT).
    def device = task.accelerator ? 'cuda' : 'cpu'
    // The encoder's file: the ResNet50's weights, or a TorchScript model (as TILEFEAT_EXTRACT).
    def encoder_arg = [ weights ? "--weights ${weights}" : '', model ? "--model ${model}" : '' ].findAll { arg -> arg }.join(' ')
    def cache_arg = cache_dir ? "--cache-dir '${cache_dir}'" : '--no-cache'
    // csv is tilefeat's default: no --format then (the command of a csv run stays as it was)
    def format_arg = format == 'csv' ? '' : "--format ${format}"
    def slide_mpp_arg = meta.slide_mpp ? " --slide-mpp ${meta.slide_mpp}" : ''
    // Each sample's files once written (and moved up from clam's h5_files/ and pt_files/).
    def suffixes = format == 'clam' ? ['h5', 'pt', 'provenance.yaml', 'rejected.tsv'] : [format == 'stamp' ? 'h5' : format, 'provenance.yaml', 'rejected.tsv']
    def sample_files = suffixes.collect { suffix -> "\"\$sample.${suffix}\"" }
    def tile_list = tiles instanceof List ? tiles : [tiles]
    def tile_args = tile_list.collect { t -> "'${t}'" }.join(' ')
    def sample_args = meta.samples.collect { s -> "--sample '${s.id}'" }.join(' ')
    def sample_ids = meta.samples.collect { s -> "'${s.id}'" }.join(' ')
    """
    # Exit 3 (a sample's input) or 6 (a sample's output): tilefeat wrote the other samples and
    # names the failed ones; they are listed in ${prefix}.failed.tsv and the task succeeds.
    # Any other non-zero exit status fails the task.
    status=0
    tilefeat extract \\
        ${tile_args} \\
        --outdir . \\
        ${sample_args}${slide_mpp_arg} \\
        ${format_arg} \\
        --device ${device} \\
        --threads ${task.cpus} \\
        ${encoder_arg} \\
        ${cache_arg} \\
        --quiet \\
        ${args} \\
        2> ${prefix}.extract.err || status=\$?
    cat ${prefix}.extract.err >&2
    if [ \$status -ne 0 ] && [ \$status -ne 3 ] && [ \$status -ne 6 ]; then
        exit \$status
    fi

    # clam: each sample's files up from h5_files/ and pt_files/ (published back into them)
    for file in h5_files/* pt_files/*; do
        if [ -f "\$file" ]; then mv "\$file" .; fi
    done

    # A sample without all of its files failed: tilefeat leaves none of a failed
    # sample's files (any leftover is removed, so that only complete samples are emitted).
    printf 'sample\\texit_status\\terror\\n' > ${prefix}.failed.tsv
    for sample in ${sample_ids}; do
        complete=1
        for file in ${sample_files.join(' ')}; do
            if [ ! -f "\$file" ]; then complete=0; fi
        done
        if [ \$complete -eq 1 ]; then
            continue
        fi
        rm -f ${sample_files.join(' ')} "\$sample.index.npz" "\$sample.tissue.png"
        error=\$(awk -v p="tilefeat: error: sample \$sample: " 'index(\$0, p) == 1 { print substr(\$0, length(p) + 1); exit }' ${prefix}.extract.err)
        if [ -z "\$error" ]; then
            # one sample in the command: its error is not prefixed with its ID
            error=\$(awk '/^tilefeat: error: / && !/ samples failed \\(/ { print substr(\$0, 18); exit }' ${prefix}.extract.err)
        fi
        error=\$(printf '%s' "\${error:-no message, see the .command.err of the task}" | tr '\\t' ' ')
        printf '%s\\t%s\\t%s\\n' "\$sample" "\$status" "\$error" >> ${prefix}.failed.tsv
    done
    failed=\$(( \$(wc -l < ${prefix}.failed.tsv) - 1 ))
    if [ \$status -eq 0 ] && [ \$failed -ne 0 ]; then
        echo "tilefeat extract exited 0 but left \$failed sample(s) without their files" >&2
        exit 1
    fi
    if [ \$status -ne 0 ] && [ \$failed -eq 0 ]; then
        echo "tilefeat extract exited \$status although every sample's files were written" >&2
        exit \$status
    fi
    """

    stub:
    def prefix = task.ext.prefix ?: "${meta.id}"
    def format = task.ext.format ?: 'csv'
    def sample_ids = meta.samples.collect { s -> "'${s.id}'" }.join(' ')
    // the files of each format, as the script's (clam: each sample's .h5 and .pt)
    def suffixes = format == 'clam' ? ['h5', 'pt'] : [format == 'stamp' ? 'h5' : format]
    """
    for sample in ${sample_ids}; do
        for suffix in ${suffixes.join(' ')}; do echo 'sample,tile' > "\$sample.\$suffix"; done
        echo "sample: \$sample" > "\$sample.provenance.yaml"
        printf 'tile\\treason\\n' > "\$sample.rejected.tsv"
    done
    printf 'sample\\texit_status\\terror\\n' > ${prefix}.failed.tsv
    """
}
