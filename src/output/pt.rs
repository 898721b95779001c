//! `.pt` feature bags, as CLAM's training (`pt_files/{slide}.pt`) and slideflow's MIL
//! (`{slide}.pt` with `{slide}.index.npz`) load them: one float32 (N, D) tensor in the rows'
//! order, in the file format `torch.save` writes and `torch.load(p, weights_only=True)` reads.
//!
//! That format is a zip of stored (uncompressed) records under one folder: `data.pkl` (a
//! protocol-2 pickle that rebuilds the tensor from a storage named by a persistent id),
//! `data/0` (the storage: the raw little-endian floats, aligned to 64 bytes as `torch.save`
//! aligns it), `byteorder` and `version`. The floats are streamed into `data/0` as rows come;
//! `data.pkl`, which holds the shape, is written last (readers look records up by name).
//!
//! When the tiles have coordinates, `NAME.index.npz` goes beside it (numpy's `savez` layout:
//! `arr_0`, int64 (N, 2) level-0 tile centres, which slideflow's loaders read), committed
//! with the bag; without coordinates, a previous run's index is removed in the same commit.
//! The pickle is written here by hand, with only the opcodes `torch.save` uses
//! for a tensor, all of them allowed by `weights_only=True`.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::Result;
use zip::write::SimpleFileOptions;
use zip::{CompressionMethod, ZipWriter};

use super::atomic::{AtomicPath, Staged};
use super::{Committed, FeatureRow, FeatureWriter, FileInfo, NoEncoding, RowEncoder};
use crate::error::{fail, ExitKind};
use crate::input::coords::ToLevel0;

/// The folder every record of the zip lives in (`torch.save` to a buffer names it so).
const ARCHIVE: &str = "archive";

pub struct PtWriter {
    target: AtomicPath,
    zip: ZipWriter<BufWriter<File>>,
    dim: usize,
    rows: u64,
    /// Level-0 centres for the index, and how a name's x,y become them.
    index: Option<(Vec<[i64; 2]>, ToLevel0)>,
}

fn perr(path: &Path, e: impl std::fmt::Display) -> anyhow::Error {
    fail(
        ExitKind::Output,
        format!("cannot write {}: {e}", path.display()),
    )
}

fn stored() -> SimpleFileOptions {
    SimpleFileOptions::default()
        .compression_method(CompressionMethod::Stored)
        .large_file(true)
}

impl PtWriter {
    /// The bag at `path` (a temporary beside it until committed), its tensor's record opened.
    /// `warn` gets the reason when the tiles have coordinates that cannot be made centres (no
    /// index is written then).
    pub fn create(path: &Path, info: &FileInfo, warn: &mut dyn FnMut(String)) -> Result<Self> {
        let index = match &info.coords {
            Some(c) => match &c.centre {
                Ok(to) => Some((Vec::new(), *to)),
                Err(why) => {
                    warn(format!(
                        "{}: no {} beside it (slideflow needs it): {why}",
                        path.display(),
                        index_path(path).display()
                    ));
                    None
                }
            },
            None => None,
        };
        let target = AtomicPath::create(path)?;
        let file = File::create(target.tmp()).map_err(|e| perr(path, e))?;
        let mut zip = ZipWriter::new(BufWriter::with_capacity(1 << 20, file));
        zip.start_file(format!("{ARCHIVE}/data/0"), stored().with_alignment(64))
            .map_err(|e| perr(path, e))?;
        Ok(PtWriter {
            target,
            zip,
            dim: info.dim,
            rows: 0,
            index,
        })
    }
}

impl FeatureWriter for PtWriter {
    fn encoder(&self) -> std::sync::Arc<dyn RowEncoder> {
        std::sync::Arc::new(NoEncoding)
    }

    fn append(&mut self, _encoded: &[u8], rows: &[FeatureRow<'_>]) -> Result<()> {
        let path = self.target.target().to_path_buf();
        let mut bytes = Vec::with_capacity(rows.len() * self.dim * 4);
        for r in rows {
            anyhow::ensure!(
                r.features.len() == self.dim,
                "internal error: a row of {} floats for {}",
                r.features.len(),
                path.display()
            );
            bytes.extend(r.features.iter().flat_map(|f| f.to_le_bytes()));
            if let Some((centres, to)) = &mut self.index {
                let [x, y] = r
                    .xy
                    .ok_or_else(|| anyhow::anyhow!("internal error: a row without coordinates"))?;
                centres.push([to.apply(x), to.apply(y)]);
            }
        }
        self.zip.write_all(&bytes).map_err(|e| perr(&path, e))?;
        self.rows += rows.len() as u64;
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<(Staged, Committed)> {
        let PtWriter {
            target,
            mut zip,
            dim,
            rows,
            index,
        } = *self;
        let path = target.target().to_path_buf();
        let err = |e: &dyn std::fmt::Display| perr(&path, e);
        let records: [(&str, Vec<u8>); 3] = [
            ("data.pkl", tensor_pickle(rows, dim as u64)),
            ("byteorder", b"little".to_vec()),
            ("version", b"3\n".to_vec()),
        ];
        for (name, bytes) in records {
            zip.start_file(format!("{ARCHIVE}/{name}"), stored())
                .map_err(|e| err(&e))?;
            zip.write_all(&bytes).map_err(|e| err(&e))?;
        }
        let file = zip.finish().map_err(|e| err(&e))?;
        file.into_inner()
            .map_err(|e| err(&e.into_error()))?
            .sync_all()
            .map_err(|e| err(&e))?;
        let (staged, committed) = target.finish()?;
        // Regression (review): with no index this time, the previous run's stayed beside
        // the new bag (another N, other tiles), which slideflow would pair with it.
        let index = match index {
            Some((centres, _)) => write_index(&index_path(&path), &centres)?,
            None => Staged::removal(index_path(&path)),
        };
        let staged = staged.and(index);
        Ok((staged, committed))
    }
}

/// `NAME.index.npz` for `NAME.pt`.
pub fn index_path(pt: &Path) -> PathBuf {
    super::side_file(pt, "index.npz")
}

/// numpy's `savez(path, centres)`: a zip holding `arr_0.npy`, int64 (N, 2), staged.
fn write_index(path: &Path, centres: &[[i64; 2]]) -> Result<Staged> {
    let mut npy = npy_header("<i8", &[centres.len() as u64, 2]);
    npy.extend(centres.iter().flatten().flat_map(|v| v.to_le_bytes()));
    let mut buf = std::io::Cursor::new(Vec::new());
    {
        let mut zip = ZipWriter::new(&mut buf);
        zip.start_file("arr_0.npy", stored().large_file(false))
            .map_err(|e| perr(path, e))?;
        zip.write_all(&npy).map_err(|e| perr(path, e))?;
        zip.finish().map_err(|e| perr(path, e))?;
    }
    super::atomic::stage(path, buf.get_ref())
}

/// A `.npy` (format 1.0) header for a C-order array of `descr` and `shape`, padded with
/// spaces to a multiple of 64 bytes as numpy pads it.
fn npy_header(descr: &str, shape: &[u64]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(u64::to_string).collect();
    let shape = match dims.len() {
        1 => format!("({},)", dims[0]),
        _ => format!("({})", dims.join(", ")),
    };
    let mut dict = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    while (10 + dict.len() + 1) % 64 != 0 {
        dict.push(' ');
    }
    dict.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend((dict.len() as u16).to_le_bytes());
    out.extend(dict.as_bytes());
    out
}

/// The protocol-2 pickle `torch.save` writes for a contiguous float32 (n, d) CPU tensor:
/// `torch._utils._rebuild_tensor_v2(storage, 0, (n, d), (d, 1), False, OrderedDict())`,
/// the storage a persistent id `('storage', torch.FloatStorage, '0', 'cpu', n * d)`.
fn tensor_pickle(n: u64, d: u64) -> Vec<u8> {
    let mut p = Pickle(vec![0x80, 2]); // PROTO 2
    p.global("torch._utils", "_rebuild_tensor_v2");
    p.op(b'('); // MARK: the arguments
    p.op(b'('); // MARK: the persistent id
    p.unicode("storage");
    p.global("torch", "FloatStorage");
    p.unicode("0");
    p.unicode("cpu");
    p.int(n * d);
    p.op(b't'); // TUPLE
    p.op(b'Q'); // BINPERSID
    p.int(0); // storage offset
    p.int(n);
    p.int(d);
    p.op(0x86); // TUPLE2: size
    p.int(d);
    p.int(1);
    p.op(0x86); // TUPLE2: stride
    p.op(0x89); // NEWFALSE: requires_grad
    p.global("collections", "OrderedDict");
    p.op(b')'); // EMPTY_TUPLE
    p.op(b'R'); // REDUCE: backward hooks
    p.op(b't'); // TUPLE
    p.op(b'R'); // REDUCE
    p.op(b'.'); // STOP
    p.0
}

struct Pickle(Vec<u8>);

impl Pickle {
    fn op(&mut self, op: u8) {
        self.0.push(op);
    }

    fn global(&mut self, module: &str, name: &str) {
        self.0.push(b'c');
        self.0.extend(format!("{module}\n{name}\n").as_bytes());
    }

    fn unicode(&mut self, s: &str) {
        self.0.push(b'X'); // BINUNICODE
        self.0.extend((s.len() as u32).to_le_bytes());
        self.0.extend(s.as_bytes());
    }

    /// The shortest of BININT1, BININT2, BININT and LONG1, as pickle writes a Python int.
    fn int(&mut self, v: u64) {
        if v < 1 << 8 {
            self.0.extend([b'K', v as u8]);
        } else if v < 1 << 16 {
            self.0.push(b'M');
            self.0.extend((v as u16).to_le_bytes());
        } else if v < 1 << 31 {
            self.0.push(b'J');
            self.0.extend((v as u32).to_le_bytes());
        } else {
            // LONG1: little-endian two's complement, with a 0 byte when the top bit is set.
            let mut bytes = v.to_le_bytes().to_vec();
            while bytes.len() > 1 && bytes[bytes.len() - 1] == 0 && bytes[bytes.len() - 2] < 0x80 {
                bytes.pop();
            }
            self.0.extend([0x8a, bytes.len() as u8]);
            self.0.extend(bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pickle_ints_as_python_writes_them() {
        let enc = |v: u64| {
            let mut p = Pickle(Vec::new());
            p.int(v);
            p.0
        };
        assert_eq!(enc(5), [b'K', 5]);
        assert_eq!(enc(2048), [b'M', 0, 8]);
        assert_eq!(enc(1 << 20), [b'J', 0, 0, 0x10, 0]);
        // pickle.dumps(2**31, 2) and 2**40.
        assert_eq!(enc(1 << 31), [0x8a, 5, 0, 0, 0, 0x80, 0]);
        assert_eq!(enc(1 << 40), [0x8a, 6, 0, 0, 0, 0, 0, 1]);
    }

    #[test]
    fn npy_headers_are_padded_to_64_bytes() {
        let h = npy_header("<i8", &[3, 2]);
        assert_eq!(h.len() % 64, 0);
        assert!(String::from_utf8_lossy(&h).contains("'shape': (3, 2), }"));
        assert_eq!(*h.last().unwrap(), b'\n');
    }
}
