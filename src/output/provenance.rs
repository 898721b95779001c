//! The provenance record written beside every feature CSV (`OUT.provenance.yaml`).
//!
//! It says how the numbers were made: tilefeat, tch and libtorch versions, device, precision,
//! every setting, the weights' SHA-256, the cache fingerprint, tile counts, skipped tiles with
//! reasons, cache hits and misses, and where the time went. `tilefeat join` reads it back to
//! refuse mixing incompatible features, so the fingerprint fields are the contract.

use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::error::{ExitKind, WithKind};
use crate::fingerprint::Fingerprint;

pub const RANDOM_WEIGHTS_WARNING: &str =
    "RANDOM WEIGHTS: these features come from randomly initialised weights, NOT a trained model. \
     Use them for demos and benchmarks only.";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WeightsInfo {
    pub source: String,
    /// SHA-256 of the weights file, or `random:SEED`.
    pub sha256: String,
    pub trained: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Settings {
    /// The ResNet stage pooled (absent for a `--model`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer: Option<crate::cli::Layer>,
    pub pool: crate::cli::Pool,
    /// `--normalize`'s name (absent when the mean and std are numbers: `mean_std`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub normalize: Option<crate::cli::Normalize>,
    /// `mean=R,G,B std=R,G,B` when given as numbers (--mean/--std, or a model's sidecar):
    /// then `normalize` does not apply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean_std: Option<String>,
    pub size: u32,
    pub precision: crate::cli::Precision,
    pub batch_size: usize,
    pub torch_threads: usize,
    pub decode_threads: usize,
    pub layout: String,
    pub on_error: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Counts {
    pub found: usize,
    pub written: usize,
    pub skipped: usize,
    pub computed: usize,
    pub cache_hits: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Skipped {
    pub tile: String,
    pub reason: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CacheInfo {
    pub dir: Option<String>,
    /// Index entries visible at open: this fingerprint's in packs without a segment, and
    /// all of the sealed packs' segments (every fingerprint; counted from their headers).
    pub entries_at_open: usize,
    pub hits: usize,
    pub misses: usize,
    pub stored: u64,
    pub damaged_records: u64,
    /// Why the cache stopped storing vectors (a full disk, a quota): the run went on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_failed: Option<String>,
}

/// Seconds spent per stage, summed over the threads doing it; `startup` and `pipeline` are
/// wall-clock: listing the tiles, loading the weights, building the model (on a GPU: creating
/// the CUDA context) and opening the cache; then everything from the first tile read to the
/// last row written, the model workers' first batches (`model_warmup`) included. Of
/// `startup`, `setup_weights`, `setup_model` and `setup_cache` are the shared set-up's parts
/// (the first sample of a command pays them; later samples show 0).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Timings {
    #[serde(default)]
    pub startup: f64,
    /// Reading and checking the weights (or generating `random:SEED`).
    #[serde(default)]
    pub setup_weights: f64,
    /// The device (on a GPU: CUDA context, cuDNN set-up) and the model built on it.
    #[serde(default)]
    pub setup_model: f64,
    /// Opening the cache (reading its index).
    #[serde(default)]
    pub setup_cache: f64,
    #[serde(default)]
    pub pipeline: f64,
    pub read: f64,
    pub hash: f64,
    pub cache_lookup: f64,
    pub decode: f64,
    pub resize: f64,
    pub model_waiting_for_tiles: f64,
    /// Model workers waiting for a batch, summed over them: the batches came too slowly.
    #[serde(default)]
    pub workers_waiting_for_batches: f64,
    /// The model stage waiting to hand over a full batch (every worker busy, one queued): the
    /// device is the bound.
    #[serde(default)]
    pub batches_waiting_for_workers: f64,
    /// Each model worker's first batch, summed, on a GPU (0 on the CPU): it also loads kernels
    /// and builds cuDNN's plans (autotuning them with `TILEFEAT_CUDNN_BENCHMARK=1`).
    #[serde(default)]
    pub model_warmup: f64,
    pub model_compute: f64,
    /// Making the CSV text, summed over the formatting threads.
    #[serde(default)]
    pub format: f64,
    /// Writing the CSV (and storing vectors in the cache), on the writer thread.
    pub write: f64,
}

impl Timings {
    /// To the millisecond, as recorded in the provenance.
    pub fn rounded(&self) -> Timings {
        let r = |x: f64| (x * 1000.0).round() / 1000.0;
        Timings {
            startup: r(self.startup),
            setup_weights: r(self.setup_weights),
            setup_model: r(self.setup_model),
            setup_cache: r(self.setup_cache),
            pipeline: r(self.pipeline),
            read: r(self.read),
            hash: r(self.hash),
            cache_lookup: r(self.cache_lookup),
            decode: r(self.decode),
            resize: r(self.resize),
            model_waiting_for_tiles: r(self.model_waiting_for_tiles),
            workers_waiting_for_batches: r(self.workers_waiting_for_batches),
            batches_waiting_for_workers: r(self.batches_waiting_for_workers),
            model_warmup: r(self.model_warmup),
            model_compute: r(self.model_compute),
            format: r(self.format),
            write: r(self.write),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FingerprintInfo {
    pub id: String,
    #[serde(flatten)]
    pub fields: Fingerprint,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Provenance {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
    pub tilefeat_version: String,
    pub tch_version: String,
    pub libtorch_version: String,
    pub command: Vec<String>,
    pub created: String,
    pub host: String,
    pub sample: String,
    pub tile_dir: String,
    pub output: String,
    /// `--model`: the TorchScript file that made the features (absent for the ResNet50).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelProvenance>,
    /// The slide the tiles were read from (absent for a tile folder or an archive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slide: Option<crate::input::slide::SlideInfo>,
    /// The feature file's format: csv, h5 or parquet (absent in files before formats: csv).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// Tile coordinates: the naming convention found, or why there are none (absent with
    /// `--coords none`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coords: Option<CoordsProvenance>,
    /// SHA-256 and size of the feature file as written: `join` checks them, so a feature
    /// file and a provenance of two different runs are never taken as a pair.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_bytes: Option<u64>,
    /// CLAM's layout: the `.pt` bag written from the same rows as the feature file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bag: Option<BagProvenance>,
    pub device: String,
    /// On the CPU: its model and the instruction sets that decide bf16/fp16 speed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<crate::cpu::CpuInfo>,
    pub feature_dim: usize,
    pub settings: Settings,
    pub weights: WeightsInfo,
    pub fingerprint: FingerprintInfo,
    pub tiles: Counts,
    pub skipped_tiles: Vec<Skipped>,
    pub cache: CacheInfo,
    /// On a GPU: how threads wait for it (see `device::configure_cuda`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cuda_waits: Option<String>,
    /// On a GPU: which streams the model workers used (see `device::configure_cuda`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cuda_streams: Option<String>,
    /// On a GPU: how cuDNN picked its algorithms (heuristics, or autotuned).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cudnn_algorithms: Option<String>,
    pub elapsed_s: f64,
    pub tiles_per_s: f64,
    /// Computed tiles per second once warm: from the moment every model worker had its first
    /// batch of this sample back (in a command's first sample, its warm-up: on a GPU, kernels
    /// loaded and cuDNN plans made; in later ones, the pipeline filling up again) to the last
    /// batch back. Comparable with `tilefeat bench` (model-only, warm-up excluded); absent
    /// when fewer than 4 batches per worker came after the first ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steady_tiles_per_s: Option<f64>,
    pub timings_s: Timings,
}

/// A `.pt` bag written beside the feature file (CLAM's `pt_files/`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BagProvenance {
    pub path: String,
    pub sha256: String,
    pub bytes: u64,
}

/// A `--model`'s file, its hash, sidecar and output.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ModelProvenance {
    pub file: String,
    pub sha256: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sidecar: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The module's output for one tile, e.g. [1, 768], or [1, 2048, 7, 7] (then pooled).
    pub output_shape: Vec<i64>,
    pub pooled: bool,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

/// Where a sample's tile coordinates came from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CoordsProvenance {
    /// histolab, qupath, trident, stamp, slideflow, or `regex:PATTERN`; None if not found.
    pub convention: Option<String>,
    /// Where in the tile the names' x,y point: top-left or centre.
    pub origin: Option<String>,
    /// level-0 pixels or micrometres.
    pub unit: Option<String>,
    /// Whether the feature file holds them (the CSV only with `--coords`; HDF5 converts them
    /// to level-0 top-left corners).
    pub in_output: bool,
    /// Every x and y is a whole number.
    #[serde(default)]
    pub integral: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patch_size_level0: Option<u64>,
    /// `--slide-mpp`: the slide's micrometres per pixel at level 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slide_mpp: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patch_level: Option<u32>,
    /// Why there are none (a tile whose name does not match).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub missing: Option<String>,
}

impl Provenance {
    pub fn to_yaml(&self) -> Result<String> {
        let mut s = String::new();
        if self.warning.is_some() {
            s.push_str(&format!("# WARNING: {RANDOM_WEIGHTS_WARNING}\n"));
        }
        s.push_str(&serde_yaml::to_string(self)?);
        Ok(s)
    }

    pub fn read(path: &Path) -> Result<Provenance> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read provenance file {}", path.display()))
            .kind(ExitKind::Input)?;
        serde_yaml::from_str(&text)
            .with_context(|| {
                format!(
                    "provenance file {} is not a tilefeat provenance record",
                    path.display()
                )
            })
            .kind(ExitKind::Input)
    }
}
