//! Black-box tests of `extract --model` that need no exported model (issue 20): usage errors
//! and bad model files; and the native model's non-finite features (issue 13). tests/python/test_encoders.py exports real models and checks their
//! features against PyTorch.

mod common;

use common::*;
use predicates::prelude::*;

#[test]
fn model_flags_that_do_not_apply_are_usage_errors() {
    let d = tempfile::tempdir().unwrap();
    let model = d.path().join("m.pt");
    std::fs::write(&model, b"not yet looked at").unwrap();
    let tiles = demo_sample("sampleC");
    let out = d.path().join("o.csv");
    for (extra, want) in [
        (vec!["--weights", "random:0"], "--weights does not apply"),
        (vec!["--layer", "layer3"], "--layer"),
        (vec!["--mean", "0.5,0.5,0.5"], "--std"),
        (vec!["--mean", "1,2", "--std", "1,1,1"], "three numbers"),
        (
            vec!["--mean", "0,0,0", "--std", "1,0,1"],
            "every value must be positive",
        ),
    ] {
        extract_base(&tiles, &out)
            .arg("--model")
            .arg(&model)
            .args(&extra)
            .assert()
            .code(2)
            .stderr(predicate::str::contains(want));
        assert!(!out.exists());
    }
}

#[test]
fn bad_model_files_fail_with_exit_4_naming_them() {
    let d = tempfile::tempdir().unwrap();
    let tiles = demo_sample("sampleC");
    let out = d.path().join("o.csv");
    let missing = d.path().join("missing.pt");
    let text = d.path().join("notes.pt");
    std::fs::write(&text, b"a text file, not TorchScript\n").unwrap();
    for (model, want) in [
        (&missing, "does not exist"),
        (&text, "is not a TorchScript module"),
    ] {
        extract_base(&tiles, &out)
            .arg("--model")
            .arg(model)
            .assert()
            .code(4)
            .stderr(predicate::str::contains(
                model.file_name().unwrap().to_str().unwrap(),
            ))
            .stderr(predicate::str::contains(want));
        assert!(!out.exists());
    }
    // A malformed sidecar beside the model is named too.
    for sidecar in [
        r#"{"size": "big"}"#,
        r#"{"tilefeat_encoder": 1, "size": 0, "mean": [0,0,0], "std": [1,1,1]}"#,
        r#"{"tilefeat_encoder": 1, "size": 224, "mean": [0,0,0], "std": [1,0,1]}"#,
        r#"{"tilefeat_encoder": 2, "size": 224, "mean": [0,0,0], "std": [1,1,1]}"#,
    ] {
        std::fs::write(text.with_extension("json"), sidecar).unwrap();
        extract_base(&tiles, &out)
            .arg("--model")
            .arg(&text)
            .assert()
            .code(4)
            .stderr(predicate::str::contains("notes.json"));
    }
}

/// The native ResNet50's features are checked as a --model's are: a `--std` so small that
/// normalized pixels overflow (1e-40) gives infinities and NaN, which fail the run with exit 4
/// naming the weights and the tile, and leave no feature file (they were written, exit 0).
#[test]
fn non_finite_features_of_the_native_model_fail_the_run() {
    let d = tempfile::tempdir().unwrap();
    let tiles = demo_sample("sampleC");
    let out = d.path().join("o.csv");
    extract_cmd(&tiles, &out)
        .args([
            "--mean",
            "0.5,0.5,0.5",
            "--std",
            "1e-40,1e-40,1e-40",
            "--threads",
            "1",
        ])
        .assert()
        .code(4)
        .stderr(predicate::str::contains("weights random:0"))
        .stderr(predicate::str::contains("not a finite number"))
        .stderr(predicate::str::contains("model failed on tile"))
        .stderr(predicate::str::contains("sampleC"));
    assert!(!out.exists());
}
