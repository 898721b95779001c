//! The names a zip archive's central directory really lists, record by record. The `zip`
//! crate keeps one entry per name (the last of a name stored twice), while other readers
//! (libtorch's miniz, Info-ZIP) may take another copy: whoever checks an archive's contents
//! (tiles, a TorchScript model's code) counts the records itself and refuses a name stored
//! twice, so that what is checked is what is read.

use std::io::{BufReader, Read, Seek, SeekFrom};

/// The names of the central directory's records, as stored, in order; `start` is where the
/// directory begins (`ZipArchive::central_directory_start`).
pub fn central_names<R: Read + Seek>(reader: R, start: u64) -> std::io::Result<Vec<Vec<u8>>> {
    let mut r = BufReader::with_capacity(1 << 16, reader);
    r.seek(SeekFrom::Start(start))?;
    let mut names = Vec::new();
    let mut record = [0u8; 46];
    loop {
        r.read_exact(&mut record[..4])?;
        if record[..4] != *b"PK\x01\x02" {
            return Ok(names); // the end of central directory record(s)
        }
        r.read_exact(&mut record[4..])?;
        let field = |at: usize| u16::from_le_bytes([record[at], record[at + 1]]) as usize;
        let mut name = vec![0u8; field(28)];
        r.read_exact(&mut name)?;
        r.seek_relative((field(30) + field(32)) as i64)?;
        names.push(name);
    }
}

/// The first name stored twice among `names`; with `fold_case`, names that differ only in
/// ASCII case count as the same (miniz looks names up that way).
pub fn stored_twice(names: &[Vec<u8>], fold_case: bool) -> Option<&[u8]> {
    let mut seen = std::collections::HashSet::new();
    names
        .iter()
        .find(|n| {
            let key = if fold_case {
                n.to_ascii_lowercase()
            } else {
                n.to_vec()
            };
            !seen.insert(key)
        })
        .map(|n| n.as_slice())
}
