//! Outputs that would replace an input: refused before anything is written. A command's
//! outputs (a feature file, a cohort, a PNG, and the side files beside each) are compared with
//! the files it reads (tiles, archives, feature files and their side files, models) by file
//! identity (device and inode), so another spelling of the same path, a hard link or a symbolic
//! link cannot slip past.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use anyhow::Result;

use crate::error::{fail, ExitKind};

/// Fail (exit 6), naming the output (and the input it is, when spelt otherwise), if any of
/// `outputs` is the same file as any of `inputs`. Paths that do not exist are never the same
/// file.
pub fn refuse_overwriting_inputs<P: AsRef<Path>, Q: AsRef<Path>>(
    outputs: &[P],
    inputs: &[Q],
) -> Result<()> {
    let id = |p: &Path| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
    let inputs: Vec<_> = inputs
        .iter()
        .filter_map(|p| Some((p.as_ref(), id(p.as_ref())?)))
        .collect();
    for out in outputs {
        let out = out.as_ref();
        let Some(o) = id(out) else { continue };
        if let Some((input, _)) = inputs.iter().find(|(_, i)| *i == o) {
            let same = if input == &out {
                String::new()
            } else {
                format!(" (the same file as {})", input.display())
            };
            return Err(fail(
                ExitKind::Output,
                format!(
                    "{}{same} is one of this command's inputs: writing it would destroy it; \
                     write to another name",
                    out.display()
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_file_under_any_name_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a.csv");
        std::fs::write(&a, "x").unwrap();
        let other = d.path().join("b.csv");
        std::fs::write(&other, "y").unwrap();
        let missing = d.path().join("new.csv");
        refuse_overwriting_inputs(&[&missing, &other], &[&a]).unwrap();
        let dotted = d.path().join(".").join("a.csv");
        let e = refuse_overwriting_inputs(&[&missing, &dotted], &[&a]).unwrap_err();
        assert_eq!(crate::error::kind_of(&e), ExitKind::Output);
        assert!(
            e.to_string().contains("is one of this command's inputs"),
            "{e}"
        );
        let hard = d.path().join("hard.csv");
        std::fs::hard_link(&a, &hard).unwrap();
        let link = d.path().join("link.csv");
        std::os::unix::fs::symlink(&a, &link).unwrap();
        for alias in [&hard, &link] {
            let e = refuse_overwriting_inputs(&[alias], &[&a]).unwrap_err();
            assert!(e.to_string().contains("the same file as"), "{e}");
        }
    }
}
