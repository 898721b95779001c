// TILEFEAT_JOIN: per-sample feature files -> one cohort file (streaming): CSV, or Parquet
// with task.ext.format.
//
// No conda/environment.yml: tilefeat is a Rust binary linked against libtorch and is not
// packaged on Bioconda or conda-forge (see the extract module).
//
// Inputs
//   tuple val(meta), path(features), path(provenance)
//       meta.id names the cohort; features are `tilefeat extract` outputs (.csv, .h5 or
//       .parquet, mixed if need be) and provenance their `*.provenance.yaml` files. Both are
//       staged into the same folder (inputs/) because `tilefeat join` reads each file's
//       provenance from beside it. They are joined in the order given; they are passed
//       through a list file (--from-list), so cohorts of any size stay clear of the
//       command-line length limit.
//
// task.ext.format: csv (default) or parquet, the cohort file being ${prefix}.<format>.
process TILEFEAT_JOIN {
    tag "$meta.id"
    label 'process_low'

    // Joining needs no GPU: the small CPU image under Docker; the one tilefeat SIF under
    // Apptainer/Singularity.
    container "${ workflow.containerEngine in ['singularity', 'apptainer'] ?
        'oras://ghcr.io/tilefeat/tilefeat:0.1.0-cuda13.0-sif' :
        'ghcr.io/tilefeat/tilefeat:0.1.0-cpu' }"

    input:
    tuple val(meta), path(features, stageAs: 'inputs/*'), path(provenance, stageAs: 'inputs/*')

    output:
    tuple val(meta), path("*.{csv,parquet}"), emit: cohort
    tuple val(meta), path("*.provenance.yaml"), emit: provenance
    tuple val("${task.process}"), val('tilefeat'), eval("tilefeat --version | sed 's/tilefeat //'"), topic: versions, emit: versions_tilefeat

    when:
    task.ext.when == null || task.ext.when

    script:
    def args = task.ext.args ?: ''
    def prefix = task.ext.prefix ?: "${meta.id}"
    def format = task.ext.format ?: 'csv'
    // A staged input's .name includes its stageAs folder (inputs/x.csv); .fileName.name is x.csv.
    def inputs = (features instanceof List ? features : [features]).collect { f -> "inputs/${f.fileName.name}" }
    // printf is a shell builtin: no exec, so no ARG_MAX limit however many samples there are.
    """
    printf '%s\\n' ${inputs.join(' ')} > ${prefix}.inputs.txt

    tilefeat join \\
        --from-list ${prefix}.inputs.txt \\
        --output ${prefix}.${format} \\
        --quiet \\
        ${args}
    """

    stub:
    def prefix = task.ext.prefix ?: "${meta.id}"
    def format = task.ext.format ?: 'csv'
    """
    echo 'sample,tile' > ${prefix}.${format}
    echo 'inputs: []' > ${prefix}.provenance.yaml
    """
}
