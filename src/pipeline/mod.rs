//! `tilefeat extract`: the plan, the pipeline that runs each sample, and the set-up the
//! samples share.
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
//!
//! Files, in the order of the data flow: [`plan`] (flags -> configs), [`shared`] (weights,
//! encoder, workers and cache set up once), [`sample`] (one sample's run and side files),
//! [`run`] (the threads of one sample), [`decoders`], [`stage`] with [`stage_clock`],
//! [`workers`], [`writer`].

pub mod decoders;
pub mod plan;
pub mod run;
pub mod sample;
pub mod shared;
pub mod stage;
pub mod stage_clock;
pub mod state;
pub mod workers;
pub mod writer;

use std::io::Write;
use std::time::Instant;

use anyhow::{Context, Result};

pub(crate) use plan::{check_batch_size, check_size, gpu_decode_threads};
pub use plan::{ExtractConfig, ExtractPlan};
pub use sample::Summary;
pub use workers::model_workers;

use crate::error::{fail, kind_of, ExitKind, WithKind};
use sample::extract_sample;
use shared::Shared;

/// Why a sample failed.
pub(crate) enum Failure {
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
