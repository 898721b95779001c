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
    // The same run without --quiet does print (so the check above can fail); to another
    // file, or it would be up to date.
    let o = extract_cmd(&tiles, &d.path().join("y.csv"))
        .args(["--on-error", "skip", "--size", "32"])
        .output()
        .unwrap();
    let err = String::from_utf8(o.stderr).unwrap();
    assert!(
        err.contains("RANDOM WEIGHTS") && err.contains("skipping") && err.contains("tiles/s"),
        "{err}"
    );
}

/// A run of about 13 s (each batch held 1 s by the test switch) off a terminal: a start line
/// naming the sample, a first progress line after 2 s (before, a log stayed silent until the
/// first rows, 12-31 s), then one every 10 s, each with elapsed time, a rounded rate and an
/// ETA; the summary at the end (regression, issue 28).
#[test]
fn progress_lines_at_a_steady_interval_off_a_terminal() {
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
    let start = err
        .lines()
        .position(|l| l.starts_with("tilefeat: sample s: 13 tiles -> "))
        .expect("a start line");
    assert!(
        err.contains("(resnet50 layer4 max on cpu, fp32, batch 1)")
            && err.lines().position(|l| l.contains("/13 tiles (")) > Some(start),
        "the start line, before any progress:\n{err}"
    );
    let progress: Vec<&str> = err.lines().filter(|l| l.contains("/13 tiles (")).collect();
    // At 2 s, 12 s, 22 s, ...: as many as the run's length allows (one more or less for
    // the start-up before the first).
    let expected = 1 + ((secs - 2.0) / 10.0).floor() as usize;
    assert!(
        progress.len() + 1 >= expected && progress.len() <= expected,
        "{} lines in a {secs:.1} s run:\n{err}",
        progress.len()
    );
    let shape = regex::Regex::new(
        r"^tilefeat: \d+/13 tiles \(\d+%\), \d+s elapsed, \d+\.\d tiles/s, ETA (\?|\d+s), \d+ cached$",
    )
    .unwrap();
    for l in &progress {
        assert!(shape.is_match(l), "{l:?}");
    }
    assert!(progress.len() >= 2, "{err}");
    // The interval itself, from the lines' own elapsed times (issue 27: a count alone holds
    // for other intervals): the first at 2 s, then 10 s apart (a second either way for the
    // whole-second display and a busy machine's late wake-up).
    let elapsed: Vec<u64> = progress
        .iter()
        .map(|l| {
            let (_, rest) = l.split_once("), ").unwrap();
            rest.split_once("s elapsed").unwrap().0.parse().unwrap()
        })
        .collect();
    assert!(
        (2..=3).contains(&elapsed[0]),
        "first line at {elapsed:?}:\n{err}"
    );
    for w in elapsed.windows(2) {
        assert!(
            (9..=11).contains(&(w[1] - w[0])),
            "lines at {elapsed:?}:\n{err}"
        );
    }
    assert!(
        err.contains("13 tiles (13 computed, 0 cached, 0 skipped)"),
        "{err}"
    );
    assert!(
        !err.contains('\r') && !err.contains("\x1b["),
        "no terminal bar in a log"
    );
}

/// On a terminal (a pseudo-terminal made by `script`): a bar that moves tile by tile (with
/// `--batch-size 1`; on the CPU the default batch of 4 moves it every 4 tiles), with the
/// elapsed time and a rounded rate, and no plain progress lines.
#[test]
fn a_bar_that_moves_on_a_terminal() {
    let d = tempfile::tempdir().unwrap();
    let tiles = d.path().join("s");
    make_tiles(&tiles, 6, 40);
    let out = d.path().join("x.csv");
    let cmd = format!(
        "{} extract {} -o {} --weights random:0 --size 32 --batch-size 1 --threads 1",
        assert_cmd::cargo::cargo_bin("tilefeat").display(),
        tiles.display(),
        out.display()
    );
    let o = std::process::Command::new("script")
        .args(["-qefc", &cmd, "/dev/null"])
        .env("TILEFEAT_TEST_BATCH_DELAY_MS", "700")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{text}");
    for n in 1..=5 {
        assert!(
            text.contains(&format!(" {n}/6 tiles")),
            "position {n}/6:\n{text:?}"
        );
    }
    assert!(text.contains("[00:00:0"), "elapsed time:\n{text:?}");
    let rate = regex::Regex::new(r"\d+\.\d tiles/s, ETA ").unwrap();
    assert!(rate.is_match(&text), "{text:?}");
    assert!(
        !text.contains("/6 tiles ("),
        "no log lines on a terminal:\n{text:?}"
    );
}
