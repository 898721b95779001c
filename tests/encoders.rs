//! Black-box tests of `extract --model` that need no exported model (issue 20): usage errors
//! and bad model files; the native model's non-finite features (issue 13); `--preset`, the
//! published recipes' settings in one flag (issue 28). tests/python/test_encoders.py exports real models and checks their
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

/// Regression (issue 28): CLAM users looked for CLAM's `resnet50_trunc`. The preset is exactly
/// its flags (the same bytes), 1024 values a tile, recorded as such; a flag that disagrees
/// with it, or a --model, is a usage error naming both.
#[test]
fn preset_resnet50_trunc_is_clams_flags_and_refuses_disagreeing_ones() {
    let d = tempfile::tempdir().unwrap();
    let tiles = demo_sample("sampleA");
    let (p, f) = (d.path().join("p.csv"), d.path().join("f.csv"));
    extract_ok(&tiles, &p, &["--preset", "resnet50-trunc"]);
    #[rustfmt::skip]
    extract_ok(&tiles, &f, &["--layer", "layer3", "--pool", "avg", "--normalize", "imagenet", "--size", "224"]);
    assert_same(&p, &f, "--preset resnet50-trunc against its flags");
    let header = read(&p).lines().next().unwrap().to_string();
    assert_eq!(header.split(',').count(), 1 + 1024, "{header}");
    let prov = provenance(&p);
    let settings = &prov["settings"];
    assert_eq!(settings["layer"].as_str(), Some("layer3"));
    assert_eq!(settings["pool"].as_str(), Some("avg"));
    assert_eq!(settings["normalize"].as_str(), Some("imagenet"));
    // CLAM's spelling, and flags that agree.
    let a = d.path().join("a.csv");
    extract_ok(&tiles, &a, &["--preset", "resnet50_trunc", "--pool", "avg"]);
    assert_same(&p, &a, "the resnet50_trunc alias");
    // The tutorial's preset is the defaults.
    let (t, def) = (d.path().join("t.csv"), d.path().join("d.csv"));
    extract_ok(&tiles, &t, &["--preset", "tutorial"]);
    extract_ok(&tiles, &def, &[]);
    assert_same(&t, &def, "--preset tutorial against the defaults");
    let model = d.path().join("m.pt");
    std::fs::write(&model, b"never read").unwrap();
    let out = d.path().join("x.csv");
    for (extra, want) in [
        (
            vec!["--layer", "layer4"],
            "--preset resnet50-trunc sets --layer layer3, not layer4",
        ),
        (vec!["--pool", "max"], "sets --pool avg, not max"),
        (
            vec!["--normalize", "tutorial"],
            "sets --normalize imagenet, not tutorial",
        ),
        (vec!["--size", "256"], "sets --size 224, not 256"),
        (
            vec!["--mean", "0.5,0.5,0.5", "--std", "0.5,0.5,0.5"],
            "drop --mean and --std",
        ),
        (vec!["--model", model.to_str().unwrap()], "--model"),
    ] {
        extract_cmd(&tiles, &out)
            .args(["--preset", "resnet50-trunc"])
            .args(&extra)
            .assert()
            .code(2)
            .stderr(predicate::str::contains(want));
        assert!(!out.exists());
    }
}
