// TILEFEAT_JOIN: per-sample feature CSVs -> one cohort CSV (streaming).
//
// No conda/environment.yml: tilefeat is a Rust binary linked against libtorch and is not
// packaged on Bioconda or conda-forge (see the extract module).
//
// Inputs
//   tuple val(meta), path(csvs), path(provenance)
//       meta.id names the cohort; csvs are `tilefeat extract` outputs and provenance their
//       `*.provenance.yaml` files. Both are staged into the same folder (inputs/) because
//       `tilefeat join` reads each CSV's provenance from beside it. The CSVs are joined in
//       the order given; they are passed through a list file (--from-list), so cohorts of
//       any size stay clear of the command-line length limit.
process TILEFEAT_JOIN {
    tag "$meta.id"
    label 'process_low'

    // Joining needs no GPU: the small CPU image under Docker; the one tilefeat SIF under
    // Apptainer/Singularity.
    container "${ workflow.containerEngine in ['singularity', 'apptainer'] ?
        'oras://ghcr.io/tilefeat/tilefeat:0.1.0-cuda13.0-sif' :
        'ghcr.io/tilefeat/tilefeat:0.1.0-cpu' }"

    input:
    tuple val(meta), path(csvs, stageAs: 'inputs/*'), path(provenance, stageAs: 'inputs/*')

    output:
    tuple val(meta), path("*.csv"), emit: csv
    tuple val(meta), path("*.provenance.yaml"), emit: provenance
    tuple val("${task.process}"), val('tilefeat'), eval("tilefeat --version | sed 's/tilefeat //'"), topic: versions, emit: versions_tilefeat

    when:
    task.ext.when == null || task.ext.when

    script:
    def args = task.ext.args ?: ''
    def prefix = task.ext.prefix ?: "${meta.id}"
    def inputs = (csvs instanceof List ? csvs : [csvs]).collect { csv -> "inputs/${csv.name}" }
    // printf is a shell builtin: no exec, so no ARG_MAX limit however many samples there are.
    """
    printf '%s\\n' ${inputs.join(' ')} > ${prefix}.inputs.txt

    tilefeat join \\
        --from-list ${prefix}.inputs.txt \\
        --output ${prefix}.csv \\
        --quiet \\
        ${args}
    """

    stub:
    def prefix = task.ext.prefix ?: "${meta.id}"
    """
    echo 'sample,tile' > ${prefix}.csv
    echo 'inputs: []' > ${prefix}.provenance.yaml
    """
}
