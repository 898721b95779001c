//! The files of a cache directory: pack records, index entries, listing packs, and the one
//! writer of a pack (append-only: bytes once written are never modified).

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Write};
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
    let feats = bytes[72..72 + 4 * dim]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
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
    let mut f = BufReader::with_capacity(1 << 20, File::open(path)?);
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
            // A torn or damaged entry: nothing after it can be trusted to be aligned.
            let mut rest = Vec::new();
            f.read_to_end(&mut rest)?;
            return Ok(got + rest.len());
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
            last_sync: Instant::now(),
        })
    }

    /// Buffer a record; false if this writer already stored that key.
    pub(crate) fn put(&mut self, fp: &Hash32, tile: &Hash32, features: &[f32]) -> Result<bool> {
        if !self.seen.insert((*fp, *tile)) {
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

    pub(crate) fn seal(mut self) -> Result<()> {
        self.flush(true)?;
        let marker = self.dir.join(format!("{}.sealed", self.stem));
        File::create(&marker)
            .with_context(|| format!("cannot seal cache pack {}", marker.display()))
            .kind(ExitKind::Cache)?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Maintenance: stats, verify, gc.
