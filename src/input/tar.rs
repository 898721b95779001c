//! Tiles from a tar archive, read in place (never unpacked to disk).
//!
//! Listing reads the archive once, to its end: an archive that ends before its end-of-archive
//! blocks (truncated, even at a member boundary) or, gzipped, whose stream is corrupt or has
//! no trailer, is refused. A plain `.tar` is listed by its headers (the data between them
//! skipped by seeking), and each member is then read by its offset from any thread at once,
//! as fast as loose files. A `.tar.gz`/`.tgz` is one compressed stream: listing decompresses
//! it once, keeping a CRC-32 of each tile and checkpoints of the stream ([`gz`]); the tiles
//! are then read by whichever decode worker asks, one at a time, going on from where the
//! stream is or resuming from the nearest checkpoint before the tile. Tiles passed on the way
//! that are not yet asked for wait in memory (at most [`MAX_WAITING_BYTES`], those needed
//! soonest kept), so an archive stored in name order (`tar czf s.tgz -C dir $(cd dir && ls |
//! sort)`, WebDataset writers) is read in one pass, and one in any other order costs at most
//! a checkpoint spacing of decompression per tile that was not waiting. Members that are bad
//! tiles before they are read (over the size bound, links) are passed over, never held.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Read, Seek};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Result;

use super::gz::{Checkpoint, GzReader};
use super::{archive_error, member_tile, Listing, Tile, TileSource};

/// Tiles read ahead of their turn that may wait in memory.
pub const MAX_WAITING_BYTES: usize = 512 << 20;

/// Decompressed bytes between two checkpoints of a `.tar.gz` (to start with: the spacing
/// doubles past [`super::gz::MAX_CHECKPOINTS`]).
pub const CHECKPOINT_EVERY: u64 = 4 << 20;

/// Where a tile member lies.
#[derive(Clone, Copy)]
struct Member {
    /// Offset of its data in the (decompressed) stream, and its size.
    offset: u64,
    size: u64,
    /// CRC-32 of its bytes (`.tar.gz` only: checked again when it is read).
    crc: u32,
    /// Its position in the listing (the order tiles are asked for).
    rank: usize,
    /// Whether it is a tile to read (not a bad one before reading).
    readable: bool,
}

/// A tar archive of tiles, plain or gzip-compressed.
pub struct Tar {
    path: PathBuf,
    /// Open once: members are read from it with positioned reads (`pread`).
    file: Arc<File>,
    gzip: bool,
    /// Tile members in archive order.
    members: Vec<Member>,
    /// Tile name -> index in `members`.
    index: HashMap<String, usize>,
    /// A compressed archive's checkpoints, in stream order.
    checkpoints: Vec<Checkpoint>,
    /// The reader of a compressed archive.
    stream: Mutex<Stream>,
    /// Bytes of tiles that may wait for their turn ([`MAX_WAITING_BYTES`]).
    waiting_cap: usize,
    /// Decompressed bytes between checkpoints ([`CHECKPOINT_EVERY`]).
    checkpoint_every: u64,
}

impl Tar {
    pub fn open(path: &Path, gzip: bool) -> Result<Tar> {
        let file =
            File::open(path).map_err(|e| archive_error(path, format!("cannot open: {e}")))?;
        Ok(Tar {
            path: path.to_path_buf(),
            file: Arc::new(file),
            gzip,
            members: Vec::new(),
            index: HashMap::new(),
            checkpoints: Vec::new(),
            stream: Mutex::new(Stream::default()),
            waiting_cap: MAX_WAITING_BYTES,
            checkpoint_every: CHECKPOINT_EVERY,
        })
    }

    /// Bytes decompressed to read tiles so far (listing not counted).
    pub fn inflated_bytes(&self) -> u64 {
        let s = self.stream.lock().unwrap_or_else(|p| p.into_inner());
        s.inflated + s.reader.as_ref().map_or(0, GzReader::inflated)
    }

    /// The tiles among `entries`, recording where each lies (and, from a compressed
    /// archive, reading each readable tile once for its CRC-32).
    fn list_entries<R: Read>(&mut self, entries: tar::Entries<'_, R>) -> Result<Listing> {
        let bad = |why: String| archive_error(&self.path, why);
        let mut listing = Listing::default();
        let mut buf = vec![0u8; 64 << 10];
        for entry in entries {
            let mut entry = entry.map_err(|e| bad(format!("not a readable tar archive ({e})")))?;
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
            let mut member = Member {
                offset: entry.raw_file_position(),
                size,
                crc: 0,
                rank: 0,
                readable: tile.problem.is_none(),
            };
            if self.gzip && member.readable {
                let mut crc = crc32fast::Hasher::new();
                let mut got = 0u64;
                loop {
                    let n = entry.read(&mut buf).map_err(|e| {
                        bad(format!("not a readable tar archive ({e}, in {})", tile.rel))
                    })?;
                    if n == 0 {
                        break;
                    }
                    crc.update(&buf[..n]);
                    got += n as u64;
                }
                if got != size {
                    return Err(bad(format!(
                        "not a readable tar archive (truncated: it ends inside member {})",
                        tile.rel
                    )));
                }
                member.crc = crc.finalize();
            }
            if self
                .index
                .insert(tile.rel.clone(), self.members.len())
                .is_some()
            {
                return Err(bad(format!("member {} appears twice", tile.rel)));
            }
            self.members.push(member);
            listing.tiles.push(tile);
        }
        listing.tiles.sort_by(|a, b| a.rel.cmp(&b.rel));
        super::strip_top_folder(&mut listing.tiles, &mut self.index);
        for (rank, t) in listing.tiles.iter().enumerate() {
            self.members[self.index[&t.rel]].rank = rank;
        }
        Ok(listing)
    }

    /// After the last entry (the tar reader stops at the first zero block, or at the end of
    /// the data): the second zero block must follow, and a compressed stream must then end
    /// well (its trailer checked).
    fn check_end(&self, rest: &mut impl Read) -> Result<()> {
        let unreadable = |e: std::io::Error| {
            archive_error(&self.path, format!("not a readable tar archive ({e})"))
        };
        let mut block = [0u8; 512];
        let mut got = 0;
        while got < block.len() {
            match rest.read(&mut block[got..]).map_err(unreadable)? {
                0 => break,
                n => got += n,
            }
        }
        if got < block.len() || block.iter().any(|&b| b != 0) {
            return Err(archive_error(
                &self.path,
                "not a readable tar archive (truncated: it ends without its end-of-archive \
                 blocks)",
            ));
        }
        if self.gzip {
            std::io::copy(rest, &mut std::io::sink()).map_err(unreadable)?;
        }
        Ok(())
    }

    /// A tile of a compressed archive (see the module above).
    fn read_gz(&self, i: usize) -> std::io::Result<Vec<u8>> {
        let m = self.members[i];
        let mut s = self.stream.lock().unwrap_or_else(|p| p.into_inner());
        if s.served.len() != self.members.len() {
            s.served = vec![false; self.members.len()];
        }
        if s.served[i] {
            // Asked for again: a new round of reads (`bench` reads every tile twice).
            s.served.iter_mut().for_each(|v| *v = false);
        }
        s.served[i] = true;
        if let Some(bytes) = s.waiting.remove(&m.rank) {
            s.waiting_bytes -= bytes.as_ref().map_or(0, Vec::len);
            return bytes;
        }
        // The stream goes on from where it is (a first one from the start) if that is before
        // the tile and either what lies between can all wait (so an archive in any order that
        // fits the cap is read in one pass) or no checkpoint is nearer; else it resumes from
        // the nearest checkpoint before the tile (or the start).
        let after = self.checkpoints.partition_point(|c| c.out() <= m.offset);
        let best = after.checked_sub(1).map(|k| &self.checkpoints[k]);
        let from = best.map_or(0, Checkpoint::out);
        let room = self.waiting_cap.saturating_sub(s.waiting_bytes) as u64;
        let here = s.reader.as_ref().map_or(0, GzReader::pos);
        // Regression (review): a zero-byte member read twice left the stream at its offset
        // with the member behind it; going on from there ran past the last member (a panic).
        let go_on = s.next <= i && here <= m.offset && (m.offset - here <= room || here >= from);
        if !go_on || s.reader.is_none() {
            s.inflated += s.reader.as_ref().map_or(0, GzReader::inflated);
            let file = self.file.clone();
            let reader = match best {
                Some(c) if !go_on => GzReader::resume(file, c),
                _ => GzReader::open(file),
            };
            s.next = self.members.partition_point(|p| p.offset < reader.pos());
            s.reader = Some(reader);
        }
        let got = s.advance_to(self, i);
        if got.is_err() {
            // The stream is in no state to go on: the next read starts afresh.
            s.inflated += s.reader.take().map_or(0, |r| r.inflated());
        }
        got
    }
}

impl TileSource for Tar {
    fn list(&mut self) -> Result<Listing> {
        let unreadable = |e: std::io::Error| {
            archive_error(&self.path, format!("not a readable tar archive ({e})"))
        };
        if self.gzip {
            let mut reader = GzReader::open(self.file.clone());
            reader.record_checkpoints(self.checkpoint_every);
            let mut archive = tar::Archive::new(reader);
            let entries = archive.entries().map_err(unreadable)?;
            let listing = self.list_entries(entries)?;
            let mut rest = archive.into_inner();
            self.check_end(&mut rest)?;
            self.checkpoints = rest.into_checkpoints();
            Ok(listing)
        } else {
            // Headers only: the data between them is skipped by seeking, not read (no read
            // buffer either: each would be refilled after every seek).
            let file = self.file.clone();
            let mut handle: &File = &file;
            handle.rewind().map_err(unreadable)?;
            let mut archive = tar::Archive::new(handle);
            let entries = archive.entries_with_seek().map_err(unreadable)?;
            let listing = self.list_entries(entries)?;
            self.check_end(&mut archive.into_inner())?;
            Ok(listing)
        }
    }

    fn read(&self, tile: &Tile) -> std::io::Result<Vec<u8>> {
        let i = *self.index.get(&tile.rel).ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::NotFound, "not in the archive")
        })?;
        if let Some(problem) = &tile.problem {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                problem.clone(),
            ));
        }
        let m = self.members[i];
        if !self.gzip {
            let mut bytes = vec![0u8; m.size as usize];
            self.file.read_exact_at(&mut bytes, m.offset)?;
            return Ok(bytes);
        }
        self.read_gz(i)
    }
}

/// Where the reading of a compressed archive is.
#[derive(Default)]
struct Stream {
    /// The stream, between members: `members[..next]` are behind it.
    reader: Option<GzReader>,
    next: usize,
    /// Tiles read ahead of their turn, by rank.
    waiting: BTreeMap<usize, std::io::Result<Vec<u8>>>,
    waiting_bytes: usize,
    /// Tiles already asked for in this round (not kept again when passed).
    served: Vec<bool>,
    /// Bytes decompressed by readers no longer in use.
    inflated: u64,
}

impl Stream {
    /// Go on to member `i` and return its bytes, keeping the tiles passed on the way that are
    /// still to be asked for, as room allows.
    fn advance_to(&mut self, tar: &Tar, i: usize) -> std::io::Result<Vec<u8>> {
        let reader = self.reader.as_mut().expect("started by the caller");
        loop {
            let j = self.next;
            let Some(&m) = tar.members.get(j).filter(|_| j <= i) else {
                return Err(std::io::Error::other(format!(
                    "internal error: member {i} is behind the stream"
                )));
            };
            reader.skip_to(m.offset)?;
            self.next += 1;
            if j == i {
                return take_member(reader, &m);
            }
            let wanted = m.readable && !self.served[j] && !self.waiting.contains_key(&m.rank);
            if !wanted || !make_room(&mut self.waiting, &mut self.waiting_bytes, &m, tar) {
                continue; // the stream skips its bytes when it goes on
            }
            let bytes = take_member(reader, &m);
            self.waiting_bytes += bytes.as_ref().map_or(0, Vec::len);
            self.waiting.insert(m.rank, bytes);
        }
    }
}

/// Make room among the waiting tiles for `m`, dropping those asked for later than it; false
/// if it is the one to drop.
fn make_room(
    waiting: &mut BTreeMap<usize, std::io::Result<Vec<u8>>>,
    bytes: &mut usize,
    m: &Member,
    tar: &Tar,
) -> bool {
    let later: usize = waiting
        .range(m.rank + 1..)
        .map(|(_, b)| b.as_ref().map_or(0, Vec::len))
        .sum();
    if *bytes - later + m.size as usize > tar.waiting_cap {
        return false;
    }
    while *bytes + m.size as usize > tar.waiting_cap {
        match waiting.last_key_value() {
            Some((&rank, _)) if rank > m.rank => {
                let dropped = waiting.remove(&rank).expect("just seen");
                *bytes -= dropped.as_ref().map_or(0, Vec::len);
            }
            _ => return false,
        }
    }
    true
}

/// A member's bytes from `reader`, which is at its start; checked against the CRC-32 it had
/// when listed.
fn take_member(reader: &mut GzReader, m: &Member) -> std::io::Result<Vec<u8>> {
    let mut bytes = vec![0u8; m.size as usize];
    reader.read_exact(&mut bytes)?;
    if crc32fast::hash(&bytes) != m.crc {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "its bytes are not those listed (has the archive changed since?)",
        ));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tar of `members` (in the order given) and that tar gzip-compressed.
    fn tar_and_gz<'a>(members: impl Iterator<Item = (&'a str, &'a [u8])>) -> (Vec<u8>, Vec<u8>) {
        let mut b = ::tar::Builder::new(Vec::new());
        for (name, bytes) in members {
            let mut h = ::tar::Header::new_gnu();
            h.set_size(bytes.len() as u64);
            h.set_mode(0o644);
            b.append_data(&mut h, name, bytes).unwrap();
        }
        let plain = b.into_inner().unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &plain).unwrap();
        (plain, gz.finish().unwrap())
    }

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
        let (_, gz) = tar_and_gz(
            members
                .iter()
                .rev()
                .map(|(n, b)| (n.as_str(), b.as_slice())),
        );
        let path = d.path().join("s.tgz");
        std::fs::write(&path, gz).unwrap();
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

    /// Regression (review): a `.tar.gz` whose tile is a zero-byte file, read twice (as `bench`
    /// reads every tile), panicked indexing past the last member.
    #[test]
    fn an_empty_member_can_be_read_twice() {
        let d = tempfile::tempdir().unwrap();
        let (_, gz) = tar_and_gz([("a.png", &b""[..]), ("b.png", &b"xyz"[..])].into_iter());
        let path = d.path().join("e.tgz");
        std::fs::write(&path, gz).unwrap();
        let mut tar = Tar::open(&path, true).unwrap();
        let tiles = tar.list().unwrap().tiles;
        for t in [
            &tiles[0], &tiles[0], &tiles[1], &tiles[0], &tiles[1], &tiles[1],
        ] {
            let want: &[u8] = if t.rel == "a.png" { b"" } else { b"xyz" };
            assert_eq!(tar.read(t).unwrap(), want, "{}", t.rel);
        }
    }

    /// A `.tar.gz` in reverse name order, whose members are each larger than the waiting cap
    /// (none can wait for its turn), read in name order: each member costs at most one
    /// checkpoint spacing of extra decompression, so the bytes decompressed stay within twice
    /// the archive's (restarting the stream from its start for each member would decompress
    /// about half the archive per member: 16 times it here).
    #[test]
    fn reverse_order_is_read_in_linear_work() {
        let d = tempfile::tempdir().unwrap();
        let mut x = 1u32;
        let members: Vec<(String, Vec<u8>)> = (0..32)
            .map(|i| {
                let bytes = (0..64 << 10)
                    .map(|_| {
                        x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                        (x >> 28) as u8
                    })
                    .collect();
                (format!("t{i:02}.png"), bytes)
            })
            .collect();
        let (plain, gz) = tar_and_gz(
            members
                .iter()
                .rev()
                .map(|(n, b)| (n.as_str(), b.as_slice())),
        );
        let path = d.path().join("s.tgz");
        std::fs::write(&path, gz).unwrap();
        let mut tar = Tar::open(&path, true).unwrap();
        tar.waiting_cap = 48 << 10;
        tar.checkpoint_every = 16 << 10;
        let tiles = tar.list().unwrap().tiles;
        assert_eq!(tiles.len(), 32);
        for (t, (name, bytes)) in tiles.iter().zip(&members) {
            assert_eq!(&t.rel, name);
            assert_eq!(&tar.read(t).unwrap(), bytes, "{name}");
        }
        let inflated = tar.inflated_bytes();
        assert!(
            inflated <= 2 * plain.len() as u64,
            "{inflated} bytes decompressed to read an archive of {}",
            plain.len()
        );
        // With room for all to wait, in one pass (up to the last tile's end).
        let mut tar = Tar::open(&path, true).unwrap();
        tar.checkpoint_every = 16 << 10;
        let tiles = tar.list().unwrap().tiles;
        for (t, (name, bytes)) in tiles.iter().zip(&members) {
            assert_eq!(&tar.read(t).unwrap(), bytes, "{name}");
        }
        assert!(tar.inflated_bytes() <= plain.len() as u64);
    }
}
