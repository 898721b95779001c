//! Command-line surface: the clap definitions of every subcommand and flag.
//!
//! This module only *parses*. Turning the parsed flags into a validated configuration
//! (resolving paths, checking ranges, reading environment defaults) is done by
//! `ExtractPlan::from_cli_arguments` and friends, so that the rest of the program never
//! sees a raw, unchecked flag. The workflow modules (Nextflow, Snakemake) call exactly
//! these flags; `tests/` checks that they cannot drift apart.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Per-tile ResNet50 deep features for computational pathology.
///
/// Exit codes: 0 success, 1 internal error, 2 usage error, 3 bad input (tile folder, tile,
/// CSV), 4 bad weights or model, 5 device unavailable, 6 cannot write output, 7 cache
/// error, 130/143/129 interrupted (SIGINT/SIGTERM/SIGHUP).
#[derive(Debug, Parser)]
#[command(
    name = "tilefeat",
    version,
    about,
    long_about = None,
    propagate_version = true,
    after_help = "Exit codes: 0 success, 1 internal error, 2 usage error, 3 bad input (tile folder, \
                  tile, CSV), 4 bad weights or model, 5 device unavailable, 6 cannot write output, 7 cache \
                  error, 130/143/129 interrupted (SIGINT/SIGTERM/SIGHUP: the same command resumes)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once per process: the size of `extract`'s many flags costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Turn one sample's tiles (a folder or a zip/tar archive) into a per-tile feature file:
    /// CSV, HDF5, Parquet or a .pt bag (or several samples, one file each, in one process).
    Extract(ExtractArgs),
    /// Join per-sample feature files (CSV, HDF5, Parquet) into one cohort CSV or Parquet
    /// (streaming).
    Join(JoinArgs),
    /// Show tilefeat and libtorch versions, CUDA/cuDNN availability, devices and threads.
    Info,
    /// Inspect and maintain a feature cache directory.
    Cache {
        #[command(subcommand)]
        command: CacheCommand,
    },
    /// Locate, verify or download ResNet50 weights.
    Weights {
        #[command(subcommand)]
        command: WeightsCommand,
    },
    /// Measure: model-only throughput (the ceiling for `extract`), decoding, the pipeline without
    /// the network, SHA-256 speed, cache opening.
    Bench(BenchArgs),
    /// Write the exact pixels the network sees for one tile (decoded, resized; RGB PNG).
    Preprocess(PreprocessArgs),
}

#[derive(Debug, Args)]
pub struct PreprocessArgs {
    /// A tile (PNG, JPEG or TIFF).
    pub image: PathBuf,
    /// Output PNG (8-bit RGB).
    #[arg(short, long)]
    pub output: PathBuf,
    /// Resize to SIZE x SIZE, as `extract --size`.
    #[arg(long, default_value_t = 224)]
    pub size: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    Fp32,
    Bf16,
    Fp16,
}

/// The spelling users type (`fp32`), for messages.
pub fn value_name(v: &impl ValueEnum) -> String {
    v.to_possible_value()
        .map_or_else(String::new, |p| p.get_name().to_string())
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&value_name(self))
    }
}

impl std::fmt::Display for Layer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&value_name(self))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layer {
    Layer3,
    Layer4,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pool {
    Max,
    Avg,
}

/// `extract --preset`: the settings of a published recipe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Preset {
    /// The tutorial notebook's: layer4, max pool, mean = std = 0.5, 224 px.
    Tutorial,
    /// CLAM's `resnet50_trunc` and TRIDENT's `resnet50`: layer3, average pool, ImageNet
    /// statistics, 224 px.
    #[value(name = "resnet50-trunc", alias = "resnet50_trunc")]
    Resnet50Trunc,
}

impl Preset {
    /// Its layer, pool, normalization and size.
    pub fn settings(self) -> (Layer, Pool, Normalize, u32) {
        match self {
            Preset::Tutorial => (Layer::Layer4, Pool::Max, Normalize::Tutorial, 224),
            Preset::Resnet50Trunc => (Layer::Layer3, Pool::Avg, Normalize::Imagenet, 224),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Normalize {
    /// mean = std = 0.5 per channel, as the tutorial notebook does.
    Tutorial,
    /// ImageNet statistics (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225).
    Imagenet,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnError {
    /// Stop at the first unreadable tile.
    Fail,
    /// Record unreadable tiles in the provenance and `*.rejected.tsv`, go on.
    Skip,
}

#[derive(Debug, Clone, Args)]
#[command(after_help = "Examples:
  tilefeat extract tiles/S1 -o features/S1.csv          # the tutorial's numbers
  tilefeat extract S1.zip -o features/S1.h5 --preset resnet50-trunc    # CLAM's
  tilefeat extract slides/*.svs --outdir features --format h5 --cache-dir /scratch/tilefeat-cache
  tilefeat extract S1.svs -o S1.h5 --mpp 0.5 --patch-size 224 --tissue bwh_biopsy

Tuning (environment switches: 0, false, no or off turn one off, any other value \
on; the GPU settings are recorded in the provenance): \
TILEFEAT_NO_HEAP_TUNING=1 keeps glibc's heap defaults (less memory, slower on a CPU); \
TILEFEAT_CUDNN_BENCHMARK=1 autotunes cuDNN's algorithms on each model worker's first batch \
(default: cuDNN's heuristics); TILEFEAT_CUDA_SLEEP=1 makes threads sleep while they wait for \
the GPU (default: CUDA's own choice, which spins while CPUs are free); TILEFEAT_CUDA_STREAMS=0 \
makes the GPU model workers share the device's default stream (default: a stream each).")]
pub struct ExtractArgs {
    /// Folder holding one sample's tiles (searched recursively), or an archive of them read
    /// in place: .zip, .tar, .tar.gz, .tgz (the sample is then named after the archive,
    /// without its suffix), or a whole-slide image read through OpenSlide (.svs, .ndpi,
    /// .mrxs, .tiff, ...; any other file: see --mpp, --patch-size). Several (with --outdir) are extracted one after the other in one
    /// process, which sets the weights, the model and the GPU up once: on a GPU that saves
    /// seconds per sample.
    #[arg(required = true, value_name = "TILE_DIR")]
    pub tile_dirs: Vec<PathBuf>,

    /// Output feature file (one tile folder), replaced atomically; its extension sets the
    /// format: .csv, .h5/.hdf5 (CLAM/TRIDENT layout), .parquet or .pt. The provenance
    /// (`OUT.provenance.yaml`) and the rejected-tile list (`OUT.rejected.tsv`) are written
    /// beside it.
    #[arg(
        short,
        long,
        value_name = "OUT.csv|OUT.h5|OUT.parquet|OUT.pt",
        required_unless_present = "outdir",
        conflicts_with = "outdir"
    )]
    pub output: Option<PathBuf>,

    /// Output folder (created if missing): `SAMPLE.csv` (or .h5, .parquet, .pt: see --format),
    /// with its provenance and rejected-tile list, for each tile folder, SAMPLE being its
    /// --sample or the folder's name. With --format clam: `h5_files/SAMPLE.h5` and
    /// `pt_files/SAMPLE.pt`, as CLAM's training reads them.
    #[arg(long, value_name = "DIR")]
    pub outdir: Option<PathBuf>,

    /// Feature file format [default: from --output's extension; csv with --outdir]. For the
    /// MIL tools: `h5` (TRIDENT; CLAM's heatmaps), `clam` (CLAM's h5_files/ + pt_files/,
    /// with --outdir), `pt` (slideflow: SAMPLE.pt + SAMPLE.index.npz), `stamp` (STAMP's
    /// HDF5 layout, coordinates in micrometres: needs --slide-mpp for pixel tile names).
    #[arg(long, value_enum)]
    pub format: Option<crate::output::Format>,

    /// Tile coordinates from tile names: `auto` (histolab, QuPath, TRIDENT, STAMP or slideflow
    /// names, when every tile follows the same one), `none`, or a regex with named groups x
    /// and y (level-0 top-left pixels). They go into HDF5 (`coords`) and Parquet (`x`, `y`)
    /// whenever found; into the CSV (`tile,x,y,...`) only when this flag is given. Given
    /// explicitly, a tile whose name gives no coordinates fails the sample [default: auto,
    /// without failing].
    #[arg(long, value_name = "auto|none|REGEX")]
    pub coords: Option<String>,

    /// The tiles' extent in level-0 pixels: converts centre coordinates (slideflow names) to
    /// the top-left corners HDF5's `coords` holds, and is recorded as `patch_size_level0`.
    #[arg(long, value_name = "PX")]
    pub patch_size_level0: Option<u64>,

    /// The slide's micrometres per pixel at level 0 (full resolution), e.g. 0.25 for a 40x
    /// scan: converts micrometre tile names (STAMP) to level-0 pixels for HDF5 and pixel
    /// names to micrometres for --format stamp, and gives `level0_magnification` (10 / F).
    /// For a slide: instead of the resolution it records (none, or a wrong one).
    #[arg(long, value_name = "F")]
    pub slide_mpp: Option<f64>,

    /// Sample ID recorded in the provenance (and with --outdir, the output's name) [default:
    /// the tile folder's name]. With several tile folders: once per folder, in their order.
    #[arg(long, value_name = "ID")]
    pub sample: Vec<String>,

    /// Weights: a torchvision `.pth` state dict or a `.safetensors` file; `random:SEED` for
    /// demos and benchmarks (NOT trained features). Default: the torchvision cache
    /// ($TORCH_HOME/hub/checkpoints/resnet50-0676ba61.pth).
    #[arg(long, value_name = "FILE", env = "TILEFEAT_WEIGHTS")]
    pub weights: Option<String>,

    /// Compute device: auto (CUDA if available, else CPU), cpu, cuda, cuda:N.
    #[arg(long, default_value = "auto", value_name = "auto|cpu|cuda|cuda:N")]
    pub device: String,

    /// Tiles per model batch [default: 32 on a GPU; 4 on the CPU, where each tile is computed
    /// on its own whatever the batch (the rows are the same), so that progress and the first
    /// rows come sooner].
    #[arg(long, value_name = "N")]
    pub batch_size: Option<usize>,

    /// CPU threads in total [default: all cores, or the Slurm/cgroup allocation].
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,

    /// Threads that read, hash, decode and resize tiles [default: derived from --threads].
    #[arg(long, value_name = "N")]
    pub decode_threads: Option<usize>,

    /// Arithmetic precision of the model.
    #[arg(long, value_enum, default_value_t = Precision::Fp32)]
    pub precision: Precision,

    /// Which ResNet50 stage's output to pool [default: layer4].
    #[arg(long, value_enum)]
    pub layer: Option<Layer>,

    /// A TorchScript image model to run instead of the ResNet50 (`torch.jit.trace`/`script`,
    /// e.g. from scripts/export_encoder.py): it gets float32 (N, 3, SIZE, SIZE) batches
    /// preprocessed as the ResNet's and returns (N, D), or (N, C, H, W) pooled with --pool. A
    /// sidecar FILE.json beside it (from the export script) sets --size, --mean and --std.
    #[arg(long, value_name = "FILE.pt", conflicts_with = "layer")]
    pub model: Option<PathBuf>,

    /// Run a --model whose code calls operations that read or write files (refused by default:
    /// a TorchScript model is code; only for models you trust).
    #[arg(long, requires = "model")]
    pub allow_unsafe_model: bool,

    /// Global spatial pooling of that output [default: max].
    #[arg(long, value_enum)]
    pub pool: Option<Pool>,

    /// A published recipe's settings in one flag: `tutorial` (the defaults: layer4, max pool,
    /// mean = std = 0.5, 224 px; 2048 values) or `resnet50-trunc` (CLAM's `resnet50_trunc`,
    /// TRIDENT's `resnet50`: layer3, average pool, ImageNet mean and std, 224 px; 1024
    /// values). A flag given with it must agree with it.
    #[arg(long, value_enum, conflicts_with = "model")]
    pub preset: Option<Preset>,

    /// Input normalization [default: tutorial, or a --model's sidecar].
    #[arg(long, value_enum, conflicts_with_all = ["mean", "std"])]
    pub normalize: Option<Normalize>,

    /// Normalization mean per channel, R,G,B on the 0-1 scale (with --std), e.g.
    /// 0.707223,0.578729,0.703617.
    #[arg(long, value_name = "R,G,B", value_parser = parse_rgb, requires = "std")]
    pub mean: Option<[f32; 3]>,

    /// Normalization standard deviation per channel, R,G,B (with --mean).
    #[arg(long, value_name = "R,G,B", value_parser = parse_rgb, requires = "mean")]
    pub std: Option<[f32; 3]>,

    /// Every tile is resized to SIZE x SIZE (OpenCV INTER_LINEAR arithmetic) [default: 224,
    /// or a --model's sidecar].
    #[arg(long, value_name = "PX")]
    pub size: Option<u32>,

    /// Memory layout of activations: nhwc (channels-last) is faster on current CPUs and GPUs.
    #[arg(long, default_value = "nhwc", value_parser = ["nhwc", "nchw"])]
    pub layout: String,

    /// What to do with a tile that cannot be read or decoded.
    #[arg(long, value_enum, default_value_t = OnError::Fail)]
    pub on_error: OnError,

    /// Feature cache directory shared across runs, processes and nodes [default:
    /// .tilefeat-cache in the output's folder (--outdir, or --output's folder), so an
    /// interrupted run resumes where it stopped; TILEFEAT_DEFAULT_CACHE=0 turns that default
    /// off].
    #[arg(long, value_name = "DIR", env = "TILEFEAT_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,

    /// Do not use a cache, even if --cache-dir or TILEFEAT_CACHE_DIR is given.
    #[arg(long)]
    pub no_cache: bool,

    /// Recompute every tile (no cache lookups; computed vectors are still stored) and write
    /// the outputs even when they are up to date.
    #[arg(long)]
    pub force: bool,

    /// Print where the time went (reading, hashing, decoding, model, writing) at the end.
    #[arg(long)]
    pub profile: bool,

    /// Validate options, weights and tile folder, print the plan, compute nothing.
    #[arg(long)]
    pub dry_run: bool,

    /// No progress output (errors are still printed).
    #[arg(short, long)]
    pub quiet: bool,

    /// Slides: read tiles at F µm/px [default: --magnification 20, i.e. 0.5 µm/px].
    #[arg(long, value_name = "F", conflicts_with = "magnification")]
    pub mpp: Option<f64>,

    /// Slides: read tiles at the resolution of an M x objective, 10/M µm/px (20: 0.5 µm/px,
    /// 40: 0.25) [default: 20].
    #[arg(long, value_name = "M")]
    pub magnification: Option<f64>,

    /// Slides: a tile's side in pixels at that resolution (then resized to --size) [default:
    /// 256].
    #[arg(long, value_name = "PX")]
    pub patch_size: Option<u32>,

    /// Slides: the step between tiles in pixels at that resolution (less than --patch-size:
    /// overlapping tiles) [default: the patch size].
    #[arg(long, value_name = "PX")]
    pub stride: Option<u32>,

    /// Slides: keep the tiles on tissue, found as CLAM finds it (saturation, median blur,
    /// threshold, closing, contours with holes, area filters) with its default settings
    /// (`clam`) or its presets (`tcga`, `bwh_biopsy`); `none` keeps every tile. A picture of
    /// the tissue and the kept tiles goes beside the output (OUT.tissue.png) [default: clam].
    #[arg(long, value_name = "clam|tcga|bwh_biopsy|none")]
    pub tissue: Option<String>,
}

/// `R,G,B`: three finite numbers.
fn parse_rgb(s: &str) -> Result<[f32; 3], String> {
    let v: Vec<f32> = s
        .split(',')
        .map(|x| x.trim().parse::<f32>())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{s:?}: {e}"))?;
    match v.as_slice() {
        [r, g, b] if v.iter().all(|x| x.is_finite()) => Ok([*r, *g, *b]),
        _ => Err(format!("{s:?}: expected three numbers R,G,B")),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Aggregate {
    /// One row per tile: `sample,tile,0..D-1`.
    None,
    /// One row per sample: `sample,n_tiles,0..D-1`, the mean over its tiles.
    Mean,
    /// One row per sample: `sample,n_tiles,0..D-1`, the maximum over its tiles.
    Max,
}

#[derive(Debug, Args)]
pub struct JoinArgs {
    /// Per-sample feature files written by `tilefeat extract`, CSV, HDF5 or Parquet (their
    /// provenance files beside them).
    pub inputs: Vec<PathBuf>,

    /// Output cohort file, CSV or Parquet (from its extension).
    #[arg(short, long, value_name = "COHORT.csv|COHORT.parquet")]
    pub output: PathBuf,

    /// Aggregate tiles to one row per sample.
    #[arg(long, value_enum, default_value_t = Aggregate::None)]
    pub aggregate: Aggregate,

    /// Read input paths from FILE, one per line (for cohorts too large for a command line).
    #[arg(long, value_name = "FILE")]
    pub from_list: Option<PathBuf>,

    /// No progress output.
    #[arg(short, long)]
    pub quiet: bool,
}

#[derive(Debug, Subcommand)]
pub enum CacheCommand {
    /// Entries, bytes, packs and fingerprints present.
    Stats(CacheDirArg),
    /// Check every record's checksum; exit 7 if anything is damaged.
    Verify(CacheDirArg),
    /// Compact all sealed packs into one, dropping damaged records and unwanted fingerprints.
    Gc(CacheGcArgs),
}

#[derive(Debug, Args)]
pub struct CacheDirArg {
    #[arg(long, value_name = "DIR", env = "TILEFEAT_CACHE_DIR")]
    pub cache_dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct CacheGcArgs {
    #[arg(long, value_name = "DIR", env = "TILEFEAT_CACHE_DIR")]
    pub cache_dir: PathBuf,

    /// Keep only these fingerprints (hex id or unique prefix, as `cache stats` shows). Repeatable.
    #[arg(long, value_name = "FP")]
    pub keep: Vec<String>,

    /// Drop fingerprints not used since this date (YYYY-MM-DD).
    #[arg(long, value_name = "DATE")]
    pub unused_since: Option<String>,

    /// Treat a pack still open by a writer on another host as abandoned after this many hours.
    #[arg(long, default_value_t = 24, value_name = "HOURS")]
    pub stale_after_hours: u64,
}

#[derive(Debug, Subcommand)]
pub enum WeightsCommand {
    /// Print where the default weights are looked for and whether they are there.
    Where,
    /// Check a weights file: every key and shape, and its SHA-256.
    Verify {
        /// `.pth` or `.safetensors` file.
        file: PathBuf,
    },
    /// Download torchvision's resnet50-0676ba61.pth into the torchvision cache (needs network;
    /// run on a login node) and verify its SHA-256. From a site mirror: TILEFEAT_WEIGHTS_URL
    /// (any URL curl or wget reads, file:// too) and TILEFEAT_WEIGHTS_SHA256 (the mirror
    /// file's SHA-256, or its first hex digits; default torchvision's 0676ba61).
    Fetch {
        /// Destination directory [default: $TORCH_HOME/hub/checkpoints].
        #[arg(long, value_name = "DIR")]
        dest: Option<PathBuf>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchWhat {
    /// ResNet trunk throughput on random input.
    Model,
    /// SHA-256 throughput of the tile hasher (one core).
    Hash,
    /// Opening a cache of --entries records from --packs writers: time, memory, lookups of
    /// present and absent keys; then `cache gc` on it and again (give it a scratch folder).
    CacheOpen,
    /// Read, hash, decode and resize the tiles of --tiles DIR (no model, no cache): tiles/s
    /// per core and per format, then on --threads cores at once.
    Decode,
    /// The whole `extract` pipeline on --tiles DIR (read, decode, resize, batch, write the
    /// CSV; with --cache-dir, hash and store too) with a stand-in for the network that costs
    /// nothing: the most tiles/s this host can feed any device. Uses --decode-threads,
    /// --batch-size, --size, --layer; not --device, --threads or --layout.
    Pipeline,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// What to measure.
    #[arg(long, value_enum, default_value_t = BenchWhat::Model)]
    pub what: BenchWhat,
    /// With --what cache-open: entries to create (once) in --cache-dir, then open.
    #[arg(long, default_value_t = 1_000_000)]
    pub entries: usize,
    /// With --what cache-open: how many writers fill the cache (one pack each, or more for
    /// over 2 Mi entries), as many jobs would.
    #[arg(long, default_value_t = 1)]
    pub packs: usize,
    /// With --what cache-open: neither fill nor gc, only open and look up (the bench runs
    /// itself so, so that the memory measured is the opening's alone).
    #[arg(long, hide = true)]
    pub measure_only: bool,
    /// With --what cache-open: the cache directory (created and filled if empty; `cache gc`
    /// runs on it: a scratch folder, not a cache in use). With
    /// --what pipeline: also hash and cache, in a fresh cache created under DIR and removed
    /// after (every tile a miss, as on a first run).
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// With --what decode or pipeline: a tile folder (searched recursively, as `extract`
    /// does).
    #[arg(long, value_name = "DIR")]
    pub tiles: Option<PathBuf>,
    /// With --what pipeline: decode workers [default: as `extract --device cuda`, all
    /// cores but one].
    #[arg(long)]
    pub decode_threads: Option<usize>,
    /// Compute device.
    #[arg(long, default_value = "auto")]
    pub device: String,
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    #[arg(long, value_enum, default_value_t = Precision::Fp32)]
    pub precision: Precision,
    #[arg(long, value_enum, default_value_t = Layer::Layer4)]
    pub layer: Layer,
    #[arg(long, default_value_t = 224)]
    pub size: u32,

    /// --what model: time this TorchScript model (as `extract --model`) instead of the
    /// ResNet50, on batches of --batch-size.
    #[arg(long, value_name = "FILE.pt")]
    pub model: Option<PathBuf>,
    /// Run a --model whose code calls file operations anyway (as `extract`).
    #[arg(long, requires = "model")]
    pub allow_unsafe_model: bool,
    /// Intra-op threads for libtorch [default: all cores].
    #[arg(long)]
    pub threads: Option<usize>,
    /// Memory layout of activations.
    #[arg(long, default_value = "nhwc", value_parser = ["nhwc", "nchw"])]
    pub layout: String,
    /// Timed batches (after warm-up).
    #[arg(long, default_value_t = 10)]
    pub batches: usize,
    /// Untimed warm-up batches.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Print one machine-readable line: `images_per_s=...` (model) or `tiles_per_s=...`
    /// (pipeline).
    #[arg(long)]
    pub machine: bool,
}
