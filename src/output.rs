//! Output files: atomic replacement, the feature CSV format, and the names of side files.
//!
//! Every output is written to a temporary file in the destination folder and renamed over
//! the final name only when complete and flushed, so a crash, a full disk or a kill never
//! leaves a half-written file under the final name. The CSV format is the tutorial's, with a
//! named first column: `tile,0,1,...,D-1`, one row per tile, floats in the shortest form that
//! reads back as the same f32.

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

impl AtomicFile {
    pub fn create(target: &Path) -> Result<AtomicFile> {
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
    pub fn commit(mut self) -> Result<()> {
        let w = self.writer.take().expect("commit twice");
        let result = w
            .into_inner()
            .map_err(|e| e.into_error())
            .and_then(|file| file.sync_all())
            .with_context(|| format!("cannot write {}", self.target.display()))
            .and_then(|()| {
                std::fs::rename(&self.tmp, &self.target).with_context(|| {
                    format!(
                        "cannot move {} to {}",
                        self.tmp.display(),
                        self.target.display()
                    )
                })
            })
            .kind(ExitKind::Output);
        if result.is_err() {
            // Regression: a failed rename (say, a folder where the file should go) left the
            // temporary file behind.
            let _ = std::fs::remove_file(&self.tmp);
        }
        result
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.writer.is_some() {
            let _ = std::fs::remove_file(&self.tmp);
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
    let mut f = AtomicFile::create(target)?;
    f.writer()
        .write_all(contents)
        .with_context(|| format!("cannot write {}", target.display()))
        .kind(ExitKind::Output)?;
    f.commit()
}

/// `x.csv` -> `x.<suffix>`; other names get `.<suffix>` appended.
pub fn side_file(output: &Path, suffix: &str) -> PathBuf {
    let s = output.to_string_lossy();
    match s.strip_suffix(".csv").or_else(|| s.strip_suffix(".CSV")) {
        Some(stem) => PathBuf::from(format!("{stem}.{suffix}")),
        None => PathBuf::from(format!("{s}.{suffix}")),
    }
}

pub fn provenance_path(output: &Path) -> PathBuf {
    side_file(output, "provenance.yaml")
}

pub fn rejected_path(output: &Path) -> PathBuf {
    side_file(output, "rejected.tsv")
}

/// Append a CSV field, quoted only if it needs to be (RFC 4180).
pub fn push_csv_field(line: &mut String, field: &str) {
    if field.contains([',', '"', '\n', '\r']) {
        line.push('"');
        line.push_str(&field.replace('"', "\"\""));
        line.push('"');
    } else {
        line.push_str(field);
    }
}

/// A per-tile feature CSV for `extract`, not yet under its final name, with its header
/// (`tile,0,...,dim-1`) written: fails before any compute when the output cannot be written.
pub fn features_csv(path: &Path, dim: usize) -> Result<AtomicFile> {
    let mut csv = AtomicFile::create(path)?;
    csv.writer()
        .write_all(csv_header(&["tile"], dim).as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
        .kind(ExitKind::Output)?;
    Ok(csv)
}

/// The header `first,0,1,...,dim-1` (possibly with more leading columns).
pub fn csv_header(leading: &[&str], dim: usize) -> String {
    let mut line = leading.join(",");
    for i in 0..dim {
        line.push(',');
        line.push_str(&i.to_string());
    }
    line.push('\n');
    line
}

/// Append `,v0,v1,...` in shortest round-trip form, then a newline.
pub fn push_features(line: &mut String, features: &[f32]) {
    let mut buf = ryu::Buffer::new();
    for &v in features {
        line.push(',');
        if v.is_finite() {
            line.push_str(buf.format_finite(v));
        } else if v.is_nan() {
            line.push_str("NaN");
        } else if v > 0.0 {
            line.push_str("inf");
        } else {
            line.push_str("-inf");
        }
    }
    line.push('\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn side_files() {
        assert_eq!(
            provenance_path(Path::new("a/x.csv")),
            PathBuf::from("a/x.provenance.yaml")
        );
        assert_eq!(
            rejected_path(Path::new("x.tsv")),
            PathBuf::from("x.tsv.rejected.tsv")
        );
    }

    #[test]
    fn csv_quoting_and_floats_round_trip() {
        let mut l = String::new();
        push_csv_field(&mut l, "a,\"b\".png");
        push_features(&mut l, &[0.1, -2.5e-8, 3.0, f32::NAN]);
        assert_eq!(l, "\"a,\"\"b\"\".png\",0.1,-2.5e-8,3.0,NaN\n");
        for v in [0.1f32, 1.0 / 3.0, f32::from_bits(5), f32::MAX, 123456.79] {
            let mut l = String::new();
            push_features(&mut l, &[v]);
            let back: f32 = l.trim_start_matches(',').trim().parse().unwrap();
            assert_eq!(back.to_bits(), v.to_bits());
        }
    }

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

    #[test]
    fn missing_folder_is_output_error() {
        let e = AtomicFile::create(Path::new("/nonexistent/dir/out.csv"))
            .err()
            .unwrap();
        assert_eq!(crate::error::kind_of(&e), ExitKind::Output);
    }
}
