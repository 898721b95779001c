//! `tilefeat cache stats` and `verify`: reading every pack and checking every record, and
//! what `gc` (in `gc.rs`) shares with them: which packs' writers are gone, the fingerprint
//! records, the scan of one pack.

use std::collections::BTreeMap;
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
