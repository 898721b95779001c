//! Finding a sample's tiles: a recursive, sorted, deterministic walk of the tile folder.
//!
//! Keeps regular files named `*.png`, `*.jpg`, `*.jpeg`, `*.tif`, `*.tiff` (any case); skips
//! hidden files and hidden folders (a leading `.`), and everything else. Symbolic links are
//! followed, and a link that loops back to one of its ancestors is skipped with a warning
//! rather than walked forever. Tiles are identified by their path relative to the folder,
//! with `/` separators, and sorted by it: the output's row order.

use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::error::{fail, ExitKind};

/// One tile: where it is, and its name in the output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tile {
    pub path: PathBuf,
    /// Path relative to the tile folder, `/`-separated.
    pub rel: String,
}

const EXTENSIONS: [&str; 5] = ["png", "jpg", "jpeg", "tif", "tiff"];

fn is_tile_name(name: &str) -> bool {
    !name.starts_with('.')
        && name
            .rsplit_once('.')
            .is_some_and(|(_, ext)| EXTENSIONS.iter().any(|e| ext.eq_ignore_ascii_case(e)))
}

/// Result of a walk: the tiles, and warnings about what was passed over.
#[derive(Debug, Default)]
pub struct Listing {
    pub tiles: Vec<Tile>,
    pub warnings: Vec<String>,
}

/// Walk `dir` for tiles; a folder without any is an input error (exit 3).
pub fn find_some_tiles(dir: &Path) -> Result<Listing> {
    let listing = find_tiles(dir)?;
    if listing.tiles.is_empty() {
        return Err(fail(
            ExitKind::Input,
            format!(
                "tile folder {} holds no tiles (*.png, *.jpg, *.jpeg, *.tif, *.tiff)",
                dir.display()
            ),
        ));
    }
    Ok(listing)
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
        if !entry.file_type().is_file() {
            continue;
        }
        let Some(name) = entry.file_name().to_str() else {
            listing.warnings.push(format!(
                "skipped {}: file name is not valid UTF-8",
                entry.path().display()
            ));
            continue;
        };
        if !is_tile_name(name) {
            continue;
        }
        let rel_path = entry.path().strip_prefix(dir).unwrap_or(entry.path());
        let parts: Option<Vec<&str>> = rel_path
            .components()
            .map(|c| c.as_os_str().to_str())
            .collect();
        let Some(parts) = parts else {
            listing.warnings.push(format!(
                "skipped {}: path is not valid UTF-8",
                entry.path().display()
            ));
            continue;
        };
        listing.tiles.push(Tile {
            path: entry.path().to_path_buf(),
            rel: parts.join("/"),
        });
    }
    listing.tiles.sort_by(|a, b| a.rel.cmp(&b.rel));
    Ok(listing)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a.png", "b.JPG", "c.jpeg", "d.TIF", "e.tiff", "x.y.Png"] {
            assert!(is_tile_name(ok), "{ok}");
        }
        for no in [".a.png", "a.gif", "png", "a.png.txt", "a.svs"] {
            assert!(!is_tile_name(no), "{no}");
        }
    }

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
