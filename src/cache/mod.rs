//! The content-hash feature cache: append-only pack files, one writer per pack, no locks.
//!
//! A cached vector is keyed by [`CacheKey`]: the SHA-256 of the tile's bytes and the
//! [`Fingerprint`] of everything that changes the numbers (weights SHA-256, layer, pooling,
//! normalization, size, precision, preprocessing version). Renaming or moving a tile keeps
//! its key; changing any fingerprint field misses.
//!
//! Layout of a cache directory:
//! - `packs/<host>-<pid>-<random>.pack`: records `magic | fp | tile | dim | f32 x dim | crc32`,
//!   appended by exactly one process, whose name the file carries.
//! - `packs/<same>.idx`: one fixed-size entry per record (`fp | tile | offset | len | crc32`),
//!   appended after the record itself has been written, so an index entry never points at
//!   bytes that were not written first.
//! - `packs/<same>.sealed`: written when the writer closed cleanly. `gc` only rewrites sealed
//!   packs and packs whose writer is provably gone.
//! - `packs/<same>.seg`: written when the writer seals the pack: its entries sorted, behind a
//!   fan-out table ([`segment`]). A lookup reads two words and one bucket of it.
//! - `fingerprints/<fp>.yaml`: what each fingerprint means, and when it was last used.
//!
//! Opening reads the header of every segment and, for packs without one (live writers, killed
//! writers, caches written before segments), the `.idx` into a hash map from tile hash to
//! record location for the run's fingerprint only: what opening costs grows with the number
//! of packs and the entries of unsealed ones, not with the entries of sealed ones. Every
//! record read is checked (magic, key, length, CRC) before it is served; a damaged one is
//! reported and treated as a miss, so the tile is recomputed. Writers never modify bytes already written,
//! processes on several nodes may share the directory over NFS/Lustre/GPFS, and a `kill -9`
//! at any moment loses at most the unflushed tail.

mod gc;
mod key;
mod maintain;
mod pack;
mod segment;

pub use gc::{gc, parse_date, GcOptions};
pub use key::{CacheKey, Fingerprint, FingerprintRecord, Hash32, PREPROCESSING_VERSION};
pub use maintain::{stats, verify};

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use anyhow::Result;
use serde::Serialize;

use crate::error::{fail, ExitKind, WithKind};

use pack::*;

#[derive(Debug, Clone, Copy)]
pub(crate) struct Loc {
    /// Pack number (24 bits) and record length (40 bits would be overkill: records are
    /// < 16 MiB), packed so that a map entry is 32 bytes.
    pub(crate) pack_len: u64,
    pub(crate) offset: u64,
}

impl Loc {
    pub(crate) fn new(pack: u32, offset: u64, len: u32) -> Loc {
        Loc {
            pack_len: ((pack as u64) << 32) | len as u64,
            offset,
        }
    }
    pub(crate) fn pack(&self) -> usize {
        (self.pack_len >> 32) as usize
    }
    pub(crate) fn len(&self) -> usize {
        (self.pack_len & 0xffff_ffff) as usize
    }
}

/// In-memory key: the first 128 bits of the tile hash. The full hash is in every record and
/// is checked on read, so a (2^-128) prefix collision is caught, never served.
pub(crate) fn short_key(tile: &Hash32) -> u128 {
    u128::from_le_bytes(tile[..16].try_into().expect("16 bytes"))
}

/// Counters a run reports.
#[derive(Debug, Default, Clone, Serialize)]
pub struct CacheCounters {
    pub damaged_records: u64,
    pub torn_index_bytes: u64,
    pub stored: u64,
}

/// A cache opened for one fingerprint: lookups from many threads, writes from one.
pub struct Cache {
    pub(crate) dir: PathBuf,
    pub(crate) fp: Hash32,
    pub(crate) fp_record: FingerprintRecord,
    pub(crate) files: Vec<File>,
    pub(crate) pack_names: Vec<String>,
    pub(crate) index: HashMap<u128, Loc>,
    /// Sorted segments of sealed packs, with the number of their pack in `files`.
    pub(crate) segments: Vec<(u32, segment::Segment)>,
    pub(crate) writer: Mutex<Option<PackWriter>>,
    pub(crate) damaged: Mutex<Vec<String>>,
    pub(crate) torn_index_bytes: u64,
    pub(crate) stored: std::sync::atomic::AtomicU64,
    /// Why storing stopped (a full disk, a quota, a folder this user cannot write): lookups
    /// go on, new vectors are not stored (see [`Cache::stop_storing`]).
    pub(crate) store_failed: Mutex<Option<String>>,
    /// Vectors put since the last flush that wrote their index entries: not stored for sure
    /// until it does (if it fails, `stored` takes them back).
    pub(crate) unflushed: std::sync::atomic::AtomicU64,
    /// False under `--force`: every lookup misses, computed vectors are still stored.
    pub(crate) lookups: bool,
}

impl Cache {
    /// Open (creating if needed) the cache at `dir` for `fingerprint`.
    pub fn open(dir: &Path, fingerprint: &Fingerprint) -> Result<Cache> {
        init_dir(dir)?;
        let fp = fingerprint.id();
        let mut files = Vec::new();
        let mut pack_names = Vec::new();
        let mut index = HashMap::new();
        let mut torn = 0u64;
        let packs = list_packs(dir).kind(ExitKind::Cache)?;
        let mut segments = Vec::new();
        let mut unsegmented = Vec::new();
        for p in packs {
            // A pack removed by a concurrent gc between listing and opening, or one that is not a
            // regular file (a link to /dev/zero, a FIFO: never opened): skip it.
            let Ok((file, pack_len)) = open_regular(&p.pack) else {
                continue;
            };
            let n = files.len() as u32;
            files.push(file);
            pack_names.push(p.stem.clone());
            let seg = segment::seg_path(&packs_dir(dir), &p.stem);
            match segment::Segment::open(&seg, pack_len) {
                Ok(s) => segments.push((n, s)),
                Err(e) => {
                    // No segment (unsealed, or older than segments), or gone with its pack
                    // (gc): read the index. One that is there but cannot be used (damaged, or
                    // an I/O error) is said, then not used.
                    if std::fs::symlink_metadata(&seg).is_ok() && p.pack.exists() {
                        eprintln!(
                            "tilefeat: warning: cache index segment {} cannot be used ({e:#}); \
                             reading its pack's index instead (`tilefeat cache gc` rewrites it)",
                            seg.display()
                        );
                    }
                    unsegmented.push((n, p));
                }
            }
        }
        // Reserve up front for the entries present (up to 2^20; other fingerprints count too,
        // so no more than that): no rehash, and no transient double table, while loading a
        // million entries.
        let upper: u64 = unsegmented
            .iter()
            .map(|(_, p)| std::fs::metadata(&p.idx).map_or(0, |m| m.len()) / IDX_ENTRY as u64)
            .sum();
        index.reserve(upper.min(1 << 20) as usize);
        for (n, p) in unsegmented {
            // Entries read before an I/O error are still valid and point at pack `n`.
            if let Ok(t) = scan_idx(&p.idx, |e| {
                if e.fp == fp {
                    index.insert(short_key(&e.tile), Loc::new(n, e.offset, e.len));
                }
            }) {
                torn += t as u64;
            }
        }
        let now = unix_now();
        let fp_record = FingerprintRecord {
            id: hex::encode(fp),
            fingerprint: fingerprint.clone(),
            last_used: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            last_used_unix: now,
        };
        let cache = Cache {
            dir: dir.to_path_buf(),
            fp,
            fp_record,
            files,
            pack_names,
            index,
            segments,
            writer: Mutex::new(None),
            damaged: Mutex::new(Vec::new()),
            torn_index_bytes: torn,
            stored: Default::default(),
            store_failed: Mutex::new(None),
            unflushed: Default::default(),
            lookups: true,
        };
        if let Err(e) = cache.touch_fingerprint() {
            let mut w = cache.writer.lock().unwrap();
            cache.stop_storing(&mut w, e);
        }
        Ok(cache)
    }

    fn touch_fingerprint(&self) -> Result<()> {
        let path = self
            .dir
            .join("fingerprints")
            .join(format!("{}.yaml", self.fp_record.id));
        let yaml = serde_yaml::to_string(&self.fp_record)?;
        crate::output::write_atomic(&path, yaml.as_bytes())
            .map_err(|e| fail(ExitKind::Cache, format!("{e:#}")))
    }

    /// This cache with lookups on, or (`--force`) off: then every tile is a miss, recomputed
    /// and stored again.
    pub fn with_lookups(mut self, on: bool) -> Cache {
        self.lookups = on;
        self
    }

    /// Entries of this fingerprint held in memory (those of packs without a segment).
    pub fn len_in_memory(&self) -> usize {
        self.index.len()
    }

    /// What the provenance reports as `entries_at_open`: [`Cache::len_in_memory`] plus the
    /// entries of every segment (all fingerprints).
    pub fn entries_at_open(&self) -> usize {
        self.index.len() + self.segments().1 as usize
    }

    /// Segments opened (sealed packs), and the entries they hold (all fingerprints).
    pub fn segments(&self) -> (usize, u64) {
        let entries = self.segments.iter().map(|(_, s)| s.count).sum();
        (self.segments.len(), entries)
    }

    /// The stored vector for a tile hash, checked; `None` on a miss or a damaged record (or
    /// a damaged segment: then its tiles are recomputed).
    pub fn get(&self, tile: &Hash32) -> Option<Vec<f32>> {
        if !self.lookups {
            return None;
        }
        if let Some(loc) = self.index.get(&short_key(tile)) {
            if let Some(v) = self.read(*loc, tile) {
                return Some(v);
            }
        }
        for (pack, seg) in &self.segments {
            match seg.find(&self.fp, tile) {
                Ok(Some(e)) => {
                    if let Some(v) = self.read(Loc::new(*pack, e.offset, e.len), tile) {
                        return Some(v);
                    }
                }
                Ok(None) => {}
                Err(m) if m.is_empty() => {}
                Err(m) => self.damaged.lock().unwrap().push(m),
            }
        }
        None
    }

    /// The record at `loc`, checked against this fingerprint and `tile`; damage is noted.
    fn read(&self, loc: Loc, tile: &Hash32) -> Option<Vec<f32>> {
        let result = if loc.len() > MAX_RECORD {
            // A damaged index entry: nothing is allocated for it.
            Err(anyhow::anyhow!(
                "absurd record length {} in the index",
                loc.len()
            ))
        } else {
            let mut buf = vec![0u8; loc.len()];
            let file = &self.files[loc.pack()];
            file.read_exact_at(&mut buf, loc.offset)
                .map_err(anyhow::Error::from)
                .and_then(|_| decode_record(&buf, Some((&self.fp, tile))))
        };
        match result {
            Ok((_, _, v)) => Some(v),
            Err(e) => {
                self.damaged.lock().unwrap().push(format!(
                    "pack {} offset {}: {e:#}",
                    self.pack_names[loc.pack()],
                    loc.offset
                ));
                None
            }
        }
    }

    /// A store that failed (a full disk, a quota, a folder this user cannot write) stops
    /// storing for the rest of the process, with one warning: the run goes on, its features
    /// are as good, only its new vectors are not cached. The pack being written is left as
    /// a killed process leaves one (what was complete stays readable).
    fn stop_storing(&self, writer: &mut Option<PackWriter>, e: anyhow::Error) {
        let why = format!("{e:#}");
        eprintln!(
            "tilefeat: warning: cache {}: cannot store vectors ({why}); going on without \
             storing (lookups still served; this run's new vectors are not cached)",
            self.dir.display()
        );
        *writer = None;
        // Those not flushed are not findable (their index entries were never written).
        let lost = self.unflushed.swap(0, std::sync::atomic::Ordering::Relaxed);
        self.stored
            .fetch_sub(lost, std::sync::atomic::Ordering::Relaxed);
        *self.store_failed.lock().unwrap() = Some(why);
    }

    /// Why storing stopped, if it did.
    pub fn store_failed(&self) -> Option<String> {
        self.store_failed.lock().unwrap().clone()
    }

    /// Append a computed vector (buffered until [`Cache::flush`]); nothing once storing
    /// stopped.
    pub fn put(&self, tile: &Hash32, features: &[f32]) -> Result<()> {
        let mut w = self.writer.lock().unwrap();
        if self.store_failed.lock().unwrap().is_some() {
            return Ok(());
        }
        // A full pack is sealed (its segment written) and this vector begins a new one.
        if w.as_ref().is_some_and(PackWriter::full) {
            match w.take().expect("checked").seal() {
                Ok(()) => self
                    .unflushed
                    .store(0, std::sync::atomic::Ordering::Relaxed),
                Err(e) => {
                    self.stop_storing(&mut w, e);
                    return Ok(());
                }
            }
        }
        let stored = match w.as_mut() {
            Some(pw) => pw.put(&self.fp, tile, features),
            None => PackWriter::create(&self.dir).and_then(|mut pw| {
                let r = pw.put(&self.fp, tile, features);
                *w = Some(pw);
                r
            }),
        };
        match stored {
            Ok(true) => {
                self.stored
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.unflushed
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Ok(false) => {}
            Err(e) => self.stop_storing(&mut w, e),
        }
        Ok(())
    }

    /// Write buffered records, then their index entries.
    pub fn flush(&self) -> Result<()> {
        self.flush_as(false)
    }

    /// Write buffered records and their index entries, and fsync both: what was stored so
    /// far survives a crash (the pack stays open for more).
    pub fn sync(&self) -> Result<()> {
        self.flush_as(true)
    }

    fn flush_as(&self, durable: bool) -> Result<()> {
        let mut w = self.writer.lock().unwrap();
        match w.as_mut().map(|pw| pw.flush(durable)) {
            Some(Err(e)) => self.stop_storing(&mut w, e),
            Some(Ok(())) => self
                .unflushed
                .store(0, std::sync::atomic::Ordering::Relaxed),
            None => {}
        }
        Ok(())
    }

    /// Flush, fsync and seal this process's pack.
    pub fn close(&self) -> Result<CacheCounters> {
        let mut w = self.writer.lock().unwrap();
        if let Some(Err(e)) = w.take().map(PackWriter::seal) {
            self.stop_storing(&mut w, e);
        }
        drop(w);
        Ok(self.counters())
    }

    pub fn counters(&self) -> CacheCounters {
        CacheCounters {
            damaged_records: self.damaged.lock().unwrap().len() as u64,
            torn_index_bytes: self.torn_index_bytes,
            stored: self.stored.load(std::sync::atomic::Ordering::Relaxed),
        }
    }

    /// Descriptions of damaged records met so far.
    pub fn damaged(&self) -> Vec<String> {
        self.damaged.lock().unwrap().clone()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::cli::{Layer, Normalize, Pool, Precision};

    fn fp(size: u32) -> Fingerprint {
        Fingerprint {
            weights_sha256: "random:0".into(),
            layer: Layer::Layer4,
            pool: Pool::Max,
            normalize: Normalize::Tutorial,
            size,
            precision: Precision::Fp32,
            preprocessing_version: PREPROCESSING_VERSION,
            layout: None,
            encoder: None,
            mean_std: None,
        }
    }

    #[test]
    fn fingerprint_fields_change_the_id() {
        assert_eq!(fp(224).id(), fp(224).id());
        assert_ne!(fp(224).id(), fp(256).id());
        let mut f = fp(224);
        f.pool = Pool::Avg;
        assert_ne!(f.id(), fp(224).id());
        // NCHW is a fingerprint of its own; NHWC (the default) keeps the YAML, and so the id,
        // that fingerprints had before the layout was part of them.
        let mut f = fp(224);
        f.layout = Some("nchw".into());
        assert_ne!(f.id(), fp(224).id());
        let yaml = serde_yaml::to_string(&fp(224)).unwrap();
        assert!(!yaml.contains("layout"), "{yaml}");
    }

    #[test]
    fn put_flush_reopen_get() {
        let d = tempfile::tempdir().unwrap();
        let c = Cache::open(d.path(), &fp(224)).unwrap();
        let t = [7u8; 32];
        c.put(&t, &[1.0, 2.5, -3.0]).unwrap();
        c.flush().unwrap();
        // Visible to a second opener while the first is still open.
        let c2 = Cache::open(d.path(), &fp(224)).unwrap();
        assert_eq!(c2.get(&t), Some(vec![1.0, 2.5, -3.0]));
        assert_eq!(Cache::open(d.path(), &fp(256)).unwrap().get(&t), None);
        c.close().unwrap();
        let mut out = Vec::new();
        verify(d.path(), &mut out).unwrap();
    }

    #[test]
    fn bit_flip_is_never_served_and_verify_reports_it() {
        let d = tempfile::tempdir().unwrap();
        let c = Cache::open(d.path(), &fp(224)).unwrap();
        let t = [9u8; 32];
        c.put(&t, &[0.5; 16]).unwrap();
        c.close().unwrap();
        let pack = list_packs(d.path()).unwrap()[0].pack.clone();
        let mut bytes = std::fs::read(&pack).unwrap();
        let n = bytes.len();
        bytes[n - 10] ^= 0x40;
        std::fs::write(&pack, bytes).unwrap();
        let c = Cache::open(d.path(), &fp(224)).unwrap();
        assert_eq!(c.get(&t), None);
        assert_eq!(c.counters().damaged_records, 1);
        let mut out = Vec::new();
        assert!(verify(d.path(), &mut out).is_err());
        assert!(String::from_utf8(out)
            .unwrap()
            .contains("checksum mismatch"));
    }

    #[test]
    fn gc_compacts_and_drops_unwanted() {
        let d = tempfile::tempdir().unwrap();
        for (size, tile) in [(224, 1u8), (224, 2), (256, 3)] {
            let c = Cache::open(d.path(), &fp(size)).unwrap();
            c.put(&[tile; 32], &[tile as f32]).unwrap();
            c.close().unwrap();
        }
        assert_eq!(list_packs(d.path()).unwrap().len(), 3);
        let keep = hex::encode(fp(224).id())[..10].to_string();
        let opts = GcOptions {
            keep: vec![keep],
            unused_since: None,
            stale: Duration::from_secs(3600),
        };
        gc(d.path(), &opts, &mut Vec::new()).unwrap();
        assert_eq!(list_packs(d.path()).unwrap().len(), 1);
        let c = Cache::open(d.path(), &fp(224)).unwrap();
        assert_eq!(c.segments(), (1, 2));
        assert_eq!(c.get(&[1; 32]), Some(vec![1.0]));
        assert_eq!(c.get(&[2; 32]), Some(vec![2.0]));
        assert_eq!(Cache::open(d.path(), &fp(256)).unwrap().get(&[3; 32]), None);
    }

    /// A writer seals its pack at `MAX_PACK_ENTRIES` (64 in unit tests) and goes on in a new
    /// one; every pack gets its segment, lookups find every entry through them, `stats`
    /// counts each tile once however many packs hold it, and `gc` drops the duplicates
    /// across its own output packs.
    #[test]
    fn full_packs_roll_over_and_gc_dedups_across_its_output() {
        let d = tempfile::tempdir().unwrap();
        let key = |i: u32| -> Hash32 {
            use sha2::{Digest, Sha256};
            Sha256::digest(i.to_le_bytes()).into()
        };
        for _ in 0..2 {
            let c = Cache::open(d.path(), &fp(224)).unwrap();
            for i in 0..200 {
                c.put(&key(i), &[i as f32]).unwrap();
            }
            c.close().unwrap();
        }
        let segs = |d: &Path| {
            std::fs::read_dir(packs_dir(d))
                .unwrap()
                .filter(|e| e.as_ref().unwrap().path().extension().unwrap() == "seg")
                .count()
        };
        assert_eq!(list_packs(d.path()).unwrap().len(), 8);
        assert_eq!(segs(d.path()), 8);
        let c = Cache::open(d.path(), &fp(224)).unwrap();
        assert_eq!(c.segments(), (8, 400));
        assert_eq!(c.len_in_memory(), 0);
        for i in 0..200 {
            assert_eq!(c.get(&key(i)), Some(vec![i as f32]), "{i}");
        }
        assert_eq!(c.get(&key(200)), None);
        let mut out = Vec::new();
        stats(d.path(), &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("entries: 400 (200 unique)"), "{text}");
        let opts = GcOptions::keep_all(Duration::from_secs(3600));
        let mut out = Vec::new();
        gc(d.path(), &opts, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.contains("compacted 8 packs into 4: kept 200 records")
                && text.contains("200 duplicates"),
            "{text}"
        );
        assert_eq!(segs(d.path()), 4);
        let c = Cache::open(d.path(), &fp(224)).unwrap();
        assert_eq!(c.segments(), (4, 200));
        assert!((0..200).all(|i| c.get(&key(i)) == Some(vec![i as f32])));
        verify(d.path(), &mut Vec::new()).unwrap();
    }

    /// A reader that opened the cache before `gc` compacted (and removed) the packs and
    /// segments it opened still serves every entry: its handles outlive the names.
    #[test]
    fn a_reader_open_before_gc_serves_everything_after_it() {
        let d = tempfile::tempdir().unwrap();
        for t in 0..3u8 {
            let c = Cache::open(d.path(), &fp(224)).unwrap();
            c.put(&[t; 32], &[t as f32; 3]).unwrap();
            c.close().unwrap();
        }
        let reader = Cache::open(d.path(), &fp(224)).unwrap();
        assert_eq!(reader.segments().0, 3);
        let before: Vec<PathBuf> = list_packs(d.path())
            .unwrap()
            .into_iter()
            .map(|p| p.pack)
            .collect();
        let opts = GcOptions::keep_all(Duration::from_secs(3600));
        gc(d.path(), &opts, &mut Vec::new()).unwrap();
        assert!(before
            .iter()
            .all(|p| !p.exists() && !p.with_extension("seg").exists()));
        for t in 0..3u8 {
            assert_eq!(reader.get(&[t; 32]), Some(vec![t as f32; 3]));
        }
        assert_eq!(reader.counters().damaged_records, 0);
    }

    /// Regression (issue 27, 8): the damaged-index test only flipped a tile hash, which can
    /// never point at another tile's vector. Here an index entry, and then a segment entry,
    /// for tile A is forged (checksum and all) to point at tile B's record: A is a miss and
    /// damage, never B's vector; B is still served.
    #[test]
    fn a_forged_entry_pointing_at_another_record_is_never_served() {
        let d = tempfile::tempdir().unwrap();
        let c = Cache::open(d.path(), &fp(224)).unwrap();
        let (a, b) = ([0xaa; 32], [0xbb; 32]);
        c.put(&a, &[1.0; 4]).unwrap();
        c.put(&b, &[2.0; 4]).unwrap();
        c.close().unwrap();
        let p = list_packs(d.path()).unwrap().remove(0);
        let (entries, _) = read_idx(&p.idx).unwrap();
        let (ea, eb) = (entries[0], entries[1]);
        assert_eq!((ea.tile, eb.tile), (a, b));
        let forged = IdxEntry {
            offset: eb.offset,
            len: eb.len,
            ..ea
        };
        let check = |what: &str| {
            let c = Cache::open(d.path(), &fp(224)).unwrap();
            assert_eq!(c.get(&a), None, "{what}");
            assert_eq!(c.get(&b), Some(vec![2.0; 4]), "{what}");
            let damage = c.damaged();
            assert!(
                damage.len() == 1 && damage[0].contains("record key does not match"),
                "{what}: {damage:?}"
            );
        };
        // Through the segment: its first entry (A's: 0xaa sorts before 0xbb).
        let seg = segment::seg_path(&packs_dir(d.path()), &p.stem);
        let mut bytes = std::fs::read(&seg).unwrap();
        let at = bytes.len() - 2 * segment::SEG_ENTRY;
        bytes[at..at + segment::SEG_ENTRY].copy_from_slice(&segment::encode_entry(&forged));
        std::fs::write(&seg, &bytes).unwrap();
        check("segment");
        // Through the index (no segment, as in a cache from before segments).
        std::fs::remove_file(&seg).unwrap();
        let mut bytes = std::fs::read(&p.idx).unwrap();
        bytes[IDX_MAGIC.len()..IDX_MAGIC.len() + IDX_ENTRY].copy_from_slice(&encode_idx(&forged));
        std::fs::write(&p.idx, &bytes).unwrap();
        check("index");
    }

    #[test]
    fn dates() {
        assert_eq!(parse_date("1970-01-02").unwrap(), 86400);
        assert_eq!(parse_date("2026-11-26").unwrap(), 1795651200);
        assert!(parse_date("2026-13-01").is_err());
    }
}
