//! What a TorchScript file's code calls, read from the archive before libtorch loads it.
//!
//! A TorchScript model is code: libtorch runs its `__setstate__` methods while loading it and
//! its `forward` on every batch, and TorchScript can call ops that read and write files
//! (`torch.from_file(path, shared=True)` maps a file read-write). [`audit`] refuses such a
//! model before any of its code has run, so before `torch.jit.load`: it reads the serialized
//! source of every method of every module, submodule, class and function, which a TorchScript
//! zip archive stores as text (`<name>/code/__torch__/**.py`, compiled by the loader), and
//! looks for the file operations of [`FILE_OPS`], however spelt (`torch.from_file`,
//! `ops.aten.from_file`, `getattr(torch.ops.aten, "from_" "file")`, octal escapes).
//!
//! Why the source and not the loaded graph: loading already runs `__setstate__` (a model that
//! maps a file there has done so before any graph could be inspected), and tch exposes no
//! graph. The source is what the loader compiles, so nothing it can call escapes the scan;
//! anything that is not a zip archive with code (the legacy and flatbuffer formats) is refused.
//! The scan errs on the side of refusing: an identifier `save` anywhere in the code (a method
//! of that name, too) counts as `aten::save`; `--allow-unsafe-model` runs such a model anyway.

use std::io::Read;

/// The ops of libtorch's registry that touch files, by the name TorchScript code calls them
/// with. Derived from `torch._C._jit_get_all_schemas()` (torch 2.11, 4,487 schemas, and
/// torchvision's, whose ops a libtorch with torchvision's library loaded would have): every
/// op with a file-name argument (`aten::from_file(str filename, ...)`, `aten::save(t item, str
/// filename)`, `image::read_file`, `image::write_file`) and the debug op that reads tensors
/// from a store on disk. No op in the registry spawns a process or opens a socket by itself
/// (the distributed ops need a process group, which TorchScript cannot create).
/// tests/python/test_encoders.py checks the registry again.
pub(crate) const FILE_OPS: &[(&str, &str)] = &[
    ("from_file", "aten::from_file"),
    ("save", "aten::save"),
    ("load_tensor", "debugprims::load_tensor"),
    ("read_file", "image::read_file"),
    ("write_file", "image::write_file"),
];

/// Code larger than this (all `.py` entries together) is refused unread: real encoders hold
/// well under 10 MB of code, and a zip bomb must not fill memory.
const MAX_CODE_BYTES: u64 = 256 << 20;

/// A call of a file operation: the op, the archive entry and the line.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Finding {
    pub op: &'static str,
    pub entry: String,
    pub line: usize,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({} line {})", self.op, self.entry, self.line)
    }
}

/// The file operations that the code in the TorchScript archive `bytes` calls (empty: none),
/// or why it cannot be read as one (not a zip archive, no code in it, an unreadable entry).
pub(crate) fn audit(bytes: &[u8]) -> Result<Vec<Finding>, String> {
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes))
        .map_err(|e| format!("not a zip archive ({e})"))?;
    // Regression (review): a code file stored twice, a clean copy last, was audited as the
    // zip crate reads it (the last copy) while libtorch's miniz may load the other.
    let stored = crate::zip_directory::central_names(
        std::io::Cursor::new(bytes),
        zip.central_directory_start(),
    )
    .map_err(|e| format!("not a readable zip archive ({e})"))?;
    if let Some(twice) = crate::zip_directory::stored_twice(&stored, true) {
        return Err(format!(
            "archive entry {} is stored twice (another reader could load the copy not checked)",
            String::from_utf8_lossy(twice)
        ));
    }
    if stored.len() != zip.len() {
        return Err(format!(
            "its central directory lists {} entries, the zip reader {}",
            stored.len(),
            zip.len()
        ));
    }
    let mut findings = Vec::new();
    let (mut files, mut total) = (0usize, 0u64);
    for i in 0..zip.len() {
        let entry = zip
            .by_index(i)
            .map_err(|e| format!("archive entry {i} cannot be read ({e})"))?;
        // libtorch finds code by name, case-insensitively (miniz): `.PY` is code too.
        if !entry.name_raw().to_ascii_lowercase().ends_with(b".py") {
            continue;
        }
        let name = entry.name().to_string();
        let mut text = Vec::new();
        entry
            .take(MAX_CODE_BYTES - total + 1)
            .read_to_end(&mut text)
            .map_err(|e| format!("archive entry {name} cannot be read ({e})"))?;
        total += text.len() as u64;
        if total > MAX_CODE_BYTES {
            return Err(format!("more than {} MiB of code", MAX_CODE_BYTES >> 20));
        }
        files += 1;
        scan(&text, &name, &mut findings);
    }
    if files == 0 {
        return Err("no TorchScript code in the archive (no code/*.py)".into());
    }
    Ok(findings)
}

/// The line (1-based) of byte `pos` of `text`.
fn line_of(text: &[u8], pos: usize) -> usize {
    text[..pos].iter().filter(|&&b| b == b'\n').count() + 1
}

fn is_ident(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// Every file operation named in one code file, as an identifier or as a string literal.
fn scan(text: &[u8], entry: &str, out: &mut Vec<Finding>) {
    let mut found = |op: &'static str, pos: usize| {
        let f = Finding {
            op,
            entry: entry.to_string(),
            line: line_of(text, pos),
        };
        if !out.contains(&f) {
            out.push(f);
        }
    };
    // Identifiers, over the raw text (strings and comments too: nothing can hide one). The
    // lexer splits a number off the front of a run (`0save` is `0` then `save`).
    let mut i = 0;
    while i < text.len() {
        if !is_ident(text[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < text.len() && is_ident(text[i]) {
            i += 1;
        }
        let run = &text[start..i];
        for &(name, op) in FILE_OPS {
            if let Some(prefix) = run.strip_suffix(name.as_bytes()) {
                if prefix.first().is_none_or(|b| b.is_ascii_digit()) {
                    found(op, start);
                }
            }
        }
    }
    // String literals (`getattr(x, "save")`): adjacent literals concatenate, so every run of
    // consecutive ones is tried, each part of a dotted name too.
    for run in literal_runs(text) {
        for a in 0..run.len() {
            let mut joined = String::new();
            for lit in &run[a..] {
                joined.push_str(&lit.1);
                for &(name, op) in FILE_OPS {
                    if joined.split('.').any(|part| part == name) {
                        found(op, lit.0);
                    }
                }
                if joined.len() > 64 {
                    break;
                }
            }
        }
    }
}

/// String literals as TorchScript's lexer reads them (`torch/csrc/jit/frontend/lexer.h`:
/// comments skipped except `# type:`, 1 or 3 quotes, a backslash escapes the next byte), in
/// runs of literals with nothing but blanks, newlines, comments and line continuations
/// between them; each literal's start and its value (escapes decoded).
fn literal_runs(text: &[u8]) -> Vec<Vec<(usize, String)>> {
    let mut runs: Vec<Vec<(usize, String)>> = vec![Vec::new()];
    let mut i = 0;
    while i < text.len() {
        let b = text[i];
        if b == b'#' && !text[i..].starts_with(b"# type:") {
            while i < text.len() && text[i] != b'\n' {
                i += 1;
            }
            continue;
        }
        if b.is_ascii_whitespace() || (b == b'\\' && text.get(i + 1) == Some(&b'\n')) {
            i += if b == b'\\' { 2 } else { 1 };
            continue;
        }
        if b == b'"' || b == b'\'' {
            if let Some(len) = string_len(&text[i..]) {
                let q = if len >= 6 && text[i..].starts_with(&[b; 3]) {
                    3
                } else {
                    1
                };
                let value = unescape(&text[i + q..i + len - q]);
                runs.last_mut().expect("one run").push((i, value));
                i += len;
                continue;
            }
        }
        // Any other token ends a run of literals.
        if !runs.last().expect("one run").is_empty() {
            runs.push(Vec::new());
        }
        i += 1;
    }
    runs.retain(|r| !r.is_empty());
    runs
}

/// The length of the string literal at the start of `s` (quotes included), as the lexer's
/// `isString`; None if there is none.
fn string_len(s: &[u8]) -> Option<usize> {
    let quote = s[0];
    let q = if s.len() >= 3 && s[..3] == [quote; 3] {
        3
    } else {
        1
    };
    let mut end = q;
    while end < s.len() && !(end + q <= s.len() && s[end..end + q].iter().all(|&c| c == quote)) {
        if s[end] == b'\n' && q != 3 {
            return None;
        }
        if s[end] == b'\\' {
            end += 1;
        }
        end += 1;
    }
    (end < s.len()).then_some(end + q)
}

/// A literal's value, escapes decoded as `parseStringLiteral` does (`\\ \' \" \<newline>`,
/// `\a \b \f \n \v \t`, octal `\ooo`; others are compile errors, kept as they are).
fn unescape(raw: &[u8]) -> String {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        if raw[i] != b'\\' || i + 1 >= raw.len() {
            out.push(raw[i]);
            i += 1;
            continue;
        }
        let c = raw[i + 1];
        let simple = match c {
            b'\\' | b'\'' | b'"' | b'\n' => Some(c),
            b'a' => Some(7),
            b'b' => Some(8),
            b'f' => Some(12),
            b'n' => Some(b'\n'),
            b'v' => Some(11),
            b't' => Some(b'\t'),
            _ => None,
        };
        if let Some(v) = simple {
            out.push(v);
            i += 2;
            continue;
        }
        let octal = raw
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|x| (b'0'..=b'7').contains(x)));
        match octal.map(|d| d.iter().fold(0u32, |v, x| v * 8 + u32::from(x - b'0'))) {
            Some(v) if v < 256 => {
                out.push(v as u8);
                i += 4;
            }
            _ => {
                out.push(raw[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ops(code: &str) -> Vec<&'static str> {
        let mut out = Vec::new();
        scan(code.as_bytes(), "m/code/__torch__.py", &mut out);
        out.iter().map(|f| f.op).collect()
    }

    #[test]
    fn file_operations_are_found_however_spelt() {
        for code in [
            "    t = torch.from_file(\"/etc/hostname\", True, 16)\n",
            "    t = ops.aten.from_file(p)\n",
            "    f = getattr(torch.ops.aten, \"from_\" \"file\")\n",
            "    f = getattr(torch.ops.aten, 'from_'  # a comment\n  'file')\n",
            "    f = getattr(torch.ops.aten, \"from\\137file\")\n",
            "    f = getattr(torch.ops.aten, \"from_file.default\")\n",
            "    x = 0from_file\n",
        ] {
            assert_eq!(ops(code), ["aten::from_file"], "{code}");
        }
        assert_eq!(ops("  torch.save(x, \"/tmp/x\")\n"), ["aten::save"]);
        assert_eq!(
            ops("  ops.debugprims.load_tensor(\"a\")\n"),
            ["debugprims::load_tensor"]
        );
    }

    /// Regression (review): a code file stored twice, the file operation in the copy the zip
    /// crate does not read, passed the audit (libtorch's miniz may load that copy). Also when
    /// the names differ only in case (miniz looks names up case-insensitively).
    #[test]
    fn a_code_file_stored_twice_is_refused() {
        use std::io::Write;
        let archive = |second: &str| {
            let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
            let opts = zip::write::SimpleFileOptions::default();
            w.start_file("m/code/__torch__/a.py", opts).unwrap();
            w.write_all(b"  t = torch.from_file(p)\n").unwrap();
            w.start_file("m/code/__torch__/b.py", opts).unwrap();
            w.write_all(b"  return x\n").unwrap();
            let mut bytes = w.finish().unwrap().into_inner();
            // Rename b.py in its local header and its central directory record.
            let at: Vec<usize> = (0..bytes.len() - 4)
                .filter(|&i| &bytes[i..i + 4] == b"b.py")
                .collect();
            assert_eq!(at.len(), 2);
            for i in at {
                bytes[i..i + 4].copy_from_slice(second.as_bytes());
            }
            bytes
        };
        for second in ["a.py", "A.py"] {
            let e = audit(&archive(second)).unwrap_err();
            assert!(e.contains("stored twice"), "{second}: {e}");
        }
        // Distinct names: the file operation is found.
        let ok = audit(&archive("c.py")).unwrap();
        assert_eq!(
            ok.iter().map(|f| f.op).collect::<Vec<_>>(),
            ["aten::from_file"]
        );
    }

    #[test]
    fn ordinary_code_is_not_flagged() {
        let code = "class M(Module):\n  def forward(self, x: Tensor) -> Tensor:\n    \
                    saved = torch.mean(x, [2, 3])  # a comment\n    \
                    _save_x = \"from_files\"\n    return torch.add(saved, 1)\n";
        assert!(ops(code).is_empty(), "{:?}", ops(code));
        // A literal that only looks like the start of one is not concatenated across a token.
        assert!(ops("  a = (\"from_\", x, \"file\")\n").is_empty());
    }

    #[test]
    fn the_line_is_named() {
        let mut out = Vec::new();
        scan(
            b"a\nb\n  torch.save(x, y)\n",
            "m/code/__torch__/n.py",
            &mut out,
        );
        assert_eq!(
            out[0].to_string(),
            "aten::save (m/code/__torch__/n.py line 3)"
        );
    }

    #[test]
    fn only_zip_archives_with_code_are_read() {
        assert!(audit(b"not a zip").unwrap_err().contains("not a zip"));
        let mut buf = std::io::Cursor::new(Vec::new());
        let mut w = zip::ZipWriter::new(&mut buf);
        w.start_file("m/data.pkl", zip::write::SimpleFileOptions::default())
            .unwrap();
        w.finish().unwrap();
        assert!(audit(buf.get_ref())
            .unwrap_err()
            .contains("no TorchScript code"));
    }
}
