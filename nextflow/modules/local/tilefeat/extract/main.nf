// TILEFEAT_EXTRACT: one sample's tile folder (or tile archive) -> per-tile ResNet50 features,
// or a TorchScript model's (input `model`) (CSV; HDF5 or Parquet with task.ext.format).
//
// No conda/environment.yml: tilefeat is a Rust binary linked against libtorch and is not
// packaged on Bioconda or conda-forge, so this module runs from the tilefeat container
// image (or from a `tilefeat` already on PATH when no container engine is enabled).
//
// Inputs
//   tuple val(meta), path(tiles) : meta.id is the sample ID; tiles is the sample's tile folder,
//                                  or an archive of its tiles (.zip, .tar, .tar.gz, .tgz, any
//                                  case), staged as a file and read in place by tilefeat.
//   path weights                 : a torchvision .pth / .safetensors file, staged so the
//                                  container sees it; pass [] to use the default weights
//                                  (or `--weights random:SEED` through ext.args).
//   path model                   : a TorchScript image encoder (FILE.pt, e.g. from
//                                  scripts/export_encoder.py) run instead of the ResNet50
//                                  (`--model`), staged like the weights; [] for the ResNet50.
//                                  Not with weights (tilefeat refuses both, exit 2), nor with
//                                  --layer in ext.args.
//   path model_sidecar           : the model's sidecar FILE.json (the same stem as the model:
//                                  it sets the size and the normalization), staged beside it,
//                                  where tilefeat looks for it; [] when it has none.
//   val cache_dir                : absolute path of a shared feature cache, passed as a
//                                  string and NEVER staged (it is shared, mutable state);
//                                  '' or null means `--no-cache`. The pipeline must make
//                                  the folder visible inside the container (see
//                                  nextflow/conf/modules.config, containerOptions).
//
// task.ext.format: csv (default), h5 or parquet: the per-sample file is ${prefix}.<format>,
// its provenance and rejected-tile list beside it as ${prefix}.provenance.yaml and
// ${prefix}.rejected.tsv whatever the format.
process TILEFEAT_EXTRACT {
    tag "$meta.id"
    label 'process_gpu'

    // The Docker image follows the task: the CUDA image when a GPU is requested
    // (task.accelerator), the much smaller CPU image otherwise. Apptainer/Singularity
    // always use the CUDA SIF, which also runs on CPU-only nodes.
    container "${ workflow.containerEngine in ['singularity', 'apptainer'] ?
        'oras://ghcr.io/tilefeat/tilefeat:0.1.0-cuda13.0-sif' :
        (task.accelerator ? 'ghcr.io/tilefeat/tilefeat:0.1.0-cuda13.0' : 'ghcr.io/tilefeat/tilefeat:0.1.0-cpu') }"

    input:
    tuple val(meta), path(tiles)
    path weights
    path model
    path model_sidecar
    val cache_dir

    output:
    tuple val(meta), path("*.{csv,h5,parquet}"), emit: features
    tuple val(meta), path("*.provenance.yaml"), emit: provenance
    tuple val(meta), path("*.rejected.tsv"), emit: rejected
    tuple val("${task.process}"), val('tilefeat'), eval("tilefeat --version | sed 's/tilefeat //'"), topic: versions, emit: versions_tilefeat

    when:
    task.ext.when == null || task.ext.when

    script:
    def args = task.ext.args ?: ''
    def prefix = task.ext.prefix ?: "${meta.id}"
    def format = task.ext.format ?: 'csv'
    // Ask for CUDA only when the task was given a GPU; never rely on `auto`, so a GPU
    // job that lost its GPU fails (exit 5) instead of silently running on CPU.
    def device = task.accelerator ? 'cuda' : 'cpu'
    // The encoder's file: the ResNet50's weights, or a TorchScript model (whose sidecar,
    // staged beside it, tilefeat reads by itself); neither for the defaults. Both: tilefeat
    // refuses them (exit 2).
    def encoder_arg = [ weights ? "--weights ${weights}" : '', model ? "--model ${model}" : '' ].findAll { arg -> arg }.join(' ')
    def cache_arg = cache_dir ? "--cache-dir '${cache_dir}'" : '--no-cache'
    """
    tilefeat extract \\
        ${tiles} \\
        --output ${prefix}.${format} \\
        --sample '${meta.id}' \\
        --device ${device} \\
        --threads ${task.cpus} \\
        ${encoder_arg} \\
        ${cache_arg} \\
        --quiet \\
        ${args}
    """

    stub:
    def prefix = task.ext.prefix ?: "${meta.id}"
    def format = task.ext.format ?: 'csv'
    """
    echo 'sample,tile' > ${prefix}.${format}
    echo 'sample: ${meta.id}' > ${prefix}.provenance.yaml
    printf 'tile\\treason\\n' > ${prefix}.rejected.tsv
    """
}
