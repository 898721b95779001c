//! Black-box tests of the content-hash cache: hits and misses, fingerprints, damage,
//! concurrent writers (`kill -9` resume and live writers: `cache_live.rs`).

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use predicates::prelude::*;

fn with_cache(cache: &Path) -> Vec<String> {
    vec!["--cache-dir".into(), cache.to_str().unwrap().into()]
}

fn args<'a>(v: &'a [String], extra: &[&'a str]) -> Vec<&'a str> {
    v.iter()
        .map(String::as_str)
        .chain(extra.iter().copied())
        .collect()
}

#[test]
fn rerun_hits_and_equals_and_moving_tiles_still_hits() {
    let d = tempfile::tempdir().unwrap();
    let cache = d.path().join("cache");
    let c = with_cache(&cache);
    let tiles = demo_sample("sampleB");
    let fresh = d.path().join("fresh.csv");
    extract_ok(&tiles, &fresh, &[]);
    let first = d.path().join("first.csv");
    extract_ok(&tiles, &first, &args(&c, &[]));
    assert_eq!(prov_u64(&first, &["cache", "hits"]), 0);
    assert_eq!(prov_u64(&first, &["cache", "stored"]), 5);
    assert_same(
        &first,
        &fresh,
        "a cached run writes what an uncached one does",
    );
    let second = d.path().join("second.csv");
    extract_ok(&tiles, &second, &args(&c, &["--batch-size", "3"]));
    assert_eq!(prov_u64(&second, &["cache", "hits"]), 5);
    assert_eq!(prov_u64(&second, &["tiles", "computed"]), 0);
    assert_same(&second, &fresh, "hits return exactly the stored values");
    // Move and rename the tiles: same bytes, same features.
    let moved = d.path().join("elsewhere").join("renamed");
    std::fs::create_dir_all(&moved).unwrap();
    for (i, e) in std::fs::read_dir(&tiles).unwrap().enumerate() {
        let e = e.unwrap();
        let ext = e.path().extension().unwrap().to_str().unwrap().to_string();
        std::fs::copy(e.path(), moved.join(format!("x{i}.{ext}"))).unwrap();
    }
    let third = d.path().join("third.csv");
    extract_ok(&moved, &third, &args(&c, &[]));
    assert_eq!(prov_u64(&third, &["cache", "hits"]), 5);
    // Environment variable works too, and --no-cache bypasses it.
    let o = d.path().join("env.csv");
    extract_cmd(&tiles, &o)
        .env("TILEFEAT_CACHE_DIR", &cache)
        .arg("--quiet")
        .assert()
        .success();
    assert_eq!(prov_u64(&o, &["cache", "hits"]), 5);
    extract_cmd(&tiles, &o)
        .env("TILEFEAT_CACHE_DIR", &cache)
        .args(["--quiet", "--no-cache"])
        .assert()
        .success();
    assert_eq!(prov_u64(&o, &["cache", "hits"]), 0);
    cache_cmd("verify", &cache).assert().success();
    tilefeat()
        .args(["cache", "stats", "--cache-dir", cache.to_str().unwrap()])
        .assert()
        .success()
        .stdout(
            predicate::str::contains("entries: 5 (5 unique)")
                .and(predicate::str::contains("fingerprints: 1")),
        );
}

#[test]
fn every_fingerprint_change_misses() {
    let d = tempfile::tempdir().unwrap();
    let cache = d.path().join("cache");
    let c = with_cache(&cache);
    let tiles = d.path().join("two");
    make_tiles(&tiles, 2, 96);
    let out = d.path().join("o.csv");
    extract_ok(&tiles, &out, &args(&c, &[]));
    for change in [
        vec!["--layer", "layer3"],
        vec!["--pool", "avg"],
        vec!["--normalize", "imagenet"],
        vec!["--size", "160"],
        vec!["--precision", "bf16"],
        vec!["--weights", "random:1"],
        // Its last bits differ from NHWC's: a cache must not serve one for the other.
        vec!["--layout", "nchw"],
    ] {
        extract_ok(&tiles, &out, &args(&c, &change));
        assert_eq!(
            prov_u64(&out, &["cache", "hits"]),
            0,
            "{change:?} must miss"
        );
        extract_ok(&tiles, &out, &args(&c, &change));
        assert_eq!(
            prov_u64(&out, &["cache", "hits"]),
            2,
            "{change:?} rerun must hit"
        );
    }
    tilefeat()
        .args(["cache", "stats", "--cache-dir", cache.to_str().unwrap()])
        .assert()
        .success()
        .stdout(predicate::str::contains("fingerprints: 8"));
}

fn pack_files(cache: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(cache.join("packs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "pack"))
        .collect();
    v.sort();
    v
}

#[test]
fn damaged_packs_are_reported_never_served_and_recomputed() {
    for damage in ["bitflip", "truncate"] {
        let d = tempfile::tempdir().unwrap();
        let cache = d.path().join("cache");
        let c = with_cache(&cache);
        let tiles = demo_sample("sampleC");
        let clean = d.path().join("clean.csv");
        extract_ok(&tiles, &clean, &args(&c, &[]));
        let pack = &pack_files(&cache)[0];
        let mut bytes = std::fs::read(pack).unwrap();
        match damage {
            "bitflip" => {
                let n = bytes.len();
                bytes[n / 2] ^= 0x01;
            }
            _ => bytes.truncate(bytes.len() - 100),
        }
        std::fs::write(pack, bytes).unwrap();
        cache_cmd("verify", &cache)
            .assert()
            .code(7)
            .stdout(predicate::str::contains("DAMAGED"));
        let again = d.path().join("again.csv");
        extract_ok(&tiles, &again, &args(&c, &[]));
        assert_eq!(
            prov_u64(&again, &["cache", "damaged_records"]),
            1,
            "{damage}"
        );
        assert_eq!(prov_u64(&again, &["cache", "hits"]), 3, "{damage}");
        assert_same(
            &again,
            &clean,
            &format!("{damage}: the damaged tile was recomputed"),
        );
        // gc drops the damaged record and keeps the rest, plus the recomputed one.
        tilefeat()
            .args(["cache", "gc", "--cache-dir", cache.to_str().unwrap()])
            .assert()
            .success();
        cache_cmd("verify", &cache).assert().success();
        assert_eq!(pack_files(&cache).len(), 1);
        extract_ok(&tiles, &again, &args(&c, &[]));
        assert_eq!(
            prov_u64(&again, &["cache", "hits"]),
            4,
            "{damage}: nothing lost by gc"
        );
    }
}

/// Four processes extracting overlapping tile sets into one cache at once.
#[test]
fn concurrent_writers_share_one_cache() {
    let d = tempfile::tempdir().unwrap();
    let all = d.path().join("all");
    let tiles = make_tiles(&all, 16, 80);
    let cache = d.path().join("cache");
    // Sets overlap: process k takes tiles [4k, 4k + 8).
    let mut sets = Vec::new();
    for k in 0..4 {
        let dir = d.path().join(format!("set{k}"));
        std::fs::create_dir_all(&dir).unwrap();
        for t in tiles.iter().skip(4 * k).take(8) {
            std::fs::copy(t, dir.join(t.file_name().unwrap())).unwrap();
        }
        sets.push(dir);
    }
    let children: Vec<_> = sets
        .iter()
        .enumerate()
        .map(|(k, dir)| {
            std::process::Command::new(assert_cmd::cargo::cargo_bin("tilefeat"))
                .args(["extract", dir.to_str().unwrap()])
                .args(["-o", d.path().join(format!("c{k}.csv")).to_str().unwrap()])
                .args([
                    "--weights",
                    "random:0",
                    "--quiet",
                    "--threads",
                    "1",
                    "--batch-size",
                    "2",
                ])
                .args(["--cache-dir", cache.to_str().unwrap()])
                .spawn()
                .unwrap()
        })
        .collect();
    for mut c in children {
        assert!(c.wait().unwrap().success());
    }
    for (k, dir) in sets.iter().enumerate() {
        let reference = d.path().join(format!("r{k}.csv"));
        extract_ok(dir, &reference, &["--batch-size", "2"]);
        assert_same(
            &d.path().join(format!("c{k}.csv")),
            &reference,
            &format!("set {k}"),
        );
    }
    cache_cmd("verify", &cache).assert().success();
    // No entry lost: the union is all hits.
    let out = d.path().join("union.csv");
    extract_ok(&all, &out, &["--cache-dir", cache.to_str().unwrap()]);
    assert_eq!(prov_u64(&out, &["cache", "hits"]), 16);
    assert_eq!(pack_files(&cache).len(), 4, "one pack per writer process");
}

#[test]
fn gc_keeps_only_named_fingerprints() {
    let d = tempfile::tempdir().unwrap();
    let cache = d.path().join("cache");
    let c = with_cache(&cache);
    let tiles = d.path().join("t");
    make_tiles(&tiles, 2, 64);
    let out = d.path().join("o.csv");
    extract_ok(&tiles, &out, &args(&c, &["--pool", "avg"]));
    extract_ok(&tiles, &out, &args(&c, &[]));
    let keep = provenance(&out)["fingerprint"]["id"].as_str().unwrap()[..12].to_string();
    tilefeat()
        .args([
            "cache",
            "gc",
            "--cache-dir",
            cache.to_str().unwrap(),
            "--keep",
            &keep,
        ])
        .assert()
        .success()
        .stdout(predicate::str::contains("kept 2 records, dropped 2"));
    extract_ok(&tiles, &out, &args(&c, &[]));
    assert_eq!(prov_u64(&out, &["cache", "hits"]), 2);
    extract_ok(&tiles, &out, &args(&c, &["--pool", "avg"]));
    assert_eq!(prov_u64(&out, &["cache", "hits"]), 0);
    tilefeat()
        .args([
            "cache",
            "gc",
            "--cache-dir",
            cache.to_str().unwrap(),
            "--unused-since",
            "2999-01-01",
        ])
        .assert()
        .success()
        .stdout(predicate::str::contains("kept 0 records"));
    tilefeat()
        .args(["cache", "stats", "--cache-dir", d.path().to_str().unwrap()])
        .assert()
        .code(7)
        .stderr(predicate::str::contains("not a tilefeat cache directory"));
}

/// Regression: a miss followed by more cached tiles than the model stage holds back used to
/// deadlock (rows all finished, none flushed, nothing outstanding to wait for).
#[test]
fn one_miss_before_many_hits_does_not_hang() {
    let d = tempfile::tempdir().unwrap();
    let all = d.path().join("all");
    let tiles = make_tiles(&all, 150, 48);
    let cache = d.path().join("cache");
    let warm = d.path().join("warm");
    std::fs::create_dir(&warm).unwrap();
    for t in &tiles[1..] {
        std::fs::copy(t, warm.join(t.file_name().unwrap())).unwrap();
    }
    let out = d.path().join("o.csv");
    extract_ok(&warm, &out, &["--cache-dir", cache.to_str().unwrap()]);
    extract_cmd(&all, &out)
        .args(["--quiet", "--cache-dir", cache.to_str().unwrap()])
        .timeout(Duration::from_secs(120))
        .assert()
        .success();
    assert_eq!(prov_u64(&out, &["cache", "hits"]), 149);
    assert_eq!(prov_u64(&out, &["tiles", "computed"]), 1);
    // And the rows are the right ones, in the right order.
    let reference = d.path().join("reference.csv");
    extract_ok(&all, &reference, &["--no-cache"]);
    assert_same(
        &out,
        &reference,
        "149 hits and a miss equal a run without the cache",
    );
}
