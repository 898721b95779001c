//! One sample of an `extract` command: list its tiles, run the pipeline into its feature
//! file (complete under a temporary name), then write what goes beside it (the rejected list
//! and the provenance), and only then rename all of them into place. If any cannot be
//! written, none replaces the previous run's: a sample's outputs are all new or all old.

use std::io::Write;
use std::time::Instant;

use anyhow::{Context, Result};

use super::run::pipeline_on;
use super::shared::{Session, SetupTimes, Shared};
use super::state::PipelineState;
use super::writer::RowNames;
use super::{ExtractConfig, Failure};
use crate::cache::{Cache, CacheCounters, Fingerprint};
use crate::cpu::CpuInfo;
use crate::device::device_name;
use crate::error::{fail, ExitKind, WithKind};
use crate::input;
use crate::input::coords::{self, Coords};
use crate::output::provenance::{
    BagProvenance, CacheInfo, CoordsProvenance, Counts, FingerprintInfo, ModelProvenance,
    Provenance, Settings, WeightsInfo, RANDOM_WEIGHTS_WARNING,
};
use crate::output::{
    create_features, provenance_path, rejected_path, CoordsInfo, FileInfo, Format, OutputLock,
};
use crate::progress::Progress;

/// Summary of a finished run.
pub struct Summary {
    pub provenance: Provenance,
    /// The outputs in place were already these (and described so): nothing was written.
    pub up_to_date: bool,
}

/// One sample: list its tiles, run the pipeline into its CSV, write its rejected list and
/// provenance. None for a dry run (the plan is printed instead).
pub(crate) fn extract_sample(
    cfg: &ExtractConfig,
    shared: &mut Shared,
    start: Instant,
    command: Vec<String>,
    out: &mut dyn Write,
) -> Result<Option<Summary>, Failure> {
    // This sample's start-up reports the shared set-up it paid for itself (not what an earlier
    // sample that then failed paid).
    shared.setup = SetupTimes::default();
    let request = input::slide::GridRequest {
        slide_mpp: cfg.slide_mpp,
        // Before the model runs, tissue detection may use the run's decode or model threads,
        // whichever are more (segment.rs caps them).
        threads: cfg.torch_threads.max(cfg.decode_threads),
        ..cfg.slide_grid.clone()
    };
    let mut source = input::open(&cfg.tile_dir, &request)?;
    // A slide's grid tiles off tissue were dropped when it was opened (`--tissue`).
    let listing = input::list_some_tiles(&mut *source, &cfg.tile_dir)?;
    for w in &listing.warnings {
        if !cfg.quiet {
            eprintln!("tilefeat: warning: {w}");
        }
    }
    let tiles = listing.tiles;
    let slide = source.slide_info();
    let coords = sample_coords(cfg, &tiles)?;
    // A slide's tiles are its grid's extent in level 0, whatever --patch-size-level0 says, and
    // its level 0 is the resolution it was read at (its own, or --slide-mpp).
    let patch_size_level0 = slide
        .as_ref()
        .map(|s| s.patch_size_level0)
        .or(cfg.patch_size_level0);
    let slide_mpp = slide.as_ref().map(|s| s.mpp).or(cfg.slide_mpp);
    let weights_id = shared.weights(cfg).map_err(Failure::Shared)?.id.clone();
    let fingerprint = cfg.fingerprint(&weights_id);
    if cfg.dry_run {
        writeln!(
            out,
            "dry run: sample {} — {} tiles in {}{} -> {} ({}, coordinates: {}); device {}, precision {}, batch {}, {} torch + {} decode threads; weights {} (sha256 {}); fingerprint {}",
            cfg.sample,
            tiles.len(),
            cfg.tile_dir.display(),
            slide.as_ref().map_or(String::new(), |s| format!(
                " (slide: {} level-0 {} µm/px from {}; {} px tiles at {} µm/px, {}, read from level {} as {} px, {} level-0 px a side)",
                s.vendor, s.mpp, s.mpp_source, s.patch_size, s.target_mpp, s.target, s.level, s.read_size, s.patch_size_level0
            )),
            cfg.output.display(),
            cfg.format.as_str(),
            coords.found.as_ref().map_or("none", |c| c.convention.as_str()),
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
    // Fail early, before any compute, if the outputs cannot be written; one run at a time
    // per output, until its provenance is written.
    // Like --outdir's, --output's folder is made (`--output features/S1.csv` in a new
    // project), and CLAM's h5_files/ and pt_files/.
    for file in [Some(cfg.output.as_path()), cfg.bag.as_deref()]
        .into_iter()
        .flatten()
    {
        if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create the folder of {}", file.display()))
                .kind(ExitKind::Output)?;
        }
    }
    let _lock = OutputLock::acquire(&cfg.output)?;
    let _bag_lock = cfg.bag.as_deref().map(OutputLock::acquire).transpose()?;
    check_side_files_free(&cfg.output)?;
    // An output (or a side file) that is the archive read, the weights, or the model or its
    // sidecar (regression, review: `--weights w.pt -o w.pt` replaced the weights).
    let mut written = vec![
        cfg.output.clone(),
        provenance_path(&cfg.output),
        rejected_path(&cfg.output),
        crate::output::pt::index_path(&cfg.output),
    ];
    if let Some(bag) = &cfg.bag {
        written.extend([
            bag.clone(),
            crate::output::pt::index_path(bag),
            provenance_path(bag),
            rejected_path(bag),
        ]);
    }
    written.push(crate::output::side_file(&cfg.output, "tissue.png"));
    let mut read = vec![cfg.tile_dir.clone()];
    if let crate::encoder::weights::WeightsSource::File(w) = &cfg.weights {
        read.push(w.clone());
    }
    if let Some(m) = &cfg.model {
        read.push(m.path.clone());
        read.extend(m.sidecar.as_ref().map(|(p, _)| p.clone()));
    }
    crate::output::refuse_overwriting_inputs(&written, &read)?;
    let dim = shared.feature_dim(cfg);
    let model = model_provenance(cfg, shared);
    let in_file = coords.in_file(cfg);
    let info = FileInfo {
        dim,
        coords: in_file.map(|c| {
            let mut info = CoordsInfo::of(c, patch_size_level0, slide_mpp);
            // A slide's tiles: CLAM's `patch_size` is the region's side at `patch_level`
            // (its readers read that region there, its heatmaps scale it by the level's
            // downsample), which the tile was then resized from to --patch-size; the
            // magnification the tiles are at is the grid's.
            if let Some(s) = &slide {
                info.patch_size = Some(s.read_size);
                info.patch_level = u32::try_from(s.level).ok();
                info.target_mpp = Some(s.target_mpp);
            }
            info
        }),
        attrs: file_attrs(cfg, &fingerprint),
    };
    let quiet = cfg.quiet;
    let mut warn = |w: String| {
        if !quiet {
            eprintln!("tilefeat: warning: {w}");
        }
    };
    let mut file = create_features(&cfg.output, cfg.format, &info, &mut warn)?;
    if let Some(bag) = &cfg.bag {
        let pt = create_features(bag, Format::Pt, &info, &mut warn)?;
        file = Box::new(crate::output::pair::Pair::new(file, pt));
    }

    shared.session(cfg, &fingerprint).map_err(Failure::Shared)?;
    let setup = std::mem::take(&mut shared.setup);
    let session = shared.session.as_ref().expect("set up above");
    let cache = session.cache.as_ref();
    let before = cache.map(|c| c.counters());

    crate::interrupt::set_resume(match (cache, &cfg.cache_dir) {
        (Some(_), Some(d)) => format!(
            "the tiles computed so far are in the cache {}: run the same command{} to resume",
            d.display(),
            if cfg.force { " without --force" } else { "" }
        ),
        _ => "no cache keeps its tiles: a rerun computes them again".to_string(),
    });
    if !cfg.quiet {
        // Where a rerun would resume from (or that it would not).
        let resume = match (cache, &cfg.cache_dir) {
            (Some(_), Some(d)) if cfg.force => format!("cache {} (--force: not read)", d.display()),
            (Some(_), Some(d)) => format!("cache {}", d.display()),
            _ => "no cache".to_string(),
        };
        eprintln!(
            "tilefeat: sample {}: {} tiles -> {} ({} on {}, {}, batch {}); {resume}",
            cfg.sample,
            tiles.len(),
            cfg.output.display(),
            encoder_description(cfg),
            device_name(cfg.device),
            cfg.precision,
            cfg.batch_size
        );
    }
    let mut progress = Progress::new(tiles.len(), cfg.quiet);
    let pipeline_start = Instant::now();
    let names = RowNames {
        tiles: &tiles,
        xy: in_file.map(|c| c.xy.as_slice()),
    };
    let mut state = pipeline_on(
        cfg,
        &*source,
        names,
        &session.runner,
        &session.workers,
        cache,
        file,
        &mut progress,
        dim,
    )
    .map_err(|e| out_of_memory_hint(e, cfg))?;
    progress.finish();
    state.timings.startup = (pipeline_start - start).as_secs_f64();
    (
        state.timings.setup_weights,
        state.timings.setup_model,
        state.timings.setup_cache,
    ) = (setup.weights, setup.model, setup.cache);
    state.timings.pipeline = pipeline_start.elapsed().as_secs_f64();
    // The feature file is complete under a temporary name: it replaces the previous one only
    // with its side files, once all three are written.
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
        (
            coords.provenance(cfg, in_file.is_some(), (patch_size_level0, slide_mpp)),
            model,
            source.slide_info(),
            source.picture(),
        ),
    )
    .map(Some)
    .map_err(Failure::Sample)
}

/// A sample's outputs once its feature file is complete: the cache synced, the rejected list
/// and the provenance written, then all three renamed into place. A failure before the renames
/// (a full disk) leaves the previous outputs as they were.
#[allow(clippy::too_many_arguments)]
fn finish_sample(
    cfg: &ExtractConfig,
    session: &Session,
    mut state: PipelineState,
    found: usize,
    before: Option<CacheCounters>,
    fingerprint: &Fingerprint,
    start: Instant,
    command: Vec<String>,
    dim: usize,
    (coords, model, slide, picture): (
        Option<CoordsProvenance>,
        Option<ModelProvenance>,
        Option<input::slide::SlideInfo>,
        Option<Vec<u8>>,
    ),
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
            eprintln!("tilefeat: warning: damaged cache data ignored (recomputed): {d}");
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
    let rejected = crate::output::stage(&rejected_path(&cfg.output), tsv.as_bytes())?;

    let elapsed = start.elapsed().as_secs_f64();
    let written = state.written;
    let trained = !cfg.untrained();
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
        model,
        slide,
        format: Some(cfg.format.as_str().to_string()),
        coords,
        output_sha256: Some(state.committed.sha256.clone()),
        output_bytes: Some(state.committed.bytes),
        bag: cfg
            .bag
            .as_ref()
            .zip(state.committed.companion.as_ref())
            .map(|(p, c)| BagProvenance {
                path: p.display().to_string(),
                sha256: c.sha256.clone(),
                bytes: c.bytes,
            }),
        cpu: (cfg.device == tch::Device::Cpu).then(CpuInfo::detect),
        device: device_name(cfg.device),
        feature_dim: dim,
        settings: Settings {
            // A --model has no ResNet layer, and numbers (its sidecar's, or --mean/--std)
            // instead of a --normalize name: neither is recorded for what did not apply.
            layer: cfg.model.is_none().then_some(cfg.layer),
            pool: cfg.pool,
            normalize: (!cfg.mean_std.custom).then_some(cfg.normalize),
            mean_std: cfg.mean_std.custom.then(|| cfg.mean_std.describe()),
            size: cfg.size,
            precision: cfg.precision,
            batch_size: cfg.batch_size,
            torch_threads: cfg.torch_threads,
            decode_threads: cfg.decode_threads,
            // From the built model, so that the provenance shows a --layout that was lost on
            // the way (the strides themselves: encoder::native's layout test).
            layout: session.runner.layout().into(),
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
            // The cache used (none when the default one could not be).
            dir: cache
                .and(cfg.cache_dir.as_ref())
                .map(|d| d.display().to_string()),
            entries_at_open: session.entries_at_open,
            hits: state.hits,
            misses: if cache.is_some() { state.computed } else { 0 },
            stored,
            damaged_records,
            store_failed: cache.and_then(Cache::store_failed),
        },
        cuda_waits: cuda.map(|c| c.waits.clone()),
        cuda_streams: cuda.map(|c| c.streams.clone()),
        cudnn_algorithms: cuda.map(|c| c.cudnn.clone()),
        elapsed_s: round3(elapsed),
        tiles_per_s: round3(found as f64 / elapsed.max(1e-9)),
        steady_tiles_per_s: state.steady_tiles_per_s.map(round3),
        timings_s: state.timings.rounded(),
    };
    // Every file is complete: rename them, the provenance (which names the feature file's
    // hash) last.
    let features = state
        .staged
        .take()
        .ok_or_else(|| anyhow::anyhow!("internal error: no feature file to commit"))?;
    // A slide's picture of its tissue and tiles goes with them; a slide read without
    // tissue detection takes a previous run's picture (of other tiles) away.
    let picture_path = crate::output::side_file(&cfg.output, "tissue.png");
    let mut staged = features.and(rejected);
    match &picture {
        Some(png) => staged = staged.and(crate::output::stage(&picture_path, png)?),
        None => staged = staged.and(crate::output::Staged::removal(picture_path)),
    }
    // CLAM's layout: a provenance or rejected list beside the bag (an earlier `--format pt`
    // run's) would describe the bag this run replaces; the `.h5`'s describe both now.
    if let Some(bag) = &cfg.bag {
        for stale in [provenance_path(bag), rejected_path(bag)] {
            staged = staged.and(crate::output::Staged::removal(stale));
        }
    }
    // A rerun that made the very files in place, which their provenance describes, leaves
    // them (and that provenance) as they are: "up to date" (`--force` writes them anyway).
    if !cfg.force
        && describes(&provenance_path(&cfg.output), &provenance)
        && staged.changes_nothing()
    {
        return Ok(Summary {
            provenance,
            up_to_date: true,
        });
    }
    let prov_file = crate::output::stage(
        &provenance_path(&cfg.output),
        provenance.to_yaml()?.as_bytes(),
    )?;
    staged.and(prov_file).commit()?;
    Ok(Summary {
        provenance,
        up_to_date: false,
    })
}

/// A run that ran out of memory says so first, with the settings that set how much it needs
/// and the flags that lower it (then what libtorch said, naming the batch's first tile).
fn out_of_memory_hint(e: anyhow::Error, cfg: &ExtractConfig) -> anyhow::Error {
    if !crate::error::is_out_of_memory(&format!("{e:#}")) {
        return e;
    }
    let lower = if cfg.device == tch::Device::Cpu {
        "lower --batch-size first, then --threads (each model thread holds a batch) or --size"
    } else {
        "lower --batch-size first, then --size"
    };
    e.context(format!(
        "out of memory computing sample {} on {} (--batch-size {}, --size {}, --threads {}, \
         --precision {}): {lower}",
        cfg.sample,
        device_name(cfg.device),
        cfg.batch_size,
        cfg.size,
        cfg.torch_threads,
        cfg.precision
    ))
}

/// Whether the provenance file at `path` describes the outputs `new` describes: the same
/// fingerprint (weights, model and every setting that changes a number), sample, format, and
/// feature file and bag hashes. Unreadable or unparsable: no.
fn describes(path: &std::path::Path, new: &Provenance) -> bool {
    let Ok(text) = std::fs::read_to_string(path) else {
        return false;
    };
    let Ok(old) = serde_yaml::from_str::<serde_yaml::Value>(&text) else {
        return false;
    };
    let field = |v: &serde_yaml::Value, path: &[&str]| {
        path.iter()
            .try_fold(v, |v, k| v.get(*k))
            .and_then(|v| v.as_str().map(str::to_string))
    };
    field(&old, &["fingerprint", "id"]).as_deref() == Some(new.fingerprint.id.as_str())
        && field(&old, &["sample"]).as_deref() == Some(new.sample.as_str())
        && field(&old, &["format"]) == new.format
        && field(&old, &["output_sha256"]) == new.output_sha256
        && field(&old, &["bag", "sha256"]) == new.bag.as_ref().map(|b| b.sha256.clone())
}

/// A sample's tile coordinates, or why it has none.
struct SampleCoords {
    found: Option<Coords>,
    missing: Option<String>,
}

impl SampleCoords {
    /// The coordinates the feature file holds: HDF5 and Parquet whenever the names give them,
    /// the CSV only when `--coords` was given (its default columns stay the tutorial's).
    fn in_file(&self, cfg: &ExtractConfig) -> Option<&Coords> {
        self.found
            .as_ref()
            .filter(|_| cfg.format != Format::Csv || cfg.coords_explicit)
    }

    fn provenance(
        &self,
        cfg: &ExtractConfig,
        in_file: bool,
        (patch_size_level0, slide_mpp): (Option<u64>, Option<f64>),
    ) -> Option<CoordsProvenance> {
        if cfg.coords == coords::CoordsMode::None {
            return None;
        }
        Some(match &self.found {
            Some(c) => CoordsProvenance {
                convention: Some(c.convention.clone()),
                origin: Some(c.origin.as_str().into()),
                unit: Some(c.unit.as_str().into()),
                in_output: in_file,
                integral: c.integral,
                patch_size_level0: patch_size_level0.or(c.patch_size_level0),
                slide_mpp,
                patch_level: c.patch_level,
                missing: None,
            },
            None => CoordsProvenance {
                convention: None,
                origin: None,
                unit: None,
                in_output: false,
                integral: false,
                patch_size_level0: None,
                slide_mpp,
                patch_level: None,
                missing: self.missing.clone(),
            },
        })
    }
}

/// The coordinates `--coords` finds in the tile names. Given explicitly, a tile without them
/// fails the sample; by default the sample just has none (with a warning where the format
/// would have held them).
fn sample_coords(cfg: &ExtractConfig, tiles: &[input::Tile]) -> Result<SampleCoords> {
    match coords::find(&cfg.coords, tiles) {
        Ok(found) => Ok(SampleCoords {
            found,
            missing: None,
        }),
        Err(coords::NoCoords(why)) if cfg.coords_explicit => Err(fail(
            ExitKind::Input,
            format!(
                "tile folder {}: no coordinates (--coords {}): {why}",
                cfg.tile_dir.display(),
                cfg.coords_flag()
            ),
        )),
        Err(coords::NoCoords(why)) => {
            if cfg.format != Format::Csv && !cfg.quiet {
                eprintln!(
                    "tilefeat: warning: sample {}: no tile coordinates in {} ({why})",
                    cfg.sample,
                    cfg.output.display()
                );
            }
            Ok(SampleCoords {
                found: None,
                missing: Some(why),
            })
        }
    }
}

/// `x.csv`, `x.h5` and `x.parquet` share their side files (`x.provenance.yaml`): writing one
/// must not take the provenance of another that is still there (it could no longer be
/// joined or trusted).
fn check_side_files_free(output: &std::path::Path) -> Result<()> {
    let Ok(prov) = Provenance::read(&provenance_path(output)) else {
        return Ok(());
    };
    let other = std::path::Path::new(&prov.output)
        .file_name()
        .map(|n| output.parent().unwrap_or(std::path::Path::new("")).join(n));
    match other {
        Some(other) if other.file_name() != output.file_name() && other.exists() => Err(fail(
            ExitKind::Output,
            format!(
                "{} would replace {}, the provenance of {} (a feature file and its side files \
                 share their name without the extension): write {} to another name or \
                 folder, or remove {} first",
                output.display(),
                provenance_path(output).display(),
                other.display(),
                output.display(),
                other.display()
            ),
        )),
        _ => Ok(()),
    }
}

/// `resnet50`, or `torchscript:NAME` for a `--model` (NAME from its sidecar, else the file).
fn encoder_name(cfg: &ExtractConfig) -> String {
    match &cfg.model {
        None => "resnet50".into(),
        Some(m) => {
            let file = m.path.file_name().unwrap_or_default().to_string_lossy();
            let name = m.sidecar.as_ref().and_then(|(_, s)| s.name.clone());
            format!("torchscript:{}", name.unwrap_or_else(|| file.into_owned()))
        }
    }
}

/// What computes the features, in words: `resnet50 layer4 max` or `torchscript:NAME`.
fn encoder_description(cfg: &ExtractConfig) -> String {
    match cfg.model {
        None => format!(
            "resnet50 {} {}",
            layer_name(cfg),
            format!("{:?}", cfg.pool).to_lowercase()
        ),
        Some(_) => encoder_name(cfg),
    }
}

/// The ResNet stage pooled, or `output` for a `--model`.
fn layer_name(cfg: &ExtractConfig) -> String {
    match cfg.model {
        None => format!("{:?}", cfg.layer).to_lowercase(),
        Some(_) => "output".into(),
    }
}

/// `tutorial`, `imagenet`, or the numbers.
fn normalize_name(cfg: &ExtractConfig) -> String {
    if cfg.mean_std.custom {
        cfg.mean_std.describe()
    } else {
        format!("{:?}", cfg.normalize).to_lowercase()
    }
}

/// What the provenance says of a `--model`.
fn model_provenance(cfg: &ExtractConfig, shared: &Shared) -> Option<ModelProvenance> {
    let (m, script) = (cfg.model.as_ref()?, shared.script.as_ref()?);
    Some(ModelProvenance {
        file: m.path.display().to_string(),
        sha256: script.sha256.clone(),
        sidecar: m.sidecar.as_ref().map(|(p, _)| p.display().to_string()),
        name: m.sidecar.as_ref().and_then(|(_, s)| s.name.clone()),
        output_shape: script.output_shape.clone(),
        pooled: script.output_shape.len() == 4,
        mean: cfg.mean_std.mean,
        std: cfg.mean_std.std,
    })
}

/// What an HDF5 file records about how its features were made.
fn file_attrs(cfg: &ExtractConfig, fingerprint: &Fingerprint) -> Vec<(String, String)> {
    [
        ("encoder", encoder_name(cfg)),
        ("layer", layer_name(cfg)),
        ("pool", format!("{:?}", cfg.pool).to_lowercase()),
        ("normalize", normalize_name(cfg)),
        ("size", cfg.size.to_string()),
        ("precision", cfg.precision.to_string()),
        ("fingerprint", hex::encode(fingerprint.id())),
        ("weights_sha256", fingerprint.weights_sha256.clone()),
        ("trained", (!cfg.untrained()).to_string()),
        ("tilefeat_version", env!("CARGO_PKG_VERSION").to_string()),
        ("sample", cfg.sample.clone()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}
