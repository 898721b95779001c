//! `tilefeat cache stats`, `verify` and `gc`: reading every pack, checking every record,
//! and compacting packs whose writer is provably gone.

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::error::{ExitKind, WithKind};

use super::key::*;
use super::pack::*;
use crate::host::hostname;

/// Whether a pack's writer is gone: sealed, or unsealed from a dead local process, or
/// unsealed from another host and untouched for `stale`.
pub(crate) fn writer_gone(p: &PackInfo, stale: Duration) -> bool {
    if p.sealed {
        return true;
    }
    let mut parts = p.stem.rsplitn(3, '-');
    let (_rand, pid, host) = (parts.next(), parts.next(), parts.next());
    if host == Some(hostname().as_str()) {
        if let Some(pid) = pid.and_then(|s| s.parse::<u32>().ok()) {
            return !crate::host::process_alive(pid);
        }
    }
    std::fs::metadata(&p.pack)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age >= stale)
}

pub(crate) fn fingerprint_records(dir: &Path) -> BTreeMap<String, FingerprintRecord> {
    let mut out = BTreeMap::new();
    if let Ok(entries) = std::fs::read_dir(dir.join("fingerprints")) {
        for e in entries.flatten() {
            if let Ok(text) = std::fs::read_to_string(e.path()) {
                if let Ok(r) = serde_yaml::from_str::<FingerprintRecord>(&text) {
                    out.insert(r.id.clone(), r);
                }
            }
        }
    }
    out
}

pub(crate) fn require_cache_dir(dir: &Path) -> Result<()> {
    if !dir.join("tilefeat-cache.yaml").is_file() || !packs_dir(dir).is_dir() {
        return Err(crate::error::fail(
            ExitKind::Cache,
            format!(
                "{} is not a tilefeat cache directory (no tilefeat-cache.yaml)",
                dir.display()
            ),
        ));
    }
    Ok(())
}

/// `tilefeat cache stats`.
pub fn stats(dir: &Path, out: &mut dyn Write) -> Result<()> {
    require_cache_dir(dir)?;
    let packs = list_packs(dir).kind(ExitKind::Cache)?;
    let mut per_fp: BTreeMap<String, HashSet<Hash32>> = BTreeMap::new();
    let (mut entries, mut bytes, mut sealed, mut torn) = (0u64, 0u64, 0usize, 0u64);
    for p in &packs {
        let (es, t) = read_idx(&p.idx)
            .with_context(|| format!("cannot read {}", p.idx.display()))
            .kind(ExitKind::Cache)?;
        torn += t as u64;
        entries += es.len() as u64;
        bytes += std::fs::metadata(&p.pack).map(|m| m.len()).unwrap_or(0)
            + std::fs::metadata(&p.idx).map(|m| m.len()).unwrap_or(0);
        sealed += p.sealed as usize;
        for e in es {
            per_fp.entry(hex::encode(e.fp)).or_default().insert(e.tile);
        }
    }
    let records = fingerprint_records(dir);
    let unique: usize = per_fp.values().map(|s| s.len()).sum();
    writeln!(out, "cache: {}", dir.display())?;
    writeln!(
        out,
        "packs: {} ({} sealed, {} open or abandoned)",
        packs.len(),
        sealed,
        packs.len() - sealed
    )?;
    writeln!(out, "entries: {entries} ({unique} unique)")?;
    writeln!(out, "bytes: {bytes}")?;
    if torn > 0 {
        writeln!(
            out,
            "torn index bytes (from killed writers, ignored): {torn}"
        )?;
    }
    writeln!(out, "fingerprints: {}", per_fp.len())?;
    for (id, tiles) in &per_fp {
        match records.get(id) {
            Some(r) => writeln!(
                out,
                "  {}  {} tiles  layer={:?} pool={:?} normalize={:?} size={} precision={:?} weights={}  last used {}",
                &id[..16],
                tiles.len(),
                r.fingerprint.layer,
                r.fingerprint.pool,
                r.fingerprint.normalize,
                r.fingerprint.size,
                r.fingerprint.precision,
                short_weights(&r.fingerprint.weights_sha256),
                r.last_used
            )?,
            None => writeln!(out, "  {}  {} tiles  (no description)", &id[..16], tiles.len())?,
        }
    }
    Ok(())
}

pub(crate) fn short_weights(w: &str) -> String {
    if w.len() == 64 {
        format!("sha256:{}", &w[..12])
    } else {
        w.to_string()
    }
}

/// Result of scanning one pack.
pub(crate) struct PackScan {
    pub(crate) good: Vec<(Hash32, Hash32, Vec<f32>)>,
    pub(crate) problems: Vec<String>,
    pub(crate) notes: Vec<String>,
}

/// Walk a pack record by record, checking each one, and cross-check its index.
pub(crate) fn scan_pack(p: &PackInfo, keep_records: bool) -> Result<PackScan> {
    let data =
        std::fs::read(&p.pack).with_context(|| format!("cannot read {}", p.pack.display()))?;
    let mut scan = PackScan {
        good: Vec::new(),
        problems: Vec::new(),
        notes: Vec::new(),
    };
    let name = p.pack.display();
    if data.len() < PACK_MAGIC.len() || &data[..PACK_MAGIC.len()] != PACK_MAGIC {
        scan.problems
            .push(format!("{name}: not a tilefeat pack (bad header)"));
        return Ok(scan);
    }
    let mut pos = PACK_MAGIC.len();
    let mut valid_offsets = HashSet::new();
    while pos < data.len() {
        let rest = &data[pos..];
        let len = if rest.len() >= 72 {
            RECORD_OVERHEAD + 4 * u32::from_le_bytes(rest[68..72].try_into()?) as usize
        } else {
            usize::MAX
        };
        if len > rest.len() {
            let msg = format!(
                "{name}: incomplete record at offset {pos} ({} trailing bytes)",
                rest.len()
            );
            if p.sealed {
                scan.problems.push(format!("{msg}: the pack was truncated"));
            } else {
                scan.notes
                    .push(format!("{msg}: left by a killed writer, ignored"));
            }
            break;
        }
        match decode_record(&rest[..len], None) {
            Ok((fp, tile, v)) => {
                valid_offsets.insert(pos as u64);
                if keep_records {
                    scan.good.push((fp, tile, v));
                }
            }
            Err(e) => scan
                .problems
                .push(format!("{name}: record at offset {pos}: {e:#}")),
        }
        pos += len;
    }
    match read_idx(&p.idx) {
        Ok((entries, torn)) => {
            if torn > 0 {
                let msg = format!(
                    "{}: {torn} torn bytes at the end of the index",
                    p.idx.display()
                );
                if p.sealed {
                    scan.problems.push(msg);
                } else {
                    scan.notes.push(format!("{msg} (killed writer), ignored"));
                }
            }
            let bad = entries
                .iter()
                .filter(|e| !valid_offsets.contains(&e.offset))
                .count();
            if bad > 0 {
                scan.problems.push(format!(
                    "{}: {bad} index entries point at damaged or missing records",
                    p.idx.display()
                ));
            }
        }
        Err(e) => scan.problems.push(format!("{}: {e:#}", p.idx.display())),
    }
    Ok(scan)
}

/// `tilefeat cache verify`: every record's checksum; error (exit 7) if anything is damaged.
pub fn verify(dir: &Path, out: &mut dyn Write) -> Result<()> {
    require_cache_dir(dir)?;
    let packs = list_packs(dir).kind(ExitKind::Cache)?;
    let (mut records, mut problems) = (0usize, Vec::new());
    for p in &packs {
        let scan = scan_pack(p, true).kind(ExitKind::Cache)?;
        records += scan.good.len();
        for n in &scan.notes {
            writeln!(out, "note: {n}")?;
        }
        problems.extend(scan.problems);
    }
    for pr in &problems {
        writeln!(out, "DAMAGED: {pr}")?;
    }
    writeln!(
        out,
        "verified {} packs, {records} good records, {} problems",
        packs.len(),
        problems.len()
    )?;
    if !problems.is_empty() {
        return Err(crate::error::fail(
            ExitKind::Cache,
            format!(
                "cache {} has {} damaged pack(s) or record(s); damaged records are never served \
                 (they are recomputed); `tilefeat cache gc` rewrites the cache without them",
                dir.display(),
                problems.len()
            ),
        ));
    }
    Ok(())
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
pub(crate) fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

/// Parse `YYYY-MM-DD` to Unix seconds (midnight UTC).
pub fn parse_date(s: &str) -> Result<u64> {
    let parts: Vec<&str> = s.split('-').collect();
    let bad = || {
        crate::error::fail(
            ExitKind::Usage,
            format!("--unused-since {s}: expected YYYY-MM-DD"),
        )
    };
    if parts.len() != 3 {
        return Err(bad());
    }
    let y: i64 = parts[0].parse().map_err(|_| bad())?;
    let m: i64 = parts[1].parse().map_err(|_| bad())?;
    let d: i64 = parts[2].parse().map_err(|_| bad())?;
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || y < 1970 {
        return Err(bad());
    }
    Ok((days_from_civil(y, m, d) * 86400) as u64)
}

/// Options for [`gc`].
pub struct GcOptions {
    pub keep: Vec<String>,
    pub unused_since: Option<u64>,
    pub stale: Duration,
}

/// `tilefeat cache gc`: compact all packs whose writer is gone into one, dropping damaged
/// records, duplicates and unwanted fingerprints; then remove the old packs.
pub fn gc(dir: &Path, opts: &GcOptions, out: &mut dyn Write) -> Result<()> {
    require_cache_dir(dir)?;
    let records = fingerprint_records(dir);
    let all_packs = list_packs(dir).kind(ExitKind::Cache)?;
    let (done, live): (Vec<_>, Vec<_>) = all_packs
        .into_iter()
        .partition(|p| writer_gone(p, opts.stale));
    // Resolve --keep prefixes against the fingerprints present.
    let mut present: HashSet<String> = records.keys().cloned().collect();
    let mut scans = Vec::new();
    for p in &done {
        let s = scan_pack(p, true).kind(ExitKind::Cache)?;
        for (fp, _, _) in &s.good {
            present.insert(hex::encode(fp));
        }
        scans.push(s);
    }
    let mut keep_ids: Option<HashSet<String>> = None;
    if !opts.keep.is_empty() {
        let mut ids = HashSet::new();
        for k in &opts.keep {
            let m: Vec<&String> = present
                .iter()
                .filter(|id| id.starts_with(&k.to_lowercase()))
                .collect();
            match m.len() {
                1 => {
                    ids.insert(m[0].clone());
                }
                0 => {
                    return Err(crate::error::fail(
                        ExitKind::Usage,
                        format!("--keep {k}: no such fingerprint in {}", dir.display()),
                    ))
                }
                _ => {
                    return Err(crate::error::fail(
                        ExitKind::Usage,
                        format!("--keep {k}: prefix matches {} fingerprints", m.len()),
                    ))
                }
            }
        }
        keep_ids = Some(ids);
    }
    let wanted = |fp: &str| -> bool {
        if let Some(k) = &keep_ids {
            if !k.contains(fp) {
                return false;
            }
        }
        if let Some(since) = opts.unused_since {
            // Without a record we cannot tell when it was used: keep it.
            if let Some(r) = records.get(fp) {
                if r.last_used_unix < since {
                    return false;
                }
            }
        }
        true
    };
    let mut writer: Option<PackWriter> = None;
    let (mut kept, mut dropped, mut dup, mut damaged) = (0u64, 0u64, 0u64, 0u64);
    let mut seen = HashSet::new();
    let mut kept_fps = HashSet::new();
    for s in scans {
        damaged += s.problems.len() as u64;
        for (fp, tile, v) in s.good {
            let id = hex::encode(fp);
            if !wanted(&id) {
                dropped += 1;
                continue;
            }
            if !seen.insert((fp, tile)) {
                dup += 1;
                continue;
            }
            if writer.is_none() {
                writer = Some(PackWriter::create(dir)?);
            }
            writer.as_mut().unwrap().put(&fp, &tile, &v)?;
            kept_fps.insert(id);
            kept += 1;
        }
    }
    if let Some(w) = writer {
        w.seal()?;
    }
    // The compacted pack is sealed on disk: now the old ones can go.
    for p in &done {
        for ext in ["idx", "pack", "sealed"] {
            let f = packs_dir(dir).join(format!("{}.{ext}", p.stem));
            match std::fs::remove_file(&f) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("cannot remove {}", f.display()))
                        .kind(ExitKind::Cache)
                }
            }
        }
    }
    // Forget fingerprints that have no entries left anywhere.
    let mut live_fps = HashSet::new();
    for p in &live {
        if let Ok((es, _)) = read_idx(&p.idx) {
            live_fps.extend(es.iter().map(|e| hex::encode(e.fp)));
        }
    }
    for id in records.keys() {
        if !kept_fps.contains(id) && !live_fps.contains(id) && !wanted(id) {
            let _ = std::fs::remove_file(dir.join("fingerprints").join(format!("{id}.yaml")));
        }
    }
    writeln!(
        out,
        "gc: compacted {} packs into {}: kept {kept} records, dropped {dropped} of unwanted fingerprints, \
         {dup} duplicates, {damaged} damaged; left {} packs of live writers alone",
        done.len(),
        if kept > 0 { 1 } else { 0 },
        live.len()
    )?;
    Ok(())
}
