//! `tilefeat cache gc`: compact the packs whose writer is gone (sealed, or provably dead)
//! into packs of at most [`segment::MAX_PACK_ENTRIES`] entries, each sealed with its segment,
//! dropping damaged records, duplicates and unwanted fingerprints; then remove the old packs.
//! `--unused-since` dates are parsed here.

use std::collections::HashSet;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::error::{ExitKind, WithKind};

use super::key::*;
use super::maintain::{fingerprint_records, require_cache_dir, scan_pack, writer_gone};
use super::pack::*;
use super::segment;

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
    use crate::cache::verify;

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
