//! The README's promise: on the CPU, a sample's CSV is byte-identical whatever `--batch-size`,
//! `--threads`, `--decode-threads` or cache state. Tested on enough tiles (48) and batch sizes
//! (3 to 64) for oneDNN to pick different kernels by batch shape: the same promise held on 6
//! tiles and failed on 24 before the CPU network ran one image at a time.

mod common;

use common::*;

#[test]
fn cpu_bytes_are_identical_whatever_batch_threads_and_cache() {
    let d = tempfile::tempdir().unwrap();
    let tiles = d.path().join("tiles");
    make_tiles(&tiles, 48, 96);
    let reference = d.path().join("ref.csv");
    extract_ok(
        &tiles,
        &reference,
        &["--batch-size", "1", "--threads", "1", "--no-cache"],
    );
    let want = std::fs::read(&reference).unwrap();
    assert_eq!(read(&reference).lines().count(), 49);
    for (i, args) in [
        vec!["--batch-size", "3", "--threads", "2"],
        vec!["--batch-size", "7", "--threads", "1"],
        vec![
            "--batch-size",
            "32",
            "--threads",
            "2",
            "--decode-threads",
            "3",
        ],
        vec!["--batch-size", "64", "--threads", "2"],
    ]
    .iter()
    .enumerate()
    {
        let out = d.path().join(format!("o{i}.csv"));
        let mut args = args.clone();
        args.push("--no-cache");
        extract_ok(&tiles, &out, &args);
        assert_same(&reference, &out, &format!("{args:?} vs batch 1, 1 thread"));
    }
    // Half of the tiles cached (a sample of them, by another batch size), then the whole
    // sample: the recomputed rows are computed in other batches than in the reference.
    let cache = d.path().join("cache");
    let half = d.path().join("half");
    std::fs::create_dir_all(&half).unwrap();
    for (k, e) in std::fs::read_dir(&tiles).unwrap().enumerate() {
        let e = e.unwrap();
        if k % 2 == 0 {
            std::fs::copy(e.path(), half.join(e.file_name())).unwrap();
        }
    }
    let cache_arg = cache.to_str().unwrap();
    extract_ok(
        &half,
        &d.path().join("half.csv"),
        &["--batch-size", "5", "--cache-dir", cache_arg],
    );
    let resumed = d.path().join("resumed.csv");
    extract_ok(
        &tiles,
        &resumed,
        &["--batch-size", "16", "--cache-dir", cache_arg],
    );
    assert_eq!(prov_u64(&resumed, &["tiles", "cache_hits"]), 24);
    assert_eq!(prov_u64(&resumed, &["tiles", "computed"]), 24);
    assert_eq!(std::fs::read(&resumed).unwrap(), want, "half-cached run");
}
