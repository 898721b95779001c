//! The cache while a writer is alive or has just died: `kill -9` then resume, `cache gc` beside
//! a running writer, a reader opening the cache while another process writes, a damaged index
//! entry. Model workers are slowed or stopped with the test-only switches
//! `TILEFEAT_TEST_BATCH_DELAY_MS` and `TILEFEAT_TEST_STALL_AFTER_BATCHES` (see
//! `pipeline/workers.rs`), so the state at the kill is known, not guessed from a sleep.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::*;
use predicates::prelude::*;

/// `extract TILES -o OUT --cache-dir CACHE --batch-size 4 --threads 1` in the background
/// (one model worker), with the test switches in `env`.
fn spawn_extract(tiles: &Path, out: &Path, cache: &Path, env: &[(&str, &str)]) -> Child {
    let mut c = std::process::Command::new(assert_cmd::cargo::cargo_bin("tilefeat"));
    c.args([
        "extract",
        tiles.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ])
    .args([
        "--weights",
        "random:0",
        "--quiet",
        "--batch-size",
        "4",
        "--threads",
        "1",
    ])
    .args(["--cache-dir", cache.to_str().unwrap()])
    .env_remove("TILEFEAT_CACHE_DIR")
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    for (k, v) in env {
        c.env(k, v);
    }
    c.spawn().unwrap()
}

/// Entries in the cache, from `cache stats` (0 before the cache exists).
fn entries(cache: &Path) -> u64 {
    if !cache.join("packs").exists() {
        return 0;
    }
    let o = cache_cmd("stats", cache).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s = String::from_utf8(o.stdout).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("entries: "))
        .and_then(|l| l.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no entry count in:\n{s}"))
}

/// Wait until the cache holds at least `n` entries; their count.
fn wait_for_entries(cache: &Path, n: u64) -> u64 {
    let t = Instant::now();
    loop {
        let k = entries(cache);
        if k >= n {
            return k;
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "stuck at {k} < {n} entries"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn kill(mut child: Child) {
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
}

/// `kill -9` at a known point, then the same command: the CSV equals an uninterrupted run's,
/// nothing stored is lost or recomputed, and a kill loses at most the batches in flight.
#[test]
fn kill_9_loses_at_most_the_batch_in_flight_and_resume_recomputes_the_rest() {
    let d = tempfile::tempdir().unwrap();
    let tiles = d.path().join("tiles");
    make_tiles(&tiles, 40, 96);
    let reference = d.path().join("reference.csv");
    extract_ok(&tiles, &reference, &["--batch-size", "4", "--no-cache"]);
    let cache = d.path().join("cache");
    let out = d.path().join("out.csv");

    // The worker stops for good before its 4th batch: exactly 3 batches (12 tiles) were
    // computed, and all 12 are stored (flushed after each batch) before the kill.
    let child = spawn_extract(
        &tiles,
        &out,
        &cache,
        &[("TILEFEAT_TEST_STALL_AFTER_BATCHES", "3")],
    );
    assert_eq!(wait_for_entries(&cache, 12), 12);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(entries(&cache), 12, "the stalled run stores nothing more");
    kill(child);
    assert_eq!(
        entries(&cache),
        12,
        "a kill loses nothing that was computed before it"
    );
    assert!(!out.exists(), "no CSV from a killed run");

    // A slow worker, killed mid-run at whatever it has stored by then: what it had stored
    // stays, and at most the batches in flight at the kill (one computing, one handed back)
    // are stored after the count was read.
    let child = spawn_extract(
        &tiles,
        &out,
        &cache,
        &[("TILEFEAT_TEST_BATCH_DELAY_MS", "150")],
    );
    let at_kill = wait_for_entries(&cache, 24);
    kill(child);
    let after = entries(&cache);
    assert!(
        after >= at_kill,
        "entries never disappear: {after} < {at_kill}"
    );
    assert!(
        after <= at_kill + 2 * 4,
        "{after} entries after the kill, {at_kill} before"
    );
    assert!(after < 40, "killed mid-run, not after it ({after} entries)");
    assert!(!out.exists());

    // Resume: exactly the tiles not stored are computed; the CSV is the uninterrupted one.
    extract_ok(
        &tiles,
        &out,
        &["--batch-size", "4", "--cache-dir", cache.to_str().unwrap()],
    );
    assert_same(&out, &reference, "resumed CSV equals an uninterrupted run");
    assert_eq!(prov_u64(&out, &["cache", "hits"]), after);
    assert_eq!(prov_u64(&out, &["tiles", "computed"]), 40 - after);
    cache_cmd("verify", &cache).assert().success();
    assert!(
        files_containing(d.path(), "tilefeat-").is_empty(),
        "temp and lock files of the killed runs removed"
    );
}

/// `cache gc` while a writer is running: the live pack is left alone (its entries are still
/// served, its later appends verify clean), while the pack of a dead local process and a
/// stale pack of another host are compacted.
#[test]
fn gc_leaves_a_running_writers_pack_alone() {
    let d = tempfile::tempdir().unwrap();
    let tiles = d.path().join("tiles");
    let all = make_tiles(&tiles, 40, 64);
    let cache = d.path().join("cache");
    let packs = cache.join("packs");
    // A dead local writer: killed after 2 batches (8 tiles of a set of its own).
    let dead_set = d.path().join("dead");
    std::fs::create_dir_all(&dead_set).unwrap();
    for t in &all[32..40] {
        std::fs::copy(t, dead_set.join(t.file_name().unwrap())).unwrap();
    }
    let child = spawn_extract(
        &dead_set,
        &d.path().join("dead.csv"),
        &cache,
        &[("TILEFEAT_TEST_STALL_AFTER_BATCHES", "1")],
    );
    wait_for_entries(&cache, 4);
    kill(child);
    let dead_pack = files(&packs, "pack").pop().unwrap();
    // Another host's unsealed pack, untouched for two hours: a copy of the dead one, renamed.
    let stale = packs.join("otherhost-4242-0123456789abcdef.pack");
    std::fs::copy(&dead_pack, &stale).unwrap();
    std::fs::copy(dead_pack.with_extension("idx"), stale.with_extension("idx")).unwrap();
    let two_hours_ago = std::time::SystemTime::now() - Duration::from_secs(7200);
    for p in [&stale, &stale.with_extension("idx")] {
        std::fs::File::options()
            .write(true)
            .open(p)
            .unwrap()
            .set_modified(two_hours_ago)
            .unwrap();
    }

    // The live writer: 32 tiles, slowly; gc runs once it has stored 8.
    let live_set = d.path().join("live");
    std::fs::create_dir_all(&live_set).unwrap();
    for t in &all[..32] {
        std::fs::copy(t, live_set.join(t.file_name().unwrap())).unwrap();
    }
    let live_out = d.path().join("live.csv");
    let mut live = spawn_extract(
        &live_set,
        &live_out,
        &cache,
        &[("TILEFEAT_TEST_BATCH_DELAY_MS", "250")],
    );
    wait_for_entries(&cache, 4 + 8);
    let live_packs: Vec<PathBuf> = files(&packs, "pack")
        .into_iter()
        .filter(|p| *p != dead_pack && *p != stale)
        .collect();
    assert_eq!(live_packs.len(), 1, "{live_packs:?}");
    let live_pack = live_packs[0].clone();
    tilefeat()
        .args([
            "cache",
            "gc",
            "--stale-after-hours",
            "1",
            "--cache-dir",
            cache.to_str().unwrap(),
        ])
        .assert()
        .success();
    assert!(
        live_pack.exists() && live_pack.with_extension("idx").exists(),
        "the live pack is untouched"
    );
    assert!(
        !dead_pack.exists(),
        "a dead local writer's pack is compacted"
    );
    assert!(!stale.exists(), "a stale other host's pack is compacted");
    assert!(
        live.wait().unwrap().success(),
        "the writer went on undisturbed"
    );
    cache_cmd("verify", &cache).assert().success();
    // Everything is served: the dead writer's 4, the live one's 32.
    let union = d.path().join("union.csv");
    extract_ok(&tiles, &union, &["--cache-dir", cache.to_str().unwrap()]);
    assert_eq!(prov_u64(&union, &["cache", "hits"]), 36);
    assert_eq!(prov_u64(&union, &["tiles", "computed"]), 4);
    let reference = d.path().join("reference.csv");
    extract_ok(&tiles, &reference, &["--no-cache"]);
    assert_same(&union, &reference, "served entries equal computed ones");
}

/// A reader that opens the cache while another process is writing it gets the entries
/// already stored as hits; a damaged index entry is reported by verify and never served.
#[test]
fn a_reader_sees_a_live_writers_entries_and_damaged_index_entries_are_never_served() {
    let d = tempfile::tempdir().unwrap();
    let tiles = d.path().join("tiles");
    make_tiles(&tiles, 24, 64);
    let cache = d.path().join("cache");
    let writer = spawn_extract(
        &tiles,
        &d.path().join("w.csv"),
        &cache,
        &[("TILEFEAT_TEST_STALL_AFTER_BATCHES", "2")],
    );
    assert_eq!(wait_for_entries(&cache, 8), 8);
    let read = d.path().join("r.csv");
    extract_ok(&tiles, &read, &["--cache-dir", cache.to_str().unwrap()]);
    assert_eq!(
        prov_u64(&read, &["cache", "hits"]),
        8,
        "the live writer's entries are hits"
    );
    assert_eq!(prov_u64(&read, &["tiles", "computed"]), 16);
    kill(writer);
    let reference = d.path().join("reference.csv");
    extract_ok(&tiles, &reference, &["--no-cache"]);
    assert_same(&read, &reference, "hits equal computed rows");

    // Flip one byte of one index entry (its tile hash) of the reader's sealed pack, and
    // remove its sorted segment (as in a cache written before segments): the `.idx` is what
    // a reader then goes by.
    let idx = files(&cache.join("packs"), "idx")
        .into_iter()
        .find(|p| p.with_extension("sealed").exists())
        .unwrap();
    std::fs::remove_file(idx.with_extension("seg")).unwrap();
    let mut bytes = std::fs::read(&idx).unwrap();
    let entry = 80;
    let at = bytes.len() - 3 * entry + 40; // inside the tile hash of the third-last entry
    bytes[at] ^= 0x10;
    std::fs::write(&idx, bytes).unwrap();
    cache_cmd("verify", &cache)
        .assert()
        .code(7)
        .stdout(predicate::str::contains(
            idx.file_name().unwrap().to_str().unwrap(),
        ));
    let again = d.path().join("again.csv");
    extract_ok(&tiles, &again, &["--cache-dir", cache.to_str().unwrap()]);
    assert_same(
        &again,
        &reference,
        "the damaged entry's tiles were recomputed, not served",
    );
    // Nothing after a damaged entry can be trusted to be aligned: its last 3 are dropped.
    assert_eq!(prov_u64(&again, &["cache", "hits"]), 21);
    assert_eq!(prov_u64(&again, &["tiles", "computed"]), 3);
}

/// Issue 31: `cache gc` beside a live reader that is also a live writer. The reader opened
/// the cache (a sealed pack and its segment, holding the last 16 tiles) and computes the
/// first 16 slowly; gc compacts the sealed pack, removing the files the reader opened, and
/// leaves the reader's own pack alone. The reader still serves all 16 (its open handles
/// outlive the names), its CSV equals an uncached run's, and a rerun after it hits all 32.
#[test]
fn gc_beside_a_live_reader_and_writer_loses_nothing() {
    let d = tempfile::tempdir().unwrap();
    let tiles = d.path().join("tiles");
    let all = make_tiles(&tiles, 32, 64);
    let reference = d.path().join("reference.csv");
    extract_ok(&tiles, &reference, &["--batch-size", "4", "--no-cache"]);
    let cache = d.path().join("cache");
    let packs = cache.join("packs");
    let last = d.path().join("last");
    std::fs::create_dir_all(&last).unwrap();
    for t in &all[16..] {
        std::fs::copy(t, last.join(t.file_name().unwrap())).unwrap();
    }
    extract_ok(
        &last,
        &d.path().join("last.csv"),
        &["--cache-dir", cache.to_str().unwrap()],
    );
    let sealed = files(&packs, "seg");
    assert_eq!(sealed.len(), 1);

    let out = d.path().join("reader.csv");
    let mut reader = spawn_extract(
        &tiles,
        &out,
        &cache,
        &[("TILEFEAT_TEST_BATCH_DELAY_MS", "250")],
    );
    // Its first batch stored: it has opened the cache and is running.
    wait_for_entries(&cache, 16 + 4);
    tilefeat()
        .args(["cache", "gc", "--cache-dir", cache.to_str().unwrap()])
        .assert()
        .success();
    assert!(
        !sealed[0].exists() && !sealed[0].with_extension("pack").exists(),
        "the sealed pack and its segment were compacted"
    );
    assert!(reader.wait().unwrap().success());
    assert_same(&out, &reference, "the reader's rows, served and computed");
    assert_eq!(prov_u64(&out, &["cache", "hits"]), 16);
    assert_eq!(prov_u64(&out, &["tiles", "computed"]), 16);
    cache_cmd("verify", &cache).assert().success();
    let again = d.path().join("again.csv");
    extract_ok(&tiles, &again, &["--cache-dir", cache.to_str().unwrap()]);
    assert_eq!(prov_u64(&again, &["cache", "hits"]), 32);
    assert_same(&again, &reference, "everything served after gc");
}
