//! `tilefeat join`: many per-sample CSVs into one cohort CSV, streaming, one input open at a
//! time, whatever the cohort size.
//!
//! Before a single row is written, every input's provenance (beside its CSV) is read and
//! compared: the feature fingerprint (weights, layer, pooling, normalization, size,
//! precision, preprocessing) and dimension must agree, and sample IDs must be unique. Each
//! CSV's header must be `tile,0..D-1`, every row must have D+1 fields and end in a newline,
//! and the row count must equal the provenance's, so a truncated file is caught. Rows are
//! copied as bytes (no float re-formatting) with the sample prepended; `--aggregate
//! mean|max` instead emits one row per sample. The output appears only when complete.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::cli::{Aggregate, JoinArgs};
use crate::error::{fail, ExitKind, WithKind};
use crate::output::provenance::{FingerprintInfo, Provenance, RANDOM_WEIGHTS_WARNING};
use crate::output::{csv_header, provenance_path, push_csv_field, push_features, AtomicFile};

struct Input {
    csv: PathBuf,
    prov: Provenance,
}

#[derive(Serialize)]
struct JoinedInput {
    csv: String,
    sample: String,
    tiles: usize,
}

#[derive(Serialize)]
struct JoinProvenance {
    #[serde(skip_serializing_if = "Option::is_none")]
    warning: Option<String>,
    tilefeat_version: String,
    created: String,
    aggregate: String,
    feature_dim: usize,
    fingerprint: FingerprintInfo,
    samples: usize,
    rows: usize,
    inputs: Vec<JoinedInput>,
}

fn input_err(path: &Path, msg: impl std::fmt::Display) -> anyhow::Error {
    fail(ExitKind::Input, format!("{}: {msg}", path.display()))
}

/// Collect input paths from the arguments and `--from-list`.
fn input_paths(a: &JoinArgs) -> Result<Vec<PathBuf>> {
    let mut paths = a.inputs.clone();
    if let Some(list) = &a.from_list {
        let text = std::fs::read_to_string(list)
            .with_context(|| format!("cannot read --from-list {}", list.display()))
            .kind(ExitKind::Input)?;
        let base = list.parent().unwrap_or(Path::new("."));
        for line in text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            let p = PathBuf::from(line);
            paths.push(if p.is_absolute() || p.exists() {
                p
            } else {
                base.join(p)
            });
        }
    }
    if paths.is_empty() {
        return Err(fail(
            ExitKind::Usage,
            "no input CSVs (give paths or --from-list FILE)",
        ));
    }
    Ok(paths)
}

/// Whether `record` starts with a quoted field that is not closed yet (a tile name with a
/// newline in it, which `extract` writes quoted, continues on the next line).
fn first_field_open(record: &str) -> bool {
    let Some(rest) = record.strip_prefix('"') else {
        return false;
    };
    // Inside the quotes a quote is doubled; the first single one closes the field.
    let mut quotes = rest.bytes().peekable();
    while let Some(b) = quotes.next() {
        if b == b'"' {
            if quotes.peek() == Some(&b'"') {
                quotes.next();
            } else {
                return false;
            }
        }
    }
    true
}

/// Read one CSV record (one line, or more where a quoted tile name holds newlines) into
/// `record`, hashing what was read; returns the bytes read (0 at the end).
fn read_record(
    r: &mut impl BufRead,
    record: &mut String,
    sha: &mut Sha256,
) -> std::io::Result<usize> {
    record.clear();
    let mut n = r.read_line(record)?;
    while n > 0 && record.ends_with('\n') && first_field_open(record) {
        let more = r.read_line(record)?;
        if more == 0 {
            break;
        }
        n += more;
    }
    sha.update(record.as_bytes());
    Ok(n)
}

/// Split one CSV line into its first field (unquoted) and the rest (starting at the comma).
fn split_first_field(line: &str) -> Option<(String, &str)> {
    if let Some(rest) = line.strip_prefix('"') {
        let mut field = String::new();
        let mut chars = rest.char_indices().peekable();
        while let Some((i, c)) = chars.next() {
            if c == '"' {
                if let Some((_, '"')) = chars.peek() {
                    field.push('"');
                    chars.next();
                } else {
                    return Some((field, &rest[i + 1..]));
                }
            } else {
                field.push(c);
            }
        }
        None
    } else {
        let i = line.find(',')?;
        Some((line[..i].to_string(), &line[i..]))
    }
}

pub fn run(a: &JoinArgs, out: &mut dyn Write) -> Result<()> {
    let paths = input_paths(a)?;
    // Pass 1: provenance only.
    let mut inputs = Vec::with_capacity(paths.len());
    let mut samples = std::collections::HashMap::new();
    for p in &paths {
        let meta = std::fs::metadata(p).map_err(|e| input_err(p, format!("cannot read: {e}")))?;
        if meta.len() == 0 {
            return Err(input_err(p, "is empty"));
        }
        let pp = provenance_path(p);
        if !pp.exists() {
            return Err(input_err(
                p,
                format!(
                    "no provenance file {} beside it (was it written by tilefeat extract?)",
                    pp.display()
                ),
            ));
        }
        let prov = Provenance::read(&pp)?;
        if let Some(prev) = samples.insert(prov.sample.clone(), p.clone()) {
            return Err(input_err(
                p,
                format!(
                    "duplicate sample ID {:?} (also in {})",
                    prov.sample,
                    prev.display()
                ),
            ));
        }
        inputs.push(Input {
            csv: p.clone(),
            prov,
        });
    }
    let first = &inputs[0];
    let dim = first.prov.feature_dim;
    for i in &inputs[1..] {
        if i.prov.fingerprint.fields != first.prov.fingerprint.fields || i.prov.feature_dim != dim {
            let (a, b) = (&first.prov.fingerprint.fields, &i.prov.fingerprint.fields);
            return Err(input_err(
                &i.csv,
                format!(
                    "features are not comparable with {}: fingerprint {} vs {} (weights {} vs {}, layer {:?} vs {:?}, pool {:?} vs {:?}, normalize {:?} vs {:?}, size {} vs {}, precision {:?} vs {:?}, layout {} vs {})",
                    first.csv.display(),
                    &i.prov.fingerprint.id[..12],
                    &first.prov.fingerprint.id[..12],
                    b.weights_sha256, a.weights_sha256, b.layer, a.layer, b.pool, a.pool,
                    b.normalize, a.normalize, b.size, a.size, b.precision, a.precision,
                    b.layout.as_deref().unwrap_or("nhwc"), a.layout.as_deref().unwrap_or("nhwc")
                ),
            ));
        }
    }
    let untrained = inputs.iter().any(|i| !i.prov.weights.trained);
    if untrained && !a.quiet {
        eprintln!("tilefeat: WARNING: {RANDOM_WEIGHTS_WARNING}");
    }

    // Pass 2: stream.
    let mut file = AtomicFile::create(&a.output)?;
    let header = match a.aggregate {
        Aggregate::None => csv_header(&["sample", "tile"], dim),
        _ => csv_header(&["sample", "n_tiles"], dim),
    };
    let werr = |e: std::io::Error| {
        fail(
            ExitKind::Output,
            format!("cannot write {}: {e}", a.output.display()),
        )
    };
    file.writer().write_all(header.as_bytes()).map_err(werr)?;
    let expected_header = csv_header(&["tile"], dim);
    let mut total_rows = 0usize;
    let mut joined = Vec::new();
    let mut line = String::new();
    let mut out_line = String::new();
    for inp in &inputs {
        let f =
            File::open(&inp.csv).map_err(|e| input_err(&inp.csv, format!("cannot open: {e}")))?;
        let mut r = BufReader::with_capacity(1 << 20, f);
        let mut sha = Sha256::new();
        let mut bytes =
            read_record(&mut r, &mut line, &mut sha).map_err(|e| input_err(&inp.csv, e))?;
        if line != expected_header {
            return Err(input_err(
                &inp.csv,
                format!(
                    "header is not `tile,0,...,{}` (a tilefeat CSV with {dim} features)",
                    dim - 1
                ),
            ));
        }
        let mut sample_field = String::new();
        push_csv_field(&mut sample_field, &inp.prov.sample);
        let mut sum = vec![0f64; dim];
        let mut max = vec![f32::NEG_INFINITY; dim];
        let mut rows = 0usize;
        loop {
            let n = read_record(&mut r, &mut line, &mut sha).map_err(|e| input_err(&inp.csv, e))?;
            if n == 0 {
                break;
            }
            bytes += n;
            let row = rows + 2;
            if !line.ends_with('\n') {
                return Err(input_err(
                    &inp.csv,
                    format!("line {row} is truncated (no newline at end of file)"),
                ));
            }
            let body = line.trim_end_matches(['\n', '\r']);
            let (_tile, rest) = split_first_field(body)
                .ok_or_else(|| input_err(&inp.csv, format!("line {row} is malformed")))?;
            let fields = rest.bytes().filter(|&b| b == b',').count();
            if fields != dim {
                return Err(input_err(
                    &inp.csv,
                    format!("line {row} has {} features, expected {dim}", fields),
                ));
            }
            match a.aggregate {
                Aggregate::None => {
                    out_line.clear();
                    out_line.push_str(&sample_field);
                    out_line.push(',');
                    out_line.push_str(body);
                    out_line.push('\n');
                    file.writer().write_all(out_line.as_bytes()).map_err(werr)?;
                }
                agg => {
                    // One pass over the bytes: parse a number, expect a comma, repeat.
                    // fast-float2 gives the same result as str::parse, several times faster.
                    let bytes = &rest.as_bytes()[1..];
                    let mut pos = 0;
                    for k in 0..dim {
                        let (x, n) = fast_float2::parse_partial::<f32, _>(&bytes[pos..])
                            .ok()
                            .filter(|&(_, n)| matches!(bytes.get(pos + n), Some(b',') | None))
                            .ok_or_else(|| {
                                input_err(
                                    &inp.csv,
                                    format!("line {row}: feature {k} is not a number"),
                                )
                            })?;
                        pos += n + 1;
                        if agg == Aggregate::Mean {
                            sum[k] += x as f64;
                        } else if x > max[k] || x.is_nan() {
                            max[k] = x;
                        }
                    }
                }
            }
            rows += 1;
        }
        if rows != inp.prov.tiles.written {
            return Err(input_err(
                &inp.csv,
                format!(
                    "has {rows} rows but its provenance records {} (truncated or edited?)",
                    inp.prov.tiles.written
                ),
            ));
        }
        // The provenance of the run that wrote these bytes, not of another run on the same
        // output (older provenance files have no hash: their pairing is not checked).
        let sha = hex::encode(sha.finalize());
        if let Some(want) = &inp.prov.output_sha256 {
            if *want != sha || inp.prov.output_bytes.is_some_and(|b| b != bytes as u64) {
                return Err(input_err(
                    &inp.csv,
                    format!(
                        "its SHA-256 is {sha} but its provenance records {want}: the CSV and the \
                         provenance beside it come from different runs (or the CSV was edited)"
                    ),
                ));
            }
        }
        if a.aggregate != Aggregate::None {
            if rows == 0 {
                return Err(input_err(&inp.csv, "has no tiles to aggregate"));
            }
            let v: Vec<f32> = match a.aggregate {
                Aggregate::Mean => sum.iter().map(|s| (s / rows as f64) as f32).collect(),
                _ => max,
            };
            out_line.clear();
            out_line.push_str(&sample_field);
            out_line.push_str(&format!(",{rows}"));
            push_features(&mut out_line, &v);
            file.writer().write_all(out_line.as_bytes()).map_err(werr)?;
        }
        total_rows += if a.aggregate == Aggregate::None {
            rows
        } else {
            1
        };
        joined.push(JoinedInput {
            csv: inp.csv.display().to_string(),
            sample: inp.prov.sample.clone(),
            tiles: rows,
        });
    }
    file.commit()?;
    let prov = JoinProvenance {
        warning: untrained.then(|| RANDOM_WEIGHTS_WARNING.to_string()),
        tilefeat_version: env!("CARGO_PKG_VERSION").into(),
        created: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        aggregate: format!("{:?}", a.aggregate).to_lowercase(),
        feature_dim: dim,
        fingerprint: first.prov.fingerprint.clone(),
        samples: inputs.len(),
        rows: total_rows,
        inputs: joined,
    };
    let mut text = String::new();
    if untrained {
        text.push_str(&format!("# WARNING: {RANDOM_WEIGHTS_WARNING}\n"));
    }
    text.push_str(&serde_yaml::to_string(&prov)?);
    crate::output::write_atomic(&provenance_path(&a.output), text.as_bytes())?;
    if !a.quiet {
        writeln!(
            out,
            "tilefeat: joined {} samples, {total_rows} rows -> {}",
            inputs.len(),
            a.output.display()
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_field() {
        assert_eq!(
            split_first_field("a.png,1,2"),
            Some(("a.png".into(), ",1,2"))
        );
        assert_eq!(
            split_first_field("\"a,\"\"b\"\".png\",1"),
            Some(("a,\"b\".png".into(), ",1"))
        );
        assert_eq!(split_first_field("\"open,1"), None);
    }

    /// Regression: a tile name with a newline (quoted by `extract`) made `join` report
    /// "line 2 is malformed".
    #[test]
    fn records_may_span_lines_inside_quotes() {
        let text = "\"a\nb.png\",1\n\"c\"\"\n\"\"d.png\",2\nplain.png,3\n";
        let mut r = std::io::Cursor::new(text.as_bytes());
        let (mut rec, mut sha) = (String::new(), Sha256::new());
        let mut got = Vec::new();
        while read_record(&mut r, &mut rec, &mut sha).unwrap() > 0 {
            got.push(split_first_field(rec.trim_end()).unwrap().0);
        }
        assert_eq!(got, ["a\nb.png", "c\"\n\"d.png", "plain.png"]);
        assert_eq!(
            hex::encode(sha.finalize()),
            hex::encode(Sha256::digest(text.as_bytes())),
            "every byte hashed once"
        );
        assert!(first_field_open("\"a\n") && !first_field_open("\"a\",1\n"));
        assert!(first_field_open("\"a\"\"\n") && !first_field_open("a\n"));
    }
}
