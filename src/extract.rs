//! `tilefeat extract`: the validated configuration and the pipeline that runs it.
//!
//! Data flow (bounded channels everywhere, so memory does not grow with the tile count):
//!
//! ```text
//! sorted tile list -> feeder --(credits: at most WINDOW tiles in flight)--> jobs
//! jobs -> D decode workers: read bytes; with a cache, SHA-256 + lookup; on a miss decode +
//!             resize
//! decoders -> model stage (this thread): reorder by tile index, group misses into u8 batches,
//!             hand rows on in order as their batches come back
//! batches -> M model workers: upload, normalize on the device, ResNet trunk, pool, download
//! model stage -> F formatting threads: groups of rows, numbered in tile order -> CSV text
//!             (credits: at most 2F + 2 groups between the model stage and the disk)
//! texts -> writer thread: the groups in order to the CSV, new vectors appended to the cache
//! ```
//!
//! Rows leave the model stage strictly in tile order, so the CSV is streamed, never held in
//! memory, and is identical whatever the batch size, thread count or cache state. The CSV,
//! the rejected list and the provenance are written atomically at the end.

use std::collections::{BTreeMap, VecDeque};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use crossbeam_channel::{bounded, Receiver, Sender};
use sha2::{Digest, Sha256};
use tch::{Device, Kind, Tensor};

use crate::batch::PixelBuf;
use crate::cache::{Cache, Fingerprint, Hash32, PREPROCESSING_VERSION};
use crate::cli::{ExtractArgs, Normalize, OnError, Precision};
use crate::device::{available_cpus, configure_cuda, device_name, parse_device, CudaSetup};
use crate::error::{fail, first_line, kind_of, ExitKind, WithKind};
use crate::model::{feature_dim, to_channels_last, ResNetTrunk, RunOptions};
use crate::output::{
    features_csv, provenance_path, push_csv_field, push_features, rejected_path, AtomicFile,
};
use crate::progress::Progress;
use crate::provenance::{
    CacheInfo, Counts, FingerprintInfo, Provenance, Settings, Skipped, Timings, WeightsInfo,
    RANDOM_WEIGHTS_WARNING,
};
use crate::resize::resize_linear;
use crate::tiles::{find_some_tiles, Tile};
use crate::weights::{self, Weights, WeightsSource};

/// `--batch-size`: 1 to 4096 (`extract` and `bench`).
pub(crate) fn check_batch_size(n: usize) -> Result<()> {
    if n == 0 || n > 4096 {
        return Err(fail(
            ExitKind::Usage,
            format!("--batch-size {n}: must be between 1 and 4096"),
        ));
    }
    Ok(())
}

/// `--size`: 16 to 4096 pixels (`extract` and `bench`).
pub(crate) fn check_size(n: u32) -> Result<()> {
    if !(16..=4096).contains(&n) {
        return Err(fail(
            ExitKind::Usage,
            format!("--size {n}: must be between 16 and 4096 pixels"),
        ));
    }
    Ok(())
}

/// Decode threads on a GPU when not given: all `threads` but one (the CPU's job is decoding).
pub(crate) fn gpu_decode_threads(threads: usize) -> usize {
    threads.saturating_sub(1).max(1)
}

/// A validated `extract` configuration.
#[derive(Debug, Clone)]
pub struct ExtractConfig {
    pub tile_dir: PathBuf,
    pub output: PathBuf,
    pub sample: String,
    pub weights: WeightsSource,
    pub device: Device,
    pub batch_size: usize,
    pub torch_threads: usize,
    pub decode_threads: usize,
    pub precision: Precision,
    pub layer: crate::cli::Layer,
    pub pool: crate::cli::Pool,
    pub normalize: Normalize,
    pub size: u32,
    pub on_error: OnError,
    pub cache_dir: Option<PathBuf>,
    pub channels_last: bool,
    pub dry_run: bool,
    pub quiet: bool,
    pub profile: bool,
}

/// A validated `extract` command: one configuration per tile folder, in the order given, alike
/// but for the folder, the output and the sample ID.
#[derive(Debug, Clone)]
pub struct ExtractPlan {
    pub samples: Vec<ExtractConfig>,
    /// `--outdir`, created when the first sample runs.
    pub outdir: Option<PathBuf>,
}

impl ExtractPlan {
    /// Check every flag and resolve defaults; nothing heavy happens here.
    pub fn from_cli_arguments(a: &ExtractArgs) -> Result<ExtractPlan> {
        let usage = |m: String| fail(ExitKind::Usage, m);
        check_batch_size(a.batch_size)?;
        check_size(a.size)?;
        if a.threads == Some(0) || a.decode_threads == Some(0) {
            return Err(usage(
                "--threads and --decode-threads must be at least 1".into(),
            ));
        }
        let n = a.tile_dirs.len();
        if n > 1 && a.output.is_some() {
            return Err(usage(format!(
                "--output names one CSV but {n} tile folders were given: use --outdir DIR \
                 (one SAMPLE.csv per folder)"
            )));
        }
        if !a.sample.is_empty() && a.sample.len() != n {
            return Err(usage(format!(
                "{} --sample for {n} tile folders: give it once per folder, in their \
                 order, or not at all (samples are then named after their folders)",
                a.sample.len()
            )));
        }
        for dir in &a.tile_dirs {
            if !dir.is_dir() {
                let why = if dir.exists() {
                    "is not a directory"
                } else {
                    "does not exist"
                };
                return Err(fail(
                    ExitKind::Input,
                    format!("tile folder {} {why}", dir.display()),
                ));
            }
        }
        if let Some(o) = a.output.as_ref().filter(|o| o.is_dir()) {
            return Err(fail(
                ExitKind::Output,
                format!(
                    "--output {} is a directory; give a file name such as {}/features.csv \
                     (or --outdir {} for SAMPLE.csv)",
                    o.display(),
                    o.display(),
                    o.display()
                ),
            ));
        }
        if let Some(d) = a.outdir.as_ref().filter(|d| d.exists() && !d.is_dir()) {
            return Err(fail(
                ExitKind::Output,
                format!("--outdir {} exists and is not a directory", d.display()),
            ));
        }
        // Names and outputs first: usage errors before the weights and the device are looked at.
        let mut named: Vec<(PathBuf, String, PathBuf)> = Vec::with_capacity(n);
        for (k, dir) in a.tile_dirs.iter().enumerate() {
            let sample = match a.sample.get(k) {
                Some(s) => s.clone(),
                None => {
                    let abs = std::fs::canonicalize(dir)
                        .with_context(|| format!("cannot resolve tile folder {}", dir.display()))
                        .kind(ExitKind::Input)?;
                    let name = abs.file_name().unwrap_or_default();
                    match name.to_str() {
                        Some("") => "sample".into(),
                        Some(s) => s.to_string(),
                        None => {
                            return Err(usage(format!(
                                "tile folder {}: its name is not valid UTF-8; give --sample",
                                dir.display()
                            )))
                        }
                    }
                }
            };
            if sample.is_empty() || sample.contains(['\n', '\r', ',', '"']) {
                return Err(usage(format!(
                    "--sample {sample:?}: must be non-empty, without commas, quotes or newlines"
                )));
            }
            let output = match (&a.output, &a.outdir) {
                (Some(o), _) => o.clone(),
                (None, Some(d)) => {
                    if sample.contains(['/', '\0']) || sample == "." || sample == ".." {
                        return Err(usage(format!(
                            "--sample {sample:?} cannot name a file in --outdir"
                        )));
                    }
                    d.join(format!("{sample}.csv"))
                }
                (None, None) => unreachable!("clap requires --output or --outdir"),
            };
            if let Some((other, _, _)) = named.iter().find(|(_, s, _)| *s == sample) {
                return Err(usage(format!(
                    "tile folders {} and {} are both sample {sample:?}: their outputs in \
                     --outdir would collide (give each folder its own --sample)",
                    other.display(),
                    dir.display()
                )));
            }
            named.push((dir.clone(), sample, output));
        }
        let weights = weights::resolve(a.weights.as_deref()).kind(ExitKind::Weights)?;
        let device = parse_device(&a.device)?;
        let cpus = available_cpus();
        let threads = a.threads.unwrap_or(cpus);
        let (torch_threads, decode_threads) = match device {
            // On the CPU the model is the bottleneck; one decoder per 8 threads keeps it fed.
            Device::Cpu => (threads, a.decode_threads.unwrap_or((threads / 8).max(1))),
            // On a GPU the CPU's job is decoding; libtorch needs little.
            _ => (
                threads.clamp(1, 4),
                a.decode_threads.unwrap_or(gpu_decode_threads(threads)),
            ),
        };
        let samples = named
            .into_iter()
            .map(|(tile_dir, sample, output)| ExtractConfig {
                tile_dir,
                output,
                sample,
                weights: weights.clone(),
                device,
                batch_size: a.batch_size,
                torch_threads,
                decode_threads,
                precision: a.precision,
                layer: a.layer,
                pool: a.pool,
                normalize: a.normalize,
                size: a.size,
                on_error: a.on_error,
                cache_dir: if a.no_cache {
                    None
                } else {
                    a.cache_dir.clone()
                },
                channels_last: a.layout == "nhwc",
                dry_run: a.dry_run,
                quiet: a.quiet,
                profile: a.profile,
            })
            .collect();
        Ok(ExtractPlan {
            samples,
            outdir: a.outdir.clone(),
        })
    }
}

impl ExtractConfig {
    /// What `bench --what pipeline` runs the pipeline with (the network replaced by
    /// [`NullModel`]): two model workers as on a GPU, bad tiles skipped, no progress.
    pub(crate) fn for_pipeline_bench(
        tile_dir: &Path,
        output: &Path,
        batch_size: usize,
        decode_threads: usize,
        size: u32,
        layer: crate::cli::Layer,
        precision: Precision,
    ) -> ExtractConfig {
        ExtractConfig {
            tile_dir: tile_dir.to_path_buf(),
            output: output.to_path_buf(),
            sample: "bench".into(),
            weights: WeightsSource::Random(0),
            device: Device::Cpu,
            batch_size,
            // `model_workers` gives one worker per torch thread on the CPU: two, as on a GPU.
            torch_threads: 2,
            decode_threads,
            precision,
            layer,
            pool: crate::cli::Pool::Max,
            normalize: Normalize::Tutorial,
            size,
            on_error: OnError::Skip,
            cache_dir: None,
            channels_last: false,
            dry_run: false,
            quiet: true,
            profile: false,
        }
    }

    pub(crate) fn fingerprint(&self, weights_id: &str) -> Fingerprint {
        Fingerprint {
            weights_sha256: weights_id.to_string(),
            layer: self.layer,
            pool: self.pool,
            normalize: self.normalize,
            size: self.size,
            precision: self.precision,
            preprocessing_version: PREPROCESSING_VERSION,
        }
    }
}

/// What a worker produced for one tile.
pub(crate) enum Prepared {
    Hit(Vec<f32>),
    Pixels(Vec<u8>),
    Bad(String),
}

struct Item {
    idx: usize,
    sha: Hash32,
    prepared: Prepared,
}

/// A row on its way to the writer.
struct Row {
    idx: usize,
    sha: Hash32,
    state: RowState,
}

enum RowState {
    Ready {
        features: Vec<f32>,
        hit: bool,
    },
    /// Row `k` of batch `id`.
    InBatch(u64, usize),
    Rejected(String),
}

/// Seconds a decode worker spent per step.
#[derive(Default, Clone)]
pub(crate) struct WorkerTimes {
    pub read: f64,
    pub hash: f64,
    pub lookup: f64,
    pub decode: f64,
    pub resize: f64,
}

impl std::ops::AddAssign<&WorkerTimes> for WorkerTimes {
    fn add_assign(&mut self, o: &WorkerTimes) {
        self.read += o.read;
        self.hash += o.hash;
        self.lookup += o.lookup;
        self.decode += o.decode;
        self.resize += o.resize;
    }
}

/// Read, hash, look up and (on a miss) decode and resize one tile. The content hash is only
/// worth its time (~10% of a PNG tile's) when a cache uses it: with `hash` false and no cache,
/// it is left at zeros.
pub(crate) fn prepare(
    tile: &Tile,
    size: usize,
    cache: Option<&Cache>,
    hash: bool,
    t: &mut WorkerTimes,
) -> (Hash32, Prepared) {
    let clock = Instant::now();
    let bytes = match std::fs::read(&tile.path) {
        Ok(b) => b,
        Err(e) => return ([0; 32], Prepared::Bad(format!("cannot read: {e}"))),
    };
    let t1 = Instant::now();
    t.read += (t1 - clock).as_secs_f64();
    let sha: Hash32 = if hash || cache.is_some() {
        Sha256::digest(&bytes).into()
    } else {
        [0; 32]
    };
    let t2 = Instant::now();
    t.hash += (t2 - t1).as_secs_f64();
    if let Some(c) = cache {
        let hit = c.get(&sha);
        t.lookup += t2.elapsed().as_secs_f64();
        if let Some(v) = hit {
            return (sha, Prepared::Hit(v));
        }
    }
    let t3 = Instant::now();
    let img = match crate::decode::decode_rgb(&bytes) {
        Ok(i) => i,
        Err(e) => return (sha, Prepared::Bad(e)),
    };
    let t4 = Instant::now();
    t.decode += (t4 - t3).as_secs_f64();
    let out = resize_linear(&img, size, size);
    t.resize += t4.elapsed().as_secs_f64();
    (sha, Prepared::Pixels(out.data))
}

/// What a model worker runs on each batch: the network ([`Runner`]), or [`NullModel`] for
/// `bench --what pipeline`, which measures everything else.
pub(crate) trait BatchModel: Send {
    /// A handle for another worker (shared weights).
    fn fork(&self) -> Self
    where
        Self: Sized;
    /// An empty buffer for a batch of up to `tiles` tiles (the model stage fills it).
    fn buffer(&self, tiles: usize) -> PixelBuf;
    /// Set up the calling thread, a model worker, before its first batch.
    fn start_worker(&self) -> Result<()> {
        Ok(())
    }
    /// `pixels` holds `n` RGB tiles of size x size; returns `n * dim` features. May pad the
    /// buffer (it is cleared before it is filled again).
    fn run(&self, pixels: &mut PixelBuf, n: usize) -> Result<Vec<f32>>;
}

/// A stand-in for the network that costs next to nothing: it reads every pixel once (as the
/// upload does) and returns `dim` full-precision values per tile, so that the writer
/// formats realistic numbers. With it, `pipeline` runs at the speed of reading, hashing (with
/// a cache), decoding, resizing, batching and writing: the most it can feed any device.
pub(crate) struct NullModel {
    pub dim: usize,
    pub tile_bytes: usize,
}

impl BatchModel for NullModel {
    fn fork(&self) -> Self {
        NullModel { ..*self }
    }

    fn buffer(&self, tiles: usize) -> PixelBuf {
        PixelBuf::host(tiles * self.tile_bytes)
    }

    fn run(&self, pixels: &mut PixelBuf, n: usize) -> Result<Vec<f32>> {
        let pixels = pixels.as_slice();
        anyhow::ensure!(
            pixels.len() == n * self.tile_bytes,
            "batch of {n} tiles holds {} bytes, not {}",
            pixels.len(),
            n * self.tile_bytes
        );
        let mut out = Vec::with_capacity(n * self.dim);
        for tile in pixels.chunks_exact(self.tile_bytes.max(1)) {
            let sum = tile.iter().fold(0u64, |a, &b| a.wrapping_add(b as u64));
            // xorshift64*, seeded by the pixels: values in [0, 4) with all 24 bits used.
            let mut x = sum.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            out.extend((0..self.dim).map(|_| {
                x ^= x >> 12;
                x ^= x << 25;
                x ^= x >> 27;
                (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32 / (1u32 << 22) as f32
            }));
        }
        Ok(out)
    }
}

/// Turns u8 NHWC batches into pooled features on the configured device.
struct Runner {
    model: ResNetTrunk,
    mean: Tensor,
    std: Tensor,
    size: i64,
    /// Pad partial batches to this size (one input shape: cuDNN plans are made once).
    pad_to: Option<usize>,
    /// Give each model worker a CUDA stream of its own on this device (the default; see
    /// `device::configure_cuda`).
    worker_stream: Option<usize>,
}

impl Runner {
    fn new(
        model: ResNetTrunk,
        normalize: Normalize,
        size: u32,
        pad_to: Option<usize>,
        worker_stream: Option<usize>,
    ) -> Runner {
        let (m, s): ([f32; 3], [f32; 3]) = match normalize {
            Normalize::Tutorial => ([0.5; 3], [0.5; 3]),
            Normalize::Imagenet => ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        };
        let dev = model.options().device;
        Runner {
            mean: Tensor::from_slice(&m).view([1, 3, 1, 1]).to_device(dev),
            std: Tensor::from_slice(&s).view([1, 3, 1, 1]).to_device(dev),
            model,
            size: size as i64,
            pad_to,
            worker_stream,
        }
    }
}

impl BatchModel for Runner {
    /// A handle for another worker: shared weights.
    fn fork(&self) -> Runner {
        Runner {
            model: self.model.shallow_clone(),
            mean: self.mean.shallow_clone(),
            std: self.std.shallow_clone(),
            size: self.size,
            pad_to: self.pad_to,
            worker_stream: self.worker_stream,
        }
    }

    /// A u8 tensor of a whole (padded) batch, page-locked on a GPU: the tiles are put where
    /// the upload reads them.
    fn buffer(&self, tiles: usize) -> PixelBuf {
        let rows = self.pad_to.map_or(tiles, |p| p.max(tiles));
        let (buf, why) = PixelBuf::tensor(rows, self.size as usize, self.model.options().device);
        if let Some(why) = why {
            static ONCE: std::sync::Once = std::sync::Once::new();
            ONCE.call_once(|| {
                eprintln!(
                    "tilefeat: warning: cannot pin host memory for uploads ({why}); \
                     using pageable memory (slower, same results)"
                )
            });
        }
        buf
    }

    fn start_worker(&self) -> Result<()> {
        match self.worker_stream {
            Some(i) => crate::device::use_worker_stream(i).map_err(anyhow::Error::msg),
            None => Ok(()),
        }
    }

    /// `pixels` holds `n` RGB tiles of size x size; returns `n * D` features.
    fn run(&self, pixels: &mut PixelBuf, n: usize) -> Result<Vec<f32>> {
        let _guard = tch::no_grad_guard();
        let opts = self.model.options();
        let row_bytes = (self.size * self.size * 3) as usize;
        anyhow::ensure!(
            pixels.len() == n * row_bytes,
            "batch of {n} tiles holds {} bytes, not {}",
            pixels.len(),
            n * row_bytes
        );
        let rows = self.pad_to.map_or(n, |p| p.max(n));
        pixels.pad_to(rows * row_bytes);
        let (staged, pinned) = pixels
            .rows(rows)
            .context("internal error: a batch buffer that is not the model's")?;
        // From pinned memory the upload is non-blocking: it may still read the buffer when
        // `to_device_` returns. The buffer goes back to the model stage (to be refilled) only
        // with the features, which come after the upload on this thread's stream.
        let input = match opts.device {
            Device::Cpu => staged,
            d => staged.to_device_(d, Kind::Uint8, pinned, false),
        };
        // ToTensor (x / 255) and Normalize ((x - mean) / std) in f32, as torchvision does.
        let x = input.permute([0, 3, 1, 2]).to_kind(Kind::Float);
        let x = ((x / 255.0) - &self.mean) / &self.std;
        let x = if opts.channels_last {
            to_channels_last(&x)
        } else {
            x.contiguous()
        };
        let x = x.to_kind(opts.kind());
        let out = self
            .model
            .forward(&x)
            .narrow(0, 0, n as i64)
            .to_device(Device::Cpu);
        let flat = out.contiguous().view([-1]);
        Vec::<f32>::try_from(&flat).context("cannot read features back from the model")
    }
}

/// Summary of a finished run.
pub struct Summary {
    pub provenance: Provenance,
}

/// What the samples of one `extract` command share, set up once, when the first sample needs
/// it: the weights (after the first folder is listed), then the model on its device and the
/// cache (after the first CSV could be created).
#[derive(Default)]
struct Shared {
    weights: Option<Weights>,
    session: Option<Session>,
    /// Seconds the set-up took (`setup_*` of [`Timings`]), until a sample reports them.
    setup: SetupTimes,
}

#[derive(Default)]
struct SetupTimes {
    weights: f64,
    model: f64,
    cache: f64,
}

struct Session {
    runner: Runner,
    /// Started with the model, shared by the samples (see [`ModelWorkers`]).
    workers: ModelWorkers,
    cuda: Option<CudaSetup>,
    cache: Option<Cache>,
    entries_at_open: usize,
}

impl Shared {
    fn weights(&mut self, cfg: &ExtractConfig) -> Result<&Weights> {
        if self.weights.is_none() {
            if cfg.weights.is_random() && !cfg.quiet {
                eprintln!("tilefeat: WARNING: {RANDOM_WEIGHTS_WARNING}");
            }
            let t = Instant::now();
            self.weights = Some(Weights::load(&cfg.weights, cfg.layer).kind(ExitKind::Weights)?);
            self.setup.weights = t.elapsed().as_secs_f64();
        }
        Ok(self.weights.as_ref().expect("just loaded"))
    }

    fn session(&mut self, cfg: &ExtractConfig, fingerprint: &Fingerprint) -> Result<&Session> {
        if self.session.is_none() {
            let weights = self.weights(cfg)?;
            let t = Instant::now();
            let cuda = configure_cuda(cfg.device);
            let opts = RunOptions {
                device: cfg.device,
                precision: cfg.precision,
                channels_last: cfg.channels_last,
            };
            let model = ResNetTrunk::new(&weights.tensors, cfg.layer, cfg.pool, opts)
                .kind(ExitKind::Weights)?;
            let pad_to = matches!(cfg.device, Device::Cuda(_)).then_some(cfg.batch_size);
            let worker_stream = cuda.as_ref().and_then(|c| c.worker_stream);
            let runner = Runner::new(model, cfg.normalize, cfg.size, pad_to, worker_stream);
            let t_cache = Instant::now();
            self.setup.model = (t_cache - t).as_secs_f64();
            let cache = match &cfg.cache_dir {
                Some(d) => Some(Cache::open(d, fingerprint)?),
                None => None,
            };
            self.setup.cache = t_cache.elapsed().as_secs_f64();
            let workers = ModelWorkers::start(&runner, cfg.device, cfg.torch_threads);
            self.session = Some(Session {
                workers,
                runner,
                cuda,
                entries_at_open: cache.as_ref().map_or(0, |c| c.len()),
                cache,
            });
            // The model holds its own (folded, converted) copies.
            if let Some(w) = self.weights.as_mut() {
                w.tensors.clear();
            }
        }
        Ok(self.session.as_ref().expect("just set up"))
    }
}

/// Why a sample failed.
enum Failure {
    /// Its own input, output or run; whether the next sample may run depends on the kind.
    Sample(anyhow::Error),
    /// Setting up what every sample shares (weights, device, model, cache): nothing can run.
    Shared(anyhow::Error),
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Failure {
        Failure::Sample(e)
    }
}

/// `tilefeat extract`: the samples of `plan` in order, sharing one set-up (weights, model,
/// GPU, cache). `report` gets each sample's summary once its outputs are in place.
///
/// With several samples, one that fails on its own input or output (exit codes 3 and 6: no
/// tiles, a bad tile with `--on-error fail`, an unwritable CSV) is reported and the next one
/// runs; the command then fails with the first such error's code, naming every sample that
/// failed. Any other error (weights, device, cache, model) stops the command at once. Either
/// way, every sample that finished has all its outputs in place and none of a failed one's.
pub fn run(
    plan: &ExtractPlan,
    command: Vec<String>,
    out: &mut dyn Write,
    report: &mut dyn FnMut(&ExtractConfig, &Summary),
) -> Result<()> {
    let start = Instant::now();
    if let Some(d) = plan.outdir.as_ref().filter(|_| !plan.samples[0].dry_run) {
        std::fs::create_dir_all(d)
            .with_context(|| format!("cannot create --outdir {}", d.display()))
            .kind(ExitKind::Output)?;
    }
    let mut shared = Shared::default();
    let several = plan.samples.len() > 1;
    let mut failed: Vec<(String, anyhow::Error)> = Vec::new();
    let mut result = Ok(());
    for (k, cfg) in plan.samples.iter().enumerate() {
        // The first sample's start-up includes the shared set-up.
        let started = if k == 0 { start } else { Instant::now() };
        match extract_sample(cfg, &mut shared, started, command.clone(), out) {
            Ok(Some(summary)) => report(cfg, &summary),
            Ok(None) => {}
            Err(Failure::Sample(e))
                if several && matches!(kind_of(&e), ExitKind::Input | ExitKind::Output) =>
            {
                eprintln!("tilefeat: error: sample {}: {e:#}", cfg.sample);
                failed.push((cfg.sample.clone(), e));
            }
            Err(Failure::Sample(e) | Failure::Shared(e)) => {
                result = Err(if several {
                    e.context(format!("sample {}", cfg.sample))
                } else {
                    e
                });
                break;
            }
        }
    }
    // Seal the cache's pack (what was stored stays usable), unless the cache itself failed:
    // then its writer is in an unknown state and the pack stays unsealed (gc treats it as a
    // dead process's).
    let cache_failed = matches!(&result, Err(e) if kind_of(e) == ExitKind::Cache);
    if let Some(cache) = shared.session.as_ref().and_then(|s| s.cache.as_ref()) {
        if !cache_failed {
            let closed = cache.close();
            if result.is_ok() {
                closed?;
            }
        }
    }
    result?;
    if let Some((_, first)) = failed.first() {
        let names: Vec<&str> = failed.iter().map(|(s, _)| s.as_str()).collect();
        return Err(fail(
            kind_of(first),
            format!(
                "{} of {} samples failed ({}){}",
                failed.len(),
                plan.samples.len(),
                names.join(", "),
                if plan.samples[0].dry_run || failed.len() == plan.samples.len() {
                    ""
                } else {
                    "; the others were written"
                }
            ),
        ));
    }
    Ok(())
}

/// One sample: list its tiles, run the pipeline into its CSV, write its rejected list and
/// provenance. None for a dry run (the plan is printed instead).
fn extract_sample(
    cfg: &ExtractConfig,
    shared: &mut Shared,
    start: Instant,
    command: Vec<String>,
    out: &mut dyn Write,
) -> Result<Option<Summary>, Failure> {
    // This sample's start-up reports the shared set-up it paid for itself (not what an earlier
    // sample that then failed paid).
    shared.setup = SetupTimes::default();
    let listing = find_some_tiles(&cfg.tile_dir)?;
    for w in &listing.warnings {
        if !cfg.quiet {
            eprintln!("tilefeat: warning: {w}");
        }
    }
    let tiles = listing.tiles;
    let weights_id = shared.weights(cfg).map_err(Failure::Shared)?.id.clone();
    let fingerprint = cfg.fingerprint(&weights_id);
    if cfg.dry_run {
        writeln!(
            out,
            "dry run: sample {} — {} tiles in {} -> {}; device {}, precision {}, batch {}, {} torch + {} decode threads; weights {} (sha256 {}); fingerprint {}",
            cfg.sample,
            tiles.len(),
            cfg.tile_dir.display(),
            cfg.output.display(),
            device_name(cfg.device),
            cfg.precision,
            cfg.batch_size,
            cfg.torch_threads,
            cfg.decode_threads,
            cfg.weights.describe(),
            weights_id,
            hex::encode(&fingerprint.id()[..8]),
        )
        .map_err(anyhow::Error::from)?;
        return Ok(None);
    }
    // Fail early, before any compute, if the outputs cannot be written.
    let dim = feature_dim(cfg.layer);
    let csv = features_csv(&cfg.output, dim)?;

    shared.session(cfg, &fingerprint).map_err(Failure::Shared)?;
    let setup = std::mem::take(&mut shared.setup);
    let session = shared.session.as_ref().expect("set up above");
    let cache = session.cache.as_ref();
    let before = cache.map(|c| c.counters());

    let mut progress = Progress::new(tiles.len(), cfg.quiet);
    let pipeline_start = Instant::now();
    let mut state = pipeline_on(
        cfg,
        &tiles,
        &session.runner,
        &session.workers,
        cache,
        csv,
        &mut progress,
        dim,
    )?;
    progress.finish();
    state.timings.startup = (pipeline_start - start).as_secs_f64();
    (
        state.timings.setup_weights,
        state.timings.setup_model,
        state.timings.setup_cache,
    ) = (setup.weights, setup.model, setup.cache);
    state.timings.pipeline = pipeline_start.elapsed().as_secs_f64();
    // The CSV is in place: if what must go beside it cannot be written, take it back.
    finish_sample(
        cfg,
        session,
        state,
        tiles.len(),
        before,
        &fingerprint,
        start,
        command,
        dim,
    )
    .inspect_err(|_| {
        let _ = std::fs::remove_file(&cfg.output);
        let _ = std::fs::remove_file(rejected_path(&cfg.output));
    })
    .map(Some)
    .map_err(Failure::Sample)
}

/// A sample's side files once its CSV is committed: the cache synced, the rejected list and
/// the provenance written.
#[allow(clippy::too_many_arguments)]
fn finish_sample(
    cfg: &ExtractConfig,
    session: &Session,
    state: PipelineState,
    found: usize,
    before: Option<crate::cache::CacheCounters>,
    fingerprint: &Fingerprint,
    start: Instant,
    command: Vec<String>,
    dim: usize,
) -> Result<Summary> {
    let cache = session.cache.as_ref();
    // What this sample stored is on disk before its provenance says so.
    if let Some(c) = cache {
        c.sync()?;
    }
    // This sample's share of the cache's counters and damaged records.
    let mut stored = 0;
    let mut damaged_records = 0;
    if let (Some(c), Some(b)) = (cache, before) {
        let now = c.counters();
        stored = now.stored - b.stored;
        damaged_records = now.damaged_records - b.damaged_records;
        for d in c.damaged().iter().skip(b.damaged_records as usize) {
            eprintln!("tilefeat: warning: damaged cache record ignored (recomputed): {d}");
        }
    }
    // Rejected list (always written, so workflows can declare it as an output).
    let mut tsv = String::from("tile\treason\n");
    for s in &state.skipped {
        tsv.push_str(&format!(
            "{}\t{}\n",
            s.tile.replace(['\t', '\n'], " "),
            s.reason.replace(['\t', '\n'], " ")
        ));
    }
    crate::output::write_atomic(&rejected_path(&cfg.output), tsv.as_bytes())?;

    let elapsed = start.elapsed().as_secs_f64();
    let written = state.written;
    let trained = !cfg.weights.is_random();
    let cuda = session.cuda.as_ref();
    let provenance = Provenance {
        warning: (!trained).then(|| RANDOM_WEIGHTS_WARNING.to_string()),
        tilefeat_version: env!("CARGO_PKG_VERSION").into(),
        tch_version: crate::TCH_VERSION.into(),
        libtorch_version: crate::device::libtorch_version().into(),
        command,
        created: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        host: std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default(),
        sample: cfg.sample.clone(),
        tile_dir: std::fs::canonicalize(&cfg.tile_dir)
            .unwrap_or(cfg.tile_dir.clone())
            .display()
            .to_string(),
        output: cfg.output.display().to_string(),
        device: device_name(cfg.device),
        feature_dim: dim,
        settings: Settings {
            layer: cfg.layer,
            pool: cfg.pool,
            normalize: cfg.normalize,
            size: cfg.size,
            precision: cfg.precision,
            batch_size: cfg.batch_size,
            torch_threads: cfg.torch_threads,
            decode_threads: cfg.decode_threads,
            layout: if cfg.channels_last {
                "nhwc".into()
            } else {
                "nchw".into()
            },
            on_error: format!("{:?}", cfg.on_error).to_lowercase(),
        },
        weights: WeightsInfo {
            source: cfg.weights.describe(),
            sha256: fingerprint.weights_sha256.clone(),
            trained,
            warning: (!trained).then(|| RANDOM_WEIGHTS_WARNING.to_string()),
        },
        fingerprint: FingerprintInfo {
            id: hex::encode(fingerprint.id()),
            fields: fingerprint.clone(),
        },
        tiles: Counts {
            found,
            written,
            skipped: state.skipped.len(),
            computed: state.computed,
            cache_hits: state.hits,
        },
        skipped_tiles: state.skipped.clone(),
        cache: CacheInfo {
            dir: cfg.cache_dir.as_ref().map(|d| d.display().to_string()),
            entries_at_open: session.entries_at_open,
            hits: state.hits,
            misses: if cache.is_some() { state.computed } else { 0 },
            stored,
            damaged_records,
        },
        cuda_waits: cuda.map(|c| c.waits.clone()),
        cuda_streams: cuda.map(|c| c.streams.clone()),
        cudnn_algorithms: cuda.map(|c| c.cudnn.clone()),
        elapsed_s: round3(elapsed),
        tiles_per_s: round3(found as f64 / elapsed.max(1e-9)),
        steady_tiles_per_s: state.steady_tiles_per_s.map(round3),
        timings_s: state.timings.rounded(),
    };
    crate::output::write_atomic(
        &provenance_path(&cfg.output),
        provenance.to_yaml()?.as_bytes(),
    )?;
    // The CSV was committed by the writer; all three files are now in place.
    Ok(Summary { provenance })
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// What the pipeline hands back.
pub(crate) struct PipelineState {
    pub written: usize,
    pub computed: usize,
    pub hits: usize,
    pub skipped: Vec<Skipped>,
    pub timings: Timings,
    /// See `Provenance::steady_tiles_per_s`.
    pub steady_tiles_per_s: Option<f64>,
}

/// Messages to the formatting threads: groups of finished rows, numbered in tile order, then
/// `Finish` with the number of groups. A channel closed without `Finish` means the run
/// failed: the CSV is not committed.
enum WriterMsg {
    Rows { seq: u64, rows: Vec<OutRow> },
    Finish { groups: u64 },
}

/// From the formatting threads to the writer: a group's CSV text (or why it could not be
/// made), with its rows for the cache; `Finish` passed on.
enum Formatted {
    Text {
        seq: u64,
        text: std::result::Result<String, String>,
        rows: Vec<OutRow>,
        secs: f64,
    },
    Finish {
        groups: u64,
    },
}

struct OutRow {
    idx: usize,
    sha: Hash32,
    features: Vec<f32>,
    hit: bool,
}

/// A batch for a model worker, and what comes back.
struct BatchJob {
    id: u64,
    pixels: PixelBuf,
    n: usize,
}

struct BatchDone {
    id: u64,
    features: Result<Vec<f32>>,
    /// The batch's pixel buffer, handed back for the next batch to fill.
    pixels: PixelBuf,
    secs: f64,
    /// How long the worker waited for this batch.
    idle: f64,
    /// The worker's first batch of this sample (its first ever, or its first after an
    /// earlier sample of the command).
    first_in_sample: bool,
    /// This worker's first batch: on a GPU it also loads kernels and builds cuDNN's plans
    /// (which libtorch keeps per thread), so it is timed apart.
    first: bool,
}

/// How many model workers, and libtorch threads each: on the CPU, one single-threaded worker
/// per thread (per-image arithmetic is then identical whatever --threads and --batch-size,
/// which multi-threaded kernels do not guarantee); on a GPU, two workers so that one batch is
/// always queued while the other's results come back.
pub fn model_workers(device: Device, torch_threads: usize) -> (usize, usize) {
    match device {
        Device::Cpu => (torch_threads, 1),
        _ => (2, torch_threads),
    }
}

/// The model worker threads. They outlive a sample: `extract DIR... --outdir` starts them
/// once, with the model, and each sample hands them its batches ([`Assignment`]), so on a
/// GPU only the first sample's first batches pay the warm-up (kernels loaded, cuDNN plans
/// made, which libtorch keeps per thread; later samples' new threads took 0.13-0.15 s each
/// on an H200). Results go back on the sample's own channel, so samples never mix: a sample
/// that stops early drops its channels, and a worker still busy with one of its batches
/// finds no one to reply to and moves on to the next sample. Dropping `ModelWorkers` stops
/// and joins the threads.
pub(crate) struct ModelWorkers {
    control: Vec<Sender<Assignment>>,
    handles: Vec<std::thread::JoinHandle<()>>,
}

/// One sample's work for a model worker: batches to take, and where the results go.
struct Assignment {
    jobs: Receiver<BatchJob>,
    done: Sender<BatchDone>,
}

impl ModelWorkers {
    /// Start the workers for `device` (see [`model_workers`]), each with its own handle on
    /// `model`'s (shared) weights.
    pub(crate) fn start<M: BatchModel + 'static>(
        model: &M,
        device: Device,
        torch_threads: usize,
    ) -> ModelWorkers {
        let (n_model, model_threads) = model_workers(device, torch_threads);
        let mut control = Vec::new();
        let mut handles = Vec::new();
        for _ in 0..n_model {
            let (tx, rx) = crossbeam_channel::unbounded::<Assignment>();
            let worker = model.fork();
            handles.push(std::thread::spawn(move || {
                worker_loop(worker, model_threads, rx)
            }));
            control.push(tx);
        }
        ModelWorkers { control, handles }
    }

    fn len(&self) -> usize {
        self.control.len()
    }
}

impl Drop for ModelWorkers {
    fn drop(&mut self) {
        self.control.clear();
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// A model worker: set up once, then each sample's batches until that sample's queue closes.
fn worker_loop<M: BatchModel>(worker: M, threads: usize, control: Receiver<Assignment>) {
    tch::set_num_threads(threads as i32);
    // A worker that cannot start fails each batch it gets, so the run stops with the reason
    // (tch panics when libtorch fails: caught the same way).
    let started = match crate::error::catch_panic(|| worker.start_worker()) {
        Ok(r) => r.map_err(|e| format!("{e:#}")),
        Err(msg) => Err(format!("libtorch failed: {}", first_line(&msg))),
    };
    let mut first = true;
    for sample in control.iter() {
        let mut first_in_sample = true;
        loop {
            let t = Instant::now();
            let Ok(mut job) = sample.jobs.recv() else {
                break;
            };
            let idle = t.elapsed().as_secs_f64();
            let t = Instant::now();
            // A panic (tch panics when libtorch fails, e.g. out of GPU memory) is this
            // batch's error: a dead worker would leave the run waiting forever.
            let features = match &started {
                Err(e) => Err(anyhow::anyhow!("{e}")),
                Ok(()) => crate::error::catch_panic(|| worker.run(&mut job.pixels, job.n))
                    .unwrap_or_else(|msg| {
                        Err(anyhow::anyhow!("libtorch failed: {}", first_line(&msg)))
                    }),
            };
            let secs = t.elapsed().as_secs_f64();
            let was_first = std::mem::replace(&mut first, false);
            let done = BatchDone {
                id: job.id,
                features,
                pixels: job.pixels,
                secs,
                idle,
                first: was_first,
                first_in_sample: std::mem::replace(&mut first_in_sample, false),
            };
            if sample.done.send(done).is_err() {
                break; // that sample has stopped: on to the next
            }
        }
    }
}

/// [`pipeline_on`] with model workers of its own (started for this run, stopped after it).
pub(crate) fn pipeline<M: BatchModel + 'static>(
    cfg: &ExtractConfig,
    tiles: &[Tile],
    runner: &M,
    cache: Option<&Cache>,
    csv: AtomicFile,
    progress: &mut Progress,
    dim: usize,
) -> Result<PipelineState> {
    let workers = ModelWorkers::start(runner, cfg.device, cfg.torch_threads);
    pipeline_on(cfg, tiles, runner, &workers, cache, csv, progress, dim)
}

/// One sample's run through `workers` (which outlive it: see [`ModelWorkers`]); `runner`
/// makes the batch buffers.
#[allow(clippy::too_many_arguments)]
pub(crate) fn pipeline_on(
    cfg: &ExtractConfig,
    tiles: &[Tile],
    runner: &impl BatchModel,
    workers: &ModelWorkers,
    cache: Option<&Cache>,
    csv: AtomicFile,
    progress: &mut Progress,
    dim: usize,
) -> Result<PipelineState> {
    let size = cfg.size as usize;
    let batch = cfg.batch_size;
    let n_model = workers.len();
    let window = (2 * n_model * batch + 2 * batch)
        .max(4 * cfg.decode_threads)
        .max(16);

    std::thread::scope(|scope| -> Result<PipelineState> {
        let (credit_tx, credit_rx) = bounded::<()>(window);
        for _ in 0..window {
            credit_tx.send(()).expect("credit channel has room");
        }
        let (job_tx, job_rx) = bounded::<usize>(window);
        let (item_tx, item_rx) = bounded::<(Item, WorkerTimes)>(window);
        let (row_tx, row_rx) = bounded::<WriterMsg>(8);
        let (batch_tx, batch_rx) = bounded::<BatchJob>(1);
        let (done_tx, done_rx) = bounded::<BatchDone>(n_model + 1);

        // Feeder: tile indices in order, never more than `window` in flight.
        let n_tiles = tiles.len();
        scope.spawn(move || {
            for i in 0..n_tiles {
                if credit_rx.recv().is_err() || job_tx.send(i).is_err() {
                    return;
                }
            }
        });
        // Decode workers.
        for _ in 0..cfg.decode_threads {
            let job_rx = job_rx.clone();
            let item_tx = item_tx.clone();
            scope.spawn(move || {
                for idx in job_rx.iter() {
                    let mut t = WorkerTimes::default();
                    // A panic on one tile (a decoder bug) makes that tile bad instead of
                    // ending this worker, which would leave the run waiting for it forever.
                    let (sha, prepared) = crate::error::catch_panic(|| {
                        prepare(&tiles[idx], size, cache, false, &mut t)
                    })
                    .unwrap_or_else(|msg| {
                        let first = first_line(&msg);
                        ([0; 32], Prepared::Bad(format!("internal error: {first}")))
                    });
                    if item_tx.send((Item { idx, sha, prepared }, t)).is_err() {
                        return;
                    }
                }
            });
        }
        drop(job_rx);
        drop(item_tx);
        // This sample's batches go to the model workers, whose results come back here.
        for w in &workers.control {
            let assignment = Assignment {
                jobs: batch_rx.clone(),
                done: done_tx.clone(),
            };
            if w.send(assignment).is_err() {
                return Err(anyhow::anyhow!("model workers stopped unexpectedly"));
            }
        }
        // Kept to throw away what is still queued if this sample stops early (below).
        let queued = batch_rx;
        drop(done_tx);
        // Writer: CSV text is made on a few threads, a group of rows each (2,048 floats take
        // 50-100 us a row: one thread would bound a GPU run near 15,000 rows/s), while one
        // thread writes the groups in order and stores new vectors in the cache.
        let format_threads = cfg.decode_threads.clamp(1, 4);
        // A group is held until every group before it is written: credits bound how many wait
        // (a slow group must not let later ones pile up behind it).
        let in_flight = 2 * format_threads + 2;
        let (group_credit_tx, group_credits) = bounded::<()>(in_flight);
        for _ in 0..in_flight {
            group_credit_tx.send(()).expect("credit channel has room");
        }
        let (text_tx, text_rx) = bounded::<Formatted>(in_flight);
        for _ in 0..format_threads {
            let (row_rx, text_tx) = (row_rx.clone(), text_tx.clone());
            scope.spawn(move || format_loop(row_rx, text_tx, tiles));
        }
        drop(row_rx);
        drop(text_tx);
        let output = cfg.output.clone();
        let writer =
            scope.spawn(move || writer_loop(text_rx, group_credit_tx, csv, cache, &output));

        let new_buffer = || runner.buffer(batch);
        let mut stage = ModelStage::new(
            cfg,
            n_model,
            tiles,
            &new_buffer,
            batch,
            dim,
            row_tx,
            group_credits,
            batch_tx,
            done_rx,
        );
        let result = stage.run(item_rx, credit_tx, progress);
        drop(stage);
        // A sample that stopped early: its queued batch is not computed (the workers, which
        // outlive this sample, would otherwise run it for no one), and its buffer is freed.
        queued.try_iter().for_each(drop);
        drop(queued);
        let write_result = writer.join().expect("writer thread panicked");
        let (mut state, (write_secs, format_secs)) = match (result, write_result) {
            // A cache failure in the writer matters more than what the model stage met after
            // it (say, a bad tile): it must stop the command, not just this sample.
            (Err(e), Err(w)) => {
                return Err(if kind_of(&w) == ExitKind::Output {
                    e
                } else {
                    w
                })
            }
            (Err(e), Ok(_)) => return Err(e),
            (Ok(_), Err(e)) => return Err(e),
            (Ok(s), Ok(w)) => (s, w),
        };
        state.timings.write = write_secs;
        state.timings.format = format_secs;
        Ok(state)
    })
}

/// CSV text of `rows`, in order.
fn format_rows(rows: &[OutRow], tiles: &[Tile]) -> String {
    let mut text = String::with_capacity(rows.len() * 28 * 1024);
    for r in rows {
        push_csv_field(&mut text, &tiles[r.idx].rel);
        push_features(&mut text, &r.features);
    }
    text
}

/// A formatting thread: turns groups of rows into CSV text, in whatever order it gets them.
fn format_loop(rows: Receiver<WriterMsg>, out: Sender<Formatted>, tiles: &[Tile]) {
    for msg in rows.iter() {
        let formatted = match msg {
            WriterMsg::Finish { groups } => Formatted::Finish { groups },
            WriterMsg::Rows { seq, rows } => {
                let t = Instant::now();
                // A bug here fails the run (in the writer) instead of leaving a hole in it.
                let text = crate::error::catch_panic(|| format_rows(&rows, tiles));
                Formatted::Text {
                    seq,
                    text,
                    rows,
                    secs: t.elapsed().as_secs_f64(),
                }
            }
        };
        if out.send(formatted).is_err() {
            return;
        }
    }
}

/// Writes the formatted groups in order (holding back those that come early), gives a credit
/// back for each, stores computed vectors in the cache, and commits the CSV once every group
/// is written. Returns the seconds spent writing and, summed over the formatting threads,
/// formatting.
fn writer_loop(
    texts: Receiver<Formatted>,
    group_credits: Sender<()>,
    mut csv: AtomicFile,
    cache: Option<&Cache>,
    output: &Path,
) -> Result<(f64, f64)> {
    let (mut busy, mut format) = (0.0, 0.0);
    let mut early: BTreeMap<u64, (String, Vec<OutRow>)> = BTreeMap::new();
    let mut next = 0u64;
    let mut groups = None;
    for msg in texts.iter() {
        match msg {
            Formatted::Finish { groups: n } => groups = Some(n),
            Formatted::Text {
                seq,
                text,
                rows,
                secs,
            } => {
                format += secs;
                let text = text.map_err(|m| {
                    anyhow::anyhow!("internal error while formatting {}: {m}", output.display())
                })?;
                early.insert(seq, (text, rows));
            }
        }
        while let Some((text, rows)) = early.remove(&next) {
            let t = Instant::now();
            csv.writer()
                .write_all(text.as_bytes())
                .with_context(|| format!("cannot write {}", output.display()))
                .kind(ExitKind::Output)?;
            if let Some(c) = cache {
                for r in rows.iter().filter(|r| !r.hit) {
                    c.put(&r.sha, &r.features)?;
                }
                c.flush()?;
            }
            busy += t.elapsed().as_secs_f64();
            next += 1;
            // Room for one more group (never full: each credit given back was taken).
            let _ = group_credits.try_send(());
        }
        if groups == Some(next) {
            let t = Instant::now();
            csv.commit()?;
            return Ok((busy + t.elapsed().as_secs_f64(), format));
        }
    }
    // The run failed (no `Finish`): drop the temporary CSV (the cache keeps what was computed).
    anyhow::ensure!(
        groups.is_none(),
        "internal error: rows of {} went missing before the writer",
        output.display()
    );
    Ok((busy, format))
}

/// The in-order heart of the pipeline: tiles arrive out of order from the decoders, leave in
/// order to the writer; misses are grouped into batches for the model workers.
struct ModelStage<'a> {
    cfg: &'a ExtractConfig,
    n_model: usize,
    tiles: &'a [Tile],
    batch: usize,
    dim: usize,
    rows_out: Sender<WriterMsg>,
    /// One is taken per group sent, given back once the writer has written it.
    group_credits: Receiver<()>,
    /// Groups of rows sent to the writer so far.
    groups_sent: u64,
    batches: Sender<BatchJob>,
    done: Receiver<BatchDone>,
    /// Rows not yet handed to the writer, in tile order.
    pending: VecDeque<Row>,
    /// The batch being filled.
    pixels: PixelBuf,
    in_batch: usize,
    next_batch: u64,
    /// Finished batches' features, until their rows are written.
    results: std::collections::HashMap<u64, Vec<f32>>,
    outstanding: usize,
    st: PipelineState,
    compute: f64,
    /// Model workers' first batches (see [`BatchDone::first`]).
    warmup: f64,
    /// Model workers waiting for batches, summed.
    workers_idle: f64,
    /// Waiting in `dispatch` for a worker to take the queued batch.
    dispatch_blocked: f64,
    /// Workers whose first batch of this sample came back; when the last of them did.
    warm_workers: usize,
    warm_at: Option<Instant>,
    /// Batches and tiles back since `warm_at`, and when the last came.
    steady_batches: usize,
    steady_tiles: usize,
    last_back: Option<Instant>,
    /// Makes a pixel buffer for a batch (the model's kind: on a GPU, page-locked).
    new_buffer: &'a dyn Fn() -> PixelBuf,
    /// Pixel buffers of finished batches, reused (a GPU batch of 256 is 38 MB: allocating it
    /// afresh each time costs page faults, and pinning it costs more).
    spare: Vec<PixelBuf>,
}

impl<'a> ModelStage<'a> {
    #[allow(clippy::too_many_arguments)]
    fn new(
        cfg: &'a ExtractConfig,
        n_model: usize,
        tiles: &'a [Tile],
        new_buffer: &'a dyn Fn() -> PixelBuf,
        batch: usize,
        dim: usize,
        rows_out: Sender<WriterMsg>,
        group_credits: Receiver<()>,
        batches: Sender<BatchJob>,
        done: Receiver<BatchDone>,
    ) -> Self {
        ModelStage {
            cfg,
            n_model,
            tiles,
            batch,
            dim,
            rows_out,
            group_credits,
            groups_sent: 0,
            batches,
            done,
            pending: VecDeque::new(),
            pixels: new_buffer(),
            in_batch: 0,
            next_batch: 0,
            results: Default::default(),
            outstanding: 0,
            st: PipelineState {
                written: 0,
                computed: 0,
                hits: 0,
                skipped: Vec::new(),
                timings: Timings::default(),
                steady_tiles_per_s: None,
            },
            compute: 0.0,
            warmup: 0.0,
            workers_idle: 0.0,
            dispatch_blocked: 0.0,
            warm_workers: 0,
            warm_at: None,
            steady_batches: 0,
            steady_tiles: 0,
            last_back: None,
            new_buffer,
            spare: Vec::new(),
        }
    }

    fn run(
        &mut self,
        items: Receiver<(Item, WorkerTimes)>,
        credits: Sender<()>,
        progress: &mut Progress,
    ) -> Result<PipelineState> {
        let mut reorder: BTreeMap<usize, Item> = BTreeMap::new();
        let mut next = 0usize;
        let mut wt = WorkerTimes::default();
        let mut waiting = 0.0;
        // Room for every worker's batch, one queued and the one being filled, so the bound
        // never stalls the model; hits and rejects beyond it wait for the batches before them.
        let max_pending = (self.n_model + 2) * self.batch + 64;
        while next < self.tiles.len() {
            // Take the next tile in order, waiting for the decoders as needed.
            let item = loop {
                if let Some(it) = reorder.remove(&next) {
                    break it;
                }
                let t = Instant::now();
                let Ok((it, times)) = items.recv() else {
                    return Err(anyhow::anyhow!("decode workers stopped unexpectedly"));
                };
                waiting += t.elapsed().as_secs_f64();
                wt += &times;
                reorder.insert(it.idx, it);
            };
            next += 1;
            let _ = credits.send(());
            let state = match item.prepared {
                Prepared::Hit(features) => RowState::Ready {
                    features,
                    hit: true,
                },
                Prepared::Pixels(p) => {
                    self.pixels.push(&p);
                    self.in_batch += 1;
                    RowState::InBatch(self.next_batch, self.in_batch - 1)
                }
                Prepared::Bad(reason) => match self.cfg.on_error {
                    OnError::Fail => {
                        return Err(fail(
                            ExitKind::Input,
                            format!(
                            "tile {}: {reason} (use --on-error skip to record bad tiles and go on)",
                            self.tiles[item.idx].path.display()
                        ),
                        ))
                    }
                    OnError::Skip => {
                        if !self.cfg.quiet {
                            eprintln!(
                                "tilefeat: skipping {}: {reason}",
                                self.tiles[item.idx].path.display()
                            );
                        }
                        RowState::Rejected(reason)
                    }
                },
            };
            self.pending.push_back(Row {
                idx: item.idx,
                sha: item.sha,
                state,
            });
            if self.in_batch == self.batch {
                self.dispatch()?;
            }
            // Collect finished batches without blocking, and pass on what is ready.
            while let Ok(d) = self.done.try_recv() {
                self.receive(d)?;
            }
            if !self.flush_ready()? {
                return Ok(self.take_state(wt, waiting));
            }
            // Bound the rows held back: send the partial batch, wait for results, pass on.
            while self.pending.len() >= max_pending {
                if self.in_batch > 0 {
                    self.dispatch()?;
                }
                if self.outstanding == 0 {
                    break; // everything held back is ready and was just flushed
                }
                self.wait_one()?;
                if !self.flush_ready()? {
                    return Ok(self.take_state(wt, waiting));
                }
            }
            progress.update(self.st.written + self.st.skipped.len(), self.st.hits);
        }
        if self.in_batch > 0 {
            self.dispatch()?;
        }
        while self.outstanding > 0 {
            self.wait_one()?;
        }
        if !self.flush_ready()? {
            return Ok(self.take_state(wt, waiting));
        }
        progress.update(next, self.st.hits);
        let _ = self.rows_out.send(WriterMsg::Finish {
            groups: self.groups_sent,
        });
        Ok(self.take_state(wt, waiting))
    }

    fn take_state(&mut self, wt: WorkerTimes, waiting: f64) -> PipelineState {
        let mut st = std::mem::replace(
            &mut self.st,
            PipelineState {
                written: 0,
                computed: 0,
                hits: 0,
                skipped: Vec::new(),
                timings: Timings::default(),
                steady_tiles_per_s: None,
            },
        );
        st.timings = Timings {
            read: wt.read,
            hash: wt.hash,
            cache_lookup: wt.lookup,
            decode: wt.decode,
            resize: wt.resize,
            model_waiting_for_tiles: waiting,
            model_warmup: self.warmup,
            model_compute: self.compute,
            workers_waiting_for_batches: self.workers_idle,
            batches_waiting_for_workers: self.dispatch_blocked,
            ..Timings::default()
        };
        st.steady_tiles_per_s = match (self.warm_at, self.last_back) {
            (Some(a), Some(b)) if self.steady_batches >= 4 * self.n_model && b > a => {
                Some(self.steady_tiles as f64 / (b - a).as_secs_f64())
            }
            _ => None,
        };
        st
    }

    /// Hand the open batch to a model worker; while they are all busy, take in results (so
    /// that workers blocked on returning them can go on).
    fn dispatch(&mut self) -> Result<()> {
        let mut job = BatchJob {
            id: self.next_batch,
            pixels: std::mem::replace(
                &mut self.pixels,
                self.spare.pop().unwrap_or_else(self.new_buffer),
            ),
            n: self.in_batch,
        };
        self.next_batch += 1;
        self.in_batch = 0;
        let stopped = || anyhow::anyhow!("model workers stopped unexpectedly");
        loop {
            match self.batches.try_send(job) {
                Ok(()) => {
                    self.outstanding += 1;
                    return Ok(());
                }
                Err(crossbeam_channel::TrySendError::Disconnected(_)) => return Err(stopped()),
                Err(crossbeam_channel::TrySendError::Full(j)) => {
                    job = j;
                    let mut sel = crossbeam_channel::Select::new();
                    sel.send(&self.batches);
                    let r = sel.recv(&self.done);
                    let t = Instant::now();
                    let ready = sel.ready();
                    self.dispatch_blocked += t.elapsed().as_secs_f64();
                    if ready == r {
                        match self.done.try_recv() {
                            Ok(d) => self.receive(d)?,
                            Err(crossbeam_channel::TryRecvError::Disconnected) => {
                                return Err(stopped())
                            }
                            Err(crossbeam_channel::TryRecvError::Empty) => {}
                        }
                    }
                }
            }
        }
    }

    fn wait_one(&mut self) -> Result<()> {
        let d = self
            .done
            .recv()
            .map_err(|_| anyhow::anyhow!("model workers stopped unexpectedly"))?;
        self.receive(d)
    }

    fn receive(&mut self, mut d: BatchDone) -> Result<()> {
        self.outstanding -= 1;
        self.workers_idle += d.idle;
        let mut pixels = std::mem::replace(&mut d.pixels, PixelBuf::host(0));
        // A failed batch's upload may still be reading its buffer (nothing waited for the
        // stream): never refill that one; libtorch frees it once the copy is done.
        if d.features.is_ok() {
            pixels.clear();
            self.spare.push(pixels);
        }
        if d.first && !matches!(self.cfg.device, Device::Cpu) {
            self.warmup += d.secs;
        } else {
            self.compute += d.secs;
        }
        // The steady state starts once every worker has had its first batch of this sample
        // back: in the first sample of a command that is its warm-up (kernels, cuDNN plans),
        // in later ones the pipeline filling up again.
        let now = Instant::now();
        if d.first_in_sample {
            self.warm_workers += 1;
            if self.warm_workers == self.n_model {
                self.warm_at = Some(now);
            }
        } else if self.warm_at.is_some() {
            self.steady_batches += 1;
            self.steady_tiles += d.features.as_ref().map_or(0, |f| f.len() / self.dim.max(1));
            self.last_back = Some(now);
        }
        let feats = d.features.with_context(|| {
            let first = self.pending.iter().find_map(|r| match r.state {
                RowState::InBatch(id, _) if id == d.id => {
                    Some(self.tiles[r.idx].path.display().to_string())
                }
                _ => None,
            });
            format!(
                "model failed on the batch starting at {}",
                first.unwrap_or_default()
            )
        })?;
        self.results.insert(d.id, feats);
        Ok(())
    }

    /// Hand every finished row at the front to the writer. False if the writer stopped.
    fn flush_ready(&mut self) -> Result<bool> {
        let mut group = Vec::new();
        while let Some(front) = self.pending.front() {
            let ready = match front.state {
                RowState::InBatch(id, _) => self.results.contains_key(&id),
                _ => true,
            };
            if !ready {
                break;
            }
            let r = self.pending.pop_front().expect("front exists");
            let (features, hit) = match r.state {
                RowState::Ready { features, hit } => (features, hit),
                RowState::InBatch(id, k) => {
                    let feats = &self.results[&id];
                    let features = feats[k * self.dim..(k + 1) * self.dim].to_vec();
                    if (k + 1) * self.dim == feats.len() {
                        self.results.remove(&id);
                    }
                    (features, false)
                }
                RowState::Rejected(reason) => {
                    self.st.skipped.push(Skipped {
                        tile: self.tiles[r.idx].rel.clone(),
                        reason,
                    });
                    continue;
                }
            };
            if hit {
                self.st.hits += 1;
            } else {
                self.st.computed += 1;
            }
            self.st.written += 1;
            group.push(OutRow {
                idx: r.idx,
                sha: r.sha,
                features,
                hit,
            });
        }
        if group.is_empty() {
            return Ok(true);
        }
        // No credit: the writer has stopped (it failed; the run ends with its error).
        if self.group_credits.recv().is_err() {
            return Ok(false);
        }
        let seq = self.groups_sent;
        self.groups_sent += 1;
        Ok(self
            .rows_out
            .send(WriterMsg::Rows { seq, rows: group })
            .is_ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Groups formatted on several threads finish out of order; the CSV keeps tile order, is
    /// committed only once every group is written, and a credit comes back for each group.
    #[test]
    fn parallel_formatting_keeps_rows_in_order() {
        let tiles: Vec<Tile> = (0..203)
            .map(|i| Tile {
                path: PathBuf::from(format!("/t/{i}.png")),
                rel: format!("dir,{i}/t{i}.png"),
            })
            .collect();
        let row = |i: usize| OutRow {
            idx: 202 - i,
            sha: [i as u8; 32],
            features: (0..7).map(|k| (i * 7 + k) as f32 / 3.0).collect(),
            hit: i % 2 == 0,
        };
        let want = format_rows(&(0..203).map(row).collect::<Vec<_>>(), &tiles);
        assert_eq!(want.lines().count(), 203);
        assert!(
            want.starts_with("\"dir,202/t202.png\",0.0,0.33333334,"),
            "{}",
            &want[..40]
        );
        // Groups of 1 to 40 rows, some large ones first so that they finish after later ones.
        let sizes = [40, 35, 1, 30, 2, 1, 25, 3, 40, 26];
        assert_eq!(sizes.iter().sum::<usize>(), 203);
        for finish in [true, false] {
            let d = tempfile::tempdir().unwrap();
            let out = d.path().join("f.csv");
            let csv = AtomicFile::create(&out).unwrap();
            let (row_tx, row_rx) = bounded::<WriterMsg>(2);
            let (text_tx, text_rx) = bounded::<Formatted>(2);
            // As the model stage does: a credit per group sent, at most 3 groups not written.
            let (credit_tx, credits) = bounded::<()>(3);
            for _ in 0..3 {
                credit_tx.send(()).unwrap();
            }
            let (write, format) = std::thread::scope(|scope| {
                for _ in 0..3 {
                    let (row_rx, text_tx) = (row_rx.clone(), text_tx.clone());
                    scope.spawn(|| format_loop(row_rx, text_tx, &tiles));
                }
                drop((row_rx, text_tx));
                let writer = scope.spawn(|| writer_loop(text_rx, credit_tx, csv, None, &out));
                let mut first = 0;
                for (seq, n) in sizes.iter().enumerate() {
                    credits.recv().unwrap();
                    let rows = (first..first + n).map(row).collect();
                    first += n;
                    let seq = seq as u64;
                    row_tx.send(WriterMsg::Rows { seq, rows }).unwrap();
                }
                if finish {
                    let groups = sizes.len() as u64;
                    row_tx.send(WriterMsg::Finish { groups }).unwrap();
                }
                drop(row_tx);
                writer.join().unwrap().unwrap()
            });
            assert!(write >= 0.0 && format > 0.0);
            assert_eq!(credits.len(), 3, "a credit back for each group written");
            if finish {
                assert_eq!(std::fs::read_to_string(&out).unwrap(), want);
            } else {
                // No `Finish`: a failed run, nothing under the final name.
                assert!(!out.exists());
            }
        }
    }

    /// Without a cache the content hash is skipped unless asked for; pixels are the same.
    #[test]
    fn tiles_are_hashed_only_for_a_cache_or_when_asked() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("t.png");
        let img = image::RgbImage::from_fn(40, 30, |x, y| image::Rgb([x as u8, y as u8, 7]));
        img.save(&path).unwrap();
        let tile = Tile {
            path: path.clone(),
            rel: "t.png".into(),
        };
        let want: Hash32 = Sha256::digest(std::fs::read(&path).unwrap()).into();
        let mut t = WorkerTimes::default();
        let (sha0, p0) = prepare(&tile, 32, None, false, &mut t);
        let (sha1, p1) = prepare(&tile, 32, None, true, &mut t);
        assert_eq!(sha0, [0; 32]);
        assert_eq!(sha1, want);
        match (p0, p1) {
            (Prepared::Pixels(a), Prepared::Pixels(b)) => {
                assert_eq!(a.len(), 32 * 32 * 3);
                assert_eq!(a, b);
            }
            _ => panic!("tile did not decode"),
        }
        let fp = Fingerprint {
            weights_sha256: "test".into(),
            layer: crate::cli::Layer::Layer4,
            pool: crate::cli::Pool::Max,
            normalize: Normalize::Tutorial,
            size: 32,
            precision: Precision::Fp32,
            preprocessing_version: PREPROCESSING_VERSION,
        };
        let cache = Cache::open(&d.path().join("cache"), &fp).unwrap();
        let (sha2, _) = prepare(&tile, 32, Some(&cache), false, &mut t);
        assert_eq!(sha2, want, "a cache always gets the real hash");
    }

    /// Runs `pipeline` with `model` on the demo's sampleA (batches of 2) in a thread; the
    /// error chain, or a test failure if the run hangs. Nothing may be left under the final
    /// name either way.
    fn run_demo_pipeline<M: BatchModel + 'static>(model: M) -> Result<(), String> {
        let d = tempfile::tempdir().unwrap();
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("demo/tiles/sampleA");
        let tiles = find_some_tiles(&dir).unwrap().tiles;
        assert!(tiles.len() >= 5, "three batches of two or more");
        let out = d.path().join("f.csv");
        let cfg = demo_cfg(&dir, &out);
        let (tx, rx) = std::sync::mpsc::channel();
        let target = out.clone();
        std::thread::spawn(move || {
            let csv = AtomicFile::create(&target).unwrap();
            let mut progress = Progress::new(tiles.len(), true);
            let r = pipeline(&cfg, &tiles, &model, None, csv, &mut progress, 2048);
            let _ = tx.send(r.map(|_| ()).map_err(|e| format!("{e:#}")));
        });
        let result = rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("the run hung");
        if result.is_err() {
            assert!(!out.exists(), "nothing under the final name");
        }
        result
    }

    /// The demo pipeline's settings: batches of 2, 2 decode threads, 32 px, writing `out`.
    fn demo_cfg(dir: &Path, out: &Path) -> ExtractConfig {
        ExtractConfig::for_pipeline_bench(
            dir,
            out,
            2,
            2,
            32,
            crate::cli::Layer::Layer4,
            Precision::Fp32,
        )
    }

    fn null_model() -> NullModel {
        NullModel {
            dim: 2048,
            tile_bytes: 32 * 32 * 3,
        }
    }

    /// Regression: a model worker that panics (tch does when libtorch fails, e.g. out of GPU
    /// memory) fails the run with an error naming the batch. Before, the other worker kept
    /// the run waiting forever.
    #[test]
    fn a_panicking_model_fails_the_run_instead_of_hanging() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        struct Flaky {
            calls: Arc<AtomicUsize>,
            inner: NullModel,
        }
        impl BatchModel for Flaky {
            fn fork(&self) -> Self {
                Flaky {
                    calls: self.calls.clone(),
                    inner: self.inner.fork(),
                }
            }
            fn buffer(&self, tiles: usize) -> PixelBuf {
                self.inner.buffer(tiles)
            }
            fn run(&self, pixels: &mut PixelBuf, n: usize) -> Result<Vec<f32>> {
                if self.calls.fetch_add(1, Ordering::SeqCst) == 1 {
                    panic!("CUDA out of memory (simulated)\nException raised from ...");
                }
                self.inner.run(pixels, n)
            }
        }
        let e = run_demo_pipeline(Flaky {
            calls: Arc::new(AtomicUsize::new(0)),
            inner: null_model(),
        })
        .expect_err("a panicking model must fail the run");
        assert!(
            e.contains("model failed on the batch starting at ")
                && e.contains("libtorch failed: CUDA out of memory (simulated)")
                && !e.contains("Exception raised"),
            "{e}"
        );
    }

    /// The model workers of one command serve its samples one after the other: each worker is
    /// set up once, and a sample that fails on a batch leaves nothing behind for the next one,
    /// whose rows are those of a run on fresh workers.
    #[test]
    fn model_workers_serve_several_samples_without_mixing_them() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        struct Counting {
            starts: Arc<AtomicUsize>,
            calls: Arc<AtomicUsize>,
            fail_call: usize,
            inner: NullModel,
        }
        impl BatchModel for Counting {
            fn fork(&self) -> Self {
                Counting {
                    starts: self.starts.clone(),
                    calls: self.calls.clone(),
                    fail_call: self.fail_call,
                    inner: self.inner.fork(),
                }
            }
            fn buffer(&self, tiles: usize) -> PixelBuf {
                self.inner.buffer(tiles)
            }
            fn start_worker(&self) -> Result<()> {
                self.starts.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
            fn run(&self, pixels: &mut PixelBuf, n: usize) -> Result<Vec<f32>> {
                let call = self.calls.fetch_add(1, Ordering::SeqCst);
                if call == self.fail_call {
                    anyhow::bail!("simulated failure");
                }
                if call == self.fail_call + 1 {
                    // Still busy with the failed sample's batch when the next one starts.
                    std::thread::sleep(std::time::Duration::from_millis(300));
                }
                self.inner.run(pixels, n)
            }
        }
        let d = tempfile::tempdir().unwrap();
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("demo/tiles/sampleA");
        let tiles = find_some_tiles(&dir).unwrap().tiles;
        let model = Counting {
            starts: Arc::new(AtomicUsize::new(0)),
            calls: Arc::new(AtomicUsize::new(0)),
            // Sample 1 takes calls 0-2 (three batches of two); sample 2 fails on its second.
            fail_call: 4,
            inner: null_model(),
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let out = d.path().to_path_buf();
        let starts = model.starts.clone();
        std::thread::spawn(move || {
            let workers = ModelWorkers::start(&model, Device::Cpu, 2);
            let mut results = Vec::new();
            for k in 0..3 {
                let path = out.join(format!("s{k}.csv"));
                let cfg = demo_cfg(&dir, &path);
                let csv = AtomicFile::create(&path).unwrap();
                let mut progress = Progress::new(tiles.len(), true);
                let r = pipeline_on(
                    &cfg,
                    &tiles,
                    &model,
                    &workers,
                    None,
                    csv,
                    &mut progress,
                    2048,
                );
                results.push(
                    r.map(|_| std::fs::read(&path).unwrap())
                        .map_err(|e| format!("{e:#}")),
                );
            }
            // A run of its own, on fresh workers.
            let path = out.join("fresh.csv");
            let cfg = demo_cfg(&dir, &path);
            let csv = AtomicFile::create(&path).unwrap();
            let mut progress = Progress::new(tiles.len(), true);
            pipeline(&cfg, &tiles, &null_model(), None, csv, &mut progress, 2048).unwrap();
            results.push(Ok(std::fs::read(&path).unwrap()));
            drop(workers);
            let _ = tx.send(results);
        });
        let results = rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("the runs hung");
        let fresh = results[3].as_ref().unwrap();
        assert_eq!(results[0].as_ref().unwrap(), fresh);
        let e = results[1].as_ref().expect_err("the second sample fails");
        assert!(e.contains("simulated failure"), "{e}");
        assert!(
            !d.path().join("s1.csv").exists(),
            "nothing under its final name"
        );
        assert_eq!(
            results[2].as_ref().unwrap(),
            fresh,
            "the third is not mixed up"
        );
        assert_eq!(starts.load(Ordering::SeqCst), 2, "each worker set up once");
    }

    /// A model worker that cannot be set up (say, no CUDA stream for it) fails the run with
    /// the reason, naming the batch, instead of hanging or running without it.
    #[test]
    fn a_worker_that_cannot_start_fails_the_run() {
        struct Unstartable(NullModel);
        impl BatchModel for Unstartable {
            fn fork(&self) -> Self {
                Unstartable(self.0.fork())
            }
            fn buffer(&self, tiles: usize) -> PixelBuf {
                self.0.buffer(tiles)
            }
            fn start_worker(&self) -> Result<()> {
                anyhow::bail!("no stream for this worker (simulated)")
            }
            fn run(&self, pixels: &mut PixelBuf, n: usize) -> Result<Vec<f32>> {
                self.0.run(pixels, n)
            }
        }
        let e = run_demo_pipeline(Unstartable(null_model())).expect_err("must fail");
        assert!(
            e.contains("model failed on the batch starting at ")
                && e.contains("no stream for this worker (simulated)"),
            "{e}"
        );
        // The same pipeline with a model that starts runs through.
        run_demo_pipeline(null_model()).unwrap();
    }

    /// The pipeline bench's stand-in: one row of `dim` values per tile, a function of the
    /// tile's pixels only, full-precision floats in [0, 4).
    #[test]
    fn null_model_rows_depend_on_each_tile_only() {
        let m = NullModel {
            dim: 50,
            tile_bytes: 12,
        };
        let a: Vec<u8> = (0..12).collect();
        let b: Vec<u8> = (100..112).collect();
        let run = |m: &NullModel, tiles: &[&[u8]]| {
            let mut buf = m.buffer(tiles.len());
            tiles.iter().for_each(|t| buf.push(t));
            m.run(&mut buf, tiles.len()).unwrap()
        };
        let ab = run(&m.fork(), &[&a, &b]);
        let ba = run(&m, &[&b, &a]);
        assert_eq!(ab.len(), 100);
        assert_eq!(ab[..50], ba[50..]);
        assert_eq!(ab[50..], ba[..50]);
        assert_ne!(ab[..50], ab[50..]);
        assert_eq!(run(&m, &[&a]), ab[..50]);
        assert!(ab.iter().all(|v| (0.0..4.0).contains(v)));
        assert!(ab
            .iter()
            .any(|v| v.fract() != 0.0 && (v * 1024.0).fract() != 0.0));
    }

    /// A reused batch buffer, padded as on a GPU, gives each tile the features it gets alone:
    /// pixels land in the right rows, reuse and padding are clean.
    #[test]
    fn padded_batches_in_a_reused_buffer_match_single_tiles() {
        use crate::cli::{Layer, Pool};
        let opts = RunOptions {
            device: Device::Cpu,
            precision: Precision::Fp32,
            channels_last: true,
        };
        let model = ResNetTrunk::new(
            &weights::random_state_dict(1, Layer::Layer4),
            Layer::Layer4,
            Pool::Max,
            opts,
        )
        .unwrap();
        let size = 32usize;
        let tile_bytes = size * size * 3;
        let tiles: Vec<Vec<u8>> = (0..4u32)
            .map(|t| {
                (0..tile_bytes as u32)
                    .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(t * 977) >> 13) as u8)
                    .collect()
            })
            .collect();
        let single = Runner::new(model.shallow_clone(), Normalize::Tutorial, 32, None, None);
        let alone: Vec<Vec<f32>> = tiles
            .iter()
            .map(|t| {
                let mut b = single.buffer(1);
                b.push(t);
                single.run(&mut b, 1).unwrap()
            })
            .collect();
        let padded = Runner::new(model, Normalize::Tutorial, 32, Some(5), None);
        // One buffer for every batch, as the model stage reuses them: a short batch after a
        // long one finds the old pixels beyond its tiles.
        let mut buf = padded.buffer(3);
        for group in [&[0usize, 1, 2][..], &[3, 1], &[2, 0, 3, 1]] {
            buf.clear();
            for &i in group {
                buf.push(&tiles[i]);
            }
            let got = padded.run(&mut buf, group.len()).unwrap();
            assert_eq!(got.len(), group.len() * 2048);
            for (k, &i) in group.iter().enumerate() {
                let row = &got[k * 2048..(k + 1) * 2048];
                let scale = alone[i].iter().fold(0f32, |m, v| m.max(v.abs()));
                let err = row
                    .iter()
                    .zip(&alone[i])
                    .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(
                    err <= 1e-5 * scale,
                    "tile {i} in {group:?}: {err} vs {scale}"
                );
            }
        }
    }
}
