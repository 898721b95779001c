//! Tiles from a tar archive, read in place (never unpacked to disk).
//!
//! A plain `.tar` is listed once (its headers, skipping the data) and each member is then read
//! by its offset from any thread at once, as fast as loose files. A `.tar.gz`/`.tgz` is one
//! compressed stream: listing decompresses it once, and the tiles are then read by one
//! reader thread that decompresses the stream again, in archive order, and hands each member
//! to whichever decode worker asks for it; members that come before they are asked for wait
//! in memory (at most [`MAX_WAITING_BYTES`]; beyond that the oldest are dropped and read
//! again by restarting the stream). An archive whose members are stored in name order
//! (`tar czf s.tgz -C dir $(cd dir && ls | sort)`, WebDataset writers) is read in one pass.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::{BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::Result;
use crossbeam_channel::{bounded, Receiver};

use super::{archive_error, member_tile, Listing, Tile, TileSource, MAX_MEMBER_BYTES};

/// Members read ahead of their turn that may wait in memory.
pub const MAX_WAITING_BYTES: usize = 512 << 20;

/// Where a member lies.
#[derive(Clone, Copy)]
struct Member {
    /// Its position among the archive's entries.
    seq: usize,
    /// Offset of its data in the (decompressed) stream, and its size.
    offset: u64,
    size: u64,
}

/// A tar archive of tiles, plain or gzip-compressed.
pub struct Tar {
    path: PathBuf,
    /// Open once: a plain tar's members are read from it with positioned reads (`pread`).
    file: File,
    gzip: bool,
    members: HashMap<String, Member>,
    /// The reader of a compressed archive (None until the first read).
    stream: Mutex<Option<Stream>>,
    /// Bytes of members that may wait for their turn ([`MAX_WAITING_BYTES`]).
    waiting_cap: usize,
}

fn open_stream(path: &Path, gzip: bool) -> std::io::Result<Box<dyn Read + Send>> {
    let file = BufReader::with_capacity(1 << 20, File::open(path)?);
    Ok(if gzip {
        Box::new(flate2::read::MultiGzDecoder::new(file))
    } else {
        Box::new(file)
    })
}

impl Tar {
    pub fn open(path: &Path, gzip: bool) -> Result<Tar> {
        let file =
            File::open(path).map_err(|e| archive_error(path, format!("cannot open: {e}")))?;
        Ok(Tar {
            path: path.to_path_buf(),
            file,
            gzip,
            members: HashMap::new(),
            stream: Mutex::new(None),
            waiting_cap: MAX_WAITING_BYTES,
        })
    }
}

impl Tar {
    /// The tiles among `entries`, recording where each lies.
    fn list_entries<R: Read>(&mut self, entries: tar::Entries<'_, R>) -> Result<Listing> {
        let bad = |why: String| archive_error(&self.path, why);
        let mut listing = Listing::default();
        for (seq, entry) in entries.enumerate() {
            let entry = entry.map_err(|e| bad(format!("not a readable tar archive ({e})")))?;
            let kind = entry.header().entry_type();
            if matches!(
                kind,
                tar::EntryType::XGlobalHeader | tar::EntryType::XHeader
            ) {
                continue;
            }
            let name = entry.path_bytes().into_owned();
            let size = entry.size();
            let Some(tile) = member_tile(&self.path, &name, kind.is_file(), size).map_err(&bad)?
            else {
                continue;
            };
            let member = Member {
                seq,
                offset: entry.raw_file_position(),
                size,
            };
            if self.members.insert(tile.rel.clone(), member).is_some() {
                return Err(bad(format!("member {} appears twice", tile.rel)));
            }
            listing.tiles.push(tile);
        }
        listing.tiles.sort_by(|a, b| a.rel.cmp(&b.rel));
        Ok(listing)
    }
}

impl TileSource for Tar {
    fn list(&mut self) -> Result<Listing> {
        let unreadable = |e: std::io::Error| {
            archive_error(&self.path, format!("not a readable tar archive ({e})"))
        };
        if self.gzip {
            let stream = open_stream(&self.path, true).map_err(unreadable)?;
            let mut archive = tar::Archive::new(stream);
            let entries = archive.entries().map_err(unreadable)?;
            self.list_entries(entries)
        } else {
            // Headers only: the data between them is skipped by seeking, not read (no read
            // buffer either: each would be refilled after every seek).
            let file = File::open(&self.path).map_err(unreadable)?;
            let mut archive = tar::Archive::new(file);
            let entries = archive.entries_with_seek().map_err(unreadable)?;
            self.list_entries(entries)
        }
    }

    fn read(&self, tile: &Tile) -> std::io::Result<Vec<u8>> {
        let m = *self.members.get(&tile.rel).ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::NotFound, "not in the archive")
        })?;
        if !self.gzip {
            let mut bytes = vec![0u8; m.size as usize];
            self.file.read_exact_at(&mut bytes, m.offset)?;
            return Ok(bytes);
        }
        let mut stream = self.stream.lock().unwrap_or_else(|p| p.into_inner());
        let needs_restart = match stream.as_ref() {
            None => true,
            // Already passed and no longer waiting in memory: read the stream again.
            Some(s) => m.seq < s.next_seq && !s.waiting.contains_key(&tile.rel),
        };
        if needs_restart {
            *stream = Some(Stream::start(&self.path, &self.members, self.waiting_cap)?);
        }
        stream.as_mut().expect("started above").take(&tile.rel)
    }
}

/// One pass over a compressed archive: a thread decompresses it and sends the tile members
/// in archive order; those not yet asked for wait here.
struct Stream {
    members: Receiver<(usize, String, std::io::Result<Vec<u8>>)>,
    /// The next entry the thread will send.
    next_seq: usize,
    waiting: HashMap<String, std::io::Result<Vec<u8>>>,
    order: VecDeque<String>,
    waiting_bytes: usize,
    waiting_cap: usize,
}

impl Stream {
    fn start(
        path: &Path,
        members: &HashMap<String, Member>,
        waiting_cap: usize,
    ) -> std::io::Result<Stream> {
        let wanted: HashMap<usize, String> =
            members.iter().map(|(k, m)| (m.seq, k.clone())).collect();
        let stream = open_stream(path, true)?;
        let (tx, rx) = bounded(16);
        std::thread::spawn(move || {
            let mut archive = tar::Archive::new(stream);
            let entries = match archive.entries() {
                Ok(e) => e,
                Err(_) => return, // listed fine before: the reader sees the channel close
            };
            for (seq, entry) in entries.enumerate() {
                let Some(name) = wanted.get(&seq) else {
                    if entry.is_err() {
                        return;
                    }
                    continue;
                };
                let bytes = entry.and_then(|mut e| {
                    let mut v = Vec::with_capacity(e.size().min(MAX_MEMBER_BYTES) as usize);
                    (&mut e).take(MAX_MEMBER_BYTES + 1).read_to_end(&mut v)?;
                    Ok(v)
                });
                let failed = bytes.is_err();
                if tx.send((seq, name.clone(), bytes)).is_err() || failed {
                    return;
                }
            }
        });
        Ok(Stream {
            members: rx,
            next_seq: 0,
            waiting: HashMap::new(),
            order: VecDeque::new(),
            waiting_bytes: 0,
            waiting_cap,
        })
    }

    fn take(&mut self, name: &str) -> std::io::Result<Vec<u8>> {
        if let Some(r) = self.waiting.remove(name) {
            self.waiting_bytes -= r.as_ref().map_or(0, Vec::len);
            self.order.retain(|n| n != name);
            return r;
        }
        loop {
            let Ok((seq, got, bytes)) = self.members.recv() else {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the archive ended before this member (truncated or changed since it was listed?)",
                ));
            };
            self.next_seq = seq + 1;
            if got == name {
                return bytes;
            }
            self.waiting_bytes += bytes.as_ref().map_or(0, Vec::len);
            self.order.push_back(got.clone());
            self.waiting.insert(got, bytes);
            while self.waiting_bytes > self.waiting_cap {
                let Some(old) = self.order.pop_front() else {
                    break;
                };
                if let Some(r) = self.waiting.remove(&old) {
                    self.waiting_bytes -= r.as_ref().map_or(0, Vec::len);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `.tar.gz` whose members are stored out of name order, read in name order from
    /// several threads with room for only two members to wait: members dropped from memory
    /// are read again by restarting the stream, and every read returns its own bytes (twice
    /// over, too).
    #[test]
    fn compressed_members_are_served_in_any_order_within_a_memory_cap() {
        let d = tempfile::tempdir().unwrap();
        let members: Vec<(String, Vec<u8>)> = (0..12)
            .map(|i| (format!("t{i:02}.png"), vec![i as u8; 1000 + i * 10]))
            .collect();
        let mut b = ::tar::Builder::new(Vec::new());
        for (name, bytes) in members.iter().rev() {
            let mut h = ::tar::Header::new_gnu();
            h.set_size(bytes.len() as u64);
            h.set_mode(0o644);
            b.append_data(&mut h, name, bytes.as_slice()).unwrap();
        }
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &b.into_inner().unwrap()).unwrap();
        let path = d.path().join("s.tgz");
        std::fs::write(&path, gz.finish().unwrap()).unwrap();
        let mut tar = Tar::open(&path, true).unwrap();
        tar.waiting_cap = 2500; // two members
        let tiles = tar.list().unwrap().tiles;
        let names: Vec<&str> = tiles.iter().map(|t| t.rel.as_str()).collect();
        assert_eq!(
            names,
            members.iter().map(|m| m.0.as_str()).collect::<Vec<_>>()
        );
        for _ in 0..2 {
            std::thread::scope(|s| {
                for chunk in tiles.chunks(4) {
                    let (tar, members) = (&tar, &members);
                    s.spawn(move || {
                        for t in chunk {
                            let i: usize = t.rel[1..3].parse().unwrap();
                            assert_eq!(tar.read(t).unwrap(), members[i].1, "{}", t.rel);
                        }
                    });
                }
            });
        }
    }
}
