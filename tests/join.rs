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
