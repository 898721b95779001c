//! Black-box tests of `tilefeat join`.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use predicates::prelude::*;

/// Per-sample CSVs for the three demo samples.
fn extract_samples(dir: &Path) -> Vec<PathBuf> {
    ["sampleA", "sampleB", "sampleC"]
        .iter()
        .map(|s| {
            let out = dir.join(format!("{s}.csv"));
            extract_ok(&demo_sample(s), &out, &["--threads", "1"]);
            out
        })
        .collect()
}

#[test]
fn join_streams_samples_and_aggregates() {
    let d = tempfile::tempdir().unwrap();
    let csvs = extract_samples(d.path());
    let cohort = d.path().join("cohort.csv");
    let mut cmd = tilefeat();
    cmd.arg("join");
    for c in &csvs {
        cmd.arg(c);
    }
    cmd.args(["-o", cohort.to_str().unwrap()])
        .assert()
        .success();
    let text = read(&cohort);
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("sample,tile,0,1,"));
    assert_eq!(lines.len(), 1 + 6 + 5 + 4);
    // Rows are the per-sample rows, byte for byte, with the sample prepended.
    let a = read(&csvs[0]);
    for (row, orig) in lines[1..7].iter().zip(a.lines().skip(1)) {
        assert_eq!(*row, format!("sampleA,{orig}"));
    }
    assert!(lines[7].starts_with("sampleB,tile_020_020.png,"));

    // --from-list and --aggregate mean: one row per sample.
    let list = d.path().join("list.txt");
    std::fs::write(
        &list,
        csvs.iter()
            .map(|p| p.file_name().unwrap().to_string_lossy() + "\n")
            .collect::<String>(),
    )
    .unwrap();
    let mean = d.path().join("mean.csv");
    join_list(&list, &mean, "mean");
    let m = read(&mean);
    let mlines: Vec<&str> = m.lines().collect();
    assert_eq!(mlines.len(), 4);
    assert!(mlines[0].starts_with("sample,n_tiles,0,"));
    assert!(mlines[2].starts_with("sampleB,5,"));
    // The mean of feature 0 over sample C's tiles equals what the CSV says.
    let c = read(&csvs[2]);
    let vals: Vec<f64> = c
        .lines()
        .skip(1)
        .map(|l| l.split(',').nth(1).unwrap().parse().unwrap())
        .collect();
    let expect = (vals.iter().sum::<f64>() / vals.len() as f64) as f32;
    let got: f32 = mlines[3].split(',').nth(2).unwrap().parse().unwrap();
    assert_eq!(got, expect);
    let max = d.path().join("max.csv");
    join_list(&list, &max, "max");
    let got: f32 = read(&max)
        .lines()
        .nth(3)
        .unwrap()
        .split(',')
        .nth(2)
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(got, vals.iter().cloned().fold(f64::MIN, f64::max) as f32);
    assert!(read(&cohort.with_extension("provenance.yaml")).contains("samples: 3"));
}

#[test]
fn join_refuses_bad_inputs_and_writes_nothing() {
    let d = tempfile::tempdir().unwrap();
    let csvs = extract_samples(d.path());
    let cohort = d.path().join("cohort.csv");
    let join = |inputs: &[&Path]| {
        let mut c = tilefeat();
        c.arg("join");
        for i in inputs {
            c.arg(i);
        }
        c.args(["-o", cohort.to_str().unwrap()]);
        c
    };
    // Duplicate sample.
    join(&[&csvs[0], &csvs[0]])
        .assert()
        .code(3)
        .stderr(predicate::str::contains("duplicate sample ID \"sampleA\""));
    // Different fingerprint.
    let other = d.path().join("other.csv");
    extract_ok(
        &demo_sample("sampleC"),
        &other,
        &["--sample", "sampleD", "--pool", "avg"],
    );
    join(&[&csvs[0], &other]).assert().code(3).stderr(
        predicate::str::contains("other.csv").and(predicate::str::contains("not comparable")),
    );
    // Truncated CSV.
    let trunc_dir = d.path().join("t");
    std::fs::create_dir(&trunc_dir).unwrap();
    let trunc = trunc_dir.join("sampleB.csv");
    let text = read(&csvs[1]);
    std::fs::write(&trunc, &text[..text.len() - 5000]).unwrap();
    std::fs::copy(
        csvs[1].with_extension("provenance.yaml"),
        trunc.with_extension("provenance.yaml"),
    )
    .unwrap();
    join(&[&csvs[0], &trunc])
        .assert()
        .code(3)
        .stderr(predicate::str::contains("t/sampleB.csv"));
    // A whole row missing (still well-formed): caught by the row count.
    let lines: Vec<&str> = text.lines().collect();
    std::fs::write(&trunc, lines[..lines.len() - 1].join("\n") + "\n").unwrap();
    join(&[&csvs[0], &trunc])
        .assert()
        .code(3)
        .stderr(predicate::str::contains(
            "has 4 rows but its provenance records 5",
        ));
    // Empty file; missing provenance.
    let empty = d.path().join("empty.csv");
    std::fs::write(&empty, "").unwrap();
    join(&[&empty])
        .assert()
        .code(3)
        .stderr(predicate::str::contains("is empty"));
    let lonely = d.path().join("lonely.csv");
    std::fs::copy(&csvs[0], &lonely).unwrap();
    join(&[&lonely])
        .assert()
        .code(3)
        .stderr(predicate::str::contains("no provenance file"));
    assert!(!cohort.exists(), "nothing written under the final name");
    assert!(files_containing(d.path(), ".tilefeat-tmp.").is_empty());
}

/// `tilefeat join --from-list LIST -o OUT --aggregate HOW`, which must succeed.
fn join_list(list: &Path, out: &Path, aggregate: &str) {
    tilefeat()
        .args(["join", "--from-list", list.to_str().unwrap()])
        .args(["-o", out.to_str().unwrap(), "--aggregate", aggregate])
        .assert()
        .success();
}

/// The values of a per-sample CSV as `join` reads them (f32), row by row.
fn values(csv: &Path) -> Vec<Vec<f32>> {
    read(csv)
        .lines()
        .skip(1)
        .map(|l| l.split(',').skip(1).map(|v| v.parse().unwrap()).collect())
        .collect()
}

/// `--aggregate mean|max`: every feature of every sample (means summed in f64 over the f32
/// values, as documented), and the random-weights warning on stderr and in the provenance.
#[test]
fn aggregates_hold_for_every_feature_of_every_sample() {
    let d = tempfile::tempdir().unwrap();
    let csvs = extract_samples(d.path());
    for how in ["mean", "max"] {
        let out = d.path().join(format!("{how}.csv"));
        let mut cmd = tilefeat();
        cmd.arg("join");
        cmd.args(&csvs);
        cmd.args(["-o", out.to_str().unwrap(), "--aggregate", how])
            .assert()
            .success()
            .stderr(predicate::str::contains("WARNING: RANDOM WEIGHTS"));
        assert!(
            read(&out.with_extension("provenance.yaml")).starts_with("# WARNING: RANDOM WEIGHTS")
        );
        let text = read(&out);
        let rows: Vec<&str> = text.lines().skip(1).collect();
        assert_eq!(rows.len(), 3);
        for (row, csv) in rows.iter().zip(&csvs) {
            let v = values(csv);
            let got: Vec<f32> = row.split(',').skip(2).map(|x| x.parse().unwrap()).collect();
            assert_eq!(got.len(), 2048);
            assert_eq!(row.split(',').nth(1).unwrap(), v.len().to_string());
            for (k, g) in got.iter().enumerate() {
                let want = match how {
                    "mean" => (v.iter().map(|r| r[k] as f64).sum::<f64>() / v.len() as f64) as f32,
                    _ => v.iter().map(|r| r[k]).fold(f32::NEG_INFINITY, f32::max),
                };
                assert_eq!(
                    g.to_bits(),
                    want.to_bits(),
                    "{how}, {}, feature {k}",
                    csv.display()
                );
            }
        }
    }
}

/// A header whose width disagrees with its provenance's feature dimension is refused.
#[test]
fn a_header_that_disagrees_with_its_provenance_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let csvs = extract_samples(d.path());
    let text = read(&csvs[1]);
    let (header, rest) = text.split_once('\n').unwrap();
    let short = header.rsplit_once(',').unwrap().0; // tile,0..2046
    std::fs::write(&csvs[1], format!("{short}\n{rest}")).unwrap();
    tilefeat()
        .arg("join")
        .args(&csvs)
        .args(["-o", d.path().join("c.csv").to_str().unwrap()])
        .assert()
        .code(3)
        .stderr(
            predicate::str::contains("sampleB.csv").and(predicate::str::contains("2048 features")),
        );
}

/// Peak memory of `join` over 40 inputs is that over one: inputs are streamed, one at a time.
#[test]
fn join_memory_does_not_grow_with_the_inputs() {
    let d = tempfile::tempdir().unwrap();
    let tiles = d.path().join("tiles");
    make_tiles(&tiles, 200, 40);
    let one = d.path().join("s0.csv");
    extract_ok(&tiles, &one, &["--size", "32", "--sample", "s0"]);
    let prov = read(&one.with_extension("provenance.yaml"));
    let mut inputs = vec![one.clone()];
    for k in 1..40 {
        let p = d.path().join(format!("s{k}.csv"));
        std::fs::copy(&one, &p).unwrap();
        let renamed = prov.replace("\nsample: s0\n", &format!("\nsample: s{k}\n"));
        assert_ne!(renamed, prov);
        std::fs::write(p.with_extension("provenance.yaml"), renamed).unwrap();
        inputs.push(p);
    }
    let csv_mb = std::fs::metadata(&one).unwrap().len() as f64 / 1e6;
    let peak_kb = |inputs: &[PathBuf], how: &str| -> i64 {
        let out = d.path().join(format!("cohort-{how}-{}.csv", inputs.len()));
        let mut args = vec![std::ffi::OsStr::new("join")];
        args.extend(inputs.iter().map(|p| p.as_os_str()));
        for a in [
            "-o".as_ref(),
            out.as_os_str(),
            "--quiet".as_ref(),
            "--aggregate".as_ref(),
            how.as_ref(),
        ] {
            args.push(a);
        }
        peak_rss_kib(&args)
    };
    for how in ["none", "mean"] {
        let (small, large) = (peak_kb(&inputs[..1], how), peak_kb(&inputs, how));
        // Holding the inputs would add 39 x the CSV (tens of MB); allow 8 MB of noise.
        assert!(
            large - small < 8 * 1024,
            "{how}: peak RSS {large} KiB over 40 inputs of {csv_mb:.1} MB vs {small} KiB over one"
        );
        assert!(
            39.0 * csv_mb > 40.0,
            "the inputs are large enough to show ({csv_mb:.1} MB each)"
        );
    }
}
