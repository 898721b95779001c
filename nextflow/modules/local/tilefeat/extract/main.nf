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
// task.ext.format: csv (default), h5, parquet or pt: the per-sample file is
// ${prefix}.<format>; stamp: ${prefix}.h5 in STAMP's layout (micrometre coordinates: pixel
// tile names need meta.slide_mpp); clam: CLAM's ${meta.id}.h5 and ${meta.id}.pt from one
// computation (tilefeat's h5_files/ and pt_files/, moved up into the task folder:
// conf/modules.config publishes them back into h5_files/ and pt_files/; named by meta.id,
// not ext.prefix). The provenance and rejected-tile list are ${prefix}.provenance.yaml and
// ${prefix}.rejected.tsv whatever the format; a .pt bag gets ${prefix}.index.npz (slideflow's
// tile centres) when the tiles have coordinates (emit `index`, optional).
//
// meta.slide_mpp (optional): the slide's micrometres per pixel at level 0, passed as
// --slide-mpp (needed by stamp for pixel tile names; adds level0_magnification to HDF5).
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
    tuple val(meta), path("*.{csv,h5,parquet,pt}"), emit: features
    tuple val(meta), path("*.index.npz"), optional: true, emit: index
    tuple val(meta), path("*.provenance.yaml"), emit: provenance
    tuple val(meta), path("*.tissue.png"), optional: true, emit: tissue
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
    // The file tilefeat writes: STAMP's layout is an .h5 (--format says which), CLAM's two
    // folders (--outdir), moved up into the task folder afterwards.
    def output_arg = format == 'clam' ? '--outdir . --format clam' : (format == 'stamp' ? "--output ${prefix}.h5 --format stamp" : "--output ${prefix}.${format}")
    def slide_mpp_arg = meta.slide_mpp ? " --slide-mpp ${meta.slide_mpp}" : ''
    def clam_flatten = format == 'clam' ? 'mv h5_files/* pt_files/* . && rmdir h5_files pt_files' : ''
    """
    tilefeat extract \\
        ${tiles} \\
        ${output_arg} \\
        --sample '${meta.id}'${slide_mpp_arg} \\
        --device ${device} \\
        --threads ${task.cpus} \\
        ${encoder_arg} \\
        ${cache_arg} \\
        --quiet \\
        ${args}
    ${clam_flatten}
    """

    stub:
    def prefix = task.ext.prefix ?: "${meta.id}"
    def format = task.ext.format ?: 'csv'
    // the files of each format, named as the script's (clam: the sample's .h5 and .pt)
    def name = format == 'clam' ? "${meta.id}" : prefix
    def feature_files = format == 'clam' ? ["${name}.h5", "${name}.pt"] : [format == 'stamp' ? "${name}.h5" : "${name}.${format}"]
    """
    for file in ${feature_files.join(' ')}; do echo 'sample,tile' > "\$file"; done
    echo 'sample: ${meta.id}' > ${name}.provenance.yaml
    printf 'tile\\treason\\n' > ${name}.rejected.tsv
    """
}
