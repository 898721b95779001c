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
use super::segment;
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
    let (mut entries, mut bytes, mut sealed, mut torn) = (0u64, 0u64, 0usize, 0u64);
    // Each pack's keys in (tile, fingerprint) order: its segment, streamed, or (no segment:
    // a live or killed writer's, or an old cache's) its index, sorted in memory.
    let mut sources = Vec::new();
    for p in &packs {
        let mut n = 0u64;
        let t = scan_idx(&p.idx, |_| n += 1)
            .with_context(|| format!("cannot read {}", p.idx.display()))
            .kind(ExitKind::Cache)?;
        torn += t as u64;
        entries += n;
        bytes += std::fs::metadata(&p.pack).map(|m| m.len()).unwrap_or(0)
            + std::fs::metadata(&p.idx).map(|m| m.len()).unwrap_or(0);
        sealed += p.sealed as usize;
        sources.push(KeySource::open(p));
    }
    let segmented = sources.iter().filter(|s| s.segment.is_some()).count();
    let mut notes = Vec::new();
    let per_fp = unique_per_fingerprint(sources, &mut notes)?;
    let records = fingerprint_records(dir);
    let unique: u64 = per_fp.values().sum();
    writeln!(out, "cache: {}", dir.display())?;
    writeln!(
        out,
        "packs: {} ({} sealed, {} open or abandoned)",
        packs.len(),
        sealed,
        packs.len() - sealed
    )?;
    writeln!(out, "entries: {entries} ({unique} unique)")?;
    write!(out, "index segments: {segmented} of {} packs", packs.len())?;
    if segmented < packs.len() {
        write!(
            out,
            " (the others' indexes are read into memory by every job that opens the cache; \
             `cache gc` compacts finished ones into packs with segments)"
        )?;
    }
    writeln!(out)?;
    writeln!(out, "bytes: {bytes}")?;
    if torn > 0 {
        writeln!(
            out,
            "torn index bytes (from killed writers, ignored): {torn}"
        )?;
    }
    out.write_all(&notes)?;
    writeln!(out, "fingerprints: {}", per_fp.len())?;
    for (id, tiles) in &per_fp {
        match records.get(id) {
            Some(r) => writeln!(
                out,
                "  {}  {} tiles  layer={:?} pool={:?} normalize={:?} size={} precision={:?} weights={}  last used {}",
                &id[..16],
                tiles,
                r.fingerprint.layer,
                r.fingerprint.pool,
                r.fingerprint.normalize,
                r.fingerprint.size,
                r.fingerprint.precision,
                short_weights(&r.fingerprint.weights_sha256),
                r.last_used
            )?,
            None => writeln!(out, "  {}  {} tiles  (no description)", &id[..16], tiles)?,
        }
    }
    Ok(())
}

/// One pack's keys in (tile, fingerprint) order, for [`unique_per_fingerprint`]: its
/// segment, streamed, or (no segment, or a damaged one: from where it failed) its index,
/// sorted in memory.
struct KeySource {
    pack: PackInfo,
    segment: Option<segment::SegEntries>,
    sorted: std::vec::IntoIter<(Hash32, Hash32)>,
    last: Option<(Hash32, Hash32)>,
}

impl KeySource {
    fn open(p: &PackInfo) -> KeySource {
        let seg = segment::seg_path(&packs_dir_of(p), &p.stem);
        let pack_len = std::fs::metadata(&p.pack).map_or(0, |m| m.len());
        let segment = segment::Segment::open(&seg, pack_len)
            .and_then(|s| segment::SegEntries::open(&s))
            .ok();
        let mut k = KeySource {
            pack: p.clone(),
            segment,
            sorted: Vec::new().into_iter(),
            last: None,
        };
        if k.segment.is_none() {
            k.read_index();
        }
        k
    }

    /// The pack's index, sorted, from after the last key given.
    fn read_index(&mut self) {
        let mut keys = Vec::new();
        let _ = scan_idx(&self.pack.idx, |e| keys.push((e.tile, e.fp)));
        keys.sort_unstable();
        keys.retain(|k| self.last.is_none_or(|l| *k > l));
        self.sorted = keys.into_iter();
    }

    fn next_key(&mut self, out: &mut dyn Write) -> Result<Option<(Hash32, Hash32)>> {
        if let Some(s) = &mut self.segment {
            match s.next_entry() {
                Ok(Some(e)) => {
                    self.last = Some((e.tile, e.fp));
                    return Ok(self.last);
                }
                Ok(None) => return Ok(None),
                Err(e) => {
                    writeln!(
                        out,
                        "damaged: {e:#} (see `cache verify`; its pack's index is read instead)"
                    )?;
                    self.segment = None;
                    self.read_index();
                }
            }
        }
        Ok(self.sorted.next())
    }
}

/// Distinct tiles per fingerprint (hex id), by merging every pack's sorted keys: memory is
/// one key and one buffer per pack with a segment (the indexes of those without one are
/// held), not one per entry.
fn unique_per_fingerprint(
    mut sources: Vec<KeySource>,
    out: &mut dyn Write,
) -> Result<BTreeMap<String, u64>> {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    let mut heap = BinaryHeap::new();
    for (i, s) in sources.iter_mut().enumerate() {
        if let Some(k) = s.next_key(out)? {
            heap.push(Reverse((k, i)));
        }
    }
    let mut per_fp: BTreeMap<Hash32, u64> = BTreeMap::new();
    let mut last = None;
    while let Some(Reverse((k, i))) = heap.pop() {
        if last != Some(k) {
            *per_fp.entry(k.1).or_default() += 1;
            last = Some(k);
        }
        if let Some(k) = sources[i].next_key(out)? {
            heap.push(Reverse((k, i)));
        }
    }
    Ok(per_fp
        .into_iter()
        .map(|(fp, n)| (hex::encode(fp), n))
        .collect())
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
    /// Valid entries in the pack's `.idx` (what `stats` counts and readers can find).
    pub(crate) indexed: u64,
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

/// What is wrong with an index entry, checked against the record it points at (offset
/// within the pack, sane length, key, length and CRC of the record there); `None`: nothing.
fn entry_problem(
    e: &IdxEntry,
    r: &mut PackReader,
    in_key_order: bool,
) -> std::io::Result<Option<String>> {
    let len = e.len as usize;
    let end = e.offset.saturating_add(e.len as u64);
    Ok(
        if e.offset < PACK_MAGIC.len() as u64
            || len < RECORD_OVERHEAD
            || (len - RECORD_OVERHEAD) % 4 != 0
            || len > MAX_RECORD
        {
            Some("have an absurd offset or length".to_string())
        } else if end > r.len && r.refresh_len().map_or(true, |l| end > l) {
            Some("point beyond the end of the pack".to_string())
        } else {
            let bytes = if in_key_order {
                r.get_exact(e.offset, len)?
            } else {
                r.get(e.offset, len)?
            };
            decode_record(bytes, Some((&e.fp, &e.tile)))
                .err()
                .map(|x| format!("point at a record that fails its check ({x:#})"))
        },
    )
}

/// reason -> (count, first entry number, its offset, its length)
type EntryProblems = BTreeMap<String, (u64, u64, u64, u32)>;

/// Check entries one by one with [`entry_problem`], grouping the problems by kind.
fn entry_checker<'a>(
    r: &'a mut PackReader,
    bad: &'a mut EntryProblems,
    io_error: &'a mut Option<std::io::Error>,
    in_key_order: bool,
) -> impl FnMut(&IdxEntry) + 'a {
    let mut n = 0u64;
    move |e| {
        let k = n;
        n += 1;
        if io_error.is_some() {
            return;
        }
        match entry_problem(e, r, in_key_order) {
            Ok(Some(why)) => bad.entry(why).or_insert((0, k, e.offset, e.len)).0 += 1,
            Ok(None) => {}
            Err(x) => *io_error = Some(x),
        }
    }
}

/// Cross-check every index entry against the record it points at: one line per kind of
/// disagreement.
fn check_index(p: &PackInfo, r: &mut PackReader, scan: &mut PackScan) {
    let mut bad = EntryProblems::new();
    let mut io_error = None;
    let mut indexed = 0;
    let result = {
        let mut each = entry_checker(r, &mut bad, &mut io_error, false);
        scan_idx(&p.idx, |e| {
            indexed += 1;
            each(&e)
        })
    };
    scan.indexed = indexed;
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

/// Check a pack's sorted segment, if it has one: header, order, checksums, fan-out, and every
/// entry against its record, like the `.idx`'s.
fn check_segment(p: &PackInfo, r: &mut PackReader, scan: &mut PackScan) {
    let path = segment::seg_path(&packs_dir_of(p), &p.stem);
    if std::fs::symlink_metadata(&path).is_err() {
        if p.sealed {
            scan.notes.push(format!(
                "{}: sealed without an index segment (written before segments, or writing it \
                 failed): its index is read into memory; `tilefeat cache gc` writes one",
                p.pack.display()
            ));
        }
        return;
    }
    let seg = match segment::Segment::open(&path, r.len) {
        Ok(s) => s,
        Err(e) => return scan.problem(format!("{}: {e:#}", path.display())),
    };
    let mut bad = EntryProblems::new();
    let mut io_error = None;
    let walked = {
        let mut each = entry_checker(r, &mut bad, &mut io_error, true);
        segment::check(&seg, &mut each)
    };
    if let Err(e) = walked {
        scan.problem(format!("{e:#}"));
    }
    if let Some(e) = io_error {
        scan.problem(format!("{}: cannot read: {e}", p.pack.display()));
    }
    for (why, (count, k, offset, len)) in bad {
        scan.problem(format!(
            "{}: {count} segment entries {why} (the first: entry {k}, offset {offset}, length {len})",
            path.display()
        ));
    }
}

/// The `packs/` folder a pack lies in.
fn packs_dir_of(p: &PackInfo) -> std::path::PathBuf {
    p.idx.parent().map_or_else(|| ".".into(), Path::to_path_buf)
}

/// `tilefeat cache verify`: every record's checksum, every index entry against its record,
/// every pack with its index; error (exit 7) if anything is damaged.
pub fn verify(dir: &Path, out: &mut dyn Write) -> Result<()> {
    require_cache_dir(dir)?;
    let packs = list_packs(dir).kind(ExitKind::Cache)?;
    let orphans = orphan_packs(dir).kind(ExitKind::Cache)?;
    let (mut records, mut indexed, mut damaged, mut problems) = (0u64, 0u64, 0u64, Vec::new());
    for p in &packs {
        let (mut scan, reader) = scan_pack(p, &mut |_, _, _| Ok(())).kind(ExitKind::Cache)?;
        if let Some(mut r) = reader {
            check_index(p, &mut r, &mut scan);
            check_segment(p, &mut r, &mut scan);
        }
        records += scan.good;
        indexed += scan.indexed;
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
    if records > indexed {
        // Regression (issue 28): after a full disk, verify counted 35 good records where stats
        // said 0 entries, with nothing to tell why.
        writeln!(
            out,
            "note: {} good records have no index entry (their writer stopped before writing \
             it: a full disk, a kill); they are not served until `tilefeat cache gc` copies them",
            records - indexed
        )?;
    }
    writeln!(
        out,
        "verified {} packs, {records} good records ({indexed} index entries), {damaged} problems",
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

impl GcOptions {
    /// Keep every fingerprint; another host's unsealed pack is abandoned after `stale`.
    pub fn keep_all(stale: Duration) -> GcOptions {
        GcOptions {
            keep: vec![],
            unused_since: None,
            stale,
        }
    }
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
    let mut out_packs = OutPacks::new(dir);
    let (mut kept, mut dropped, mut dup, mut damaged) = (0u64, 0u64, 0u64, 0u64);
    let mut kept_fps = HashSet::new();
    // Packs read to their end, whose good records are now in the new packs: only these go.
    let mut compacted = Vec::new();
    let mut left_alone = Vec::new();
    for p in &done {
        let (scan, _) = scan_pack(p, &mut |fp, tile, v| {
            let id = hex::encode(fp);
            if !wanted(&id) {
                dropped += 1;
                return Ok(());
            }
            if !out_packs.put(&fp, &tile, &v)? {
                dup += 1;
                return Ok(());
            }
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
    let new_packs = out_packs.finish()?;
    // The compacted packs are sealed on disk: now the old ones can go (the segment first: a
    // pack listed without it is read through its index).
    for p in &compacted {
        for ext in ["seg", "idx", "pack", "sealed"] {
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
    // Segments left half-written by a writer killed while sealing (its pack was compacted
    // above, so the writer is gone): `.<stem>.seg.tilefeat-tmp.<pid>`.
    let gone: HashSet<&str> = compacted.iter().map(|p| p.stem.as_str()).collect();
    if let Ok(entries) = std::fs::read_dir(packs_dir(dir)) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let stem = name
                .strip_prefix('.')
                .and_then(|n| n.split_once(".seg.tilefeat-tmp."))
                .map(|(stem, _)| stem);
            if stem.is_some_and(|s| gone.contains(s)) {
                let _ = std::fs::remove_file(e.path());
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
        "gc: compacted {} packs into {new_packs}: kept {kept} records, dropped {dropped} of unwanted fingerprints, \
         {dup} duplicates, {damaged} damaged; left {} packs of live writers alone",
        compacted.len(),
        live.len()
    )?;
    Ok(())
}

/// gc's output: packs of at most [`segment::MAX_PACK_ENTRIES`] entries, each sealed with its
/// segment as it fills. A key already written is found in the open pack's own set or in the
/// segments of those sealed before, so what gc holds does not grow with the cache.
struct OutPacks<'a> {
    dir: &'a Path,
    writer: Option<PackWriter>,
    sealed: Vec<segment::Segment>,
}

impl<'a> OutPacks<'a> {
    fn new(dir: &'a Path) -> Self {
        OutPacks {
            dir,
            writer: None,
            sealed: Vec::new(),
        }
    }

    /// Write a record; false if that key was written already.
    fn put(&mut self, fp: &Hash32, tile: &Hash32, v: &[f32]) -> Result<bool> {
        // Seal a full pack first, so that its keys are searched below (regression: a key
        // already in the pack that filled went into the next one again).
        if self.writer.as_ref().is_some_and(PackWriter::full) {
            self.seal()?;
        }
        for s in &self.sealed {
            // These segments were written just now; damage in one is an error of its own.
            match s.find(fp, tile) {
                Ok(None) => {}
                Ok(Some(_)) => return Ok(false),
                Err(e) => anyhow::bail!("gc: {e}"),
            }
        }
        if self.writer.is_none() {
            self.writer = Some(PackWriter::create(self.dir)?);
        }
        self.writer.as_mut().expect("made above").put(fp, tile, v)
    }

    fn seal(&mut self) -> Result<()> {
        if let Some(w) = self.writer.take() {
            let (stem, pd) = (w.stem.clone(), w.dir.clone());
            w.seal()?;
            let pack_len = std::fs::metadata(pd.join(format!("{stem}.pack")))?.len();
            self.sealed.push(segment::Segment::open(
                &segment::seg_path(&pd, &stem),
                pack_len,
            )?);
        }
        Ok(())
    }

    /// Seal the last pack; how many were written.
    fn finish(mut self) -> Result<usize> {
        self.seal()?;
        Ok(self.sealed.len())
    }
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
        let opts = GcOptions::keep_all(Duration::from_secs(3600));
        let mut out = Vec::new();
        gc(d.path(), &opts, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.contains("kept 2 records") && text.contains("1 damaged"),
            "{text}"
        );
    }
}
