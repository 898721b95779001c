//! Reruns resume by themselves (issue 28): without cache flags a run keeps its vectors in the
//! default cache beside its outputs, so an interrupted run continues where it stopped, and a
//! finished one rerun is "up to date" and writes nothing unless the tiles, the settings that
//! change a number or the model changed, or `--force` is given.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;

/// `extract TILES -o OUT --weights random:0 --size 32 --device cpu`, with no cache flag at
/// all (the helpers of the other tests add `--no-cache`). On the CPU on a GPU host too: the
/// runs are compared with CPU references.
fn plain_args(tiles: &Path, out: &Path) -> Vec<std::ffi::OsString> {
    let mut a: Vec<std::ffi::OsString> = vec!["extract".into(), tiles.into(), "-o".into()];
    a.push(out.into());
    a.extend(["--weights", "random:0", "--size", "32", "--device", "cpu"].map(Into::into));
    a
}

/// `plain_args` and `extra` in the background, without the cache variables and with one
/// test-only switch (`name`, `value`); stderr piped for [`signal`].
fn spawn_plain(
    tiles: &Path,
    out: &Path,
    extra: &[&str],
    (name, value): (&str, &str),
) -> std::process::Child {
    std::process::Command::new(assert_cmd::cargo::cargo_bin("tilefeat"))
        .args(plain_args(tiles, out))
        .args(extra)
        .env_remove("TILEFEAT_CACHE_DIR")
        .env_remove("TILEFEAT_DEFAULT_CACHE")
        .env(name, value)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// Poll `ready` every 20 ms for up to 120 s; `what` names what never came.
fn wait_until(what: &str, mut ready: impl FnMut() -> bool) {
    let t = Instant::now();
    while !ready() {
        assert!(t.elapsed() < Duration::from_secs(120), "{what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn plain(tiles: &Path, out: &Path) -> assert_cmd::Command {
    let mut c = tilefeat();
    c.env_remove("TILEFEAT_DEFAULT_CACHE")
        .args(plain_args(tiles, out));
    c
}

fn stderr_of(c: &mut assert_cmd::Command) -> String {
    let o = c.output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "{err}");
    err
}

/// (inode, modification time in ns, bytes) of a file: what "left as it was" leaves alone.
fn identity(p: &Path) -> (u64, i64, Vec<u8>) {
    let m = std::fs::metadata(p).unwrap();
    (
        m.ino(),
        m.mtime() * 1_000_000_000 + m.mtime_nsec(),
        std::fs::read(p).unwrap(),
    )
}

fn index_files(cache: &Path) -> Vec<PathBuf> {
    let packs = cache.join("packs");
    if packs.is_dir() {
        files(&packs, "idx")
    } else {
        vec![]
    }
}

/// Interrupted with Ctrl-C (SIGINT) after some batches were stored, the same command run again
/// takes those from the default cache and computes the rest; the CSV is the uncached run's.
/// Run once more it is up to date: nothing written. A changed tile is computed alone; other
/// numbers-changing settings make a new file; --force recomputes and writes.
#[test]
fn an_interrupted_run_resumes_and_a_finished_one_is_up_to_date() {
    let d = tempfile::tempdir().unwrap();
    let tiles = d.path().join("S1");
    make_tiles(&tiles, 40, 64);
    let reference = d.path().join("ref").join("S1.csv");
    extract_ok(&tiles, &reference, &["--size", "32"]);
    let out = d.path().join("features").join("S1.csv");
    let cache = d.path().join("features").join(".tilefeat-cache");

    // Ten batches of at least 300 ms: interrupted after the first is stored.
    let mut first = spawn_plain(
        &tiles,
        &out,
        &["--batch-size", "4", "--threads", "1", "--quiet"],
        ("TILEFEAT_TEST_BATCH_DELAY_MS", "300"),
    );
    wait_until("nothing stored", || {
        assert!(first.try_wait().unwrap().is_none(), "ended before stored");
        index_files(&cache)
            .iter()
            .any(|p| std::fs::metadata(p).is_ok_and(|m| m.len() > 0))
    });
    let (code, said_err) = signal(first, "INT");
    // Said even with --quiet, as an error is: what happened and what a rerun resumes from.
    assert_eq!(code, Some(130), "128 + SIGINT: {said_err}");
    assert!(
        said_err.contains("tilefeat: interrupted by SIGINT (Ctrl-C)")
            && said_err.contains(&format!(
                "the tiles computed so far are in the cache {}: run the same command to resume",
                cache.display()
            )),
        "{said_err}"
    );
    assert!(
        !out.exists(),
        "no feature file under its name after an interrupt"
    );
    assert_eq!(
        files_containing(out.parent().unwrap(), "tilefeat-tmp"),
        Vec::<String>::new(),
        "the interrupted run's temporaries are removed"
    );

    let err = stderr_of(&mut plain(&tiles, &out));
    assert!(
        err.contains(&format!("; cache {}", cache.display())),
        "the start line says where it resumes from: {err}"
    );
    let hits = prov_u64(&out, &["tiles", "cache_hits"]);
    let computed = prov_u64(&out, &["tiles", "computed"]);
    assert!(hits > 0 && computed > 0, "hits {hits}, computed {computed}");
    assert_eq!(hits + computed, 40);
    assert_eq!(
        provenance(&out)["cache"]["dir"].as_str(),
        Some(cache.to_str().unwrap())
    );
    assert_same(&out, &reference, "resumed");

    // Finished: the same command, and one at another batch size (same numbers), leave the
    // files as they were.
    let prov = out.with_extension("provenance.yaml");
    let (before, prov_before) = (identity(&out), identity(&prov));
    for extra in [&[][..], &["--batch-size", "7"][..]] {
        let err = stderr_of(plain(&tiles, &out).args(extra));
        assert!(
            err.contains("sample S1: up to date")
                && err.contains("(40 from the cache, 0 computed, 0 skipped)"),
            "{extra:?}: {err}"
        );
        assert_eq!(identity(&out), before, "{extra:?}");
        assert_eq!(identity(&prov), prov_before, "{extra:?}");
    }

    // A changed tile is the only one computed, and the file is replaced.
    let changed = image::open(tiles.join("tile_000.png")).unwrap().fliph();
    changed.save(tiles.join("tile_000.png")).unwrap();
    let err = stderr_of(&mut plain(&tiles, &out));
    assert!(!err.contains("up to date"), "{err}");
    assert_eq!(prov_u64(&out, &["tiles", "computed"]), 1);
    assert_eq!(prov_u64(&out, &["tiles", "cache_hits"]), 39);
    assert!(read(&out) != read(&reference), "tile_000's row changed");
    let fresh = d.path().join("fresh").join("S1.csv");
    extract_ok(&tiles, &fresh, &["--size", "32"]);
    assert_same(&out, &fresh, "after a changed tile");

    // A setting that changes the numbers is not up to date.
    let err = stderr_of(plain(&tiles, &out).args(["--layer", "layer3"]));
    assert!(!err.contains("up to date"), "{err}");
    assert_eq!(prov_u64(&out, &["tiles", "computed"]), 40);
    assert!(read(&out) != read(&fresh), "layer3's numbers");

    // --force: every tile computed again, the files written again (same numbers).
    let before = identity(&out);
    let err = stderr_of(plain(&tiles, &out).args(["--layer", "layer3", "--force"]));
    assert!(!err.contains("up to date"), "{err}");
    assert!(err.contains("(--force: not read)"), "{err}");
    assert_eq!(prov_u64(&out, &["tiles", "computed"]), 40);
    assert_eq!(prov_u64(&out, &["tiles", "cache_hits"]), 0);
    let after = identity(&out);
    assert_eq!(after.2, before.2, "same numbers");
    assert_ne!(
        after.0, before.0,
        "written again (a new file renamed into place)"
    );
}

/// Up to date only when the files in place are these and their provenance says so: a
/// deleted provenance, an edited feature file or a deleted rejected list is written again.
#[test]
fn up_to_date_needs_the_files_and_their_provenance() {
    let d = tempfile::tempdir().unwrap();
    let tiles = d.path().join("S2");
    make_tiles(&tiles, 6, 64);
    let out = d.path().join("S2.csv");
    stderr_of(&mut plain(&tiles, &out));
    let clean = read(&out);
    let prov = out.with_extension("provenance.yaml");
    let rejected = out.with_extension("rejected.tsv");
    let breakages: [(&str, &dyn Fn()); 3] = [
        ("provenance deleted", &|| {
            std::fs::remove_file(&prov).unwrap()
        }),
        ("feature file edited", &|| {
            std::fs::write(&out, clean.replacen('0', "1", 1)).unwrap()
        }),
        ("rejected list deleted", &|| {
            std::fs::remove_file(&rejected).unwrap()
        }),
    ];
    for (what, breakage) in breakages {
        breakage();
        let err = stderr_of(&mut plain(&tiles, &out));
        assert!(!err.contains("up to date"), "{what}: {err}");
        assert!(read(&out) == clean, "{what}: the file is written again");
        assert!(prov.is_file() && rejected.is_file(), "{what}");
        assert_eq!(prov_u64(&out, &["tiles", "cache_hits"]), 6, "{what}");
        let err = stderr_of(&mut plain(&tiles, &out));
        assert!(err.contains("up to date"), "{what}, then: {err}");
    }
}

/// The default cache lies in --outdir (shared by its samples) or --output's folder; --no-cache
/// makes none; one that cannot be used (a file in its place) is a warning and the run goes on,
/// where a --cache-dir that cannot be used is exit 7.
#[test]
fn where_the_default_cache_lies_and_when_it_cannot_be_used() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("A"), d.path().join("B"));
    make_tiles(&a, 3, 64);
    make_tiles(&b, 3, 64);
    let outdir = d.path().join("outdir");
    let mut c = tilefeat();
    c.env_remove("TILEFEAT_DEFAULT_CACHE");
    c.arg("extract").args([&a, &b]).arg("--outdir").arg(&outdir);
    c.args([
        "--weights",
        "random:0",
        "--size",
        "32",
        "--quiet",
        "--device",
        "cpu",
    ]);
    c.assert().success();
    assert!(!index_files(&outdir.join(".tilefeat-cache")).is_empty());
    // make_tiles gives both folders the same crops: a later run with --output in that
    // folder finds them in the same cache.
    let again = outdir.join("B-again.csv");
    plain(&b, &again).arg("--quiet").assert().success();
    assert_eq!(prov_u64(&again, &["tiles", "cache_hits"]), 3);

    let none = d.path().join("none");
    plain(&a, &none.join("A.csv"))
        .arg("--no-cache")
        .assert()
        .success();
    assert!(!none.join(".tilefeat-cache").exists());
    assert!(provenance(&none.join("A.csv"))["cache"]["dir"].is_null());

    let blocked = d.path().join("blocked");
    std::fs::create_dir_all(&blocked).unwrap();
    std::fs::write(blocked.join(".tilefeat-cache"), "not a folder").unwrap();
    let err = stderr_of(&mut plain(&a, &blocked.join("A.csv")));
    assert!(
        err.contains("warning: the default cache")
            && err.contains(".tilefeat-cache")
            && err.contains("going on without a cache"),
        "{err}"
    );
    assert_same(
        &blocked.join("A.csv"),
        &none.join("A.csv"),
        "without a cache",
    );
    plain(&a, &blocked.join("A2.csv"))
        .arg("--cache-dir")
        .arg(blocked.join(".tilefeat-cache"))
        .assert()
        .code(7);
}

/// Send `signal` ("INT", "TERM") to a running child with `kill`; its exit code and stderr.
fn signal(child: std::process::Child, signal: &str) -> (Option<i32>, String) {
    let sent = std::process::Command::new("kill")
        .args([format!("-{signal}"), child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success(), "kill -{signal}");
    let o = child.wait_with_output().unwrap();
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Entries in a cache, from `cache stats`.
fn entries(cache: &Path) -> u64 {
    let o = cache_cmd("stats", cache).output().unwrap();
    let s = String::from_utf8_lossy(&o.stdout).into_owned();
    s.lines()
        .find_map(|l| l.strip_prefix("entries: "))
        .and_then(|l| l.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// `scancel` or a Slurm time limit (SIGTERM) at a known point (the model worker stopped for
/// good after two batches of 4): exit 143, the message, the output folder without a
/// temporary file, a lock or a feature file, and the same command computes exactly the 16 tiles the
/// cache does not hold. Regression: a signal ended the process silently, leaving its
/// temporaries beside the outputs until the next run.
#[test]
fn a_terminated_run_says_so_removes_its_temporaries_and_resumes_exactly() {
    let d = tempfile::tempdir().unwrap();
    let tiles = d.path().join("S2");
    make_tiles(&tiles, 24, 64);
    let folder = d.path().join("features");
    let out = folder.join("S2.h5");
    let cache = folder.join(".tilefeat-cache");
    let child = spawn_plain(
        &tiles,
        &out,
        &["--batch-size", "4", "--threads", "1"],
        ("TILEFEAT_TEST_STALL_AFTER_BATCHES", "2"),
    );
    wait_until("stuck before 8 entries and the temporary", || {
        entries(&cache) >= 8 && !files_containing(&folder, "tilefeat-tmp").is_empty()
    });
    let (code, err) = signal(child, "TERM");
    assert_eq!(code, Some(143), "128 + SIGTERM: {err}");
    assert!(
        err.contains("tilefeat: interrupted by SIGTERM (scancel, or a job's time limit)")
            && err.contains("no output was written under its final name")
            && err.contains(&format!(
                "in the cache {}: run the same command to resume",
                cache.display()
            )),
        "{err}"
    );
    assert_eq!(
        files_containing(&folder, "tilefeat-tmp"),
        Vec::<String>::new()
    );
    // Nor its lock: a rerun on another node (another host name) would be refused by it.
    assert_eq!(
        files_containing(&folder, "tilefeat-lock"),
        Vec::<String>::new()
    );
    assert!(!out.exists() && !folder.join("S2.provenance.yaml").exists());
    assert_eq!(entries(&cache), 8, "what was stored stays");

    stderr_of(&mut plain(&tiles, &out));
    assert_eq!(prov_u64(&out, &["tiles", "cache_hits"]), 8);
    assert_eq!(prov_u64(&out, &["tiles", "computed"]), 16);
}

/// A signal while a sample's files are being renamed into place (held 3 s between renames by
/// a test-only switch) waits for the last rename: the feature file is never left renamed
/// without the provenance that describes it (`join` would refuse the pair, a rerun would not
/// find it up to date).
#[test]
fn a_signal_never_splits_a_feature_file_from_its_provenance() {
    let d = tempfile::tempdir().unwrap();
    let tiles = d.path().join("S3");
    make_tiles(&tiles, 4, 64);
    let out = d.path().join("features").join("S3.csv");
    let prov = out.with_extension("provenance.yaml");
    let child = spawn_plain(
        &tiles,
        &out,
        &["--no-cache", "--quiet"],
        ("TILEFEAT_TEST_RENAME_PAUSE_MS", "3000"),
    );
    wait_until("no rename", || out.exists());
    // The CSV is renamed, the rest of its unit is not yet.
    assert!(
        !prov.exists(),
        "the pause is between the CSV and its provenance"
    );
    let (code, err) = signal(child, "INT");
    assert_eq!(code, Some(130), "{err}");
    assert!(err.contains("interrupted by SIGINT"), "{err}");
    assert!(prov.exists(), "the provenance was renamed with its CSV");
    use sha2::Digest;
    let sha = hex::encode(sha2::Sha256::digest(std::fs::read(&out).unwrap()));
    assert_eq!(
        provenance(&out)["output_sha256"].as_str(),
        Some(sha.as_str())
    );
    assert_eq!(
        files_containing(out.parent().unwrap(), "tilefeat-"),
        Vec::<String>::new(),
        "no temporary or lock left"
    );
}
