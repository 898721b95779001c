//! One writer per output: `extract` holds `.STEM.tilefeat-lock` beside its feature file from
//! before the file is created until its provenance is written, so two runs on one `--output`
//! cannot pair one run's features with the other's provenance. STEM is the name the side files
//! share (`s` for `s.csv`, `s.h5` and `s.parquet`, which all write `s.provenance.yaml`), so the
//! lock covers every file a run writes. The lock is a file created
//! with `O_EXCL` (no `flock`, which NFS does not always honour), holding `host pid`; a lock
//! left by a dead process of this host is taken over, one of another host is reported.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::error::{fail, ExitKind};
use crate::host::{hostname, process_alive};

/// A held output lock; dropping it removes the lock file.
#[derive(Debug)]
pub struct OutputLock {
    path: PathBuf,
}

/// The lock file of `output` and its side files: `.s.tilefeat-lock` for `s.csv`, `s.h5`...
pub fn lock_path(output: &Path) -> PathBuf {
    let shared = super::side_file(output, "tilefeat-lock");
    let name = shared
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    output.with_file_name(format!(".{name}"))
}

impl OutputLock {
    /// Take `output`'s lock, or fail (exit 6) naming the process that holds it.
    pub fn acquire(output: &Path) -> Result<OutputLock> {
        let path = lock_path(output);
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
        if let Some(d) = dir.filter(|d| !d.is_dir()) {
            return Err(fail(
                ExitKind::Output,
                format!(
                    "cannot write {}: folder {} does not exist",
                    output.display(),
                    d.display()
                ),
            ));
        }
        let me = format!("{} {}\n", hostname(), std::process::id());
        for _ in 0..2 {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut f) => {
                    f.write_all(me.as_bytes()).map_err(|e| {
                        let _ = std::fs::remove_file(&path);
                        fail(
                            ExitKind::Output,
                            format!("cannot write lock {}: {e}", path.display()),
                        )
                    })?;
                    // Removed if a signal ends the process (a rerun on another node of the
                    // cluster could not take over a lock of this host's).
                    crate::interrupt::track(path.clone());
                    return Ok(OutputLock { path });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let holder = std::fs::read_to_string(&path).unwrap_or_default();
                    let mut parts = holder.split_whitespace();
                    let (host, pid) = (parts.next(), parts.next().and_then(|p| p.parse().ok()));
                    match (host, pid) {
                        (Some(h), Some(pid)) if h == hostname() && !process_alive(pid) => {
                            // Left by a run that died: take it over.
                            let _ = std::fs::remove_file(&path);
                        }
                        _ => {
                            return Err(fail(
                                ExitKind::Output,
                                format!(
                                    "{} is being written by another tilefeat run ({}; lock \
                                     {}): two runs on one output would mix their files. \
                                     If that run is no longer going on, remove the lock",
                                    output.display(),
                                    match (host, pid) {
                                        (Some(h), Some(p)) => format!("process {p} on {h}"),
                                        _ => "unknown process".to_string(),
                                    },
                                    path.display()
                                ),
                            ))
                        }
                    }
                }
                Err(e) => {
                    return Err(fail(
                        ExitKind::Output,
                        format!("cannot write {}: {e}", path.display()),
                    ))
                }
            }
        }
        Err(fail(
            ExitKind::Output,
            format!("cannot take the lock {}", path.display()),
        ))
    }
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        crate::interrupt::forget(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_writer_is_refused_and_a_dead_ones_lock_taken_over() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("x.csv");
        let lock = OutputLock::acquire(&out).unwrap();
        let e = OutputLock::acquire(&out).unwrap_err();
        assert_eq!(crate::error::kind_of(&e), ExitKind::Output);
        assert!(
            e.to_string()
                .contains(&format!("process {}", std::process::id())),
            "{e}"
        );
        drop(lock);
        assert!(!lock_path(&out).exists());
        // A lock of a process of this host that is gone (pid beyond pid_max).
        std::fs::write(lock_path(&out), format!("{} 4194305\n", hostname())).unwrap();
        let lock = OutputLock::acquire(&out).unwrap();
        drop(lock);
        // A missing folder is named as such.
        let e = OutputLock::acquire(&d.path().join("no/x.csv")).unwrap_err();
        assert!(
            e.to_string().contains("folder") && e.to_string().contains("does not exist"),
            "{e}"
        );
        // Another host's: refused, whatever its pid.
        std::fs::write(lock_path(&out), "other-host 1\n").unwrap();
        let e = OutputLock::acquire(&out).unwrap_err();
        assert!(e.to_string().contains("process 1 on other-host"), "{e}");
    }

    /// Regression: `-o s.csv` and `-o s.h5` took different locks, both ran, and the one
    /// provenance they share described the last; the CSV was orphaned.
    #[test]
    fn outputs_sharing_side_files_share_one_lock() {
        let d = tempfile::tempdir().unwrap();
        let csv = d.path().join("s.csv");
        assert_eq!(lock_path(&csv), d.path().join(".s.tilefeat-lock"));
        let _held = OutputLock::acquire(&csv).unwrap();
        for other in ["s.h5", "s.hdf5", "s.parquet", "S.CSV.csv"] {
            let other = d.path().join(other);
            let shares =
                crate::output::provenance_path(&other) == d.path().join("s.provenance.yaml");
            assert_eq!(
                OutputLock::acquire(&other).is_err(),
                shares,
                "{}",
                other.display()
            );
        }
    }
}
