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

/// At most this many damaged ranges, and index entries of each kind, are described per pack
/// (the rest are counted): what verify prints and holds does not grow with the damage.
const LISTED: usize = 10;

/// Result of scanning one pack.
#[derive(Default)]
pub(crate) struct PackScan {
    pub(crate) good: u64,
    /// Damaged ranges, truncated tails, unreadable files: each one problem.
    pub(crate) damaged: u64,
    pub(crate) problems: Vec<String>,
    pub(crate) notes: Vec<String>,
    /// Whether the whole pack was read (false: not a regular file, missing, or an I/O error).
    pub(crate) complete: bool,
}

impl PackScan {
    fn problem(&mut self, msg: String) {
        self.damaged += 1;
        if self.problems.len() < LISTED {
            self.problems.push(msg);
        }
    }
}

/// Walk a pack record by record, checking each one, handing every good record to `each`.
/// Damage is summarised as byte ranges (reading goes on at the next good record). Memory is
/// bounded by [`PackReader`]'s window whatever the pack holds. Errors only from `each`.
pub(crate) fn scan_pack(
    p: &PackInfo,
    each: &mut dyn FnMut(Hash32, Hash32, Vec<f32>) -> Result<()>,
) -> Result<(PackScan, Option<PackReader>)> {
    let mut scan = PackScan::default();
    let name = p.pack.display();
    let mut r = match PackReader::open(&p.pack) {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            scan.problem(format!(
                "{}: an index without its pack ({name} does not exist)",
                p.idx.display()
            ));
            return Ok((scan, None));
        }
        Err(e) => {
            scan.problem(format!("{name}: {e}"));
            return Ok((scan, None));
        }
    };
    let walked = walk_records(p, &mut r, &mut scan, each)?;
    if let Err(e) = walked {
        scan.problem(format!("{name}: cannot read: {e}"));
        return Ok((scan, Some(r)));
    }
    scan.complete = true;
    Ok((scan, Some(r)))
}

/// The record walk of [`scan_pack`]: the outer error is `each`'s, the inner one an I/O error.
fn walk_records(
    p: &PackInfo,
    r: &mut PackReader,
    scan: &mut PackScan,
    each: &mut dyn FnMut(Hash32, Hash32, Vec<f32>) -> Result<()>,
) -> Result<std::io::Result<()>> {
    let name = p.pack.display();
    let header = PACK_MAGIC.len() as u64;
    let bad_header = r.len < header
        || match r.get(0, PACK_MAGIC.len()) {
            Ok(h) => h != PACK_MAGIC,
            Err(e) => return Ok(Err(e)),
        };
    if bad_header {
        scan.problem(format!("{name}: not a tilefeat pack (bad header)"));
        return Ok(Ok(()));
    }
    let mut pos = header;
    while pos < r.len {
        let rec = match r.record(pos) {
            Ok(rec) => rec,
            Err(e) => return Ok(Err(e)),
        };
        match rec {
            Rec::Good(len, fp, tile, v) => {
                scan.good += 1;
                each(fp, tile, v)?;
                pos += len as u64;
            }
            Rec::Incomplete => {
                // A record running past the end: a torn tail, unless good records follow (its
                // length field was damaged), which are then read, not dropped.
                match r.next_good(pos + 1) {
                    Err(e) => return Ok(Err(e)),
                    Ok(Some(next)) => {
                        scan.problem(format!(
                            "{name}: bytes {pos}..{next} damaged ({} bytes, unreadable records; \
                             at {pos}: a record length past the end of the pack)",
                            next - pos
                        ));
                        pos = next;
                        continue;
                    }
                    Ok(None) => {}
                }
                let msg = format!(
                    "{name}: incomplete record at offset {pos} ({} trailing bytes)",
                    r.len - pos
                );
                if p.sealed {
                    scan.problem(format!("{msg}: the pack was truncated"));
                } else {
                    scan.notes
                        .push(format!("{msg}: left by a killed writer, ignored"));
                }
                break;
            }
            Rec::Bad(why) => {
                let end = match r.next_good(pos + 1) {
                    Ok(next) => next.unwrap_or(r.len),
                    Err(e) => return Ok(Err(e)),
                };
                scan.problem(format!(
                    "{name}: bytes {pos}..{end} damaged ({} bytes, unreadable records; at {pos}: {why})",
                    end - pos
                ));
                pos = end;
            }
        }
    }
    Ok(Ok(()))
}

/// Cross-check every index entry against the record it points at (offset within the pack,
/// sane length, key, length and CRC of the record there): one line per kind of disagreement.
fn check_index(p: &PackInfo, r: &mut PackReader, scan: &mut PackScan) {
    // reason -> (count, first entry number, its offset, its length)
    let mut bad: BTreeMap<String, (u64, u64, u64, u32)> = BTreeMap::new();
    let mut io_error = None;
    let mut n = 0u64;
    let result = scan_idx(&p.idx, |e| {
        let k = n;
        n += 1;
        if io_error.is_some() {
            return;
        }
        let len = e.len as usize;
        let end = e.offset.saturating_add(e.len as u64);
        let why = if e.offset < PACK_MAGIC.len() as u64
            || len < RECORD_OVERHEAD
            || (len - RECORD_OVERHEAD) % 4 != 0
            || len > MAX_RECORD
        {
            Some("have an absurd offset or length".to_string())
        } else if end > r.len && r.refresh_len().map_or(true, |l| end > l) {
            Some("point beyond the end of the pack".to_string())
        } else {
            match r.get(e.offset, len) {
                Ok(b) => decode_record(b, Some((&e.fp, &e.tile)))
                    .err()
                    .map(|x| format!("point at a record that fails its check ({x:#})")),
                Err(x) => {
                    io_error = Some(x);
                    None
                }
            }
        };
        if let Some(why) = why {
            let v = bad.entry(why).or_insert((0, k, e.offset, e.len));
            v.0 += 1;
        }
    });
    let idx = p.idx.display();
    let torn = match result {
        Ok(t) => t,
        Err(e) => {
            scan.problem(format!("{idx}: {e:#}"));
            0
        }
    };
    if let Some(e) = io_error {
        scan.problem(format!("{}: cannot read: {e}", p.pack.display()));
    }
    if torn > 0 {
        let msg = format!("{idx}: {torn} torn bytes at the end of the index");
        if p.sealed {
            scan.problem(msg);
        } else {
            scan.notes.push(format!("{msg} (killed writer), ignored"));
        }
    }
    for (why, (count, k, offset, len)) in bad {
        scan.problem(format!(
            "{idx}: {count} index entries {why} (the first: entry {k}, offset {offset}, length {len})"
        ));
    }
}

/// `tilefeat cache verify`: every record's checksum, every index entry against its record,
/// every pack with its index; error (exit 7) if anything is damaged.
pub fn verify(dir: &Path, out: &mut dyn Write) -> Result<()> {
    require_cache_dir(dir)?;
    let packs = list_packs(dir).kind(ExitKind::Cache)?;
    let orphans = orphan_packs(dir).kind(ExitKind::Cache)?;
    let (mut records, mut damaged, mut problems) = (0u64, 0u64, Vec::new());
    for p in &packs {
        let (mut scan, reader) = scan_pack(p, &mut |_, _, _| Ok(())).kind(ExitKind::Cache)?;
        if let Some(mut r) = reader {
            check_index(p, &mut r, &mut scan);
        }
        records += scan.good;
        damaged += scan.damaged;
        for n in &scan.notes {
            writeln!(out, "note: {n}")?;
        }
        let listed = scan.problems.len() as u64;
        problems.extend(scan.problems);
        if scan.damaged > listed {
            problems.push(format!(
                "{}: {} more problems not listed",
                p.pack.display(),
                scan.damaged - listed
            ));
        }
    }
    for o in &orphans {
        damaged += 1;
        problems.push(format!(
            "{}: a pack without its index (its records are never served; restore its .idx or \
             remove it)",
            o.display()
        ));
    }
    for pr in &problems {
        writeln!(out, "DAMAGED: {pr}")?;
    }
    writeln!(
        out,
        "verified {} packs, {records} good records, {damaged} problems",
        packs.len() + orphans.len(),
    )?;
    if damaged > 0 {
        return Err(crate::error::fail(
            ExitKind::Cache,
            format!(
                "cache {} has {damaged} problem(s) (damaged records, index entries or packs); \
                 damaged records are never served (they are recomputed); `tilefeat cache gc` \
                 rewrites the cache without them",
                dir.display(),
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
    let mut keep_ids: Option<HashSet<String>> = None;
    if !opts.keep.is_empty() {
        // A first pass over the packs, holding only the fingerprints seen (packs are
        // streamed, never held).
        let mut present: HashSet<String> = records.keys().cloned().collect();
        for p in &done {
            scan_pack(p, &mut |fp, _, _| {
                present.insert(hex::encode(fp));
                Ok(())
            })?;
        }
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
    // Packs read to their end, whose good records are now in the new pack: only these go.
    let mut compacted = Vec::new();
    let mut left_alone = Vec::new();
    for p in &done {
        let (scan, _) = scan_pack(p, &mut |fp, tile, v| {
            let id = hex::encode(fp);
            if !wanted(&id) {
                dropped += 1;
                return Ok(());
            }
            if !seen.insert((fp, tile)) {
                dup += 1;
                return Ok(());
            }
            if writer.is_none() {
                writer = Some(PackWriter::create(dir)?);
            }
            writer.as_mut().unwrap().put(&fp, &tile, &v)?;
            kept_fps.insert(id);
            kept += 1;
            Ok(())
        })?;
        if scan.complete {
            damaged += scan.damaged;
        }
        let missing = !scan.complete && std::fs::symlink_metadata(&p.pack).is_err();
        if scan.complete || missing {
            // (An index whose pack is gone holds nothing to lose.)
            compacted.push(p);
        } else {
            // Not a regular file, or unreadable: what it may hold is not lost by gc.
            left_alone.extend(scan.problems);
        }
    }
    if let Some(w) = writer {
        w.seal()?;
    }
    // The compacted pack is sealed on disk: now the old ones can go.
    for p in &compacted {
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
    for l in &left_alone {
        writeln!(out, "gc: left alone: {l}")?;
    }
    writeln!(
        out,
        "gc: compacted {} packs into {}: kept {kept} records, dropped {dropped} of unwanted fingerprints, \
         {dup} duplicates, {damaged} damaged; left {} packs of live writers alone",
        compacted.len(),
        if kept > 0 { 1 } else { 0 },
        live.len()
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A damaged length field in the middle of a pack (one that runs past its end) is a
    /// damaged range, not a torn tail: gc keeps the records after it.
    #[test]
    fn records_after_a_damaged_length_are_kept() {
        let d = tempfile::tempdir().unwrap();
        init_dir(d.path()).unwrap();
        let mut w = PackWriter::create(d.path()).unwrap();
        for i in 0..3u8 {
            assert!(w.put(&[7; 32], &[i; 32], &[i as f32; 4]).unwrap());
        }
        w.seal().unwrap();
        let p = list_packs(d.path()).unwrap().remove(0);
        let mut bytes = std::fs::read(&p.pack).unwrap();
        // The first record's dimension: 4 -> 1000 (past the end, within MAX_DIM).
        bytes[16 + 68..16 + 72].copy_from_slice(&1000u32.to_le_bytes());
        std::fs::write(&p.pack, bytes).unwrap();
        let mut out = Vec::new();
        assert!(verify(d.path(), &mut out).is_err());
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("a record length past the end"), "{text}");
        assert!(text.contains("2 good records"), "{text}");
        let opts = GcOptions {
            keep: vec![],
            unused_since: None,
            stale: Duration::from_secs(3600),
        };
        let mut out = Vec::new();
        gc(d.path(), &opts, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.contains("kept 2 records") && text.contains("1 damaged"),
            "{text}"
        );
    }
}
