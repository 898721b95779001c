//! Link libtorch so that CUDA is really there at run time.
//!
//! By default the linker drops `libtorch_cuda.so` (`--as-needed`: nothing references it
//! directly), and the binary then silently runs on the CPU even on a GPU node. We force
//! `-Wl,--no-as-needed -ltorch` (libtorch.so pulls in libtorch_cuda.so when the build has
//! CUDA) and add an rpath to libtorch's lib dir so that no `LD_LIBRARY_PATH` is needed where
//! the binary was built. The rpath is written as RUNPATH, so `LD_LIBRARY_PATH` still wins
//! when the binary is carried to another machine or container.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=LIBTORCH_USE_PYTORCH");
    // torch-sys (links = "tch") exports the libtorch lib directory it linked against.
    let lib_dir = std::env::var("DEP_TCH_LIBTORCH_LIB").expect(
        "torch-sys did not report DEP_TCH_LIBTORCH_LIB (is torch-sys a direct dependency?)",
    );
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if os == "linux" {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-Wl,--enable-new-dtags");
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib_dir}");
        println!("cargo:rustc-link-search=native={lib_dir}");
        println!("cargo:rustc-link-arg=-ltorch");
    }
    println!("cargo:rustc-env=TILEFEAT_LIBTORCH_LIB={lib_dir}");
    println!(
        "cargo:rustc-env=TILEFEAT_LIBTORCH_VERSION={}",
        libtorch_version(&lib_dir)
    );
}

/// The version of the libtorch in `lib_dir`: pip's `torch/version.py` or the zip's
/// `build-version`.
fn libtorch_version(lib_dir: &str) -> String {
    let root = std::path::Path::new(lib_dir).join("..");
    if let Ok(text) = std::fs::read_to_string(root.join("version.py")) {
        for line in text.lines() {
            if let Some(v) = line.strip_prefix("__version__ = ") {
                return v.trim_matches(|c| c == '\'' || c == '"').to_string();
            }
        }
    }
    std::fs::read_to_string(root.join("build-version"))
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}
