//! `extract`'s flags, checked once into an [`ExtractPlan`]: one [`ExtractConfig`] per tile
//! source, alike but for the source, the output and the sample ID. Usage errors come before
//! the weights and the device are looked at; nothing heavy happens here.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use tch::Device;

use crate::cache::{Fingerprint, PREPROCESSING_VERSION};
use crate::cli::{ExtractArgs, Normalize, OnError, Precision};
use crate::device::{available_cpus, parse_device};
use crate::encoder::script::Sidecar;
use crate::encoder::weights::{self, WeightsSource};
use crate::error::{fail, ExitKind, WithKind};
use crate::input::coords::CoordsMode;
use crate::input::slide::GridRequest;
use crate::output::Format;

/// `--batch-size` by default on a GPU.
pub const GPU_BATCH: usize = 32;

/// `--batch-size` by default on the CPU: each tile is computed on its own there (one image
/// per forward call, so the rows do not depend on the batch), so a batch only decides how
/// often rows come back (and how evenly the tiles spread over the workers): 4 keeps the
/// progress moving, for one message between threads per 4 tiles of ~70 ms each.
pub const CPU_BATCH: usize = 4;

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

/// `--model`: the TorchScript file and its sidecar, if it has one.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    pub path: PathBuf,
    pub sidecar: Option<(PathBuf, Sidecar)>,
    /// `--allow-unsafe-model`: run it even if its code calls file operations.
    pub allow_unsafe: bool,
}

/// Per-channel normalization, and whether it is one of `--normalize`'s (else it is part of
/// the fingerprint as numbers).
#[derive(Debug, Clone, PartialEq)]
pub struct MeanStd {
    pub mean: [f32; 3],
    pub std: [f32; 3],
    pub custom: bool,
}

impl MeanStd {
    pub fn of(n: Normalize) -> MeanStd {
        let (mean, std) = match n {
            Normalize::Tutorial => ([0.5; 3], [0.5; 3]),
            Normalize::Imagenet => ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        };
        MeanStd {
            mean,
            std,
            custom: false,
        }
    }

    /// `mean=R,G,B std=R,G,B`, as the fingerprint and the provenance record it.
    pub fn describe(&self) -> String {
        let j = |v: &[f32; 3]| v.map(|x| x.to_string()).join(",");
        format!("mean={} std={}", j(&self.mean), j(&self.std))
    }
}

/// `--preset`: its layer, pool, normalization and size where the flags leave them unset. A
/// flag that names another value is a usage error: a recipe half applied gives neither its
/// features nor the flags'.
fn apply_preset(a: &ExtractArgs, p: crate::cli::Preset) -> Result<ExtractArgs> {
    use crate::cli::value_name;
    let (layer, pool, normalize, size) = p.settings();
    let preset = value_name(&p);
    let refuse = |m: String| Err(fail(ExitKind::Usage, format!("--preset {preset} sets {m}")));
    // A flag given with a value other than the preset's.
    fn differs<T: PartialEq>(given: Option<T>, wants: &T) -> Option<T> {
        given.filter(|g| g != wants)
    }
    let clash = |flag: &str, given: String, wants: String| {
        refuse(format!(
            "{flag} {wants}, not {given}: drop {flag} (or the preset)"
        ))
    };
    if let Some(l) = differs(a.layer, &layer) {
        return clash("--layer", value_name(&l), value_name(&layer));
    }
    if let Some(o) = differs(a.pool, &pool) {
        return clash("--pool", value_name(&o), value_name(&pool));
    }
    if let Some(n) = differs(a.normalize, &normalize) {
        return clash("--normalize", value_name(&n), value_name(&normalize));
    }
    if a.mean.is_some() {
        return refuse(format!(
            "--normalize {}: drop --mean and --std (or the preset)",
            value_name(&normalize)
        ));
    }
    if let Some(s) = differs(a.size, &size) {
        return clash("--size", s.to_string(), size.to_string());
    }
    let mut out = a.clone();
    out.layer = Some(layer);
    out.pool = Some(pool);
    out.normalize = Some(normalize);
    out.size = Some(size);
    Ok(out)
}

/// `--model`'s preprocessing: flags first, then the sidecar, then the defaults; a flag that
/// disagrees with the sidecar is used, with a warning.
fn model_preprocessing(
    a: &ExtractArgs,
    model: Option<&ModelSpec>,
) -> Result<(u32, Normalize, MeanStd)> {
    let sidecar = model.and_then(|m| m.sidecar.as_ref());
    let warn = |what: String| {
        if !a.quiet {
            eprintln!("tilefeat: warning: {what}");
        }
    };
    let size = match (a.size, sidecar) {
        (Some(s), Some((p, sc))) if s != sc.size => {
            warn(format!(
                "--size {s} differs from {}'s size {} (the model was exported for {})",
                p.display(),
                sc.size,
                sc.size
            ));
            s
        }
        (Some(s), _) => s,
        (None, Some((_, sc))) => sc.size,
        (None, None) => 224,
    };
    let normalize = a.normalize.unwrap_or(Normalize::Tutorial);
    let mean_std = match (a.mean, a.std, a.normalize, sidecar) {
        (Some(mean), Some(std), _, _) => {
            if std.iter().any(|&s| s <= 0.0) {
                return Err(fail(ExitKind::Usage, "--std: every value must be positive"));
            }
            MeanStd {
                mean,
                std,
                custom: true,
            }
        }
        (_, _, Some(n), _) => MeanStd::of(n),
        (_, _, None, Some((_, sc))) => MeanStd {
            mean: sc.mean,
            std: sc.std,
            custom: true,
        },
        _ => MeanStd::of(Normalize::Tutorial),
    };
    if let Some((p, sc)) = sidecar {
        if mean_std.mean != sc.mean || mean_std.std != sc.std {
            warn(format!(
                "normalization {} differs from {}'s (mean={:?} std={:?}), which the model was \
                 trained with",
                mean_std.describe(),
                p.display(),
                sc.mean,
                sc.std
            ));
        }
    }
    Ok((size, normalize, mean_std))
}

/// A validated `extract` configuration.
#[derive(Debug, Clone)]
pub struct ExtractConfig {
    pub tile_dir: PathBuf,
    pub output: PathBuf,
    /// The feature file's format (from --format or the output's extension).
    pub format: Format,
    /// Where tile coordinates come from, and whether the flag was given (then a tile
    /// without them fails the sample, and the CSV gets x,y columns).
    pub coords: CoordsMode,
    pub coords_explicit: bool,
    pub patch_size_level0: Option<u64>,
    /// `--slide-mpp`: the slide's micrometres per pixel at level 0.
    pub slide_mpp: Option<f64>,
    /// CLAM's layout: the `.pt` bag written beside the HDF5 `output` from the same rows
    /// (`pt_files/SAMPLE.pt` for `h5_files/SAMPLE.h5`).
    pub bag: Option<PathBuf>,
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
    /// The normalization's mean and std (from --normalize, --mean/--std or the sidecar).
    pub mean_std: MeanStd,
    pub size: u32,
    /// A TorchScript model run instead of the ResNet50 (`--model`).
    pub model: Option<ModelSpec>,
    pub on_error: OnError,
    pub cache_dir: Option<PathBuf>,
    /// `cache_dir` is the default one beside the outputs (not asked for): a cache there that
    /// cannot be used is a warning, not an error.
    pub cache_default: bool,
    /// `--force`: no cache lookups, and the outputs are written even when up to date.
    pub force: bool,
    pub channels_last: bool,
    pub dry_run: bool,
    pub quiet: bool,
    pub profile: bool,
    /// Slides: the resolution, patch size and stride of the grid.
    pub slide_grid: GridRequest,
}

/// `--mpp`/`--magnification`, `--patch-size` and `--stride`, checked: the grid slides get. Any of
/// them given with a tile folder or an archive is a usage error (they would be ignored).
fn slide_grid(a: &ExtractArgs) -> Result<GridRequest> {
    let usage = |m: String| fail(ExitKind::Usage, m);
    let given = [
        a.mpp.map(|_| "--mpp"),
        a.magnification.map(|_| "--magnification"),
        a.patch_size.map(|_| "--patch-size"),
        a.stride.map(|_| "--stride"),
        a.tissue.as_ref().map(|_| "--tissue"),
    ];
    if let Some(flag) = given.iter().flatten().next() {
        if let Some(dir) = a
            .tile_dirs
            .iter()
            .find(|d| !crate::input::slide::is_slide(d))
        {
            return Err(usage(format!(
                "{flag} is for slides, but {} is a tile folder or an archive, whose tiles are \
                 used as they are: leave {flag} out (or extract slides and tile folders in \
                 separate commands)",
                dir.display()
            )));
        }
    }
    let (target_mpp, asked) = match (a.mpp, a.magnification) {
        (Some(_), Some(_)) => {
            return Err(usage("--mpp and --magnification: give one".into()));
        }
        (Some(m), None) => {
            if !(m.is_finite() && (0.01..=100.0).contains(&m)) {
                return Err(usage(format!(
                    "--mpp {m}: must be between 0.01 and 100 µm/px"
                )));
            }
            (m, format!("--mpp {m}"))
        }
        (None, Some(x)) => {
            if !(x.is_finite() && (0.1..=1000.0).contains(&x)) {
                return Err(usage(format!(
                    "--magnification {x}: must be between 0.1 and 1000 (10/M µm/px)"
                )));
            }
            (10.0 / x, format!("--magnification {x}"))
        }
        (None, None) => (0.5, "--magnification 20 (default)".to_string()),
    };
    let patch = a.patch_size.unwrap_or(256);
    if !(16..=8192).contains(&patch) {
        return Err(usage(format!(
            "--patch-size {patch}: must be between 16 and 8192 pixels"
        )));
    }
    let stride = a.stride.unwrap_or(patch);
    if !(1..=65536).contains(&stride) {
        return Err(usage(format!(
            "--stride {stride}: must be between 1 and 65536 pixels"
        )));
    }
    let tissue = match a.tissue.as_deref().unwrap_or("clam") {
        "none" => None,
        name => Some((
            name.to_string(),
            name.parse::<crate::input::slide::tissue::TissueParams>()
                .map_err(|e| usage(format!("--tissue {name}: {e}")))?,
        )),
    };
    Ok(GridRequest {
        target_mpp,
        asked,
        patch,
        stride,
        slide_mpp: None,
        tissue,
        threads: 1,
    })
}

/// Micrometres per pixel a slide's level 0 may have: 0.01 (beyond any optical scanner) to 100
/// (a 0.1x overview); a 72-dpi image's 352.78 is not a slide's.
pub const SLIDE_MPP_RANGE: std::ops::RangeInclusive<f64> = 0.01..=100.0;

/// `--slide-mpp`: finite and in [`SLIDE_MPP_RANGE`].
fn check_slide_mpp(mpp: f64) -> std::result::Result<(), String> {
    if mpp.is_finite() && SLIDE_MPP_RANGE.contains(&mpp) {
        Ok(())
    } else {
        Err(format!(
            "--slide-mpp {mpp}: not a slide's micrometres per pixel at level 0 (expected {} to \
             {}; e.g. 0.25 for a 40x scan, 0.5 for 20x)",
            SLIDE_MPP_RANGE.start(),
            SLIDE_MPP_RANGE.end()
        ))
    }
}

/// The folder of the default cache: `.tilefeat-cache` in `--outdir`, or in `--output`'s
/// folder. Beside the outputs, not in the home folder: on a cluster a home quota is small,
/// while the output's file system already holds features of about this size (a cached vector
/// is 4 bytes a value, the CSV about 10), and every node that writes the outputs can reach it.
pub(crate) const DEFAULT_CACHE: &str = ".tilefeat-cache";

/// Where the default cache of a sample writing `output` lies (see [`DEFAULT_CACHE`]).
fn default_cache_dir(outdir: Option<&Path>, output: &Path) -> PathBuf {
    let dir = outdir
        .or_else(|| output.parent())
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    dir.join(DEFAULT_CACHE)
}

/// CLAM's `pt_files/SAMPLE.pt` for its `h5_files/SAMPLE.h5`.
fn clam_bag(h5: &Path) -> PathBuf {
    let folder = h5.parent().and_then(Path::parent).unwrap_or(Path::new(""));
    folder
        .join("pt_files")
        .join(h5.with_extension("pt").file_name().unwrap_or_default())
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
        let with_preset;
        let a = match a.preset {
            Some(p) => {
                with_preset = apply_preset(a, p)?;
                &with_preset
            }
            None => a,
        };
        if let Some(n) = a.batch_size {
            check_batch_size(n)?;
        }
        let model = match &a.model {
            Some(path) => {
                // TILEFEAT_WEIGHTS in the environment is for the ResNet; only the flag conflicts.
                let from_env = std::env::var("TILEFEAT_WEIGHTS").ok();
                if a.weights.is_some() && a.weights != from_env {
                    return Err(usage(
                        "--model replaces the ResNet50: --weights does not apply to it".into(),
                    ));
                }
                if !path.is_file() {
                    return Err(fail(
                        ExitKind::Weights,
                        format!(
                            "model file {} does not exist or is not a file",
                            path.display()
                        ),
                    ));
                }
                let sidecar = crate::encoder::script::Sidecar::find(path)?;
                Some(ModelSpec {
                    path: path.clone(),
                    sidecar,
                    allow_unsafe: a.allow_unsafe_model,
                })
            }
            None => None,
        };
        let (size, normalize, mean_std) = model_preprocessing(a, model.as_ref())?;
        check_size(size)?;
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
            // Any other regular file is a slide (OpenSlide says whether it is one).
            if !dir.is_dir() && !dir.is_file() {
                let why = if dir.exists() {
                    "is not a directory, an archive (.zip, .tar, .tar.gz, .tgz) or a slide \
                     file"
                } else {
                    "does not exist"
                };
                return Err(fail(
                    ExitKind::Input,
                    format!("tile folder {} {why}", dir.display()),
                ));
            }
        }
        // A tile's name as the output would overwrite that tile (or be read as one next time).
        if let Some(o) = a.output.as_ref().filter(|o| {
            o.file_name()
                .is_some_and(|n| crate::input::has_tile_extension(&n.to_string_lossy()))
        }) {
            return Err(usage(format!(
                "--output {}: an image name, not a feature file (it could be one of the tiles, \
                 and would be taken for a tile next time); give a name such as features.csv",
                o.display()
            )));
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
        let format = match &a.output {
            Some(o) => crate::output::format::resolve(o, a.format).map_err(usage)?,
            None => a.format.unwrap_or(Format::Csv),
        };
        let coords = CoordsMode::parse(a.coords.as_deref().unwrap_or("auto"));
        if let CoordsMode::Regex(pattern) = &coords {
            crate::input::coords::compile_user_regex(pattern).map_err(usage)?;
        }
        if a.patch_size_level0 == Some(0) {
            return Err(usage("--patch-size-level0 must be at least 1".into()));
        }
        if let Some(mpp) = a.slide_mpp {
            check_slide_mpp(mpp).map_err(usage)?;
        }
        let slide_grid = slide_grid(a)?;
        // Names and outputs first: usage errors before the weights and the device are looked at.
        let mut named: Vec<(PathBuf, String, PathBuf)> = Vec::with_capacity(n);
        for (k, dir) in a.tile_dirs.iter().enumerate() {
            let sample = match a.sample.get(k) {
                Some(s) => s.clone(),
                None => {
                    let abs = std::fs::canonicalize(dir)
                        .with_context(|| format!("cannot resolve tile folder {}", dir.display()))
                        .kind(ExitKind::Input)?;
                    // An archive's sample is its name without the archive suffix; a slide's,
                    // its name as given (a link's, in a sample sheet of links) without its
                    // extension.
                    let stem = crate::input::archive_kind(&abs)
                        .filter(|_| abs.is_file())
                        .map(|(_, stem)| std::ffi::OsString::from(stem))
                        .or_else(|| {
                            let name = dir.file_name()?.to_str()?;
                            crate::input::slide::is_slide(&abs)
                                .then(|| crate::input::slide::sample_name(name).into())
                        });
                    let name = stem.unwrap_or_else(|| abs.file_name().unwrap_or_default().into());
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
                    match format {
                        Format::Clam => d.join("h5_files").join(format!("{sample}.h5")),
                        _ => d.join(format!("{sample}.{}", format.extension())),
                    }
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
        let weights = match &model {
            Some(m) => WeightsSource::File(m.path.clone()),
            None => weights::resolve(a.weights.as_deref()).kind(ExitKind::Weights)?,
        };
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
        let batch_size = a.batch_size.unwrap_or(match device {
            Device::Cpu => CPU_BATCH,
            _ => GPU_BATCH,
        });
        // No cache flag: the default cache beside the outputs, unless a site or a wrapper that
        // manages its own turned it off.
        let default_cache = !a.no_cache
            && a.cache_dir.is_none()
            && crate::env_switch("TILEFEAT_DEFAULT_CACHE", true);
        let samples = named
            .into_iter()
            .map(|(tile_dir, sample, output)| ExtractConfig {
                cache_dir: if default_cache {
                    Some(default_cache_dir(a.outdir.as_deref(), &output))
                } else if a.no_cache {
                    None
                } else {
                    a.cache_dir.clone()
                },
                bag: (format == Format::Clam).then(|| clam_bag(&output)),
                tile_dir,
                output,
                // CLAM's layout is an HDF5 file with a bag beside it.
                format: match format {
                    Format::Clam => Format::H5,
                    f => f,
                },
                coords: coords.clone(),
                coords_explicit: a.coords.is_some(),
                patch_size_level0: a.patch_size_level0,
                slide_mpp: a.slide_mpp,
                sample,
                weights: weights.clone(),
                device,
                batch_size,
                torch_threads,
                decode_threads,
                precision: a.precision,
                layer: a.layer.unwrap_or(crate::cli::Layer::Layer4),
                pool: a.pool.unwrap_or(crate::cli::Pool::Max),
                normalize,
                mean_std: mean_std.clone(),
                size,
                model: model.clone(),
                on_error: a.on_error,
                cache_default: default_cache,
                force: a.force,
                // A TorchScript model gets contiguous NCHW, as it was traced with.
                channels_last: a.layout == "nhwc" && model.is_none(),
                dry_run: a.dry_run,
                quiet: a.quiet,
                profile: a.profile,
                slide_grid: slide_grid.clone(),
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
    /// `NullModel`): two model workers as on a GPU, bad tiles skipped, no progress.
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
            format: Format::Csv,
            coords: CoordsMode::None,
            coords_explicit: false,
            patch_size_level0: None,
            slide_mpp: None,
            bag: None,
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
            mean_std: MeanStd::of(Normalize::Tutorial),
            size,
            model: None,
            on_error: OnError::Skip,
            cache_dir: None,
            cache_default: false,
            force: false,
            channels_last: false,
            dry_run: false,
            quiet: true,
            profile: false,
            slide_grid: GridRequest::default(),
        }
    }

    /// Whether the features are not trained ones: `random:SEED` weights, or a `--model`
    /// whose sidecar says it was exported with a random initialisation.
    pub fn untrained(&self) -> bool {
        self.weights.is_random()
            || self
                .model
                .as_ref()
                .and_then(|m| m.sidecar.as_ref())
                .is_some_and(|(_, s)| s.random_init.is_some())
    }

    /// `--coords` as given (or its default).
    pub(crate) fn coords_flag(&self) -> &str {
        match &self.coords {
            CoordsMode::Auto => "auto",
            CoordsMode::None => "none",
            CoordsMode::Regex(r) => r,
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
            layout: (!self.channels_last && self.model.is_none()).then(|| "nchw".to_string()),
            encoder: self.model.as_ref().map(|_| "torchscript".to_string()),
            mean_std: self.mean_std.custom.then(|| self.mean_std.describe()),
        }
    }
}
