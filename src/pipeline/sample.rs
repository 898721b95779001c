//! One sample of an `extract` command: list its tiles, run the pipeline into its feature
//! file, then write what goes beside it (the rejected list and the provenance). If those
//! cannot be written, the feature file is taken back: a sample's outputs are all there or
//! none is.

use std::io::Write;
use std::time::Instant;

use anyhow::Result;

use super::run::{pipeline_on, PipelineState};
use super::shared::{Session, SetupTimes, Shared};
use super::{ExtractConfig, Failure};
use crate::cache::{CacheCounters, Fingerprint};
use crate::cpu::CpuInfo;
use crate::device::device_name;
use crate::encoder::resnet::feature_dim;
use crate::input;
use crate::output::provenance::{
    CacheInfo, Counts, FingerprintInfo, Provenance, Settings, WeightsInfo, RANDOM_WEIGHTS_WARNING,
};
use crate::output::{create_features, provenance_path, rejected_path, OutputLock};
use crate::progress::Progress;

/// Summary of a finished run.
pub struct Summary {
    pub provenance: Provenance,
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
    let mut source = input::open(&cfg.tile_dir)?;
    let listing = input::list_some_tiles(&mut *source, &cfg.tile_dir)?;
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
    // Fail early, before any compute, if the outputs cannot be written; one run at a time
    // per output, until its provenance is written.
    let _lock = OutputLock::acquire(&cfg.output)?;
    let dim = feature_dim(cfg.layer);
    let file = create_features(&cfg.output, dim)?;

    shared.session(cfg, &fingerprint).map_err(Failure::Shared)?;
    let setup = std::mem::take(&mut shared.setup);
    let session = shared.session.as_ref().expect("set up above");
    let cache = session.cache.as_ref();
    let before = cache.map(|c| c.counters());

    let mut progress = Progress::new(tiles.len(), cfg.quiet);
    let pipeline_start = Instant::now();
    let mut state = pipeline_on(
        cfg,
        &*source,
        &tiles,
        &session.runner,
        &session.workers,
        cache,
        file,
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
    before: Option<CacheCounters>,
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
        output_sha256: Some(state.committed.sha256.clone()),
        output_bytes: Some(state.committed.bytes),
        cpu: (cfg.device == tch::Device::Cpu).then(CpuInfo::detect),
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
