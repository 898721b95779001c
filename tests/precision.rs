//! The README's precision figures, held: on the 15 demo tiles, CPU bf16 and fp16 against
//! fp32 (max |diff| / max |feature| per tile, and cosine similarity), and the NCHW layout
//! against NHWC (the default). The GPU rows are held by `scripts/gpu-check.sh`.

mod common;

use common::*;
use std::path::Path;

fn rows(csv: &Path) -> Vec<(String, Vec<f64>)> {
    let mut r = csv::Reader::from_path(csv).unwrap();
    r.records()
        .map(|rec| {
            let rec = rec.unwrap();
            let v = rec
                .iter()
                .skip(1)
                .map(|x| x.parse::<f64>().unwrap())
                .collect();
            (rec[0].to_string(), v)
        })
        .collect()
}

/// (worst max-relative error over tiles, lowest cosine) of `csv` against `reference`.
fn compare(csv: &Path, reference: &Path) -> (f64, f64) {
    let (a, b) = (rows(csv), rows(reference));
    assert_eq!(a.len(), b.len());
    let mut worst = (0f64, 1f64);
    for ((ta, x), (tb, y)) in a.iter().zip(&b) {
        assert_eq!(ta, tb);
        assert_eq!(x.len(), 2048);
        let scale = y.iter().fold(0f64, |m, v| m.max(v.abs()));
        let diff = x.iter().zip(y).fold(0f64, |m, (p, q)| m.max((p - q).abs()));
        let dot: f64 = x.iter().zip(y).map(|(p, q)| p * q).sum();
        let norm = |v: &[f64]| v.iter().map(|p| p * p).sum::<f64>().sqrt();
        worst.0 = worst.0.max(diff / scale);
        worst.1 = worst.1.min(dot / (norm(x) * norm(y)));
    }
    worst
}

#[test]
fn cpu_precisions_and_layouts_agree_with_fp32_within_the_readme_figures() {
    let d = tempfile::tempdir().unwrap();
    let tiles = d.path().join("tiles");
    std::fs::create_dir_all(&tiles).unwrap();
    for s in ["sampleA", "sampleB", "sampleC"] {
        for e in std::fs::read_dir(demo_sample(s)).unwrap() {
            let p = e.unwrap().path();
            let name = format!("{s}-{}", p.file_name().unwrap().to_str().unwrap());
            std::fs::copy(&p, tiles.join(name)).unwrap();
        }
    }
    let run = |name: &str, extra: &[&str]| {
        let out = d.path().join(format!("{name}.csv"));
        let mut args = vec!["--no-cache", "--device", "cpu"];
        args.extend_from_slice(extra);
        extract_ok(&tiles, &out, &args);
        out
    };
    let fp32 = run("fp32", &[]);
    assert_eq!(read(&fp32).lines().count(), 16, "15 demo tiles");
    // README "Precision": CPU bf16 1.2e-2 / 0.99997, fp16 1.6e-3 / 0.999998.
    let (rel, cos) = compare(&run("bf16", &["--precision", "bf16"]), &fp32);
    assert!(rel > 0.0 && rel <= 1.2e-2, "bf16: max relative error {rel}");
    assert!(cos >= 0.99997, "bf16: cosine {cos}");
    let (rel, cos) = compare(&run("fp16", &["--precision", "fp16"]), &fp32);
    assert!(rel > 0.0 && rel <= 1.6e-3, "fp16: max relative error {rel}");
    assert!(cos >= 0.999998, "fp16: cosine {cos}");
    // Another memory layout, other kernels: the same numbers to 1e-5.
    let (rel, cos) = compare(&run("nchw", &["--layout", "nchw"]), &fp32);
    assert!(rel <= 1e-5, "nchw vs nhwc: max relative error {rel}");
    assert!(cos >= 0.9999999, "nchw vs nhwc: cosine {cos}");
}
