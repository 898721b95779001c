//! Tiles from a `.zip` archive, read in place (never unpacked to disk). Members are read by
//! their offsets from any thread at once (each read has its own handle on the file), so
//! decode workers read a zip as fast as loose files. The central directory is read once, at
//! open; a name it lists twice refuses the archive. Names are read as UTF-8 first, with or
//! without the UTF-8 flag (Info-ZIP's `zip` on Linux leaves it unset), as CP437 only when
//! they are not UTF-8 and do not claim to be; one that claims UTF-8 but is not is a bad tile.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Result;

use super::{
    archive_error, escape_non_utf8, member_tile, Listing, Tile, TileSource, MAX_MEMBER_BYTES,
};

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

/// A member's name as bytes: as stored if it is UTF-8 (flag or not) or claims to be (then,
/// not UTF-8, it is a bad tile); else as the zip reader decoded it (CP437).
fn member_name<R: Read>(m: &zip::read::ZipFile<'_, R>) -> Vec<u8> {
    let raw = m.name_raw();
    // A name decoded as CP437 never holds U+FFFD; one with the UTF-8 flag that is not UTF-8
    // is decoded with it.
    if std::str::from_utf8(raw).is_ok() || m.name().contains('\u{FFFD}') {
        raw.to_vec()
    } else {
        m.name().as_bytes().to_vec()
    }
}

impl TileSource for Zip {
    fn list(&mut self) -> Result<Listing> {
        let bad = |why: String| archive_error(&self.path, why);
        let mut listing = Listing::default();
        let mut zip = self.archive.clone();
        // The zip reader keeps one member per name (the last): a name stored twice is found
        // by counting the central directory's records.
        let stored = crate::zip_directory::central_names(
            zip.clone().into_inner(),
            zip.central_directory_start(),
        )
        .map_err(|e| bad(format!("not a readable zip archive ({e})")))?;
        if stored.len() != zip.len() {
            let why = match crate::zip_directory::stored_twice(&stored, false) {
                Some(twice) => format!("member {} appears twice", escape_non_utf8(twice)),
                None => format!(
                    "its central directory lists {} members under {} distinct names",
                    stored.len(),
                    zip.len()
                ),
            };
            return Err(bad(why));
        }
        for i in 0..zip.len() {
            let m = zip
                .by_index_raw(i)
                .map_err(|e| bad(format!("member {i} cannot be read ({e})")))?;
            let name = member_name(&m);
            let regular = m.is_file() && !m.is_symlink();
            let size = m.size();
            drop(m);
            let Some(tile) = member_tile(&self.path, &name, regular, size).map_err(&bad)? else {
                continue;
            };
            if self.index.insert(tile.rel.clone(), i).is_some() {
                return Err(bad(format!("member {} appears twice", tile.rel)));
            }
            listing.tiles.push(tile);
        }
        listing.tiles.sort_by(|a, b| a.rel.cmp(&b.rel));
        super::strip_top_folder(&mut listing.tiles, &mut self.index);
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
