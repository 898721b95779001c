//! Sorted index segments: what makes opening a cache cost nothing per entry.
//!
//! A pack's writer, when it seals the pack, writes `packs/<stem>.seg`: every index entry of
//! the pack, sorted by (tile hash, fingerprint), behind a fan-out table of bucket starts
//! (the bucket is the first `bits` bits of the tile hash; about eight entries a bucket). It is
//! written beside its pack under a temporary name, fsynced and renamed, and never modified.
//!
//! Opening a segment reads its 64-byte header (checked: magic, CRC, a length that matches
//! the entry count exactly); a lookup reads two fan-out words and then the one bucket, every
//! entry of which is checked (CRC, bucket, order) before anything in it is believed. Damage
//! makes the segment *damaged*: its lookups miss from then on (the tiles are recomputed) and
//! `verify` names it. A record found through a segment is checked against the key like any
//! other, so a damaged segment can cost recomputation, never a wrong vector.
//!
//! Layout: `magic (16) | count u64 | bits u32 | pack_len u64 | zeros (24) | crc32` (64
//! bytes), then `2^bits + 1` u64 bucket starts, then `count` entries
//! `tile (32) | fp (32) | offset u64 | len u32 | crc32` (80 bytes).

use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, Context, Result};

use super::key::Hash32;
use super::pack::{crc, open_regular, IdxEntry};
use crate::error::{ExitKind, WithKind};

pub(crate) const SEG_MAGIC: &[u8; 16] = b"TILEFEAT-SEG--01";
const HEADER: u64 = 64;
pub(crate) const SEG_ENTRY: usize = 80;
/// The most fan-out bits (16 Mi buckets, 128 MiB of table) and entries in one bucket a
/// reader accepts: more is damage (SHA-256 prefixes spread evenly: ~8 a bucket).
const MAX_BITS: u32 = 24;
const MAX_BUCKET: u64 = 1 << 16;
/// A writer seals its pack, writing its segment, after this many entries and goes on in a
/// new pack: what it holds (entries 160 MiB, the duplicate check's key set about as much)
/// stays bounded.
#[cfg(not(test))]
pub(crate) const MAX_PACK_ENTRIES: usize = 1 << 21;
/// (Small in unit tests, so that rolling over to a new pack is exercised.)
#[cfg(test)]
pub(crate) const MAX_PACK_ENTRIES: usize = 64;

pub(crate) fn seg_path(packs: &Path, stem: &str) -> PathBuf {
    packs.join(format!("{stem}.seg"))
}

fn bits_for(count: u64) -> u32 {
    let mut bits = 0;
    while bits < MAX_BITS && (count >> bits) > 8 {
        bits += 1;
    }
    bits
}

fn bucket(tile: &Hash32, bits: u32) -> u64 {
    if bits == 0 {
        0
    } else {
        (u32::from_be_bytes(tile[..4].try_into().expect("4 bytes")) >> (32 - bits)) as u64
    }
}

pub(super) fn encode_entry(e: &IdxEntry) -> [u8; SEG_ENTRY] {
    let mut b = [0u8; SEG_ENTRY];
    b[0..32].copy_from_slice(&e.tile);
    b[32..64].copy_from_slice(&e.fp);
    b[64..72].copy_from_slice(&e.offset.to_le_bytes());
    b[72..76].copy_from_slice(&e.len.to_le_bytes());
    let c = crc(&b[..76]);
    b[76..80].copy_from_slice(&c.to_le_bytes());
    b
}

fn decode_entry(b: &[u8]) -> Option<IdxEntry> {
    let stored = u32::from_le_bytes(b[76..80].try_into().ok()?);
    (crc(&b[..76]) == stored).then(|| IdxEntry {
        tile: b[0..32].try_into().expect("32 bytes"),
        fp: b[32..64].try_into().expect("32 bytes"),
        offset: u64::from_le_bytes(b[64..72].try_into().expect("8 bytes")),
        len: u32::from_le_bytes(b[72..76].try_into().expect("4 bytes")),
    })
}

fn order(e: &IdxEntry) -> (Hash32, Hash32) {
    (e.tile, e.fp)
}

/// Write the segment of the pack `stem` (whose length is `pack_len`): sorted, one entry per
/// key (a writer stores a key once per pack; any repeat is dropped), fsynced, renamed into
/// place.
pub(crate) fn write(
    packs: &Path,
    stem: &str,
    pack_len: u64,
    mut entries: Vec<IdxEntry>,
) -> Result<()> {
    entries.sort_unstable_by_key(order);
    entries.dedup_by_key(|e| order(e));
    let count = entries.len() as u64;
    let bits = bits_for(count);
    let mut header = [0u8; HEADER as usize];
    header[..16].copy_from_slice(SEG_MAGIC);
    header[16..24].copy_from_slice(&count.to_le_bytes());
    header[24..28].copy_from_slice(&bits.to_le_bytes());
    header[28..36].copy_from_slice(&pack_len.to_le_bytes());
    let c = crc(&header[..60]);
    header[60..64].copy_from_slice(&c.to_le_bytes());
    let path = seg_path(packs, stem);
    // AtomicFile's errors are Output's (`.kind` keeps the first kind): made the cache's here.
    let as_cache = |e: anyhow::Error| crate::error::fail(ExitKind::Cache, format!("{e:#}"));
    let mut f = crate::output::AtomicFile::create(&path).map_err(as_cache)?;
    let w = f.writer();
    let ctx = || format!("cannot write cache segment {}", path.display());
    w.write_all(&header)
        .with_context(ctx)
        .kind(ExitKind::Cache)?;
    let mut at = 0usize;
    for b in 0..=(1u64 << bits) {
        while at < entries.len() && bucket(&entries[at].tile, bits) < b {
            at += 1;
        }
        w.write_all(&(at as u64).to_le_bytes())
            .with_context(ctx)
            .kind(ExitKind::Cache)?;
    }
    for e in &entries {
        w.write_all(&encode_entry(e))
            .with_context(ctx)
            .kind(ExitKind::Cache)?;
    }
    f.commit().map_err(as_cache)
}

/// An open segment: its file and header; nothing per entry.
pub(crate) struct Segment {
    pub(crate) path: PathBuf,
    file: File,
    pub(crate) count: u64,
    bits: u32,
    damaged: AtomicBool,
    io_reported: AtomicBool,
}

impl Segment {
    /// Open and check the header (and that the file is exactly as long as it says) of the
    /// segment of a pack now `pack_len` bytes long.
    pub(crate) fn open(path: &Path, pack_len: u64) -> Result<Segment> {
        let (file, len) = open_regular(path)?;
        let mut h = [0u8; HEADER as usize];
        file.read_exact_at(&mut h, 0)
            .map_err(|_| anyhow::anyhow!("shorter than its header"))?;
        if &h[..16] != SEG_MAGIC {
            bail!("not a tilefeat index segment");
        }
        if crc(&h[..60]) != u32::from_le_bytes(h[60..64].try_into()?) {
            bail!("header checksum mismatch");
        }
        let count = u64::from_le_bytes(h[16..24].try_into()?);
        let bits = u32::from_le_bytes(h[24..28].try_into()?);
        let covers = u64::from_le_bytes(h[28..36].try_into()?);
        if bits > MAX_BITS {
            bail!("absurd fan-out ({bits} bits)");
        }
        let want = count
            .checked_mul(SEG_ENTRY as u64)
            .and_then(|n| n.checked_add(HEADER + 8 * ((1u64 << bits) + 1)));
        let Some(want) = want else {
            bail!("absurd entry count {count}");
        };
        if len != want {
            bail!("{len} bytes where its header says {want}");
        }
        if covers > pack_len {
            bail!("indexes {covers} bytes of a pack now {pack_len} bytes long (truncated pack)");
        }
        Ok(Segment {
            path: path.to_path_buf(),
            file,
            count,
            bits,
            damaged: AtomicBool::new(false),
            io_reported: AtomicBool::new(false),
        })
    }

    pub(crate) fn is_damaged(&self) -> bool {
        self.damaged.load(Ordering::Relaxed)
    }

    /// Where the record of (`fp`, `tile`) is, if this segment has it. `Err`: the segment is
    /// damaged (said once, as the message; every later lookup misses), or could not be read
    /// (an I/O error, said once but not held against the segment: the next lookup tries
    /// again). An empty message: said before.
    pub(crate) fn find(&self, fp: &Hash32, tile: &Hash32) -> Result<Option<IdxEntry>, String> {
        if self.is_damaged() {
            return Ok(None);
        }
        let say = |flag: &AtomicBool, msg: String| {
            if flag.swap(true, Ordering::Relaxed) {
                String::new()
            } else {
                msg
            }
        };
        match self.search(fp, tile) {
            Ok(found) => Ok(found),
            Err(Failure::Damaged(e)) => Err(say(
                &self.damaged,
                format!("index segment {}: {e}", self.path.display()),
            )),
            Err(Failure::Io(e)) => Err(say(
                &self.io_reported,
                format!(
                    "index segment {}: cannot read ({e}); its tiles are recomputed while it \
                     cannot be read",
                    self.path.display()
                ),
            )),
        }
    }

    fn search(&self, fp: &Hash32, tile: &Hash32) -> Result<Option<IdxEntry>, Failure> {
        let damaged = |m: String| Failure::Damaged(m);
        let b = bucket(tile, self.bits);
        let mut w = [0u8; 16];
        self.file
            .read_exact_at(&mut w, HEADER + 8 * b)
            .map_err(Failure::Io)?;
        let lo = u64::from_le_bytes(w[..8].try_into().expect("8 bytes"));
        let hi = u64::from_le_bytes(w[8..].try_into().expect("8 bytes"));
        if lo > hi || hi > self.count || hi - lo > MAX_BUCKET {
            return Err(damaged(format!("bucket {b}: absurd bounds {lo}..{hi}")));
        }
        // The bucket and one neighbour each side: a wrong fan-out word (the table has no
        // checksum) shows as a neighbour in this bucket or an entry out of it.
        let first = lo.saturating_sub(1);
        let end = (hi + 1).min(self.count);
        if first == end {
            return Ok(None);
        }
        let mut buf = vec![0u8; ((end - first) as usize) * SEG_ENTRY];
        let start = HEADER + 8 * ((1u64 << self.bits) + 1);
        self.file
            .read_exact_at(&mut buf, start + first * SEG_ENTRY as u64)
            .map_err(Failure::Io)?;
        let mut found = None;
        let mut prev: Option<(Hash32, Hash32)> = None;
        for (i, raw) in buf.chunks_exact(SEG_ENTRY).enumerate() {
            let at = first + i as u64;
            let Some(e) = decode_entry(raw) else {
                return Err(damaged(format!("entry {at} fails its checksum")));
            };
            let eb = bucket(&e.tile, self.bits);
            let fits = if at < lo {
                eb < b
            } else if at >= hi {
                eb > b
            } else {
                eb == b
            };
            if !fits || prev.is_some_and(|p| p >= order(&e)) {
                return Err(damaged(format!(
                    "entry {at} is out of order (or the fan-out of bucket {b} is wrong)"
                )));
            }
            prev = Some(order(&e));
            if at >= lo && at < hi && &e.tile == tile && &e.fp == fp {
                found = Some(e);
            }
        }
        Ok(found)
    }
}

/// Why a lookup in a segment failed.
enum Failure {
    /// What the segment holds is wrong.
    Damaged(String),
    /// It could not be read (an NFS hiccup, a stale handle): not held against it.
    Io(std::io::Error),
}

/// Every entry of a segment in order, streamed (for `stats`, `verify`): a damaged entry, a
/// wrong order or a short file ends the stream with an error.
pub(crate) struct SegEntries {
    reader: BufReader<std::io::Take<File>>,
    left: u64,
    prev: Option<(Hash32, Hash32)>,
    pub(crate) path: PathBuf,
    n: u64,
}

impl SegEntries {
    pub(crate) fn open(seg: &Segment) -> Result<SegEntries> {
        let (file, len) = open_regular(&seg.path)?;
        let start = HEADER + 8 * ((1u64 << seg.bits) + 1);
        let mut reader = BufReader::with_capacity(1 << 16, file.take(len));
        std::io::copy(&mut (&mut reader).take(start), &mut std::io::sink())?;
        Ok(SegEntries {
            reader,
            left: seg.count,
            prev: None,
            path: seg.path.clone(),
            n: 0,
        })
    }

    pub(crate) fn next_entry(&mut self) -> Result<Option<IdxEntry>> {
        if self.left == 0 {
            return Ok(None);
        }
        let mut b = [0u8; SEG_ENTRY];
        self.reader
            .read_exact(&mut b)
            .with_context(|| format!("{}: entry {}: cannot read", self.path.display(), self.n))?;
        let Some(e) = decode_entry(&b) else {
            bail!(
                "{}: entry {} fails its checksum",
                self.path.display(),
                self.n
            );
        };
        if self.prev.is_some_and(|p| p >= order(&e)) {
            bail!("{}: entry {} is out of order", self.path.display(), self.n);
        }
        self.prev = Some(order(&e));
        self.left -= 1;
        self.n += 1;
        Ok(Some(e))
    }
}

/// Check a whole segment: every entry (checksum, order) and that the fan-out table points at
/// each bucket's first entry. Memory: one bucket's bounds at a time.
pub(crate) fn check(seg: &Segment, each: &mut dyn FnMut(&IdxEntry)) -> Result<()> {
    let mut entries = SegEntries::open(seg)?;
    let mut fan = BufReader::with_capacity(1 << 16, open_regular(&seg.path)?.0);
    std::io::copy(&mut (&mut fan).take(HEADER), &mut std::io::sink())?;
    // fan-out[b] = the number of entries in buckets before b: checked for every b up to an
    // entry's bucket when that entry comes (all entries before it are in earlier buckets).
    let mut b = 0u64;
    let mut check_upto = |last: u64, at: u64| -> Result<()> {
        while b <= last {
            let mut word = [0u8; 8];
            fan.read_exact(&mut word)?;
            if u64::from_le_bytes(word) != at {
                bail!("{}: fan-out of bucket {b} is wrong", seg.path.display());
            }
            b += 1;
        }
        Ok(())
    };
    let mut at = 0u64;
    while let Some(e) = entries.next_entry()? {
        check_upto(bucket(&e.tile, seg.bits), at)?;
        each(&e);
        at += 1;
    }
    check_upto(1u64 << seg.bits, at)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(i: u32, fp: u8) -> IdxEntry {
        use sha2::{Digest, Sha256};
        IdxEntry {
            fp: [fp; 32],
            tile: Sha256::digest(i.to_le_bytes()).into(),
            offset: 16 + i as u64 * 100,
            len: 100,
        }
    }

    #[test]
    fn written_segments_find_every_entry_and_nothing_else() {
        let d = tempfile::tempdir().unwrap();
        for n in [0u32, 1, 9, 1000] {
            let stem = format!("s{n}");
            let es: Vec<IdxEntry> = (0..n).flat_map(|i| [entry(i, 1), entry(i, 2)]).collect();
            write(d.path(), &stem, 1 << 30, es.clone()).unwrap();
            let seg = Segment::open(&seg_path(d.path(), &stem), 1 << 30).unwrap();
            assert_eq!(seg.count, 2 * n as u64);
            for e in &es {
                let got = seg.find(&e.fp, &e.tile).unwrap().unwrap();
                assert_eq!(got.offset, e.offset);
            }
            let absent = entry(n + 1, 1);
            assert!(seg.find(&absent.fp, &absent.tile).unwrap().is_none());
            assert!(seg.find(&[3; 32], &entry(0, 1).tile).unwrap().is_none());
            let mut seen = 0;
            check(&seg, &mut |_| seen += 1).unwrap();
            assert_eq!(seen, 2 * n);
            // Opening a segment of a pack shorter than it covers: refused.
            assert!(Segment::open(&seg_path(d.path(), &stem), 1000).is_err());
        }
    }

    /// A flipped byte in an entry: the lookup that meets it reports the segment once, every
    /// later one misses, and `check` names the entry.
    #[test]
    fn damage_is_detected_not_believed() {
        let d = tempfile::tempdir().unwrap();
        let es: Vec<IdxEntry> = (0..500).map(|i| entry(i, 1)).collect();
        write(d.path(), "s", 1 << 30, es.clone()).unwrap();
        let path = seg_path(d.path(), "s");
        let mut bytes = std::fs::read(&path).unwrap();
        let n = bytes.len();
        bytes[n - SEG_ENTRY * 3 + 70] ^= 1; // an offset three entries from the end
        std::fs::write(&path, &bytes).unwrap();
        let seg = Segment::open(&path, 1 << 30).unwrap();
        let mut errors = Vec::new();
        for e in &es {
            match seg.find(&e.fp, &e.tile) {
                Err(m) => errors.push(m),
                Ok(Some(f)) => assert_eq!(f.offset, e.offset),
                Ok(None) => {}
            }
        }
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].contains("checksum"), "{}", errors[0]);
        assert!(seg.is_damaged());
        let e = check(&seg, &mut |_| {}).unwrap_err().to_string();
        assert!(e.contains("fails its checksum"), "{e}");
        // A damaged header or a truncated file: not opened at all.
        bytes[20] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let e = Segment::open(&path, 1 << 30).err().unwrap().to_string();
        assert!(e.contains("header checksum"), "{e}");
        write(d.path(), "t", 1 << 30, es.clone()).unwrap();
        let good = std::fs::read(seg_path(d.path(), "t")).unwrap();
        std::fs::write(&path, &good[..good.len() - 1]).unwrap();
        let e = Segment::open(&path, 1 << 30).err().unwrap().to_string();
        assert!(e.contains("where its header says"), "{e}");
        // A wrong fan-out word (no checksum covers the table): bucket 5's start moved one
        // entry later, so its first entry shows as the neighbour before it. Said, not believed.
        let mut fan = good.clone();
        let w = HEADER as usize + 8 * 5;
        let v = u64::from_le_bytes(fan[w..w + 8].try_into().unwrap()) + 1;
        fan[w..w + 8].copy_from_slice(&v.to_le_bytes());
        std::fs::write(&path, &fan).unwrap();
        let seg = Segment::open(&path, 1 << 30).unwrap();
        let errors: Vec<String> = es
            .iter()
            .filter_map(|e| seg.find(&e.fp, &e.tile).err())
            .collect();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].contains("fan-out of bucket"), "{}", errors[0]);
        // A forged header (good CRC) whose entry count overflows the length arithmetic.
        let mut h = [0u8; HEADER as usize];
        h[..16].copy_from_slice(SEG_MAGIC);
        h[16..24].copy_from_slice(&(u64::MAX / 40).to_le_bytes());
        let c = crc(&h[..60]);
        h[60..64].copy_from_slice(&c.to_le_bytes());
        std::fs::write(&path, [&h[..], &[0u8; 16]].concat()).unwrap();
        let e = Segment::open(&path, 1 << 30).err().unwrap().to_string();
        assert!(e.contains("absurd entry count"), "{e}");
    }
}
