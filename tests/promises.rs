//! What `extract` prints: nothing at all with `--quiet`; off a terminal (a Slurm log), a
//! progress line every 10 s and the summary at the end.

mod common;

use common::*;

#[test]
fn quiet_prints_nothing() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("x.csv");
    // Random weights and a skipped tile would each print a warning without --quiet.
    let tiles = d.path().join("s");
    copy_dir(&demo_sample("sampleC"), &tiles);
    std::fs::write(tiles.join("broken.png"), b"not a png").unwrap();
    extract_cmd(&tiles, &out)
        .args(["--quiet", "--on-error", "skip", "--size", "32"])
        .assert()
        .success()
        .stdout("")
        .stderr("");
    assert_eq!(prov_u64(&out, &["tiles", "skipped"]), 1);
    // The same run without --quiet does print (so the check above can fail).
    let o = extract_cmd(&tiles, &out)
        .args(["--on-error", "skip", "--size", "32"])
        .output()
        .unwrap();
    let err = String::from_utf8(o.stderr).unwrap();
    assert!(
        err.contains("RANDOM WEIGHTS") && err.contains("skipping") && err.contains("tiles/s"),
        "{err}"
    );
}

/// A run of about 13 s (each batch held 1 s by the test switch) logs its progress once,
/// at 10 s, as a plain line, then its summary.
#[test]
fn a_log_line_every_10_s_off_a_terminal() {
    let d = tempfile::tempdir().unwrap();
    let tiles = d.path().join("s");
    make_tiles(&tiles, 13, 40);
    let out = d.path().join("x.csv");
    let t = std::time::Instant::now();
    let o = extract_cmd(&tiles, &out)
        .args(["--size", "32", "--batch-size", "1", "--threads", "1"])
        .env("TILEFEAT_TEST_BATCH_DELAY_MS", "1000")
        .output()
        .unwrap();
    assert!(o.status.success());
    let secs = t.elapsed().as_secs_f64();
    assert!(secs > 12.0, "the run took {secs:.1} s");
    let err = String::from_utf8(o.stderr).unwrap();
    let progress: Vec<&str> = err.lines().filter(|l| l.contains("/13 tiles (")).collect();
    assert_eq!(
        progress.len(),
        1,
        "one line per 10 s in a {secs:.0} s run:\n{err}"
    );
    assert!(
        progress[0].starts_with("tilefeat: ") && progress[0].contains("tiles/s"),
        "{err}"
    );
    assert!(
        err.contains("13 tiles (13 computed, 0 cached, 0 skipped)"),
        "{err}"
    );
    assert!(
        !err.contains('\r') && !err.contains("\x1b["),
        "no terminal bar in a log"
    );
}
