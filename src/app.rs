//! Dispatch: parsed command line -> validated configuration -> the module that does the work.

use std::io::Write;

use anyhow::Result;

use crate::cli::{CacheCommand, Cli, Command, WeightsCommand};
use crate::error::{fail, ExitKind, WithKind};

/// `tilefeat preprocess`: one tile through decode + resize, saved as PNG.
fn preprocess(a: &crate::cli::PreprocessArgs) -> Result<()> {
    // Regression: `preprocess t.png -o t.png` replaced the tile.
    crate::output::refuse_overwriting_inputs(&[&a.output], &[&a.image])?;
    let bytes = std::fs::read(&a.image).map_err(|e| {
        fail(
            ExitKind::Input,
            format!("cannot read {}: {e}", a.image.display()),
        )
    })?;
    let img = crate::pixels::decode::decode_rgb(&bytes)
        .map_err(|e| fail(ExitKind::Input, format!("tile {}: {e}", a.image.display())))?;
    let s = a.size as usize;
    let out = crate::pixels::resize::resize_linear(&img, s, s);
    let buf = image::RgbImage::from_raw(s as u32, s as u32, out.data).expect("buffer matches size");
    let mut png = Vec::new();
    image::DynamicImage::ImageRgb8(buf)
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(|e| fail(ExitKind::Output, format!("cannot encode PNG: {e}")))?;
    crate::output::write_atomic(&a.output, &png)
}

/// The lines `extract` prints as each sample's outputs are in place: the summary (unless
/// `--quiet`) and, with `--profile`, where the time went.
fn report_sample(cfg: &crate::pipeline::ExtractConfig, summary: &crate::pipeline::Summary) {
    let p = &summary.provenance;
    if summary.up_to_date && !cfg.quiet {
        eprintln!(
            "tilefeat: sample {}: up to date: {} and its side files already hold these {} tiles' features ({} from the cache, {} computed, {} skipped) with these settings; left as they were (--force writes them again)",
            p.sample,
            cfg.output.display(),
            p.tiles.found,
            p.tiles.cache_hits,
            p.tiles.computed,
            p.tiles.skipped,
        );
        if !p.weights.trained {
            eprintln!(
                "tilefeat: WARNING: {}",
                crate::output::provenance::RANDOM_WEIGHTS_WARNING
            );
        }
    } else if !cfg.quiet {
        let secs = p.elapsed_s;
        eprintln!(
            "tilefeat: {} tiles ({} computed, {} cached, {} skipped) in {:.1} s, {:.1} tiles/s on {} ({}) -> {}",
            p.tiles.found,
            p.tiles.computed,
            p.tiles.cache_hits,
            p.tiles.skipped,
            secs,
            p.tiles.found as f64 / secs.max(1e-9),
            p.device,
            cfg.precision,
            cfg.output.display()
        );
        if !p.weights.trained {
            eprintln!(
                "tilefeat: WARNING: {}",
                crate::output::provenance::RANDOM_WEIGHTS_WARNING
            );
        }
    }
    if cfg.profile {
        let t = &p.timings_s;
        eprintln!(
            "tilefeat: profile: startup {:.2} s (weights {:.2}, device and model {:.2}, cache {:.2}), pipeline {:.2} s ({:.1} tiles/s) wall; summed over threads (s): read {:.2}, hash {:.2}, cache lookup {:.2}, decode {:.2}, resize {:.2}, model stage waiting for tiles {:.2}, batches waiting for a model worker {:.2}, model workers waiting for a batch {:.2}, model warm-up (first batches) {:.2}, model compute {:.2}, format {:.2}, write {:.2}",
            t.startup, t.setup_weights, t.setup_model, t.setup_cache, t.pipeline, p.tiles.found as f64 / t.pipeline.max(1e-9), t.read, t.hash, t.cache_lookup, t.decode, t.resize, t.model_waiting_for_tiles, t.batches_waiting_for_workers, t.workers_waiting_for_batches, t.model_warmup, t.model_compute, t.format, t.write
        );
        if let Some(r) = p.steady_tiles_per_s {
            eprintln!(
                "tilefeat: profile: steady state once the model workers were warm: {r:.1} tiles/s computed"
            );
        }
        if let (Some(w), Some(c)) = (&p.cuda_waits, &p.cudnn_algorithms) {
            let streams = p.cuda_streams.as_deref().unwrap_or("?");
            eprintln!(
                "tilefeat: profile: threads waiting for the GPU: {w}; cuDNN algorithms: {c}; model workers' CUDA streams: {streams}"
            );
        }
    }
}

/// Run the parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    crate::host::raise_open_file_limit();
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    match cli.command {
        Command::Extract(args) => {
            let plan = crate::pipeline::ExtractPlan::from_cli_arguments(&args)?;
            let command: Vec<String> = std::env::args().collect();
            crate::pipeline::run(&plan, command, &mut out, &mut report_sample)?;
        }
        Command::Join(args) => crate::join::run(&args, &mut out)?,
        Command::Info => crate::device::info(&mut out)?,
        Command::Bench(args) => crate::bench::run(&args, &mut out)?,
        Command::Preprocess(args) => preprocess(&args)?,
        Command::Cache { command } => match command {
            CacheCommand::Stats(a) => crate::cache::stats(&a.cache_dir, &mut out)?,
            CacheCommand::Verify(a) => crate::cache::verify(&a.cache_dir, &mut out)?,
            CacheCommand::Gc(a) => {
                let opts = crate::cache::GcOptions {
                    keep: a.keep.clone(),
                    unused_since: a
                        .unused_since
                        .as_deref()
                        .map(crate::cache::parse_date)
                        .transpose()?,
                    stale: std::time::Duration::from_secs(a.stale_after_hours * 3600),
                };
                crate::cache::gc(&a.cache_dir, &opts, &mut out)?
            }
        },
        Command::Weights { command } => match command {
            WeightsCommand::Where => {
                let dir = crate::encoder::weights::torch_hub_checkpoints();
                match dir {
                    Some(d) => {
                        let p = d.join(crate::encoder::weights::TORCHVISION_FILE);
                        writeln!(
                            out,
                            "{} ({})",
                            p.display(),
                            if p.is_file() { "present" } else { "missing" }
                        )?;
                    }
                    None => writeln!(
                        out,
                        "no torchvision cache directory (HOME and TORCH_HOME unset)"
                    )?,
                }
            }
            WeightsCommand::Verify { file } => {
                let src = crate::encoder::weights::WeightsSource::File(file.clone());
                let w = crate::encoder::weights::Weights::load(&src, crate::cli::Layer::Layer4)
                    .kind(ExitKind::Weights)?;
                writeln!(
                    out,
                    "{}: ResNet50 state dict OK ({} tensors checked), sha256 {}",
                    file.display(),
                    w.tensors.len(),
                    w.id
                )?;
                if file.file_name().and_then(|n| n.to_str())
                    == Some(crate::encoder::weights::TORCHVISION_FILE)
                    && !w
                        .id
                        .starts_with(crate::encoder::weights::TORCHVISION_SHA256_PREFIX)
                {
                    return Err(fail(ExitKind::Weights, format!(
                        "{} is named like torchvision's file but its SHA-256 does not start with {}",
                        file.display(),
                        crate::encoder::weights::TORCHVISION_SHA256_PREFIX
                    )));
                }
            }
            WeightsCommand::Fetch { dest } => {
                crate::encoder::weights::fetch(dest.as_deref(), &mut out)?
            }
        },
    }
    out.flush()?;
    Ok(())
}
