//! `tilefeat join`: many per-sample feature files (CSV, HDF5 or Parquet, mixed as they
//! come) into one cohort file (CSV or Parquet), streaming, one input open at a time, whatever
//! the cohort size.
//!
//! Before a single row is written, every input's provenance (beside it) is read and
//! compared: the feature fingerprint (weights, layer, pooling, normalization, size,
//! precision, preprocessing) and dimension must agree, and sample IDs must be unique. Each
//! input's layout is checked by its [`read`]er (a CSV's header and field counts, an HDF5's
//! datasets, a Parquet's columns), its row count must equal the provenance's and its SHA-256
//! the one recorded, so a truncated, edited or foreign file is caught. The [`cohort`] file
//! gets `sample,tile,[x,y,]0..D-1` (CSV values copied as bytes, no float re-formatting), or
//! with `--aggregate mean|max` one row per sample; it appears only when complete.

pub mod cohort;
pub mod read;

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Serialize;

use crate::cli::{Aggregate, JoinArgs};
use crate::error::{fail, ExitKind, WithKind};
use crate::output::provenance::{
    CoordsProvenance, FingerprintInfo, Provenance, RANDOM_WEIGHTS_WARNING,
};
use crate::output::{provenance_path, Format};
use read::{input_err, Expect, FeatureReader};

struct Input {
    path: PathBuf,
    format: Format,
    prov: Provenance,
}

impl Input {
    /// Whether the file holds coordinates, and (HDF5) what turns its top-left corners back
    /// into the names' x,y.
    fn xy(&self) -> Option<i64> {
        let c = self.prov.coords.as_ref().filter(|c| c.in_output)?;
        let centre = c.origin.as_deref() == Some("centre") && self.format == Format::H5;
        Some(if centre {
            c.patch_size_level0.map_or(0, |s| (s / 2) as i64)
        } else {
            0
        })
    }

    fn open(&self, dim: usize) -> Result<Box<dyn FeatureReader>> {
        let expect = Expect { dim, xy: self.xy() };
        Ok(match self.format {
            Format::Csv => Box::new(read::CsvReader::open(&self.path, &expect)?),
            Format::H5 => Box::new(read::H5Reader::open(&self.path, &expect)?),
            Format::Parquet => Box::new(read::ParquetReader::open(&self.path, &expect)?),
            Format::Pt => return Err(input_err(&self.path, PT_HAS_NO_NAMES)),
            Format::Stamp | Format::Clam => return Err(input_err(&self.path, STAMP_IS_NOT_JOINED)),
        })
    }
}

#[derive(Serialize)]
struct JoinedInput {
    #[serde(rename = "csv")]
    path: String,
    format: String,
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
    format: String,
    coordinates: bool,
    /// What the cohort's x,y are: the names' own (HDF5's corners turned back into them).
    #[serde(skip_serializing_if = "Option::is_none")]
    coords_origin: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    coords_unit: Option<String>,
    feature_dim: usize,
    fingerprint: FingerprintInfo,
    samples: usize,
    rows: usize,
    inputs: Vec<JoinedInput>,
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

const PT_HAS_NO_NAMES: &str = "is a .pt bag, which holds no tile names: join the sample's \
     .csv, .h5 or .parquet (extract it as one of those too; with --cache-dir that second run \
     is all cache hits)";

const STAMP_IS_NOT_JOINED: &str = "is in STAMP's layout (coordinates in micrometres): join \
     the sample's .csv, .h5 or .parquet (extract it as one of those too; with --cache-dir that \
     second run is all cache hits)";

/// The format of an input, from its provenance (older ones, without the field: CSV), which
/// its extension must not contradict.
fn input_format(path: &Path, prov: &Provenance) -> Result<Format> {
    let recorded = match prov.format.as_deref() {
        None | Some("csv") => Format::Csv,
        Some("h5") => Format::H5,
        Some("parquet") => Format::Parquet,
        Some("pt") => return Err(input_err(path, PT_HAS_NO_NAMES)),
        Some("stamp") => return Err(input_err(path, STAMP_IS_NOT_JOINED)),
        Some(other) => {
            return Err(input_err(
                path,
                format!("its provenance records an unknown format {other:?}"),
            ))
        }
    };
    match Format::from_path(path) {
        Some(named) if named != recorded => Err(input_err(
            path,
            format!(
                "named as a {} file but its provenance records {}",
                named.as_str(),
                recorded.as_str()
            ),
        )),
        _ => Ok(recorded),
    }
}

pub fn run(a: &JoinArgs, out: &mut dyn Write) -> Result<()> {
    let paths = input_paths(a)?;
    if !matches!(
        Format::from_path(&a.output),
        Some(Format::Csv | Format::Parquet)
    ) {
        return Err(fail(
            ExitKind::Usage,
            format!(
                "--output {}: a cohort file is .csv or .parquet",
                a.output.display()
            ),
        ));
    }
    // `c.csv` and `c.parquet` share `c.provenance.yaml`: one must not take the other's.
    for ext in ["csv", "parquet"] {
        let other = crate::output::side_file(&a.output, ext);
        if other.file_name() != a.output.file_name()
            && other.exists()
            && provenance_path(&a.output).exists()
        {
            return Err(fail(
                ExitKind::Output,
                format!(
                    "{} would replace {}, the provenance of {}: write the cohort to another \
                     name, or remove {} first",
                    a.output.display(),
                    provenance_path(&a.output).display(),
                    other.display(),
                    other.display()
                ),
            ));
        }
    }
    // Regression: `join A.csv D.csv -o A.csv` replaced its own input, and `join H.h5 D.csv -o
    // H.csv` replaced H.h5's provenance. Nothing this writes may be something it reads.
    let read: Vec<PathBuf> = paths
        .iter()
        .flat_map(|p| {
            [
                p.clone(),
                provenance_path(p),
                crate::output::rejected_path(p),
            ]
        })
        .chain(a.from_list.clone())
        .collect();
    crate::output::refuse_overwriting_inputs(
        &[a.output.clone(), provenance_path(&a.output)],
        &read,
    )?;
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
        let format = input_format(p, &prov)?;
        let micrometres = prov.coords.as_ref().is_some_and(|c| {
            c.in_output
                && c.unit.as_deref() == Some(crate::input::coords::Unit::Micrometres.as_str())
        });
        if format == Format::H5 && micrometres {
            // Its `coords` are the names' micrometres turned into pixels with --slide-mpp,
            // rounded: they cannot be given back as the names said them.
            return Err(input_err(
                p,
                "holds micrometre tile names converted to level-0 pixels (--slide-mpp): join \
                 the sample's .csv or .parquet, which keep the names' x,y",
            ));
        }
        inputs.push(Input {
            path: p.clone(),
            format,
            prov,
        });
    }
    let first = &inputs[0];
    let dim = first.prov.feature_dim;
    for i in &inputs[1..] {
        if i.prov.fingerprint.fields != first.prov.fingerprint.fields || i.prov.feature_dim != dim {
            let (a, b) = (&first.prov.fingerprint.fields, &i.prov.fingerprint.fields);
            return Err(input_err(
                &i.path,
                format!(
                    "features are not comparable with {}: fingerprint {} vs {} (weights {} vs {}, layer {:?} vs {:?}, pool {:?} vs {:?}, normalize {:?} vs {:?}, size {} vs {}, precision {:?} vs {:?}, layout {} vs {})",
                    first.path.display(),
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
    // Coordinates in the cohort when every input has them.
    let aggregate = a.aggregate != Aggregate::None;
    let with_xy = inputs.iter().filter(|i| i.xy().is_some()).count();
    let xy = (with_xy == inputs.len() && !aggregate).then(|| {
        inputs
            .iter()
            .all(|i| i.prov.coords.as_ref().is_some_and(|c| c.integral))
    });
    if with_xy > 0 && with_xy < inputs.len() && !aggregate && !a.quiet {
        let without = inputs.iter().find(|i| i.xy().is_none()).expect("one lacks");
        eprintln!(
            "tilefeat: warning: {} has no tile coordinates (but {with_xy} of {} inputs have): \
             the cohort file has none",
            without.path.display(),
            inputs.len()
        );
    }
    // One column x,y means one thing: regression, pixel and micrometre coordinates (and
    // top-left corners beside slideflow's centres) went into one column with exit 0.
    let meaning = |i: &Input| {
        let c = i.prov.coords.as_ref();
        let get = |f: fn(&CoordsProvenance) -> &Option<String>| {
            c.and_then(|c| f(c).clone()).unwrap_or_default()
        };
        (get(|c| &c.origin), get(|c| &c.unit), get(|c| &c.convention))
    };
    let coords_meaning = match xy {
        Some(_) => {
            let (origin, unit, convention) = meaning(first);
            let differs = inputs[1..]
                .iter()
                .map(|i| (i, meaning(i)))
                .find(|(_, m)| (&m.0, &m.1) != (&origin, &unit));
            if let Some((other, (o, u, c))) = differs {
                return Err(input_err(
                    &other.path,
                    format!(
                        "its tile coordinates are {o} in {u} ({c}, sample {}) but those of {} are \
                         {origin} in {unit} ({convention}, sample {}): one cohort's x,y must \
                         mean one thing; join them in separate cohorts, or extract one again \
                         with --coords none",
                        other.prov.sample,
                        first.path.display(),
                        first.prov.sample
                    ),
                ));
            }
            Some((origin, unit))
        }
        None => None,
    };

    // Pass 2: stream.
    let mut metadata = vec![
        ("fingerprint".to_string(), first.prov.fingerprint.id.clone()),
        ("feature_dim".to_string(), dim.to_string()),
        (
            "aggregate".to_string(),
            format!("{:?}", a.aggregate).to_lowercase(),
        ),
        (
            "tilefeat_version".to_string(),
            env!("CARGO_PKG_VERSION").to_string(),
        ),
    ];
    if let Some((origin, unit)) = &coords_meaning {
        metadata.push(("coords_origin".to_string(), origin.clone()));
        metadata.push(("coords_unit".to_string(), unit.clone()));
    }
    let layout = cohort::Layout {
        dim,
        aggregate,
        xy,
        metadata,
    };
    let mut cohort = cohort::create(&a.output, &layout)?;
    let mut total_rows = 0usize;
    let mut joined = Vec::new();
    let mut floats = Vec::with_capacity(dim);
    for inp in &inputs {
        let mut reader = inp.open(dim)?;
        let sample = inp.prov.sample.as_str();
        let mut sum = vec![0f64; dim];
        let mut max = vec![f32::NEG_INFINITY; dim];
        let mut rows = 0usize;
        while let Some(mut row) = reader.next_row()? {
            rows += 1;
            if xy.is_none() {
                row.xy = None;
            }
            let text_only =
                matches!(row.values, read::Values::Text(_)) && !aggregate && !cohort.needs_floats();
            let v: &[f32] = if text_only {
                &[]
            } else {
                row.values.floats(&mut floats, &inp.path, rows)?
            };
            match a.aggregate {
                Aggregate::None => cohort.row(sample, &row, v)?,
                Aggregate::Mean => {
                    for (s, &x) in sum.iter_mut().zip(v) {
                        *s += x as f64;
                    }
                }
                Aggregate::Max => {
                    for (m, &x) in max.iter_mut().zip(v) {
                        if x > *m || x.is_nan() {
                            *m = x;
                        }
                    }
                }
            }
        }
        if rows != inp.prov.tiles.written {
            return Err(input_err(
                &inp.path,
                format!(
                    "has {rows} rows but its provenance records {} (truncated or edited?)",
                    inp.prov.tiles.written
                ),
            ));
        }
        // The provenance of the run that wrote these bytes, not of another run on the same
        // output (older provenance files have no hash: their pairing is not checked).
        let (sha, bytes) = reader.finish()?;
        if let Some(want) = &inp.prov.output_sha256 {
            if *want != sha || inp.prov.output_bytes.is_some_and(|b| b != bytes) {
                return Err(input_err(
                    &inp.path,
                    format!(
                        "its SHA-256 is {sha} but its provenance records {want}: the feature \
                         file and the provenance beside it come from different runs (or the \
                         file was edited)"
                    ),
                ));
            }
        }
        if aggregate {
            if rows == 0 {
                return Err(input_err(&inp.path, "has no tiles to aggregate"));
            }
            let v: Vec<f32> = match a.aggregate {
                Aggregate::Mean => sum.iter().map(|s| (s / rows as f64) as f32).collect(),
                _ => max,
            };
            cohort.aggregate(sample, rows, &v)?;
        }
        total_rows += if aggregate { 1 } else { rows };
        joined.push(JoinedInput {
            path: inp.path.display().to_string(),
            format: inp.format.as_str().into(),
            sample: sample.to_string(),
            tiles: rows,
        });
    }
    let cohort = cohort.finish()?;
    let prov = JoinProvenance {
        warning: untrained.then(|| RANDOM_WEIGHTS_WARNING.to_string()),
        tilefeat_version: env!("CARGO_PKG_VERSION").into(),
        created: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        aggregate: format!("{:?}", a.aggregate).to_lowercase(),
        format: Format::from_path(&a.output)
            .expect("checked above")
            .as_str()
            .into(),
        coordinates: xy.is_some(),
        coords_origin: coords_meaning.as_ref().map(|m| m.0.clone()),
        coords_unit: coords_meaning.as_ref().map(|m| m.1.clone()),
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
    // Both complete before either replaces what was there.
    let prov = crate::output::stage(&provenance_path(&a.output), text.as_bytes())?;
    cohort.and(prov).commit()?;
    if !a.quiet {
        writeln!(
            out,
            "tilefeat: joined {} sample{}, {total_rows} rows -> {}",
            inputs.len(),
            if inputs.len() == 1 { "" } else { "s" },
            a.output.display()
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::read::{first_field_open, read_record, split_first_field};
    use sha2::{Digest, Sha256};

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
