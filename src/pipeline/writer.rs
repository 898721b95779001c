//! The writing end of the pipeline: formatting threads encode groups of rows (numbered in
//! tile order) with the output format's encoder, and one writer thread appends the groups in
//! order, stores new vectors in the cache, and commits the feature file once every group is
//! in. A group is held until every group before it is written; credits bound how many wait.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use anyhow::Result;
use crossbeam_channel::{Receiver, Sender};

use crate::cache::{Cache, Hash32};
use crate::input::Tile;
use crate::output::{Committed, FeatureRow, FeatureWriter, RowEncoder, Staged};

/// Messages to the formatting threads: groups of finished rows, numbered in tile order, then
/// `Finish` with the number of groups. A channel closed without `Finish` means the run
/// failed: the feature file is not committed.
pub(crate) enum WriterMsg {
    Rows { seq: u64, rows: Vec<OutRow> },
    Finish { groups: u64 },
}

/// From the formatting threads to the writer: a group's encoded rows (or why they could not be
/// made), with its rows for the cache; `Finish` passed on.
pub(crate) enum Formatted {
    Text {
        seq: u64,
        text: std::result::Result<Vec<u8>, String>,
        rows: Vec<OutRow>,
        secs: f64,
    },
    Finish {
        groups: u64,
    },
}

pub(crate) struct OutRow {
    pub(crate) idx: usize,
    pub(crate) sha: Hash32,
    pub(crate) features: Vec<f32>,
    pub(crate) hit: bool,
}

/// A sample's tiles and, when its feature file has them, their coordinates (by tile index).
#[derive(Clone, Copy)]
pub(crate) struct RowNames<'a> {
    pub(crate) tiles: &'a [Tile],
    pub(crate) xy: Option<&'a [[f64; 2]]>,
}

impl<'a> RowNames<'a> {
    pub(crate) fn of(tiles: &'a [Tile]) -> RowNames<'a> {
        RowNames { tiles, xy: None }
    }

    /// The feature file's rows for `rows`.
    fn rows<'b>(&'b self, rows: &'b [OutRow]) -> Vec<FeatureRow<'b>> {
        rows.iter()
            .map(|r| FeatureRow {
                tile: &self.tiles[r.idx].rel,
                xy: self.xy.map(|xy| xy[r.idx]),
                features: &r.features,
            })
            .collect()
    }
}

/// The encoded bytes of `rows`, in order.
pub(crate) fn format_rows(
    rows: &[OutRow],
    names: RowNames<'_>,
    encoder: &dyn RowEncoder,
) -> Vec<u8> {
    encoder.encode(&names.rows(rows))
}

/// A formatting thread: encodes groups of rows, in whatever order it gets them.
pub(crate) fn format_loop(
    rows: Receiver<WriterMsg>,
    out: Sender<Formatted>,
    names: RowNames<'_>,
    encoder: &dyn RowEncoder,
) {
    for msg in rows.iter() {
        let formatted = match msg {
            WriterMsg::Finish { groups } => Formatted::Finish { groups },
            WriterMsg::Rows { seq, rows } => {
                let t = Instant::now();
                // A bug here fails the run (in the writer) instead of leaving a hole in it.
                let text = crate::error::catch_panic(|| format_rows(&rows, names, encoder));
                Formatted::Text {
                    seq,
                    text,
                    rows,
                    secs: t.elapsed().as_secs_f64(),
                }
            }
        };
        if out.send(formatted).is_err() {
            return;
        }
    }
}

/// What the writer did: seconds writing and (summed over the formatting threads) encoding,
/// and the file it committed (None when the run failed before its last row).
pub(crate) struct Written {
    pub write: f64,
    pub format: f64,
    pub committed: Option<(Staged, Committed)>,
}

/// Writes the formatted groups in order (holding back those that come early), gives a credit
/// back for each, stores computed vectors in the cache, and commits the feature file once
/// every group is written. Returns the seconds spent writing and, summed over the formatting
/// threads, formatting.
pub(crate) fn writer_loop(
    texts: Receiver<Formatted>,
    group_credits: Sender<()>,
    mut file: Box<dyn FeatureWriter>,
    cache: Option<&Cache>,
    output: &Path,
    names: RowNames<'_>,
) -> Result<Written> {
    let (mut busy, mut format) = (0.0, 0.0);
    let mut early: BTreeMap<u64, (Vec<u8>, Vec<OutRow>)> = BTreeMap::new();
    let mut next = 0u64;
    let mut groups = None;
    for msg in texts.iter() {
        match msg {
            Formatted::Finish { groups: n } => groups = Some(n),
            Formatted::Text {
                seq,
                text,
                rows,
                secs,
            } => {
                format += secs;
                let text = text.map_err(|m| {
                    anyhow::anyhow!("internal error while formatting {}: {m}", output.display())
                })?;
                early.insert(seq, (text, rows));
            }
        }
        while let Some((text, rows)) = early.remove(&next) {
            let t = Instant::now();
            file.append(&text, &names.rows(&rows))?;
            if let Some(c) = cache {
                for r in rows.iter().filter(|r| !r.hit) {
                    c.put(&r.sha, &r.features)?;
                }
                c.flush()?;
            }
            busy += t.elapsed().as_secs_f64();
            next += 1;
            // Room for one more group (never full: each credit given back was taken).
            let _ = group_credits.try_send(());
        }
        if groups == Some(next) {
            let t = Instant::now();
            let committed = file.finish()?;
            return Ok(Written {
                write: busy + t.elapsed().as_secs_f64(),
                format,
                committed: Some(committed),
            });
        }
    }
    // The run failed (no `Finish`): drop the temporary file (the cache keeps what was computed).
    anyhow::ensure!(
        groups.is_none(),
        "internal error: rows of {} went missing before the writer",
        output.display()
    );
    Ok(Written {
        write: busy,
        format,
        committed: None,
    })
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use crossbeam_channel::bounded;

    use super::*;
    use crate::output::csv::{CsvRows, CsvWriter};

    /// Groups formatted on several threads finish out of order; the CSV keeps tile order, is
    /// committed only once every group is written, and a credit comes back for each group.
    #[test]
    fn parallel_formatting_keeps_rows_in_order() {
        let tiles: Vec<Tile> = (0..203)
            .map(|i| {
                Tile::new(
                    PathBuf::from(format!("/t/{i}.png")),
                    format!("dir,{i}/t{i}.png"),
                )
            })
            .collect();
        let row = |i: usize| OutRow {
            idx: 202 - i,
            sha: [i as u8; 32],
            features: (0..7).map(|k| (i * 7 + k) as f32 / 3.0).collect(),
            hit: i % 2 == 0,
        };
        let names = RowNames::of(&tiles);
        let rows = format_rows(&(0..203).map(row).collect::<Vec<_>>(), names, &CsvRows);
        let want = String::from_utf8(rows).unwrap();
        assert_eq!(want.lines().count(), 203);
        assert!(
            want.starts_with("\"dir,202/t202.png\",0.0,0.33333334,"),
            "{}",
            &want[..40]
        );
        // Groups of 1 to 40 rows, some large ones first so that they finish after later ones.
        let sizes = [40, 35, 1, 30, 2, 1, 25, 3, 40, 26];
        assert_eq!(sizes.iter().sum::<usize>(), 203);
        for finish in [true, false] {
            let d = tempfile::tempdir().unwrap();
            let out = d.path().join("f.csv");
            let info = crate::output::FileInfo {
                dim: 7,
                ..Default::default()
            };
            let csv = Box::new(CsvWriter::create(&out, &info).unwrap());
            let (row_tx, row_rx) = bounded::<WriterMsg>(2);
            let (text_tx, text_rx) = bounded::<Formatted>(2);
            // As the model stage does: a credit per group sent, at most 3 groups not written.
            let (credit_tx, credits) = bounded::<()>(3);
            for _ in 0..3 {
                credit_tx.send(()).unwrap();
            }
            let written = std::thread::scope(|scope| {
                for _ in 0..3 {
                    let (row_rx, text_tx) = (row_rx.clone(), text_tx.clone());
                    scope.spawn(|| format_loop(row_rx, text_tx, names, &CsvRows));
                }
                drop((row_rx, text_tx));
                let writer =
                    scope.spawn(|| writer_loop(text_rx, credit_tx, csv, None, &out, names));
                let mut first = 0;
                for (seq, n) in sizes.iter().enumerate() {
                    credits.recv().unwrap();
                    let rows = (first..first + n).map(row).collect();
                    first += n;
                    let seq = seq as u64;
                    row_tx.send(WriterMsg::Rows { seq, rows }).unwrap();
                }
                if finish {
                    let groups = sizes.len() as u64;
                    row_tx.send(WriterMsg::Finish { groups }).unwrap();
                }
                drop(row_tx);
                writer.join().unwrap().unwrap()
            });
            assert!(written.write >= 0.0 && written.format > 0.0);
            assert_eq!(written.committed.is_some(), finish);
            if let Some((staged, c)) = written.committed {
                use sha2::{Digest, Sha256};
                assert!(!out.exists(), "renamed only with its side files");
                staged.commit().unwrap();
                let bytes = std::fs::read(&out).unwrap();
                assert_eq!(c.sha256, hex::encode(Sha256::digest(&bytes)));
                assert_eq!(c.bytes, bytes.len() as u64);
            }
            assert_eq!(credits.len(), 3, "a credit back for each group written");
            if finish {
                let header = crate::output::csv_header(&["tile"], 7);
                assert_eq!(std::fs::read_to_string(&out).unwrap(), header + &want);
            } else {
                // No `Finish`: a failed run, nothing under the final name.
                assert!(!out.exists());
            }
        }
    }
}
