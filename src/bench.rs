//! `tilefeat bench`: the ceilings `extract` is measured against. `--what model`: the ResNet
//! trunk alone on random input, with the same batch, precision, layout, device and
//! model-worker arrangement as `extract` (see `pipeline::model_workers`), each batch ending
//! with its features on the CPU. `--what decode`: read, hash, decode and resize per core.
//! `--what pipeline`: `extract`'s own pipeline with a stand-in for the network, the most the
//! CPU side can feed a device. Also SHA-256 speed and opening a large cache.

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use tch::{Device, Kind, Tensor};

mod cache_open;

use crate::cli::{BenchArgs, BenchWhat, Pool};
use crate::device::{available_cpus, configure_cuda, device_name, parse_device};
use crate::encoder::resnet::{to_channels_last, ResNetTrunk, RunOptions};
use crate::encoder::weights::random_state_dict;
use crate::error::{fail, ExitKind, WithKind};
use crate::input::{Tile, TileSource};
use crate::output::create_features;
use crate::pipeline::{check_batch_size, check_size, gpu_decode_threads, model_workers};
use crate::progress::Progress;

pub fn run(a: &BenchArgs, out: &mut dyn Write) -> Result<()> {
    match a.what {
        BenchWhat::Model => model(a, out),
        BenchWhat::Hash => hash(out),
        BenchWhat::CacheOpen => cache_open::run(a, out),
        BenchWhat::Decode => decode(a, out),
        BenchWhat::Pipeline => pipeline(a, out),
    }
}

/// The tiles of `--tiles DIR` for the decode and pipeline benches, read once so that the
/// timed passes read from the page cache, as on a warm node.
fn bench_tiles(a: &BenchArgs, what: &str) -> Result<(PathBuf, Box<dyn TileSource>, Vec<Tile>)> {
    let dir = a
        .tiles
        .clone()
        .ok_or_else(|| fail(ExitKind::Usage, format!("--what {what} needs --tiles DIR")))?;
    check_size(a.size)?;
    let mut source = crate::input::open(&dir, &Default::default())?;
    let tiles = crate::input::list_some_tiles(&mut *source, &dir)?.tiles;
    for t in &tiles {
        let _ = source.read(t);
    }
    Ok((dir, source, tiles))
}

/// `extract`'s pipeline with [`NullModel`] in place of the network: reading, decoding,
/// resizing, batching, reordering, CSV formatting and writing (and with --cache-dir, hashing
/// and storing), at full speed; the tiles are listed and read once before the clock starts.
/// On a GPU host this is the ceiling of `extract`: if it is below `bench --what model`, the
/// CPU side bounds the run. The CSV (about 20 KB per tile) goes to a scratch folder under
/// TMPDIR and the cache to a fresh folder under --cache-dir; both are removed afterwards, on
/// errors too.
fn pipeline(a: &BenchArgs, out: &mut dyn Write) -> Result<()> {
    use crate::encoder::NullModel;
    use crate::pipeline::{run::pipeline, ExtractConfig};
    let (dir, source, tiles) = bench_tiles(a, "pipeline")?;
    check_batch_size(a.batch_size)?;
    if a.decode_threads == Some(0) {
        return Err(fail(ExitKind::Usage, "--decode-threads must be at least 1"));
    }
    let decode_threads = a
        .decode_threads
        .unwrap_or(gpu_decode_threads(available_cpus()));
    let scratch_dir = |parent: &Path| {
        tempfile::Builder::new()
            .prefix("tilefeat-bench-")
            .tempdir_in(parent)
            .with_context(|| format!("cannot create a scratch folder in {}", parent.display()))
    };
    let scratch = scratch_dir(&std::env::temp_dir()).kind(ExitKind::Output)?;
    let csv_path = scratch.path().join("features.csv");
    let cfg = ExtractConfig::for_pipeline_bench(
        &dir,
        &csv_path,
        a.batch_size,
        decode_threads,
        a.size,
        a.layer,
        a.precision,
    );
    let dim = crate::encoder::resnet::feature_dim(a.layer);
    let info = crate::output::FileInfo {
        dim,
        ..Default::default()
    };
    let csv = create_features(&csv_path, crate::output::Format::Csv, &info, &mut |_| ())?;
    // A fresh cache, so that every tile is hashed, missed and stored, as on a first run.
    let cache_dir = match &a.cache_dir {
        Some(parent) => Some(scratch_dir(parent).kind(ExitKind::Cache)?),
        None => None,
    };
    let cache = match &cache_dir {
        Some(d) => {
            let fp = cfg.fingerprint("bench-pipeline-null-model");
            Some(crate::cache::Cache::open(d.path(), &fp)?)
        }
        None => None,
    };
    let model = NullModel {
        dim,
        tile_bytes: (a.size * a.size * 3) as usize,
    };
    let mut progress = Progress::new(tiles.len(), true);
    let t = Instant::now();
    let mut st = pipeline(
        &cfg,
        &*source,
        &tiles,
        &model,
        cache.as_ref(),
        csv,
        &mut progress,
        dim,
    )?;
    if let Some(file) = st.staged.take() {
        file.commit()?;
    }
    let secs = t.elapsed().as_secs_f64();
    let csv_mb = std::fs::metadata(&csv_path).map_or(0.0, |m| m.len() as f64 / 1e6);
    let stored = match cache {
        Some(c) => Some(c.close()?.stored),
        None => None,
    };
    let n = st.written;
    let tps = n as f64 / secs;
    if a.machine {
        writeln!(out, "tiles_per_s={tps:.1}")?;
        return Ok(());
    }
    let ms = |s: f64| 1e3 * s / n.max(1) as f64;
    let tm = &st.timings;
    writeln!(
        out,
        "pipeline without the network on {} ({n} tiles written, {} unreadable; page cache warm): {tps:.0} tiles/s in {secs:.2} s",
        dir.display(),
        st.skipped.len()
    )?;
    writeln!(
        out,
        "  {decode_threads} decode threads, batch {}, {dim} columns, CSV {csv_mb:.0} MB in {} (removed); {}",
        a.batch_size,
        scratch.path().display(),
        match stored {
            Some(k) => format!("a fresh cache (removed): {k} vectors stored"),
            None => "no cache (no hashing)".into(),
        }
    )?;
    writeln!(
        out,
        "  decode workers, ms per tile summed over threads: read {:.3}, hash {:.3}, decode {:.3}, resize {:.3}; batching thread waited {:.2} s for tiles; CSV formatting {:.2} s (summed over threads), writing {:.2} s",
        ms(tm.read),
        ms(tm.hash),
        ms(tm.decode),
        ms(tm.resize),
        tm.model_waiting_for_tiles,
        tm.format,
        tm.write
    )?;
    Ok(())
}

/// SHA-256 over a 256 MiB buffer on one core (sha2 uses SHA-NI where the CPU has it).
fn hash(out: &mut dyn Write) -> Result<()> {
    use sha2::{Digest, Sha256};
    let buf: Vec<u8> = (0..256u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let _ = Sha256::digest(&buf[..1 << 20]);
    let t = Instant::now();
    let d = Sha256::digest(&buf);
    let secs = t.elapsed().as_secs_f64();
    writeln!(
        out,
        "sha256: {:.2} GB/s on one core (digest {})",
        buf.len() as f64 / secs / 1e9,
        hex::encode(&d[..4])
    )?;
    Ok(())
}

fn model(a: &BenchArgs, out: &mut dyn Write) -> Result<()> {
    if a.batch_size == 0 || a.batches == 0 {
        return Err(fail(
            ExitKind::Usage,
            "--batch-size and --batches must be at least 1",
        ));
    }
    let device = parse_device(&a.device)?;
    let threads = a.threads.unwrap_or(available_cpus());
    let cuda = configure_cuda(device);
    let opts = RunOptions {
        device,
        precision: a.precision,
        channels_last: a.layout == "nhwc",
    };
    let script = match &a.model {
        Some(p) => Some(crate::encoder::script::ScriptModel::load(
            p,
            a.size,
            a.allow_unsafe_model,
        )?),
        None => None,
    };
    let model = ResNetTrunk::new(&random_state_dict(0, a.layer), a.layer, Pool::Max, opts)?;
    let (workers, per_worker) = model_workers(device, threads);
    let s = a.size as i64;
    let make_input = || {
        let x = Tensor::randn([a.batch_size as i64, 3, s, s], (Kind::Float, device));
        let x = if opts.channels_last && script.is_none() {
            to_channels_last(&x)
        } else {
            x
        };
        x.to_kind(opts.kind())
    };
    // Batches are handed out from one counter: warm-up first, then the timed ones.
    let total = a.warmup + a.batches;
    let next = AtomicUsize::new(0);
    let timed_start = std::sync::Mutex::new(None::<Instant>);
    let warm_done = AtomicUsize::new(0);
    let warm_start = Instant::now();
    std::thread::scope(|scope| -> Result<()> {
        for _ in 0..workers {
            let m = model.shallow_clone();
            // A module instance per worker, as `extract --model` has.
            let module = match &script {
                Some(s) => Some(s.module(device, a.precision)?),
                None => None,
            };
            let (next, timed_start, warm_done) = (&next, &timed_start, &warm_done);
            let x = make_input();
            let stream = cuda.as_ref().and_then(|c| c.worker_stream);
            scope.spawn(move || {
                tch::set_num_threads(per_worker as i32);
                // A stream each, as `extract`'s model workers: the same ceiling.
                if let Some(i) = stream {
                    if let Err(e) = crate::device::use_worker_stream(i) {
                        panic!("{e}");
                    }
                }
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= total {
                        return;
                    }
                    if i == a.warmup {
                        // Timing starts once every warm-up batch has finished.
                        while warm_done.load(Ordering::SeqCst) < a.warmup {
                            std::thread::yield_now();
                        }
                        *timed_start.lock().unwrap() = Some(Instant::now());
                    }
                    let _ = match &module {
                        Some(module) => module
                            .forward_ts(&[&x])
                            .expect("the model ran on a blank tile")
                            .to_device(Device::Cpu),
                        None => m.forward(&x).to_device(Device::Cpu),
                    };
                    if i < a.warmup {
                        warm_done.fetch_add(1, Ordering::SeqCst);
                    }
                }
            });
        }
        Ok(())
    })?;
    let start = timed_start
        .lock()
        .unwrap()
        .expect("at least one timed batch");
    let secs = start.elapsed().as_secs_f64();
    let warm_secs = (start - warm_start).as_secs_f64();
    let ips = (a.batches * a.batch_size) as f64 / secs;
    if a.machine {
        writeln!(out, "images_per_s={ips:.2}")?;
    } else {
        writeln!(
            out,
            "model-only: {ips:.2} images/s ({} batches of {} on {}, {}, {}, {workers} model workers x {per_worker} threads, {} {}px; {} warm-up batches took {warm_secs:.2} s{})",
            a.batches,
            a.batch_size,
            device_name(device),
            a.precision,
            if script.is_some() { "nchw" } else { &a.layout },
            match &a.model {
                Some(p) => format!("TorchScript {}", p.display()),
                None => a.layer.to_string(),
            },
            a.size,
            a.warmup,
            cuda.map_or(String::new(), |c| format!("; cuDNN {}; {}", c.cudnn, c.streams))
        )?;
    }
    Ok(())
}

/// Per-core throughput of `extract`'s decode workers (read, hash, decode, resize; no cache, no
/// model) on a real tile folder, per format; then all --threads cores at once. This is the
/// figure that bounds end-to-end throughput on a GPU: the model needs
/// `model images/s / tiles/s per core` such cores to stay busy.
fn decode(a: &BenchArgs, out: &mut dyn Write) -> Result<()> {
    use crate::pipeline::decoders::{prepare, Prepared, WorkerTimes};
    let (dir, source, tiles) = bench_tiles(a, "decode")?;
    let size = a.size as usize;
    let format_of = |t: &Tile| -> String {
        let ext = t
            .path
            .extension()
            .map(|e| e.to_string_lossy().to_lowercase());
        match ext.as_deref() {
            Some("jpg") | Some("jpeg") => "jpeg".into(),
            Some("tif") | Some("tiff") => "tiff".into(),
            Some(e) => e.to_string(),
            None => "?".into(),
        }
    };
    let mut by_format: std::collections::BTreeMap<String, (usize, WorkerTimes)> =
        Default::default();
    let mut good = Vec::with_capacity(tiles.len());
    for t in &tiles {
        let mut times = WorkerTimes::default();
        let (_, prepared) = prepare(&*source, t, size, None, true, &mut times);
        if let Prepared::Bad(_) = prepared {
            continue;
        }
        good.push(t.clone());
        let e = by_format.entry(format_of(t)).or_default();
        e.0 += 1;
        e.1 += &times;
    }
    let ok = good.len();
    let bad = tiles.len() - ok;
    if ok == 0 {
        return Err(fail(
            ExitKind::Input,
            format!("no tile under {} could be decoded", dir.display()),
        ));
    }
    // Only decodable tiles from here on: failures return early and would inflate tiles/s.
    let tiles = good;
    writeln!(
        out,
        "decode workers on {} ({ok} tiles, {bad} unreadable; page cache warm; resize to {size} px), one core, ms per tile:",
        dir.display()
    )?;
    writeln!(
        out,
        "  {:<6} {:>6} {:>7} {:>7} {:>7} {:>7} {:>7} {:>12}",
        "format", "tiles", "read", "hash", "decode", "resize", "total", "tiles/s/core"
    )?;
    let mut all = (0usize, WorkerTimes::default());
    for (fmt, (n, t)) in &by_format {
        row(out, fmt, *n, t)?;
        all.0 += n;
        all.1 += t;
    }
    if by_format.len() > 1 {
        row(out, "all", all.0, &all.1)?;
    }
    // All cores at once: memory bandwidth and frequency scaling show up here.
    let threads = a.threads.unwrap_or(available_cpus()).max(1);
    let next = AtomicUsize::new(0);
    let total = tiles.len().max(250 * threads);
    let t0 = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..threads {
            let (next, tiles, source) = (&next, &tiles, &*source);
            scope.spawn(move || loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return;
                }
                let mut times = WorkerTimes::default();
                let _ = prepare(
                    &*source,
                    &tiles[i % tiles.len()],
                    size,
                    None,
                    true,
                    &mut times,
                );
            });
        }
    });
    let secs = t0.elapsed().as_secs_f64();
    let tps = total as f64 / secs;
    writeln!(
        out,
        "on {threads} threads at once: {tps:.0} tiles/s ({:.0} per thread; {total} tiles)",
        tps / threads as f64
    )?;
    Ok(())
}

fn row(
    out: &mut dyn Write,
    name: &str,
    n: usize,
    t: &crate::pipeline::decoders::WorkerTimes,
) -> Result<()> {
    let ms = |s: f64| 1e3 * s / n.max(1) as f64;
    let total = t.read + t.hash + t.decode + t.resize;
    writeln!(
        out,
        "  {:<6} {:>6} {:>7.3} {:>7.3} {:>7.3} {:>7.3} {:>7.3} {:>12.0}",
        name,
        n,
        ms(t.read),
        ms(t.hash),
        ms(t.decode),
        ms(t.resize),
        ms(total),
        n as f64 / total
    )?;
    Ok(())
}
