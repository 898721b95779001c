//! The files of a cache directory: pack records, index entries, listing packs, and the one
//! writer of a pack (append-only: bytes once written are never modified).

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{BufReader, ErrorKind, Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use crate::error::{fail, ExitKind, WithKind};

use super::key::Hash32;
use crate::host::hostname;

pub(crate) const PACK_MAGIC: &[u8; 16] = b"TILEFEAT-PACK-01";
pub(crate) const IDX_MAGIC: &[u8; 16] = b"TILEFEAT-IDX--01";
pub(crate) const RECORD_MAGIC: u32 = 0x5446_5231; // "TFR1"
pub(crate) const RECORD_OVERHEAD: usize = 4 + 32 + 32 + 4 + 4;
pub(crate) const IDX_ENTRY: usize = 32 + 32 + 8 + 4 + 4;
/// The longest vector the cache stores (4 Mi floats, a 16 MiB record): what reading one record
/// may allocate is bounded, and a larger dimension in a record header or index entry is damage.
pub(crate) const MAX_DIM: usize = 1 << 22;
pub(crate) const MAX_RECORD: usize = RECORD_OVERHEAD + 4 * MAX_DIM;
/// How much of a pack a scan reads at a time.
const SCAN_CHUNK: usize = 1 << 20;
/// fsync at most this often while running (kill -9 loses nothing written; this bounds what a
/// power loss can take).
pub(crate) const SYNC_EVERY: Duration = Duration::from_secs(5);

pub(crate) fn crc(data: &[u8]) -> u32 {
    crc32fast::hash(data)
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub(crate) fn random_hex() -> String {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let local = 0u8;
    let seed = format!(
        "{nanos}-{}-{:p}-{:?}",
        std::process::id(),
        &local,
        std::thread::current().id()
    );
    hex::encode(&Sha256::digest(seed.as_bytes())[..8])
}

/// Encode one record.
pub(crate) fn encode_record(fp: &Hash32, tile: &Hash32, features: &[f32]) -> Vec<u8> {
    let mut r = Vec::with_capacity(RECORD_OVERHEAD + 4 * features.len());
    r.extend_from_slice(&RECORD_MAGIC.to_le_bytes());
    r.extend_from_slice(fp);
    r.extend_from_slice(tile);
    r.extend_from_slice(&(features.len() as u32).to_le_bytes());
    for v in features {
        r.extend_from_slice(&v.to_le_bytes());
    }
    let c = crc(&r);
    r.extend_from_slice(&c.to_le_bytes());
    r
}

/// Decode and check one record; `expect` is the key it must carry.
pub(crate) fn decode_record(
    bytes: &[u8],
    expect: Option<(&Hash32, &Hash32)>,
) -> Result<(Hash32, Hash32, Vec<f32>)> {
    if bytes.len() < RECORD_OVERHEAD {
        bail!("record shorter than its header");
    }
    let magic = u32::from_le_bytes(bytes[0..4].try_into()?);
    if magic != RECORD_MAGIC {
        bail!("bad record magic");
    }
    let dim = u32::from_le_bytes(bytes[68..72].try_into()?) as usize;
    if bytes.len() != RECORD_OVERHEAD + 4 * dim {
        bail!("record length does not match its dimension");
    }
    let body = &bytes[..bytes.len() - 4];
    let stored = u32::from_le_bytes(bytes[bytes.len() - 4..].try_into()?);
    if crc(body) != stored {
        bail!("record checksum mismatch");
    }
    let fp: Hash32 = bytes[4..36].try_into()?;
    let tile: Hash32 = bytes[36..68].try_into()?;
    if let Some((efp, etile)) = expect {
        if &fp != efp || &tile != etile {
            bail!("record key does not match its index entry");
        }
    }
    let feats: Vec<f32> = bytes[72..72 + 4 * dim]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    // Regression (review): every computed vector is checked to be finite, but a cached one
    // (stored by a build before that check, or forged with a good checksum) was served as is.
    if feats.iter().any(|v| !v.is_finite()) {
        bail!("record holds a NaN or an infinity (never a valid feature)");
    }
    Ok((fp, tile, feats))
}

/// One index entry.
#[derive(Debug, Clone, Copy)]
pub(crate) struct IdxEntry {
    pub(crate) fp: Hash32,
    pub(crate) tile: Hash32,
    pub(crate) offset: u64,
    pub(crate) len: u32,
}

pub(crate) fn encode_idx(e: &IdxEntry) -> [u8; IDX_ENTRY] {
    let mut b = [0u8; IDX_ENTRY];
    b[0..32].copy_from_slice(&e.fp);
    b[32..64].copy_from_slice(&e.tile);
    b[64..72].copy_from_slice(&e.offset.to_le_bytes());
    b[72..76].copy_from_slice(&e.len.to_le_bytes());
    let c = crc(&b[..76]);
    b[76..80].copy_from_slice(&c.to_le_bytes());
    b
}

/// Read an index file: its valid entries, and how many trailing bytes were torn or damaged.
pub(crate) fn read_idx(path: &Path) -> Result<(Vec<IdxEntry>, usize)> {
    let mut out = Vec::new();
    let torn = scan_idx(path, |e| out.push(e))?;
    Ok((out, torn))
}

/// Stream an index file's valid entries to `each` (no list of them is built, so opening a
/// million-entry cache does not hold a million entries twice); returns the torn byte count.
pub(crate) fn scan_idx(path: &Path, mut each: impl FnMut(IdxEntry)) -> Result<usize> {
    let (file, len) = open_regular(path)?;
    // Never past the length it had when opened (a file that grows is read as it was).
    let mut f = BufReader::with_capacity(1 << 20, file.take(len));
    let mut magic = [0u8; 16];
    f.read_exact(&mut magic)?;
    if &magic != IDX_MAGIC {
        bail!("not a tilefeat index file");
    }
    let mut buf = [0u8; IDX_ENTRY];
    loop {
        let mut got = 0;
        while got < IDX_ENTRY {
            let n = f.read(&mut buf[got..])?;
            if n == 0 {
                break;
            }
            got += n;
        }
        if got == 0 {
            return Ok(0);
        }
        if got < IDX_ENTRY || crc(&buf[..76]) != u32::from_le_bytes(buf[76..80].try_into()?) {
            // A torn or damaged entry: nothing after it can be trusted to be aligned. Count
            // the rest without holding it.
            let rest = std::io::copy(&mut f, &mut std::io::sink())?;
            return Ok(got + rest as usize);
        }
        each(IdxEntry {
            fp: buf[0..32].try_into()?,
            tile: buf[32..64].try_into()?,
            offset: u64::from_le_bytes(buf[64..72].try_into()?),
            len: u32::from_le_bytes(buf[72..76].try_into()?),
        });
    }
}

/// A pack (and its index) found in the directory.
#[derive(Debug, Clone)]
pub(crate) struct PackInfo {
    pub(crate) stem: String,
    pub(crate) pack: PathBuf,
    pub(crate) idx: PathBuf,
    pub(crate) sealed: bool,
}

pub(crate) fn packs_dir(dir: &Path) -> PathBuf {
    dir.join("packs")
}

pub(crate) fn list_packs(dir: &Path) -> Result<Vec<PackInfo>> {
    let pd = packs_dir(dir);
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(&pd) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e).with_context(|| format!("cannot list {}", pd.display())),
    };
    for e in entries {
        let e = e.with_context(|| format!("cannot list {}", pd.display()))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(stem) = name.strip_suffix(".idx") {
            let pack = pd.join(format!("{stem}.pack"));
            out.push(PackInfo {
                stem: stem.to_string(),
                sealed: pd.join(format!("{stem}.sealed")).exists(),
                pack,
                idx: e.path(),
            });
        }
    }
    out.sort_by(|a, b| a.stem.cmp(&b.stem));
    Ok(out)
}

/// Packs that have no index (never served: only an index makes a pack's records visible).
pub(crate) fn orphan_packs(dir: &Path) -> Result<Vec<PathBuf>> {
    let pd = packs_dir(dir);
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(&pd) {
        Ok(e) => e,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e).with_context(|| format!("cannot list {}", pd.display())),
    };
    for e in entries {
        let e = e.with_context(|| format!("cannot list {}", pd.display()))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(stem) = name.strip_suffix(".pack") {
            // A writer creates its pack just before its index: look again when asked.
            if std::fs::symlink_metadata(pd.join(format!("{stem}.idx"))).is_err() {
                out.push(e.path());
            }
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
const NOFOLLOW_NONBLOCK: i32 = libc::O_NOFOLLOW | libc::O_NONBLOCK;
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
const NOFOLLOW_NONBLOCK: i32 = 0; // the symlink_metadata check stands alone there

/// Open a cache file for reading only if it is a regular file, and its length then: a
/// symbolic link (to `/dev/zero`, say), a FIFO or a device is never opened for reading (a
/// FIFO would block, a device never ends); the error says what it is
/// (`ErrorKind::InvalidData`, or `NotFound` if it is not there).
pub(crate) fn open_regular(path: &Path) -> std::io::Result<(File, u64)> {
    let what = |t| {
        std::io::Error::new(
            ErrorKind::InvalidData,
            format!(
                "not a regular file ({}): not read",
                crate::file_kind::describe(t)
            ),
        )
    };
    let m = std::fs::symlink_metadata(path)?;
    if !m.file_type().is_file() {
        return Err(what(m.file_type()));
    }
    // Replaced since the look above: O_NOFOLLOW refuses a link, O_NONBLOCK keeps a FIFO from
    // blocking, and what was opened is checked again.
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(NOFOLLOW_NONBLOCK)
        .open(path)?;
    let m = f.metadata()?;
    if !m.file_type().is_file() {
        return Err(what(m.file_type()));
    }
    Ok((f, m.len()))
}

/// What [`PackReader::record`] found at an offset.
pub(crate) enum Rec {
    /// A whole, checked record of this many bytes.
    Good(usize, Hash32, Hash32, Vec<f32>),
    /// The start of a record whose end is past the end of the pack (a killed writer's tail,
    /// or a truncated pack).
    Incomplete,
    /// Not a record, or a damaged one.
    Bad(String),
}

/// Reads a pack of known length through a bounded window: at most `MAX_RECORD + SCAN_CHUNK`
/// bytes are held, however large or damaged the pack.
pub(crate) struct PackReader {
    file: File,
    pub(crate) len: u64,
    buf: Vec<u8>,
    start: u64,
}

impl PackReader {
    pub(crate) fn open(path: &Path) -> std::io::Result<PackReader> {
        let (file, len) = open_regular(path)?;
        Ok(PackReader {
            file,
            len,
            buf: Vec::new(),
            start: 0,
        })
    }

    /// Take the pack's length again (a live writer's pack grows).
    pub(crate) fn refresh_len(&mut self) -> std::io::Result<u64> {
        self.len = self.len.max(self.file.metadata()?.len());
        Ok(self.len)
    }

    /// Bytes `off..off + n` read alone, for reads in no particular order (a segment's entries
    /// come in key order, not offset order: a window each would read 1 MiB per record).
    pub(crate) fn get_exact(&mut self, off: u64, n: usize) -> std::io::Result<&[u8]> {
        debug_assert!(n <= MAX_RECORD && off + n as u64 <= self.len);
        self.buf.resize(n, 0);
        self.start = off;
        if let Err(e) = self.file.read_exact_at(&mut self.buf, off) {
            self.buf.clear();
            return Err(e);
        }
        Ok(&self.buf)
    }

    /// Bytes `off..off + n`, which must lie within `len`, `n <= MAX_RECORD`.
    pub(crate) fn get(&mut self, off: u64, n: usize) -> std::io::Result<&[u8]> {
        debug_assert!(n <= MAX_RECORD && off + n as u64 <= self.len);
        let end = off + n as u64;
        if off < self.start || end > self.start + self.buf.len() as u64 {
            let want = (n.max(SCAN_CHUNK) as u64).min(self.len - off) as usize;
            self.buf.resize(want, 0);
            self.start = off;
            if let Err(e) = self.file.read_exact_at(&mut self.buf, off) {
                self.buf.clear();
                return Err(e);
            }
        }
        let s = (off - self.start) as usize;
        Ok(&self.buf[s..s + n])
    }

    /// The record at `off`, checked (magic, dimension, length, CRC).
    pub(crate) fn record(&mut self, off: u64) -> std::io::Result<Rec> {
        let rest = self.len.saturating_sub(off);
        let head = self.get(off, rest.min(72) as usize)?;
        let magic = RECORD_MAGIC.to_le_bytes();
        let n = head.len().min(4);
        if head[..n] != magic[..n] {
            return Ok(Rec::Bad("bad record magic".into()));
        }
        if head.len() < 72 {
            return Ok(Rec::Incomplete);
        }
        let dim = u32::from_le_bytes(head[68..72].try_into().expect("4 bytes")) as usize;
        if dim > MAX_DIM {
            return Ok(Rec::Bad(format!("absurd dimension {dim}")));
        }
        let len = RECORD_OVERHEAD + 4 * dim;
        if len as u64 > rest {
            return Ok(Rec::Incomplete);
        }
        Ok(match decode_record(self.get(off, len)?, None) {
            Ok((fp, tile, v)) => Rec::Good(len, fp, tile, v),
            Err(e) => Rec::Bad(format!("{e:#}")),
        })
    }

    /// The offset of the first good record at or after `from`, if any: after damage, where
    /// reading can go on. Looks for the record magic and checks what follows it.
    pub(crate) fn next_good(&mut self, from: u64) -> std::io::Result<Option<u64>> {
        let magic = RECORD_MAGIC.to_le_bytes();
        let mut at = from;
        while at + RECORD_OVERHEAD as u64 <= self.len {
            let within = at >= self.start && at + 4 <= self.start + self.buf.len() as u64;
            if !within {
                self.get(at, ((self.len - at) as usize).min(SCAN_CHUNK))?;
            }
            let ahead = &self.buf[(at - self.start) as usize..];
            match ahead.windows(4).position(|w| w == magic) {
                None => at += (ahead.len() - 3) as u64,
                Some(i) => {
                    let cand = at + i as u64;
                    if let Rec::Good(..) = self.record(cand)? {
                        return Ok(Some(cand));
                    }
                    at = cand + 1;
                }
            }
        }
        Ok(None)
    }
}

/// Make sure `dir` is (or becomes) a cache directory.
pub(crate) fn init_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(packs_dir(dir))
        .and_then(|_| std::fs::create_dir_all(dir.join("fingerprints")))
        .with_context(|| format!("cannot create cache directory {}", dir.display()))
        .kind(ExitKind::Cache)?;
    let marker = dir.join("tilefeat-cache.yaml");
    if !marker.exists() {
        let text = "# tilefeat feature cache; see ARCHITECTURE.md. Safe to share between processes and nodes.\nformat: 1\n";
        // Not `.kind()`: write_atomic's errors are already Output, and this is the cache's.
        crate::output::write_atomic(&marker, text.as_bytes())
            .map_err(|e| fail(ExitKind::Cache, format!("{e:#}")))?;
    }
    Ok(())
}

/// The single writer of one pack.
pub(crate) struct PackWriter {
    pub(crate) stem: String,
    pub(crate) dir: PathBuf,
    pub(crate) pack: File,
    pub(crate) idx: File,
    pub(crate) offset: u64,
    pub(crate) pack_buf: Vec<u8>,
    pub(crate) idx_buf: Vec<u8>,
    pub(crate) seen: HashSet<(Hash32, Hash32)>,
    /// Every entry written, for the sorted segment written at [`PackWriter::seal`] (at most
    /// [`super::segment::MAX_PACK_ENTRIES`]: then the pack is sealed and a new one begun).
    pub(crate) entries: Vec<IdxEntry>,
    pub(crate) last_sync: Instant,
}

impl PackWriter {
    pub(crate) fn create(dir: &Path) -> Result<PackWriter> {
        let stem = format!("{}-{}-{}", hostname(), std::process::id(), random_hex());
        let pd = packs_dir(dir);
        let open = |p: &Path| {
            OpenOptions::new()
                .create_new(true)
                .append(true)
                .open(p)
                .with_context(|| format!("cannot create cache file {}", p.display()))
                .kind(ExitKind::Cache)
        };
        // The pack exists before its index, so a listed index always has its pack.
        let mut pack = open(&pd.join(format!("{stem}.pack")))?;
        pack.write_all(PACK_MAGIC)?;
        let mut idx = open(&pd.join(format!("{stem}.idx")))?;
        idx.write_all(IDX_MAGIC)?;
        Ok(PackWriter {
            stem,
            dir: pd,
            pack,
            idx,
            offset: PACK_MAGIC.len() as u64,
            pack_buf: Vec::new(),
            idx_buf: Vec::new(),
            seen: HashSet::new(),
            entries: Vec::new(),
            last_sync: Instant::now(),
        })
    }

    /// Buffer a record; false if this writer already stored that key (or the vector is longer
    /// than `MAX_DIM`).
    pub(crate) fn put(&mut self, fp: &Hash32, tile: &Hash32, features: &[f32]) -> Result<bool> {
        // A vector longer than any record read back may be is not cached (it is recomputed).
        if features.len() > MAX_DIM || !self.seen.insert((*fp, *tile)) {
            return Ok(false);
        }
        let rec = encode_record(fp, tile, features);
        let entry = IdxEntry {
            fp: *fp,
            tile: *tile,
            offset: self.offset + self.pack_buf.len() as u64,
            len: rec.len() as u32,
        };
        self.pack_buf.extend_from_slice(&rec);
        self.idx_buf.extend_from_slice(&encode_idx(&entry));
        self.entries.push(entry);
        if self.pack_buf.len() > 8 << 20 {
            self.flush(false)?;
        }
        Ok(true)
    }

    pub(crate) fn flush(&mut self, force_sync: bool) -> Result<()> {
        let ctx = |what: &str| {
            format!(
                "cannot write cache {what} {}/{}",
                self.dir.display(),
                self.stem
            )
        };
        if !self.pack_buf.is_empty() {
            self.pack
                .write_all(&self.pack_buf)
                .with_context(|| ctx("pack"))
                .kind(ExitKind::Cache)?;
            self.offset += self.pack_buf.len() as u64;
            self.pack_buf.clear();
            let sync = force_sync || self.last_sync.elapsed() >= SYNC_EVERY;
            if sync {
                self.pack
                    .sync_data()
                    .with_context(|| ctx("pack"))
                    .kind(ExitKind::Cache)?;
            }
            self.idx
                .write_all(&self.idx_buf)
                .with_context(|| ctx("index"))
                .kind(ExitKind::Cache)?;
            self.idx_buf.clear();
            if sync {
                self.idx
                    .sync_data()
                    .with_context(|| ctx("index"))
                    .kind(ExitKind::Cache)?;
                self.last_sync = Instant::now();
            }
        } else if force_sync {
            self.pack
                .sync_data()
                .with_context(|| ctx("pack"))
                .kind(ExitKind::Cache)?;
            self.idx
                .sync_data()
                .with_context(|| ctx("index"))
                .kind(ExitKind::Cache)?;
        }
        Ok(())
    }

    /// Whether this pack holds as many entries as a pack may (the caller seals it and goes
    /// on in a new one).
    pub(crate) fn full(&self) -> bool {
        self.entries.len() >= super::segment::MAX_PACK_ENTRIES
    }

    /// Flush and fsync, write the pack's sorted index segment, then the `.sealed` marker: a
    /// sealed pack always has its segment (unless writing it failed: then the pack is left
    /// as a killed writer leaves one, read through its `.idx`).
    pub(crate) fn seal(mut self) -> Result<()> {
        self.flush(true)?;
        self.seen = HashSet::new(); // not held while sorting
        let entries = std::mem::take(&mut self.entries);
        super::segment::write(&self.dir, &self.stem, self.offset, entries)?;
        let marker = self.dir.join(format!("{}.sealed", self.stem));
        File::create(&marker)
            .with_context(|| format!("cannot seal cache pack {}", marker.display()))
            .kind(ExitKind::Cache)?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Maintenance: stats, verify, gc.

#[cfg(test)]
mod tests {
    use super::*;

    /// A record with a NaN or an infinity, checksum and all, is damaged: never served.
    #[test]
    fn records_with_non_finite_values_are_damaged() {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let rec = encode_record(&[1; 32], &[2; 32], &[0.5, bad, 1.0]);
            let e = decode_record(&rec, Some((&[1; 32], &[2; 32]))).unwrap_err();
            assert!(e.to_string().contains("NaN or an infinity"), "{e}");
        }
        let rec = encode_record(&[1; 32], &[2; 32], &[0.5, -0.0, 1e38]);
        assert_eq!(decode_record(&rec, None).unwrap().2, [0.5, -0.0, 1e38]);
    }

    /// Reading goes on after garbage in the middle of a pack, at the next good record.
    #[test]
    fn reader_resyncs_after_damage() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("p.pack");
        let recs: Vec<Vec<u8>> = (0..3u8)
            .map(|i| encode_record(&[i; 32], &[i; 32], &[i as f32; 5]))
            .collect();
        let garbage = [vec![0xab; 1000], RECORD_MAGIC.to_le_bytes().to_vec()].concat();
        let bytes = [
            PACK_MAGIC.to_vec(),
            recs[0].clone(),
            garbage.clone(),
            recs[1].clone(),
            recs[2].clone(),
        ]
        .concat();
        std::fs::write(&path, &bytes).unwrap();
        let mut r = PackReader::open(&path).unwrap();
        assert_eq!(r.len, bytes.len() as u64);
        let first = PACK_MAGIC.len() as u64;
        assert!(matches!(r.record(first).unwrap(), Rec::Good(n, ..) if n == recs[0].len()));
        let bad = first + recs[0].len() as u64;
        assert!(matches!(r.record(bad).unwrap(), Rec::Bad(_)));
        let next = bad + garbage.len() as u64;
        assert_eq!(r.next_good(bad + 1).unwrap(), Some(next));
        assert!(matches!(r.record(next).unwrap(), Rec::Good(_, fp, ..) if fp == [1; 32]));
        let last = next + recs[1].len() as u64;
        assert_eq!(r.next_good(last + 1).unwrap(), None);
        // Not a regular file: never opened.
        let link = d.path().join("l.pack");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        let e = PackReader::open(&link).err().unwrap();
        assert!(e.to_string().contains("a symbolic link"), "{e}");
    }
}
