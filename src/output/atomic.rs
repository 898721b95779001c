//! Atomic files: written to a temporary file in the destination folder and renamed over the
//! final name only when complete and fsynced, so a crash, a full disk or a kill never leaves a
//! half-written file under the final name. Temporaries of dead processes are removed.
//!
//! Files that belong together (a feature file and its side files) are first all written in
//! full as [`Staged`] temporaries and only then renamed, one after the other: a failure while
//! writing any of them (a full disk) leaves every previous file as it was.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::error::{ExitKind, WithKind};

const TMP_MARK: &str = ".tilefeat-tmp.";

/// A file being written; it appears under its final name only on [`AtomicFile::commit`].
pub struct AtomicFile {
    target: PathBuf,
    tmp: PathBuf,
    writer: Option<BufWriter<File>>,
}

/// A temporary file beside `target` for it, and that file opened for writing.
fn reserve(target: &Path) -> Result<(PathBuf, File)> {
    let dir = parent_dir(target);
    if !dir.is_dir() {
        return Err(anyhow::anyhow!(
            "cannot write {}: folder {} does not exist",
            target.display(),
            dir.display()
        ))
        .kind(ExitKind::Output);
    }
    remove_stale_temps(target);
    let name = target
        .file_name()
        .with_context(|| format!("{} is not a file path", target.display()))
        .kind(ExitKind::Output)?;
    let tmp = dir.join(format!(
        ".{}{TMP_MARK}{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let file = File::create(&tmp)
        .with_context(|| {
            format!(
                "cannot write {} (temporary file {})",
                target.display(),
                tmp.display()
            )
        })
        .kind(ExitKind::Output)?;
    // Removed if a signal ends the process before it is renamed (`interrupt`).
    crate::interrupt::track(tmp.clone());
    Ok((tmp, file))
}

/// Remove a temporary file that will not be renamed.
fn discard(tmp: &Path) {
    let _ = std::fs::remove_file(tmp);
    crate::interrupt::forget(tmp);
}

/// Move a complete temporary file over its target (removing it if that fails).
fn rename_over(tmp: &Path, target: &Path) -> Result<()> {
    let result = std::fs::rename(tmp, target)
        .with_context(|| format!("cannot move {} to {}", tmp.display(), target.display()))
        .kind(ExitKind::Output);
    if result.is_err() {
        let _ = std::fs::remove_file(tmp);
    }
    crate::interrupt::forget(tmp);
    result
}

impl AtomicFile {
    pub fn create(target: &Path) -> Result<AtomicFile> {
        let (tmp, file) = reserve(target)?;
        Ok(AtomicFile {
            target: target.to_path_buf(),
            tmp,
            writer: Some(BufWriter::with_capacity(1 << 20, file)),
        })
    }

    pub fn writer(&mut self) -> &mut BufWriter<File> {
        self.writer.as_mut().expect("writer used after commit")
    }

    /// Flush, fsync and rename over the target.
    pub fn commit(self) -> Result<()> {
        self.finish()?.commit()
    }

    /// Flush and fsync, leaving the complete file under its temporary name until
    /// [`Staged::commit`].
    pub fn finish(mut self) -> Result<Staged> {
        let w = self.writer.take().expect("finish twice");
        let synced = w
            .into_inner()
            .map_err(|e| e.into_error())
            .and_then(|file| file.sync_all())
            .with_context(|| format!("cannot write {}", self.target.display()))
            .kind(ExitKind::Output);
        if synced.is_err() {
            discard(&self.tmp);
        }
        synced?;
        Ok(Staged::one(
            std::mem::take(&mut self.tmp),
            std::mem::take(&mut self.target),
        ))
    }
}

/// Complete, fsynced files under their temporary names, waiting for the files that go with
/// them; dropped without [`Staged::commit`], they are removed and their targets keep what they
/// had.
#[derive(Debug)]
pub struct Staged {
    /// (temporary, target), renamed in this order; no temporary: the target is removed (a
    /// side file the new unit does not have, which must not outlive the old one).
    files: Vec<(Option<PathBuf>, PathBuf)>,
}

impl Staged {
    fn one(tmp: PathBuf, target: PathBuf) -> Staged {
        Staged {
            files: vec![(Some(tmp), target)],
        }
    }

    /// `target` removed when the unit is committed (if it is there).
    pub fn removal(target: PathBuf) -> Staged {
        Staged {
            files: vec![(None, target)],
        }
    }

    /// These files and `other`'s, committed together (these first).
    pub fn and(mut self, mut other: Staged) -> Staged {
        self.files.append(&mut other.files);
        self
    }

    /// Whether committing would change nothing: every file's target holds the same bytes,
    /// and every target to remove is absent. Any doubt (a target that cannot be read) is a
    /// change.
    pub fn changes_nothing(&self) -> bool {
        self.files.iter().all(|(tmp, target)| match tmp {
            Some(tmp) => same_bytes(tmp, target).unwrap_or(false),
            None => std::fs::symlink_metadata(target).is_err(),
        })
    }

    /// Rename each over its target. What would make a rename fail once others are done (a
    /// folder where a file should go) is checked for every file first, so that the unit is
    /// not left half-replaced (the folder is the same for all of them, so a rename that fails
    /// for want of permission fails for the first).
    pub fn commit(mut self) -> Result<()> {
        let _not_interrupted = crate::interrupt::commit_guard();
        for (_, target) in &self.files {
            if std::fs::symlink_metadata(target).is_ok_and(|m| m.is_dir()) {
                return Err(anyhow::anyhow!(
                    "cannot write {}: a folder is in the way",
                    target.display()
                ))
                .kind(ExitKind::Output);
            }
        }
        while !self.files.is_empty() {
            let (tmp, target) = self.files.remove(0);
            let Some(tmp) = tmp else {
                match std::fs::remove_file(&target) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(e)
                            .with_context(|| format!("cannot remove {}", target.display()))
                            .kind(ExitKind::Output)
                    }
                    _ => continue,
                }
            };
            // Regression: a failed rename (say, a folder where the file should go) left the
            // temporary file behind (the ones not yet renamed go on drop).
            rename_over(&tmp, &target)?;
            if !self.files.is_empty() {
                pause_between_renames();
            }
        }
        Ok(())
    }
}

/// For the black-box test that a signal never splits a unit (`tests/resume.rs`):
/// `TILEFEAT_TEST_RENAME_PAUSE_MS` sleeps that long between two renames of one unit. Not for
/// users: it only slows a commit down.
fn pause_between_renames() {
    static PAUSE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let ms = *PAUSE.get_or_init(|| {
        std::env::var("TILEFEAT_TEST_RENAME_PAUSE_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    });
    if ms > 0 {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}

/// Whether two files hold the same bytes (a regular file each; lengths first).
fn same_bytes(a: &Path, b: &Path) -> std::io::Result<bool> {
    use std::io::Read;
    let (ma, mb) = (std::fs::metadata(a)?, std::fs::symlink_metadata(b)?);
    if !mb.is_file() || ma.len() != mb.len() {
        return Ok(false);
    }
    let (mut fa, mut fb) = (File::open(a)?, File::open(b)?);
    let (mut ba, mut bb) = (vec![0u8; 1 << 16], vec![0u8; 1 << 16]);
    loop {
        let n = fa.read(&mut ba)?;
        if n == 0 {
            // Equal lengths: the other ends here too, unless it grew meanwhile.
            return Ok(fb.read(&mut bb[..1])? == 0);
        }
        fb.read_exact(&mut bb[..n])?;
        if ba[..n] != bb[..n] {
            return Ok(false);
        }
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        for (tmp, _) in &self.files {
            if let Some(tmp) = tmp {
                discard(tmp);
            }
        }
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.writer.is_some() {
            discard(&self.tmp);
        }
    }
}

/// A file written by a library that wants a path (libhdf5): it writes the temporary file
/// [`AtomicPath::tmp`], which appears under the final name only on [`AtomicPath::commit`].
pub struct AtomicPath {
    target: PathBuf,
    tmp: PathBuf,
    committed: bool,
}

impl AtomicPath {
    pub fn create(target: &Path) -> Result<AtomicPath> {
        let (tmp, _file) = reserve(target)?;
        Ok(AtomicPath {
            target: target.to_path_buf(),
            tmp,
            committed: false,
        })
    }

    pub fn tmp(&self) -> &Path {
        &self.tmp
    }

    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Fsync the (closed) temporary file and hash it; it is renamed over the target by
    /// [`Staged::commit`].
    pub fn finish(mut self) -> Result<(Staged, super::Committed)> {
        let hashed = (|| -> std::io::Result<super::Committed> {
            use sha2::{Digest, Sha256};
            let mut file = File::open(&self.tmp)?;
            file.sync_all()?;
            let mut sha = Sha256::new();
            let bytes = std::io::copy(&mut file, &mut sha)?;
            Ok(super::Committed {
                sha256: hex::encode(sha.finalize()),
                bytes,
                companion: None,
            })
        })()
        .with_context(|| format!("cannot write {}", self.target.display()))
        .kind(ExitKind::Output);
        self.committed = true;
        match hashed {
            Ok(c) => Ok((Staged::one(self.tmp.clone(), self.target.clone()), c)),
            Err(e) => {
                discard(&self.tmp);
                Err(e)
            }
        }
    }
}

impl Drop for AtomicPath {
    fn drop(&mut self) {
        if !self.committed {
            discard(&self.tmp);
        }
    }
}

fn parent_dir(p: &Path) -> PathBuf {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Remove temporaries of `target` left by killed processes of this host.
fn remove_stale_temps(target: &Path) {
    let (Some(name), dir) = (target.file_name(), parent_dir(target)) else {
        return;
    };
    let prefix = format!(".{}{TMP_MARK}", name.to_string_lossy());
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return;
    };
    for e in entries.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if let Some(pid) = n.strip_prefix(&prefix).and_then(|p| p.parse::<u32>().ok()) {
            if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// Write `contents` to `target` atomically.
pub fn write_atomic(target: &Path, contents: &[u8]) -> Result<()> {
    stage(target, contents)?.commit()
}

/// Write `contents` in full beside `target`, to be renamed over it by [`Staged::commit`].
pub fn stage(target: &Path, contents: &[u8]) -> Result<Staged> {
    let mut f = AtomicFile::create(target)?;
    f.writer()
        .write_all(contents)
        .with_context(|| format!("cannot write {}", target.display()))
        .kind(ExitKind::Output)?;
    f.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_file_appears_only_on_commit() {
        let d = tempfile::tempdir().unwrap();
        let t = d.path().join("out.csv");
        let mut f = AtomicFile::create(&t).unwrap();
        f.writer().write_all(b"partial").unwrap();
        assert!(!t.exists());
        drop(f);
        assert!(!t.exists());
        assert_eq!(
            std::fs::read_dir(d.path()).unwrap().count(),
            0,
            "temp removed on drop"
        );
        write_atomic(&t, b"whole").unwrap();
        assert_eq!(std::fs::read(&t).unwrap(), b"whole");
    }

    /// Files staged together are replaced together: one that cannot be renamed (a folder in
    /// its place) leaves every target as it was and no temporary behind.
    #[test]
    fn staged_files_are_replaced_all_or_none() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a.csv"), d.path().join("a.provenance.yaml"));
        std::fs::write(&a, "old").unwrap();
        std::fs::create_dir(&b).unwrap();
        let unit = stage(&a, b"new").unwrap().and(stage(&b, b"prov").unwrap());
        let e = unit.commit().unwrap_err();
        assert_eq!(crate::error::kind_of(&e), ExitKind::Output);
        assert!(e.to_string().contains("a folder is in the way"), "{e}");
        assert_eq!(std::fs::read_to_string(&a).unwrap(), "old");
        assert_eq!(
            std::fs::read_dir(d.path()).unwrap().count(),
            2,
            "no temporary left"
        );
        std::fs::remove_dir(&b).unwrap();
        stage(&a, b"new")
            .unwrap()
            .and(stage(&b, b"prov").unwrap())
            .commit()
            .unwrap();
        assert_eq!(std::fs::read_to_string(&a).unwrap(), "new");
        assert_eq!(std::fs::read_to_string(&b).unwrap(), "prov");
    }

    #[test]
    fn missing_folder_is_output_error() {
        let e = AtomicFile::create(Path::new("/nonexistent/dir/out.csv"))
            .err()
            .unwrap();
        assert_eq!(crate::error::kind_of(&e), ExitKind::Output);
    }
}
