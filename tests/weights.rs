//! Finding, checking and fetching weights, black-box: `TILEFEAT_WEIGHTS`, the torch hub cache
//! (`$TORCH_HOME/hub/checkpoints/resnet50-0676ba61.pth`), `weights verify` on a good file
//! and on one named like torchvision's whose hash is not, and `weights fetch` from a mirror
//! (`TILEFEAT_WEIGHTS_URL`, a file:// URL here) with a right and a wrong SHA-256.

mod common;

use std::path::Path;

use common::*;
use predicates::prelude::*;
use sha2::Digest;

fn sha256(path: &Path) -> String {
    hex::encode(sha2::Sha256::digest(std::fs::read(path).unwrap()))
}

#[test]
fn weights_are_found_without_the_flag() {
    let d = tempfile::tempdir().unwrap();
    let file = d.path().join("mine.safetensors");
    write_weights(&file, 5);
    let tiles = demo_sample("sampleC");
    // TILEFEAT_WEIGHTS.
    let a = d.path().join("a.csv");
    extract_base(&tiles, &a)
        .args(["--quiet", "--size", "32"])
        .env("TILEFEAT_WEIGHTS", &file)
        .env("TORCH_HOME", d.path().join("empty-hub"))
        .assert()
        .success();
    assert_eq!(
        provenance(&a)["weights"]["sha256"].as_str(),
        Some(sha256(&file).as_str())
    );
    assert_eq!(provenance(&a)["weights"]["trained"].as_bool(), Some(true));
    // $TORCH_HOME/hub/checkpoints, torchvision's file name.
    let hub = d.path().join("torch/hub/checkpoints");
    std::fs::create_dir_all(&hub).unwrap();
    std::fs::copy(&file, hub.join("resnet50-0676ba61.pth")).unwrap();
    let b = d.path().join("b.csv");
    extract_base(&tiles, &b)
        .args(["--quiet", "--size", "32"])
        .env("TORCH_HOME", d.path().join("torch"))
        .assert()
        .success();
    assert_same(&a, &b, "the same weights, found either way");
    assert!(provenance(&b)["weights"]["source"]
        .as_str()
        .unwrap()
        .contains("hub/checkpoints/resnet50-0676ba61.pth"));
    // Nowhere: exit 4 naming where it looked.
    extract_base(&tiles, &d.path().join("c.csv"))
        .env("TORCH_HOME", d.path().join("nowhere"))
        .assert()
        .code(4)
        .stderr(
            predicate::str::contains("nowhere/hub/checkpoints")
                .and(predicate::str::contains("tilefeat weights fetch")),
        );
}

#[test]
fn weights_verify_accepts_a_good_file_and_refuses_a_misnamed_one() {
    let d = tempfile::tempdir().unwrap();
    let file = d.path().join("mine.safetensors");
    write_weights(&file, 6);
    tilefeat()
        .args(["weights", "verify", file.to_str().unwrap()])
        .assert()
        .success()
        .stdout(
            predicate::str::contains("ResNet50 state dict OK")
                .and(predicate::str::contains(sha256(&file))),
        );
    let misnamed = d.path().join("resnet50-0676ba61.pth");
    std::fs::copy(&file, &misnamed).unwrap();
    tilefeat()
        .args(["weights", "verify", misnamed.to_str().unwrap()])
        .assert()
        .code(4)
        .stderr(predicate::str::contains("does not start with 0676ba61"));
}

#[test]
fn weights_fetch_from_a_mirror_checks_the_hash() {
    let d = tempfile::tempdir().unwrap();
    let mirror = d.path().join("mirror.pth");
    write_weights(&mirror, 7);
    let url = format!("file://{}", mirror.display());
    let dest = d.path().join("dest");
    // A wrong hash: nothing installed.
    tilefeat()
        .args(["weights", "fetch", "--dest", dest.to_str().unwrap()])
        .env("TILEFEAT_WEIGHTS_URL", &url)
        .assert()
        .code(4)
        .stderr(predicate::str::contains(
            "expected it to start with 0676ba61",
        ));
    assert!(!dest.join("resnet50-0676ba61.pth").exists());
    assert!(
        std::fs::read_dir(&dest).unwrap().next().is_none(),
        "no partial download left"
    );
    // The right one: installed under torchvision's name, found by extract.
    let sha = sha256(&mirror);
    tilefeat()
        .args(["weights", "fetch", "--dest", dest.to_str().unwrap()])
        .env("TILEFEAT_WEIGHTS_URL", &url)
        .env("TILEFEAT_WEIGHTS_SHA256", &sha)
        .assert()
        .success()
        .stdout(predicate::str::contains(format!("sha256 {sha}")));
    assert_eq!(sha256(&dest.join("resnet50-0676ba61.pth")), sha);
    // A mirror that is not there: exit 4, the URL named.
    tilefeat()
        .args(["weights", "fetch", "--dest", dest.to_str().unwrap()])
        .env(
            "TILEFEAT_WEIGHTS_URL",
            format!("file://{}/missing.pth", d.path().display()),
        )
        .assert()
        .code(4)
        .stderr(predicate::str::contains("missing.pth"));
}
