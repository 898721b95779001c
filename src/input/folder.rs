//! Tiles from a folder: a recursive, sorted, deterministic walk, and plain file reads.
//!
//! Keeps regular files named `*.png`, `*.jpg`, `*.jpeg`, `*.tif`, `*.tiff` (any case); skips
//! hidden files and hidden folders (a leading `.`), and everything else. Symbolic links are
//! followed, and a link that loops back to one of its ancestors is skipped with a warning
//! rather than walked forever. A broken link (missing target, or a loop) named like a tile,
//! and a tile whose name is not UTF-8, are bad tiles (`--on-error` decides); other broken
//! links are ignored like any other file that is not a tile. Tiles are identified by their path relative to the folder,
//! with `/` separators, and sorted by it: the output's row order.

use std::path::{Path, PathBuf};

use anyhow::Result;

use super::{member_tile, Listing, Tile, TileSource};
use crate::error::{fail, ExitKind};

/// A tile folder.
pub struct Folder {
    dir: PathBuf,
}

impl Folder {
    pub fn new(dir: &Path) -> Folder {
        Folder {
            dir: dir.to_path_buf(),
        }
    }
}

impl TileSource for Folder {
    fn list(&mut self) -> Result<Listing> {
        find_tiles(&self.dir)
    }

    fn read(&self, tile: &Tile) -> std::io::Result<Vec<u8>> {
        read_regular(&tile.path)
    }
}

/// Walk `dir` for tiles.
pub fn find_tiles(dir: &Path) -> Result<Listing> {
    let meta = std::fs::metadata(dir).map_err(|e| {
        fail(
            ExitKind::Input,
            format!("tile folder {} cannot be read: {e}", dir.display()),
        )
    })?;
    if !meta.is_dir() {
        return Err(fail(
            ExitKind::Input,
            format!("tile folder {} is not a directory", dir.display()),
        ));
    }
    let mut listing = Listing::default();
    let walker = walkdir::WalkDir::new(dir)
        .follow_links(true)
        .into_iter()
        .filter_entry(|e| e.depth() == 0 || !e.file_name().to_string_lossy().starts_with('.'));
    for entry in walker {
        let entry = match entry {
            Ok(e) => e,
            Err(e) if e.loop_ancestor().is_some() => {
                let p = e
                    .path()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default();
                listing
                    .warnings
                    .push(format!("skipped symbolic link loop at {p}"));
                continue;
            }
            Err(e) => {
                // A link to nothing (or to itself): a bad tile if named like one, else
                // ignored like any other file that is not a tile.
                if let Some(p) = e.path().filter(|p| is_symlink(p) && e.depth() > 0) {
                    if let Some(tile) = tile_at(dir, p) {
                        listing.tiles.push(Tile {
                            problem: Some(format!(
                                "broken symbolic link ({})",
                                e.io_error().map(|i| i.to_string()).unwrap_or_default()
                            )),
                            ..tile
                        });
                    }
                    continue;
                }
                let p = e
                    .path()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| dir.display().to_string());
                return Err(fail(
                    ExitKind::Input,
                    format!(
                        "cannot list {p}: {}",
                        e.io_error()
                            .map(|i| i.to_string())
                            .unwrap_or_else(|| e.to_string())
                    ),
                ));
            }
        };
        let kind = entry.file_type();
        if kind.is_dir() {
            continue;
        }
        if let Some(tile) = tile_at(dir, entry.path()) {
            // Regression: a FIFO (or a link to a device) named like a tile vanished from the
            // counts; reading it could block forever or never end. It is a bad tile, unread.
            let problem = (!kind.is_file()).then(|| {
                format!(
                    "not a regular file ({}): not read",
                    crate::file_kind::describe(kind)
                )
            });
            listing.tiles.push(Tile {
                problem: tile.problem.or(problem),
                ..tile
            });
        }
    }
    listing.tiles.sort_by(|a, b| a.rel.cmp(&b.rel));
    Ok(listing)
}

/// A tile's bytes, only if it is (still) a regular file: opened without blocking (a FIFO put
/// in its place since the listing would otherwise wait for a writer forever), checked, read.
fn read_regular(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    let meta = f.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "not a regular file ({})",
                crate::file_kind::describe(meta.file_type())
            ),
        ));
    }
    let mut bytes = Vec::with_capacity(meta.len().min(super::MAX_MEMBER_BYTES) as usize);
    f.read_to_end(&mut bytes)?;
    Ok(bytes)
}

fn is_symlink(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_symlink())
}

/// The tile at `path` (under `dir`), if its name is a tile's: a folder's files are chosen,
/// named and checked as an archive's members are (`member_tile`); a name that is not UTF-8
/// makes it a bad tile, named with its bytes escaped.
fn tile_at(dir: &Path, path: &Path) -> Option<Tile> {
    use std::os::unix::ffi::OsStrExt;
    let rel_path = path.strip_prefix(dir).unwrap_or(path);
    let parts: Vec<&[u8]> = rel_path
        .components()
        .map(|c| c.as_os_str().as_bytes())
        .collect();
    // A walk below `dir` has no absolute or `..` parts, so this is never an error; the size
    // bound is the decoders' to enforce for files.
    let mut tile = member_tile(dir, &parts.join(&b'/'), true, 0).ok()??;
    tile.path = path.to_path_buf();
    Some(tile)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walk_sorts_skips_hidden_and_survives_loops() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        std::fs::create_dir_all(root.join("b/sub")).unwrap();
        std::fs::create_dir_all(root.join(".hidden")).unwrap();
        for f in [
            "b/sub/z.png",
            "a.JPG",
            "b/c.tif",
            ".hidden/x.png",
            "notes.txt",
            ".x.png",
        ] {
            std::fs::write(root.join(f), b"x").unwrap();
        }
        #[cfg(unix)]
        std::os::unix::fs::symlink(root, root.join("b/loop")).unwrap();
        let l = find_tiles(root).unwrap();
        let rels: Vec<_> = l.tiles.iter().map(|t| t.rel.as_str()).collect();
        assert_eq!(rels, ["a.JPG", "b/c.tif", "b/sub/z.png"]);
        #[cfg(unix)]
        assert!(
            l.warnings.iter().any(|w| w.contains("loop")),
            "{:?}",
            l.warnings
        );
    }

    #[test]
    fn missing_folder_is_input_error() {
        let e = find_tiles(Path::new("/nonexistent/tiles")).unwrap_err();
        assert_eq!(crate::error::kind_of(&e), ExitKind::Input);
        assert!(e.to_string().contains("/nonexistent/tiles"));
    }
}
