//! Link libtorch so that CUDA is really there at run time.
//!
//! By default the linker drops `libtorch_cuda.so` (`--as-needed`: nothing references it
//! directly), and the binary then silently runs on the CPU even on a GPU node. We force
//! `-Wl,--no-as-needed -ltorch` (libtorch.so pulls in libtorch_cuda.so when the build has
//! CUDA) and add an rpath to libtorch's lib dir so that no `LD_LIBRARY_PATH` is needed where
//! the binary was built. The rpath is written as RUNPATH, so `LD_LIBRARY_PATH` still wins
//! when the binary is carried to another machine or container.
//!
//! Where libtorch has CUDA (`libc10_cuda.so`) and the CUDA runtime's headers are found (pip's
//! `nvidia-cuda-runtime` and `nvidia-cuda-crt`, which scripts/setup.sh installs; else
//! `CUDA_HOME`), it also compiles `src/cuda/streams.cpp`, a shim
//! over `c10::cuda` streams (tch has none), and sets `cfg(tilefeat_cuda_streams)`.
//!
//! OpenSlide is not linked: it is loaded at run time, when a slide is opened
//! (`src/input/slide/openslide.rs`). Where the Python that torch-sys uses has `openslide-bin`,
//! its folder is baked in (`TILEFEAT_OPENSLIDE_BIN_DIR`) as a place to look; never an error.

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
    println!("cargo::rustc-check-cfg=cfg(tilefeat_cuda_streams)");
    if os == "linux" {
        cuda_streams_shim(&lib_dir);
    }
    println!("cargo:rustc-env=TILEFEAT_LIBTORCH_LIB={lib_dir}");
    println!(
        "cargo:rustc-env=TILEFEAT_OPENSLIDE_BIN_DIR={}",
        openslide_bin_dir().unwrap_or_default()
    );
    println!(
        "cargo:rustc-env=TILEFEAT_LIBTORCH_VERSION={}",
        libtorch_version(&lib_dir)
    );
}

/// Compile the c10::cuda stream shim, or say (as a build warning) why not.
fn cuda_streams_shim(lib_dir: &str) {
    use std::path::{Path, PathBuf};
    println!("cargo:rerun-if-changed=src/cuda/streams.cpp");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    let lib = Path::new(lib_dir);
    let Ok(c10) = std::fs::read(lib.join("libc10.so")) else {
        println!("cargo:warning=no libc10.so in {lib_dir}: no per-worker CUDA streams");
        return;
    };
    if !lib.join("libc10_cuda.so").exists() {
        return; // a CPU-only libtorch: nothing to do
    }
    let torch_include = lib.join("../include");
    // pip: site-packages/torch/lib -> site-packages/nvidia/cu13/include (cu12: cuda_runtime/include).
    let nvidia = lib.join("../../nvidia");
    let mut candidates: Vec<PathBuf> = std::fs::read_dir(&nvidia)
        .into_iter()
        .flatten()
        .flatten()
        .flat_map(|e| {
            [
                e.path().join("include"),
                e.path().join("cuda_runtime/include"),
            ]
        })
        .collect();
    candidates.sort();
    candidates.extend(std::env::var_os("CUDA_HOME").map(|h| Path::new(&h).join("include")));
    candidates.push(PathBuf::from("/usr/local/cuda/include"));
    for c in candidates.iter().filter(|c| c.is_dir()) {
        // Headers installed later (pip install nvidia-cuda-crt) build the shim next time.
        // Only folders that exist: Cargo takes a missing path as changed, every build.
        println!("cargo:rerun-if-changed={}", c.display());
    }
    let Some(cuda_include) = candidates
        .into_iter()
        .find(|d| d.join("cuda_runtime_api.h").exists() && d.join("crt/host_defines.h").exists())
    else {
        println!(
            "cargo:warning=libtorch has CUDA but the CUDA runtime headers (cuda_runtime_api.h, \
             crt/host_defines.h) were not found (pip install nvidia-cuda-crt, or set CUDA_HOME): \
             built without per-worker CUDA streams (TILEFEAT_CUDA_STREAMS)"
        );
        return;
    };
    // The C++ ABI libtorch was built with: its mangled names say.
    let cxx11 = c10.windows(10).any(|w| w == b"St7__cxx11");
    let built = cc::Build::new()
        .cpp(true)
        .file("src/cuda/streams.cpp")
        .include(&torch_include)
        .include(&cuda_include)
        .flag("-std=c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", if cxx11 { "1" } else { "0" })
        .warnings(false)
        .try_compile("tilefeat_cuda_streams");
    if let Err(e) = built {
        let first = e.to_string();
        let first = first.lines().next().unwrap_or_default().to_string();
        println!(
            "cargo:warning=cannot compile src/cuda/streams.cpp against {} ({first}): built \
             without per-worker CUDA streams (TILEFEAT_CUDA_STREAMS)",
            cuda_include.display()
        );
        return;
    }
    println!("cargo:rustc-link-lib=dylib=c10_cuda");
    println!("cargo:rustc-link-lib=dylib=c10");
    println!("cargo:rustc-cfg=tilefeat_cuda_streams");
}

/// The folder of the `openslide-bin` wheel (its `libopenslide.so.1`) in the Python torch-sys
/// uses (`LIBTORCH_USE_PYTORCH`: `python3` on the PATH, or `PYTHON_SYS_EXECUTABLE`), if any.
fn openslide_bin_dir() -> Option<String> {
    println!("cargo:rerun-if-env-changed=PYTHON_SYS_EXECUTABLE");
    println!("cargo:rerun-if-env-changed=VIRTUAL_ENV");
    let python = std::env::var("PYTHON_SYS_EXECUTABLE").unwrap_or_else(|_| "python3".into());
    let out = std::process::Command::new(python)
        .args([
            "-c",
            "import openslide_bin, os; print(os.path.dirname(openslide_bin.__file__))",
        ])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    let dir = String::from_utf8(out.stdout).ok()?.trim().to_string();
    let lib = std::path::Path::new(&dir).join("libopenslide.so.1");
    if !lib.exists() {
        return None;
    }
    println!("cargo:rerun-if-changed={}", lib.display());
    Some(dir)
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
