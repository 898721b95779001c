//! Tiles from a `.zip` archive, read in place (never unpacked to disk). Members are read by
//! their offsets from any thread at once (each read has its own handle on the file), so
//! decode workers read a zip as fast as loose files. The central directory is read once, at
//! open.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Result;

use super::{archive_error, member_tile, Listing, Tile, TileSource, MAX_MEMBER_BYTES};

/// A file read with positioned reads (`pread`): cloning it gives a handle with its own
/// position on the same open file, so threads never share a cursor.
#[derive(Clone)]
struct PreadFile {
    file: Arc<File>,
    pos: u64,
    len: u64,
}

impl Read for PreadFile {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.file.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for PreadFile {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        let pos = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = pos.ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "seek before the start")
        })?;
        Ok(self.pos)
    }
}

/// A zip archive of tiles.
pub struct Zip {
    path: PathBuf,
    archive: zip::ZipArchive<PreadFile>,
    /// Member name -> index in the central directory.
    index: HashMap<String, usize>,
}

impl Zip {
    pub fn open(path: &Path) -> Result<Zip> {
        let bad = |why: String| archive_error(path, why);
        let file = File::open(path).map_err(|e| bad(format!("cannot open: {e}")))?;
        let len = file.metadata().map_err(|e| bad(e.to_string()))?.len();
        let reader = PreadFile {
            file: Arc::new(file),
            pos: 0,
            len,
        };
        let archive = zip::ZipArchive::new(reader)
            .map_err(|e| bad(format!("not a readable zip archive ({e})")))?;
        Ok(Zip {
            path: path.to_path_buf(),
            archive,
            index: HashMap::new(),
        })
    }
}

impl TileSource for Zip {
    fn list(&mut self) -> Result<Listing> {
        let bad = |why: String| archive_error(&self.path, why);
        let mut listing = Listing::default();
        let mut zip = self.archive.clone();
        for i in 0..zip.len() {
            let m = zip
                .by_index_raw(i)
                .map_err(|e| bad(format!("member {i} cannot be read ({e})")))?;
            let name = m.name().to_string();
            let regular = m.is_file() && !m.is_symlink();
            let size = m.size();
            drop(m);
            let Some(tile) =
                member_tile(&self.path, name.as_bytes(), regular, size).map_err(&bad)?
            else {
                continue;
            };
            if self.index.insert(tile.rel.clone(), i).is_some() {
                return Err(bad(format!("member {} appears twice", tile.rel)));
            }
            listing.tiles.push(tile);
        }
        listing.tiles.sort_by(|a, b| a.rel.cmp(&b.rel));
        Ok(listing)
    }

    fn read(&self, tile: &Tile) -> std::io::Result<Vec<u8>> {
        let i = *self.index.get(&tile.rel).ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::NotFound, "not in the archive")
        })?;
        let mut zip = self.archive.clone();
        let mut m = zip.by_index(i).map_err(std::io::Error::other)?;
        let size = m.size();
        let mut bytes = Vec::with_capacity(size.min(MAX_MEMBER_BYTES) as usize);
        // Never more than the declared size (+1 to tell a lie): a bomb cannot blow up here.
        (&mut m).take(size + 1).read_to_end(&mut bytes)?;
        if bytes.len() as u64 != size {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("holds more or less than the {size} bytes it declares"),
            ));
        }
        Ok(bytes)
    }
}
