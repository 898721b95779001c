//! Black-box tests of how the cache finds its entries (issue 31): a sealed pack through its
//! sorted segment, a pack without one through its `.idx`, gc's packs through theirs; a
//! damaged segment; `stats` counting distinct tiles across packs without holding them.

mod common;

use std::path::Path;

use common::*;
use predicates::prelude::*;

/// `extract TILES -o OUT --cache-dir CACHE`: its CSV must equal `reference`; (hits,
/// computed) and its stderr.
fn run(tiles: &Path, out: &Path, cache: &Path, reference: &Path) -> (u64, u64, String) {
    let o = extract_cmd(tiles, out)
        .args(["--quiet", "--cache-dir", cache.to_str().unwrap()])
        .env_remove("TILEFEAT_CACHE_DIR")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "{err}");
    assert_same(out, reference, &out.display().to_string());
    (
        prov_u64(out, &["cache", "hits"]),
        prov_u64(out, &["tiles", "computed"]),
        err,
    )
}

/// The line of `cache stats` that starts with `prefix`.
fn stats_line(cache: &Path, prefix: &str) -> String {
    let o = cache_cmd("stats", cache).output().unwrap();
    let s = String::from_utf8(o.stdout).unwrap();
    assert!(o.status.success(), "{s}");
    s.lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no {prefix} in {s}"))
        .to_string()
}

#[test]
fn segments_indexes_and_gc_serve_the_same_and_a_damaged_segment_is_recomputed() {
    let d = tempfile::tempdir().unwrap();
    let tiles = d.path().join("tiles");
    let all = make_tiles(&tiles, 40, 64);
    let reference = d.path().join("reference.csv");
    extract_ok(&tiles, &reference, &["--no-cache"]);
    let cache = d.path().join("cache");
    let packs = cache.join("packs");

    // Two writers, one half each: two sealed packs, each with its segment.
    for (name, part) in [("a", &all[..20]), ("b", &all[20..])] {
        let dir = d.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        for t in part {
            std::fs::copy(t, dir.join(t.file_name().unwrap())).unwrap();
        }
        let part_ref = d.path().join(format!("{name}-ref.csv"));
        extract_ok(&dir, &part_ref, &["--no-cache"]);
        let out = d.path().join(format!("{name}.csv"));
        assert_eq!(run(&dir, &out, &cache, &part_ref).0, 0);
    }
    let segs = files(&packs, "seg");
    assert_eq!(segs.len(), 2, "{segs:?}");
    let out = d.path().join("segments.csv");
    assert_eq!(run(&tiles, &out, &cache, &reference).0, 40);

    // Without the segments (a cache written before them): the same, through the indexes.
    let aside = d.path().join("aside");
    std::fs::create_dir_all(&aside).unwrap();
    for s in &segs {
        std::fs::rename(s, aside.join(s.file_name().unwrap())).unwrap();
    }
    let out = d.path().join("indexes.csv");
    assert_eq!(run(&tiles, &out, &cache, &reference).0, 40);
    assert!(stats_line(&cache, "index segments:")
        .starts_with("index segments: 0 of 2 packs (the others'"));
    for s in &segs {
        std::fs::rename(aside.join(s.file_name().unwrap()), s).unwrap();
    }

    // One byte of one segment entry (inside a tile hash, ten entries from the end) flipped:
    // said, never believed, its tiles recomputed; the CSV is the same.
    let mut bytes = std::fs::read(&segs[0]).unwrap();
    let n = bytes.len();
    bytes[n - 10 * 80 + 7] ^= 0x01;
    std::fs::write(&segs[0], &bytes).unwrap();
    let out = d.path().join("damaged.csv");
    let (hits, computed, err) = run(&tiles, &out, &cache, &reference);
    assert_eq!(hits + computed, 40);
    assert!((1..=20).contains(&computed), "{computed} computed");
    let seg_name = segs[0].file_name().unwrap().to_str().unwrap();
    assert!(
        err.contains(seg_name) && err.contains("fails its checksum") && err.contains("recomputed"),
        "{err}"
    );
    cache_cmd("verify", &cache)
        .assert()
        .code(7)
        .stdout(predicate::str::contains(seg_name).and(predicate::str::contains("checksum")));
    // stats merges the packs' sorted keys: every tile once, however many packs hold it.
    assert_eq!(
        stats_line(&cache, "entries:"),
        format!("entries: {} (40 unique)", 40 + computed)
    );

    // A damaged header: the segment is not used at all, its pack's index is (all hits).
    bytes[20] ^= 0x01;
    std::fs::write(&segs[0], &bytes).unwrap();
    let out = d.path().join("header.csv");
    let (hits, _, err) = run(&tiles, &out, &cache, &reference);
    assert_eq!(hits, 40);
    assert!(
        err.contains(seg_name) && err.contains("header checksum mismatch"),
        "{err}"
    );

    // gc rewrites the packs (it reads records, not segments): one pack, one good segment.
    cache_cmd("gc", &cache).assert().success();
    assert_eq!(files(&packs, "pack").len(), 1);
    assert_eq!(files(&packs, "seg").len(), 1);
    cache_cmd("verify", &cache).assert().success();
    let out = d.path().join("gc.csv");
    assert_eq!(
        run(&tiles, &out, &cache, &reference),
        (40, 0, String::new())
    );
    assert_eq!(stats_line(&cache, "entries:"), "entries: 40 (40 unique)");
    assert_eq!(
        stats_line(&cache, "index segments:"),
        "index segments: 1 of 1 packs"
    );
}
