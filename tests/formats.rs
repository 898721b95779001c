//! Black-box tests of the feature file formats (CSV, HDF5, Parquet), tile coordinates from
//! tile names, and `join` across formats (issue 17). Python tests (tests/python/test_formats.py)
//! read the same files with h5py and pandas.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use predicates::prelude::*;

/// `n` tiles named as histolab names them (level 0, 512 px apart, 224 px tiles).
fn histolab_tiles(dir: &Path, n: usize) -> PathBuf {
    let tiles = dir.join("histolab");
    let tmp = dir.join("plain");
    for (i, p) in make_tiles(&tmp, n, 224).iter().enumerate() {
        let (x, y) = ((i % 5) * 512, (i / 5) * 512);
        let name = format!("tile_{i}_level0_{x}-{y}-{}-{}.png", x + 512, y + 512);
        std::fs::create_dir_all(&tiles).unwrap();
        std::fs::rename(p, tiles.join(name)).unwrap();
    }
    tiles
}

/// Tiles named by `name(i)`.
fn named_tiles(dir: &Path, sub: &str, n: usize, name: impl Fn(usize) -> String) -> PathBuf {
    let tiles = dir.join(sub);
    let tmp = dir.join(format!("{sub}-src"));
    std::fs::create_dir_all(&tiles).unwrap();
    for (i, p) in make_tiles(&tmp, n, 64).iter().enumerate() {
        std::fs::rename(p, tiles.join(name(i))).unwrap();
    }
    tiles
}

fn join_to(inputs: &[&Path], out: &Path, extra: &[&str]) {
    let mut c = tilefeat();
    c.arg("join").args(inputs).arg("-o").arg(out).arg("--quiet");
    c.args(extra).assert().success();
}

fn stderr_of(c: &mut assert_cmd::Command) -> (i32, String) {
    let o = c.output().unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// The format follows the extension; every format holds the same rows and values: each joined
/// back to CSV gives the same bytes as the CSV with coordinates. Also across batch sizes
/// (Parquet byte for byte) and with the cache filled by another format (all hits).
#[test]
fn every_format_holds_the_same_rows() {
    let d = tempfile::tempdir().unwrap();
    let tiles = histolab_tiles(d.path(), 23);
    let dirs: Vec<PathBuf> = ["csv", "h5", "parquet", "hdf5"]
        .iter()
        .map(|f| {
            let p = d.path().join(f);
            std::fs::create_dir_all(&p).unwrap();
            p
        })
        .collect();
    let cache = d.path().join("cache");
    let cache_arg = ["--cache-dir", cache.to_str().unwrap()];
    let csv = dirs[0].join("s.csv");
    extract_ok(
        &tiles,
        &csv,
        &[&["--coords", "auto"][..], &cache_arg].concat(),
    );
    let h5 = dirs[1].join("s.h5");
    extract_ok(
        &tiles,
        &h5,
        &[&["--batch-size", "5"][..], &cache_arg].concat(),
    );
    assert_eq!(
        prov_u64(&h5, &["tiles", "cache_hits"]),
        23,
        "format is not in the key"
    );
    let pq = dirs[2].join("s.parquet");
    extract_ok(&tiles, &pq, &["--batch-size", "7"]);
    let pq32 = dirs[2].join("s32.parquet");
    extract_ok(&tiles, &pq32, &["--batch-size", "32", "--threads", "1"]);
    assert_eq!(
        std::fs::read(&pq).unwrap(),
        std::fs::read(&pq32).unwrap(),
        "Parquet bytes depend on the batch size"
    );
    let hdf5 = dirs[3].join("s.HDF5");
    extract_ok(&tiles, &hdf5, &[]);
    let header = read(&csv).lines().next().unwrap().to_string();
    assert!(header.starts_with("tile,x,y,0,1,"), "{header}");
    let first = read(&csv).lines().nth(1).unwrap().to_string();
    assert!(
        first.starts_with("tile_0_level0_0-0-512-512.png,0,0,"),
        "{first}"
    );
    let joined: Vec<String> = [&csv, &h5, &pq, &hdf5]
        .iter()
        .enumerate()
        .map(|(k, f)| {
            let out = d.path().join(format!("j{k}.csv"));
            join_to(&[f], &out, &[]);
            read(&out)
        })
        .collect();
    for (k, j) in joined.iter().enumerate() {
        assert_eq!(j, &joined[0], "format {k} differs from the CSV");
    }
    assert_eq!(joined[0].lines().count(), 24);
    // Provenance says the format and the convention.
    let p = provenance(&h5);
    assert_eq!(p["format"].as_str(), Some("h5"));
    assert_eq!(p["coords"]["convention"].as_str(), Some("histolab"));
    assert_eq!(p["coords"]["origin"].as_str(), Some("top-left"));
    assert_eq!(p["coords"]["in_output"].as_bool(), Some(true));
    // The default CSV keeps the tutorial's columns, and records the convention it found.
    let plain = dirs[0].join("plain.csv");
    extract_ok(&tiles, &plain, &[]);
    assert!(read(&plain).starts_with("tile,0,1,"));
    assert_eq!(
        provenance(&plain)["coords"]["in_output"].as_bool(),
        Some(false)
    );
    // A cohort in Parquet from mixed formats, and its aggregate.
    let cohort = d.path().join("cohort.parquet");
    let (a, b) = (dirs[1].join("a.h5"), dirs[2].join("b.csv"));
    extract_ok(&tiles, &a, &["--sample", "A"]);
    extract_ok(&tiles, &b, &["--sample", "B", "--coords", "auto"]);
    join_to(&[&a, &b], &cohort, &[]);
    assert!(std::fs::metadata(&cohort).unwrap().len() > 0);
    let csv_cohort = d.path().join("cohort-csv.csv");
    join_to(&[&a, &b], &csv_cohort, &[]);
    assert!(read(&csv_cohort).starts_with("sample,tile,x,y,0,"));
    let agg = d.path().join("agg.parquet");
    join_to(&[&a, &pq], &agg, &["--aggregate", "max"]);
}

#[test]
fn unknown_extensions_and_conflicting_format_are_usage_errors() {
    let d = tempfile::tempdir().unwrap();
    let tiles = demo_sample("sampleC");
    for (out, extra, want) in [
        ("f.txt", vec![], "unknown feature file extension"),
        ("f", vec![], "unknown feature file extension"),
        ("f.csv", vec!["--format", "h5"], "--format is h5"),
        (
            "f.h5",
            vec!["--coords", "(?P<x>\\d+)"],
            "named groups `x` and `y`",
        ),
        ("f.h5", vec!["--coords", "("], "is not a regex"),
    ] {
        let out = d.path().join(out);
        let (code, err) = stderr_of(extract_cmd(&tiles, &out).args(&extra));
        assert_eq!(code, 2, "{out:?} {extra:?}: {err}");
        assert!(err.contains(want), "{err}");
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0, "{err}");
    }
    // --format without an extension, and with --outdir.
    extract_ok(&tiles, &d.path().join("f"), &["--format", "parquet"]);
    let outdir = d.path().join("out");
    tilefeat()
        .args(["extract", tiles.to_str().unwrap(), "--outdir"])
        .arg(&outdir)
        .args(["--format", "h5", "--weights", "random:0", "--quiet"])
        .assert()
        .success();
    assert!(outdir.join("sampleC.h5").is_file());
    assert!(outdir.join("sampleC.provenance.yaml").is_file());
    // join writes CSV or Parquet only.
    let (code, err) = stderr_of(
        tilefeat()
            .arg("join")
            .arg(outdir.join("sampleC.h5"))
            .arg("-o")
            .arg(d.path().join("c.h5")),
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains(".csv or .parquet"), "{err}");
}

/// Names that follow no convention (or mix them): by default no coordinates (and a warning
/// where the format would hold them); with `--coords` given, the sample fails naming a tile.
#[test]
fn mixed_names_give_no_coordinates_or_fail_when_asked() {
    let d = tempfile::tempdir().unwrap();
    let tiles = histolab_tiles(d.path(), 6);
    std::fs::copy(
        demo_sample("sampleA").join("tile_000_000.png"),
        tiles.join("stray.png"),
    )
    .unwrap();
    let h5 = d.path().join("m.h5");
    let o = extract_cmd(&tiles, &h5).output().unwrap();
    assert!(o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("no tile coordinates") && err.contains("stray.png"),
        "{err}"
    );
    let p = provenance(&h5);
    assert!(p["coords"]["missing"]
        .as_str()
        .unwrap()
        .contains("stray.png"));
    assert_eq!(p["coords"]["in_output"].as_bool(), Some(false));
    for flag in ["auto", r"_(?P<x>\d+)-(?P<y>\d+)-"] {
        let out = d.path().join("x.csv");
        let (code, err) = stderr_of(extract_cmd(&tiles, &out).args(["--coords", flag]));
        assert_eq!(code, 3, "{err}");
        assert!(
            err.contains("stray.png") && err.contains("no coordinates"),
            "{err}"
        );
        assert!(!out.exists());
    }
    // --coords none: no coordinates, nothing recorded.
    let none = d.path().join("none.parquet");
    extract_ok(&tiles, &none, &["--coords", "none"]);
    assert!(provenance(&none)["coords"].is_null());
}

/// slideflow names give centres: HDF5 needs the tile extent to store top-left corners, and
/// `join` gives the names' centres back; STAMP's micrometres cannot go into HDF5's pixels.
#[test]
fn centre_and_micrometre_conventions() {
    let d = tempfile::tempdir().unwrap();
    let sf = named_tiles(d.path(), "slideflow", 4, |i| {
        format!("TCGA-01-{}-{}.jpg", 256 + 512 * i, 768)
    });
    // (make_tiles writes PNG bytes; the decoder goes by content.)
    let h5 = d.path().join("sf.h5");
    let (code, err) = stderr_of(&mut extract_cmd(&sf, &h5));
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains("--patch-size-level0") && err.contains("centre"),
        "{err}"
    );
    assert!(!h5.exists());
    extract_ok(&sf, &h5, &["--patch-size-level0", "512"]);
    assert_eq!(prov_u64(&h5, &["coords", "patch_size_level0"]), 512);
    let csv = d.path().join("sf-csv.csv");
    extract_ok(&sf, &csv, &["--coords", "auto"]);
    assert!(read(&csv).contains("\nTCGA-01-256-768.jpg,256,768,"));
    let (j1, j2) = (d.path().join("j1.csv"), d.path().join("j2.csv"));
    join_to(&[&h5], &j1, &[]);
    join_to(&[&csv], &j2, &[]);
    assert_same(&j1, &j2, "slideflow centres through HDF5 and back");

    let stamp = named_tiles(d.path(), "stamp", 3, |i| {
        format!("tile_({}.5, {}.0).jpg", 100 * i, 50)
    });
    let (code, err) = stderr_of(&mut extract_cmd(&stamp, &d.path().join("st.h5")));
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("micrometres"), "{err}");
    let pq = d.path().join("st.parquet");
    extract_ok(&stamp, &pq, &[]);
    assert_eq!(
        provenance(&pq)["coords"]["unit"].as_str(),
        Some("micrometres")
    );
    let csv = d.path().join("st-csv.csv");
    extract_ok(&stamp, &csv, &["--coords", "auto"]);
    assert!(read(&csv)
        .lines()
        .nth(1)
        .unwrap()
        .starts_with("\"tile_(0.5, 50.0).jpg\",0.5,50,"));
}

/// Regression: `join` put pixel and micrometre coordinates in one `x,y` column (exit 0), and
/// top-left corners beside slideflow's centres. Inputs whose coordinates differ in origin or
/// unit are refused, naming both samples; a cohort whose x,y agree records what they mean.
#[test]
fn join_refuses_coordinates_that_mean_different_things() {
    let d = tempfile::tempdir().unwrap();
    let hl = histolab_tiles(d.path(), 3);
    let sf = named_tiles(d.path(), "slideflow", 3, |i| {
        format!("s-{}-768.jpg", 256 + 512 * i)
    });
    let st = named_tiles(d.path(), "stamp", 3, |i| {
        format!("tile_({}.5, 50.0).jpg", 100 * i)
    });
    let out = |n: &str| d.path().join(n);
    extract_ok(&hl, &out("A.parquet"), &["--sample", "A", "--size", "32"]);
    extract_ok(&sf, &out("B.parquet"), &["--sample", "B", "--size", "32"]);
    extract_ok(&st, &out("C.parquet"), &["--sample", "C", "--size", "32"]);
    extract_ok(&hl, &out("D.h5"), &["--sample", "D", "--size", "32"]);
    for (other, what) in [
        ("B.parquet", "centre in level-0 pixels"),
        ("C.parquet", "top-left in micrometres"),
    ] {
        let cohort = out("c.csv");
        let mut c = tilefeat();
        c.arg("join")
            .arg(out("A.parquet"))
            .arg(out(other))
            .arg("-o")
            .arg(&cohort);
        let (code, err) = stderr_of(&mut c);
        assert_eq!(code, 3, "{err}");
        assert!(
            err.contains(what) && err.contains("sample A") && err.contains(other),
            "{err}"
        );
        assert!(!cohort.exists());
    }
    // The same meaning (histolab top-left pixels, from Parquet and from HDF5): joined, and
    // the cohort's provenance says what x,y are.
    let cohort = out("ok.csv");
    join_to(&[&out("A.parquet"), &out("D.h5")], &cohort, &[]);
    let prov: serde_yaml::Value = serde_yaml::from_str(&read(&out("ok.provenance.yaml"))).unwrap();
    assert_eq!(prov["coords_origin"].as_str(), Some("top-left"));
    assert_eq!(prov["coords_unit"].as_str(), Some("level-0 pixels"));
}

/// Corrupt, truncated or foreign HDF5 and Parquet files given to `join`: exit 3 naming the
/// file, no cohort written.
#[test]
fn join_refuses_corrupt_or_foreign_binary_files() {
    let d = tempfile::tempdir().unwrap();
    let tiles = histolab_tiles(d.path(), 5);
    let cohort = d.path().join("cohort.csv");
    for ext in ["h5", "parquet"] {
        let good = d.path().join(format!("good-{ext}.{ext}"));
        extract_ok(&tiles, &good, &[]);
        let bytes = std::fs::read(&good).unwrap();
        let prov = read(&good.with_extension("provenance.yaml"));
        let cases: [(&str, Vec<u8>); 3] = [
            ("truncated", bytes[..bytes.len() / 2].to_vec()),
            ("garbage", b"not a feature file at all\n".repeat(40)),
            ("flipped", {
                let mut b = bytes.clone();
                let n = b.len();
                b[n - n / 3] ^= 0xff;
                b
            }),
        ];
        for (what, content) in cases {
            let bad = d.path().join(format!("{what}-{ext}.{ext}"));
            std::fs::write(&bad, &content).unwrap();
            let prov = prov.replace("sample: histolab", &format!("sample: {what}"));
            std::fs::write(bad.with_extension("provenance.yaml"), prov).unwrap();
            let (code, err) = stderr_of(
                tilefeat()
                    .arg("join")
                    .arg(&good)
                    .arg(&bad)
                    .arg("-o")
                    .arg(&cohort),
            );
            assert_eq!(code, 3, "{what}.{ext}: {err}");
            assert!(
                err.contains(&format!("{what}-{ext}.{ext}")),
                "{what}.{ext}: {err}"
            );
            assert!(!cohort.exists(), "{what}.{ext}");
        }
    }
    // A foreign but valid HDF5 (another tool's layout) with a tilefeat provenance beside it.
    let good = d.path().join("good-h5.h5");
    let foreign = d.path().join("foreign.h5");
    {
        let f = hdf5::File::create(&foreign).unwrap();
        f.new_dataset::<f32>()
            .shape((5, 7))
            .create("feats")
            .unwrap();
    }
    std::fs::write(
        foreign.with_extension("provenance.yaml"),
        read(&good.with_extension("provenance.yaml")).replace("sample: histolab", "sample: f"),
    )
    .unwrap();
    tilefeat()
        .arg("join")
        .arg(&good)
        .arg(&foreign)
        .arg("-o")
        .arg(&cohort)
        .assert()
        .code(3)
        .stderr(predicate::str::contains("foreign.h5").and(predicate::str::contains("features")));
}

/// `x.csv` and `x.h5` share `x.provenance.yaml`: writing one beside the other is refused
/// (exit 6), and the first keeps its provenance.
#[test]
fn formats_beside_each_other_do_not_take_each_others_provenance() {
    let d = tempfile::tempdir().unwrap();
    let tiles = demo_sample("sampleC");
    let csv = d.path().join("x.csv");
    extract_ok(&tiles, &csv, &[]);
    let before = read(&csv.with_extension("provenance.yaml"));
    let (code, err) = stderr_of(&mut extract_cmd(&tiles, &d.path().join("x.h5")));
    assert_eq!(code, 6, "{err}");
    assert!(err.contains("x.csv") && err.contains("provenance"), "{err}");
    assert_eq!(read(&csv.with_extension("provenance.yaml")), before);
    assert!(!d.path().join("x.h5").exists());
    // Rerunning the same output is fine.
    extract_ok(&tiles, &csv, &[]);
    // The same for join's cohort files.
    let cohort = d.path().join("c.csv");
    tilefeat()
        .args(["join", "--quiet"])
        .arg(&csv)
        .arg("-o")
        .arg(&cohort)
        .assert()
        .success();
    tilefeat()
        .args(["join", "--quiet"])
        .arg(&csv)
        .arg("-o")
        .arg(d.path().join("c.parquet"))
        .assert()
        .code(6)
        .stderr(predicate::str::contains("c.csv"));
    assert!(!d.path().join("c.parquet").exists());
}

/// A run that fails mid-way leaves no HDF5 or Parquet file (nor a temporary one).
#[test]
fn failed_runs_leave_no_binary_file() {
    let d = tempfile::tempdir().unwrap();
    let tiles = d.path().join("t");
    make_tiles(&tiles, 40, 64);
    std::fs::write(tiles.join("tile_zzz.png"), b"\x89PNG\r\n\x1a\nbroken").unwrap();
    let out = d.path().join("o");
    std::fs::create_dir_all(&out).unwrap();
    for name in ["f.h5", "f.parquet"] {
        let (code, err) =
            stderr_of(extract_cmd(&tiles, &out.join(name)).args(["--batch-size", "4"]));
        assert_eq!(code, 3, "{err}");
        assert!(err.contains("tile_zzz.png"), "{err}");
        assert_eq!(
            std::fs::read_dir(&out).unwrap().count(),
            0,
            "{name}: files left behind"
        );
    }
}

/// HDF5 is linked in statically (hdf5-metno's bundled build): a cluster node needs no libhdf5.
/// Read from the binary's dynamic section, where libtorch must show (so the listing is real).
#[test]
fn the_binary_needs_no_libhdf5() {
    let out = std::process::Command::new("readelf")
        .args(["-d", env!("CARGO_BIN_EXE_tilefeat")])
        .output()
        .expect("readelf (binutils) runs");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let needed: Vec<&str> = text.lines().filter(|l| l.contains("(NEEDED)")).collect();
    assert!(
        needed.iter().any(|l| l.contains("libtorch_cpu.so")),
        "{text}"
    );
    assert!(
        !needed
            .iter()
            .any(|l| l.to_ascii_lowercase().contains("hdf5")),
        "{needed:?}"
    );
}
