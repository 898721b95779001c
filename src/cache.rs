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
//! - `fingerprints/<fp>.yaml`: what each fingerprint means, and when it was last used.
//!
//! Opening reads every `.idx` (80 bytes per entry, sequentially) and keeps, for the run's
//! fingerprint only, a hash map from tile hash to record location. Every record read is
//! checked (magic, key, length, CRC) before it is served; a damaged one is reported and
//! treated as a miss, so the tile is recomputed. Writers never modify bytes already written,
//! processes on several nodes may share the directory over NFS/Lustre/GPFS, and a `kill -9`
//! at any moment loses at most the unflushed tail.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::cli::{Layer, Normalize, Pool, Precision};
use crate::error::{fail, ExitKind, WithKind};

/// Bumped whenever decoding or resizing changes in a way that changes pixels.
pub const PREPROCESSING_VERSION: u32 = 1;

const PACK_MAGIC: &[u8; 16] = b"TILEFEAT-PACK-01";
const IDX_MAGIC: &[u8; 16] = b"TILEFEAT-IDX--01";
const RECORD_MAGIC: u32 = 0x5446_5231; // "TFR1"
const RECORD_OVERHEAD: usize = 4 + 32 + 32 + 4 + 4;
const IDX_ENTRY: usize = 32 + 32 + 8 + 4 + 4;
/// fsync at most this often while running (kill -9 loses nothing written; this bounds what a
/// power loss can take).
const SYNC_EVERY: Duration = Duration::from_secs(5);

pub type Hash32 = [u8; 32];

/// Everything besides the tile bytes that changes the numbers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    pub weights_sha256: String,
    pub layer: Layer,
    pub pool: Pool,
    pub normalize: Normalize,
    pub size: u32,
    pub precision: Precision,
    pub preprocessing_version: u32,
}

impl Fingerprint {
    /// Stable id: SHA-256 of the canonical YAML of the struct.
    pub fn id(&self) -> Hash32 {
        let yaml = serde_yaml::to_string(self).expect("fingerprint serializes");
        Sha256::digest(yaml.as_bytes()).into()
    }
}

/// The key of one cached vector.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct CacheKey {
    pub tile_sha256: Hash32,
    pub fingerprint: Hash32,
}

/// What `fingerprints/<id>.yaml` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FingerprintRecord {
    pub id: String,
    pub fingerprint: Fingerprint,
    pub last_used: String,
    pub last_used_unix: u64,
}

fn crc(data: &[u8]) -> u32 {
    crc32fast::hash(data)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn hostname() -> String {
    let h = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "host".into());
    let h: String = h
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if h.is_empty() {
        "host".into()
    } else {
        h
    }
}

fn random_hex() -> String {
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
fn encode_record(fp: &Hash32, tile: &Hash32, features: &[f32]) -> Vec<u8> {
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
fn decode_record(
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
struct IdxEntry {
    fp: Hash32,
    tile: Hash32,
    offset: u64,
    len: u32,
}

fn encode_idx(e: &IdxEntry) -> [u8; IDX_ENTRY] {
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
fn read_idx(path: &Path) -> Result<(Vec<IdxEntry>, usize)> {
    let mut out = Vec::new();
    let torn = scan_idx(path, |e| out.push(e))?;
    Ok((out, torn))
}

/// Stream an index file's valid entries to `each` (no list of them is built, so opening a
/// million-entry cache does not hold a million entries twice); returns the torn byte count.
fn scan_idx(path: &Path, mut each: impl FnMut(IdxEntry)) -> Result<usize> {
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
struct PackInfo {
    stem: String,
    pack: PathBuf,
    idx: PathBuf,
    sealed: bool,
}

fn packs_dir(dir: &Path) -> PathBuf {
    dir.join("packs")
}

fn list_packs(dir: &Path) -> Result<Vec<PackInfo>> {
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
fn init_dir(dir: &Path) -> Result<()> {
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

#[derive(Debug, Clone, Copy)]
struct Loc {
    /// Pack number (24 bits) and record length (40 bits would be overkill: records are
    /// < 16 MiB), packed so that a map entry is 32 bytes.
    pack_len: u64,
    offset: u64,
}

impl Loc {
    fn new(pack: u32, offset: u64, len: u32) -> Loc {
        Loc {
            pack_len: ((pack as u64) << 32) | len as u64,
            offset,
        }
    }
    fn pack(&self) -> usize {
        (self.pack_len >> 32) as usize
    }
    fn len(&self) -> usize {
        (self.pack_len & 0xffff_ffff) as usize
    }
}

/// In-memory key: the first 128 bits of the tile hash. The full hash is in every record and
/// is checked on read, so a (2^-128) prefix collision is caught, never served.
fn short_key(tile: &Hash32) -> u128 {
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
    dir: PathBuf,
    fp: Hash32,
    fp_record: FingerprintRecord,
    files: Vec<File>,
    pack_names: Vec<String>,
    index: HashMap<u128, Loc>,
    writer: Mutex<Option<PackWriter>>,
    damaged: Mutex<Vec<String>>,
    torn_index_bytes: u64,
    stored: std::sync::atomic::AtomicU64,
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
        // Reserve up front for the entries present (up to 2^20; other fingerprints count too,
        // so no more than that): no rehash, and no transient double table, while loading a
        // million entries.
        let upper: u64 = packs
            .iter()
            .map(|p| std::fs::metadata(&p.idx).map_or(0, |m| m.len()) / IDX_ENTRY as u64)
            .sum();
        index.reserve(upper.min(1 << 20) as usize);
        for p in packs {
            // A pack removed by a concurrent gc between listing and opening: skip it.
            let Ok(file) = File::open(&p.pack) else {
                continue;
            };
            let n = files.len() as u32;
            files.push(file);
            pack_names.push(p.stem);
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
            writer: Mutex::new(None),
            damaged: Mutex::new(Vec::new()),
            torn_index_bytes: torn,
            stored: Default::default(),
        };
        cache.touch_fingerprint()?;
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

    /// Number of entries visible for this fingerprint.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// The stored vector for a tile hash, checked; `None` on a miss or a damaged record.
    pub fn get(&self, tile: &Hash32) -> Option<Vec<f32>> {
        let loc = *self.index.get(&short_key(tile))?;
        let mut buf = vec![0u8; loc.len()];
        let file = &self.files[loc.pack()];
        let result = file
            .read_exact_at(&mut buf, loc.offset)
            .map_err(anyhow::Error::from)
            .and_then(|_| decode_record(&buf, Some((&self.fp, tile))));
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

    /// Append a computed vector (buffered until [`Cache::flush`]).
    pub fn put(&self, tile: &Hash32, features: &[f32]) -> Result<()> {
        let mut w = self.writer.lock().unwrap();
        if w.is_none() {
            *w = Some(PackWriter::create(&self.dir)?);
        }
        let w = w.as_mut().unwrap();
        if w.put(&self.fp, tile, features)? {
            self.stored
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(())
    }

    /// Write buffered records, then their index entries.
    pub fn flush(&self) -> Result<()> {
        if let Some(w) = self.writer.lock().unwrap().as_mut() {
            w.flush(false)?;
        }
        Ok(())
    }

    /// Write buffered records and their index entries, and fsync both: what was stored so
    /// far survives a crash (the pack stays open for more).
    pub fn sync(&self) -> Result<()> {
        if let Some(w) = self.writer.lock().unwrap().as_mut() {
            w.flush(true)?;
        }
        Ok(())
    }

    /// Flush, fsync and seal this process's pack.
    pub fn close(&self) -> Result<CacheCounters> {
        if let Some(w) = self.writer.lock().unwrap().take() {
            w.seal()?;
        }
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

/// The single writer of one pack.
struct PackWriter {
    stem: String,
    dir: PathBuf,
    pack: File,
    idx: File,
    offset: u64,
    pack_buf: Vec<u8>,
    idx_buf: Vec<u8>,
    seen: HashSet<(Hash32, Hash32)>,
    last_sync: Instant,
}

impl PackWriter {
    fn create(dir: &Path) -> Result<PackWriter> {
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
    fn put(&mut self, fp: &Hash32, tile: &Hash32, features: &[f32]) -> Result<bool> {
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

    fn flush(&mut self, force_sync: bool) -> Result<()> {
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

    fn seal(mut self) -> Result<()> {
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

/// Whether a pack's writer is gone: sealed, or unsealed from a dead local process, or
/// unsealed from another host and untouched for `stale`.
fn writer_gone(p: &PackInfo, stale: Duration) -> bool {
    if p.sealed {
        return true;
    }
    let mut parts = p.stem.rsplitn(3, '-');
    let (_rand, pid, host) = (parts.next(), parts.next(), parts.next());
    if host == Some(hostname().as_str()) {
        if let Some(pid) = pid.and_then(|s| s.parse::<u32>().ok()) {
            return !Path::new(&format!("/proc/{pid}")).exists();
        }
    }
    std::fs::metadata(&p.pack)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age >= stale)
}

fn fingerprint_records(dir: &Path) -> BTreeMap<String, FingerprintRecord> {
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

fn require_cache_dir(dir: &Path) -> Result<()> {
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

fn short_weights(w: &str) -> String {
    if w.len() == 64 {
        format!("sha256:{}", &w[..12])
    } else {
        w.to_string()
    }
}

/// Result of scanning one pack.
struct PackScan {
    good: Vec<(Hash32, Hash32, Vec<f32>)>,
    problems: Vec<String>,
    notes: Vec<String>,
}

/// Walk a pack record by record, checking each one, and cross-check its index.
fn scan_pack(p: &PackInfo, keep_records: bool) -> Result<PackScan> {
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
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(size: u32) -> Fingerprint {
        Fingerprint {
            weights_sha256: "random:0".into(),
            layer: Layer::Layer4,
            pool: Pool::Max,
            normalize: Normalize::Tutorial,
            size,
            precision: Precision::Fp32,
            preprocessing_version: PREPROCESSING_VERSION,
        }
    }

    #[test]
    fn fingerprint_fields_change_the_id() {
        assert_eq!(fp(224).id(), fp(224).id());
        assert_ne!(fp(224).id(), fp(256).id());
        let mut f = fp(224);
        f.pool = Pool::Avg;
        assert_ne!(f.id(), fp(224).id());
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
        assert_eq!(c.len(), 2);
        assert_eq!(c.get(&[2; 32]), Some(vec![2.0]));
        assert!(Cache::open(d.path(), &fp(256)).unwrap().is_empty());
    }

    #[test]
    fn dates() {
        assert_eq!(parse_date("1970-01-02").unwrap(), 86400);
        assert_eq!(parse_date("2026-11-26").unwrap(), 1795651200);
        assert!(parse_date("2026-13-01").is_err());
    }
}
