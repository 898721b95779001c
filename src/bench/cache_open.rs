//! `tilefeat bench --what cache-open`: what opening a cache and looking tiles up in it cost,
//! as the cache grows. Fills `--cache-dir` once with `--entries` small records from
//! `--packs` writers (the index, not the payload, is what opening reads), then measures in a
//! fresh process of its own (so that the memory is the opening's alone): open time, memory
//! for the index, p50/p99 of lookups of present and absent keys (warm: each key looked up
//! once untimed first). Then `cache gc`, and the same again.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::cache::{Cache, Fingerprint, GcOptions, PREPROCESSING_VERSION};
use crate::cli::BenchArgs;
use crate::error::{fail, ExitKind};

/// Keys looked up per kind (present, absent).
const LOOKUPS: usize = 2000;

fn key(i: usize) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    Sha256::digest((i as u64).to_le_bytes()).into()
}

fn fingerprint(a: &BenchArgs) -> Fingerprint {
    Fingerprint {
        weights_sha256: "bench".into(),
        layer: a.layer,
        pool: crate::cli::Pool::Max,
        normalize: crate::cli::Normalize::Tutorial,
        size: a.size,
        precision: a.precision,
        preprocessing_version: PREPROCESSING_VERSION,
        layout: None,
        encoder: None,
        mean_std: None,
    }
}

pub(super) fn run(a: &BenchArgs, out: &mut dyn Write) -> Result<()> {
    let dir = a
        .cache_dir
        .clone()
        .ok_or_else(|| fail(ExitKind::Usage, "--what cache-open needs --cache-dir DIR"))?;
    if a.entries == 0 || a.packs == 0 || a.packs > a.entries {
        return Err(fail(
            ExitKind::Usage,
            "--entries and --packs must be at least 1, and --packs at most --entries",
        ));
    }
    if a.measure_only {
        return measure(a, &dir, out);
    }
    let fp = fingerprint(a);
    if count_files(&dir, ".idx") == 0 {
        let t = Instant::now();
        for w in 0..a.packs {
            let c = Cache::open(&dir, &fp)?;
            for i in (w * a.entries / a.packs)..((w + 1) * a.entries / a.packs) {
                c.put(&key(i), &[i as f32; 4])?;
            }
            c.close()?;
        }
        writeln!(
            out,
            "filled {} entries from {} writers in {:.1} s: {} packs",
            a.entries,
            a.packs,
            t.elapsed().as_secs_f64(),
            count_files(&dir, ".idx")
        )?;
    }
    writeln!(out, "before gc: {}", child(a, &dir)?)?;
    let t = Instant::now();
    let opts = GcOptions::keep_all(Duration::from_secs(3600));
    crate::cache::gc(&dir, &opts, &mut std::io::sink())?;
    writeln!(
        out,
        "gc in {:.1} s: {} packs",
        t.elapsed().as_secs_f64(),
        count_files(&dir, ".idx")
    )?;
    writeln!(out, "after gc:  {}", child(a, &dir)?)?;
    Ok(())
}

fn count_files(dir: &Path, suffix: &str) -> usize {
    std::fs::read_dir(dir.join("packs")).map_or(0, |rd| {
        rd.flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(suffix))
            .count()
    })
}

/// This bench again, measuring only, in a process of its own: its one line.
fn child(a: &BenchArgs, dir: &Path) -> Result<String> {
    let exe = std::env::current_exe().context("cannot find this executable")?;
    let o = std::process::Command::new(exe)
        .args([
            "bench",
            "--what",
            "cache-open",
            "--measure-only",
            "--cache-dir",
        ])
        .arg(dir)
        .args(["--entries", &a.entries.to_string()])
        .args(["--size", &a.size.to_string()])
        .args(["--layer", crate::cli::value_name(&a.layer).as_str()])
        .args(["--precision", crate::cli::value_name(&a.precision).as_str()])
        .output()
        .context("cannot run the measuring process")?;
    if !o.status.success() {
        anyhow::bail!(
            "the measuring process failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
}

fn status_mb(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// p50 and p99 of `keys`' lookups in microseconds, and how many hit (after one untimed
/// pass over the same keys: warm).
fn lookups(c: &Cache, keys: &[[u8; 32]]) -> (f64, f64, usize) {
    for k in keys {
        let _ = c.get(k);
    }
    let mut hits = 0;
    let mut us: Vec<f64> = keys
        .iter()
        .map(|k| {
            let t = Instant::now();
            hits += c.get(k).is_some() as usize;
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    us.sort_by(f64::total_cmp);
    let at = |q: f64| us[((us.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.99), hits)
}

fn measure(a: &BenchArgs, dir: &Path, out: &mut dyn Write) -> Result<()> {
    let before = status_mb("VmRSS:");
    let t = Instant::now();
    let c = Cache::open(dir, &fingerprint(a))?;
    let open_s = t.elapsed().as_secs_f64();
    let opened = status_mb("VmRSS:");
    // Spread over the whole key range, deterministically.
    let present: Vec<[u8; 32]> = (0..LOOKUPS).map(|i| key(i * 7919 % a.entries)).collect();
    let absent: Vec<[u8; 32]> = (0..LOOKUPS).map(|i| key(a.entries + 1 + i)).collect();
    let (p50, p99, hits) = lookups(&c, &present);
    let (a50, a99, false_hits) = lookups(&c, &absent);
    let (segs, seg_entries) = c.segments();
    writeln!(
        out,
        "{} entries: open {:.3} s, index memory {:.1} MB ({segs} segments of {seg_entries} entries, \
         {} entries in memory); lookups p50/p99: present {p50:.1}/{p99:.1} us ({hits}/{} hit), \
         absent {a50:.1}/{a99:.1} us ({false_hits} hit)",
        a.entries,
        open_s,
        opened - before,
        c.len_in_memory(),
        present.len(),
    )?;
    Ok(())
}
