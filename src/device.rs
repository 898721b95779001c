//! Choosing the compute device, setting CUDA up for a run, and what `tilefeat info` reports
//! about libtorch and CUDA.
//!
//! `--device cuda` fails loudly (exit 5) when CUDA is unavailable: the binary must never fall
//! back to the CPU behind the user's back. `auto` picks CUDA when available; the summary line
//! and the provenance name the device used.

use anyhow::Result;
use tch::{Cuda, Device};

use crate::error::{fail, ExitKind};

/// The libtorch version this binary was built against (from its Python package or zip).
pub fn libtorch_version() -> &'static str {
    env!("TILEFEAT_LIBTORCH_VERSION")
}

/// Parse `--device`.
pub fn parse_device(spec: &str) -> Result<Device> {
    let cuda_count = || {
        if Cuda::is_available() {
            Cuda::device_count()
        } else {
            0
        }
    };
    let why_not = || {
        let vis = std::env::var("CUDA_VISIBLE_DEVICES")
            .map(|v| format!("CUDA_VISIBLE_DEVICES={v:?}"))
            .unwrap_or_else(|_| "CUDA_VISIBLE_DEVICES unset".into());
        format!(
            "CUDA is not available to this process ({vis}; libtorch {}; {} CUDA devices visible). \
             Run on a GPU node (Slurm: --gres=gpu:1; Docker: --gpus all; Apptainer: --nv), \
             or pass --device cpu",
            libtorch_version(),
            cuda_count()
        )
    };
    match spec {
        "auto" => Ok(if cuda_count() > 0 {
            Device::Cuda(0)
        } else {
            Device::Cpu
        }),
        "cpu" => Ok(Device::Cpu),
        "cuda" => {
            if cuda_count() == 0 {
                return Err(fail(
                    ExitKind::Device,
                    format!("--device cuda: {}", why_not()),
                ));
            }
            Ok(Device::Cuda(0))
        }
        s if s.starts_with("cuda:") => {
            let n: usize = s[5..].parse().map_err(|_| {
                fail(
                    ExitKind::Usage,
                    format!("--device {s}: expected cuda:N with N a GPU index"),
                )
            })?;
            let count = cuda_count();
            if count == 0 {
                return Err(fail(
                    ExitKind::Device,
                    format!("--device {s}: {}", why_not()),
                ));
            }
            if n >= count as usize {
                return Err(fail(
                    ExitKind::Device,
                    format!(
                        "--device {s}: only {count} CUDA device(s) visible (0..{})",
                        count - 1
                    ),
                ));
            }
            Ok(Device::Cuda(n))
        }
        other => Err(fail(
            ExitKind::Usage,
            format!("--device {other}: expected auto, cpu, cuda or cuda:N"),
        )),
    }
}

/// How a run set its GPU up, for the provenance and `--profile`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CudaSetup {
    /// How threads wait for the GPU (CUDA's default, or sleep).
    pub waits: String,
    /// How cuDNN picks its convolution algorithms.
    pub cudnn: String,
    /// Which CUDA streams the model workers queue their work on.
    pub streams: String,
    /// The device on which each model worker takes a stream of its own
    /// ([`use_worker_stream`]); None: they share the default stream.
    pub worker_stream: Option<usize>,
}

/// Prepare a CUDA device for a run (nothing for the CPU).
///
/// - cuDNN picks its algorithms by heuristics. Autotuning (`cudnn.benchmark`) measured no
///   faster for ResNet50 at batch 256 on an H200 (bf16 13,086-13,122 images/s tuned vs
///   13,137-13,145 not), but libtorch autotunes per thread, so each model worker's first batch
///   took 1.9-3.2 s instead of 0.35-0.45 s: a whole slide's worth of GPU time per process.
///   `TILEFEAT_CUDNN_BENCHMARK=1` autotunes (for GPUs or shapes where it may pay).
/// - Threads wait for the GPU as CUDA decides (`cudaDeviceScheduleAuto`: spin while the
///   process has fewer contexts than CPUs), as in PyTorch. Making them sleep
///   (`cudaDeviceScheduleBlockingSync`, the default of an earlier build) did not help on an
///   H200 with 16 cores: end-to-end on 16,000 tiles, alternating, 6.15 and 5.68 s against 5.32
///   and 5.22 s with the same CPU time (two runs each, with that build's cuDNN autotuning, whose
///   cost varies by more than that gap). `TILEFEAT_CUDA_SLEEP=1` makes them sleep, for hosts
///   with few cores per GPU where a spinning model worker could starve the decoders; a
///   warning says so if it cannot.
/// - Each model worker queues its work on a CUDA stream of its own (libtorch's pool), so that
///   one worker's upload and normalization overlap the other's convolutions instead of
///   queueing behind them on the device's default stream. On an H200 (bf16, batch 256) this
///   raised model-only throughput from 12,748-13,140 to 13,616-13,747 images/s and
///   end-to-end on 48,000 tiles from 9,006-9,279 to 9,768-10,480 tiles/s (alternating runs),
///   with identical features. `TILEFEAT_CUDA_STREAMS=0` makes the workers share the default
///   stream; a build without the CUDA headers has no choice (the provenance says which).
pub fn configure_cuda(device: Device) -> Option<CudaSetup> {
    let Device::Cuda(index) = device else {
        return None;
    };
    let autotune = crate::env_on("TILEFEAT_CUDNN_BENCHMARK");
    Cuda::cudnn_set_benchmark(autotune);
    let cudnn = if autotune {
        "autotuned per thread (TILEFEAT_CUDNN_BENCHMARK)"
    } else {
        "heuristics"
    }
    .to_string();
    let waits = if !crate::env_on("TILEFEAT_CUDA_SLEEP") {
        "CUDA's default (cudaDeviceScheduleAuto)".into()
    } else {
        match cuda_runtime::blocking_sync(index) {
            Ok(()) => "sleep (TILEFEAT_CUDA_SLEEP: cudaDeviceScheduleBlockingSync)".into(),
            Err(e) => {
                eprintln!(
                    "tilefeat: warning: TILEFEAT_CUDA_SLEEP: cannot make threads sleep while \
                     they wait for the GPU ({e}); CUDA's default applies"
                );
                format!("CUDA's default (could not set blocking sync: {e})")
            }
        }
    };
    let asked = std::env::var_os("TILEFEAT_CUDA_STREAMS").is_some_and(|v| !v.is_empty());
    let want_streams = crate::env_switch("TILEFEAT_CUDA_STREAMS", true);
    let worker_stream = (want_streams && streams::BUILT).then_some(index);
    let streams = if worker_stream.is_some() {
        "one per model worker".to_string()
    } else if want_streams {
        // Asked for explicitly: say so; by default the provenance records it.
        if asked {
            eprintln!(
                "tilefeat: warning: TILEFEAT_CUDA_STREAMS: this build has no CUDA stream \
                 support (built without the CUDA headers); the model workers share the default \
                 stream"
            );
        }
        "the default stream, shared (this build has no per-worker streams)".to_string()
    } else {
        "the default stream, shared by the model workers (TILEFEAT_CUDA_STREAMS=0)".to_string()
    };
    Some(CudaSetup {
        waits,
        cudnn,
        streams,
        worker_stream,
    })
}

/// Give the calling thread a CUDA stream of its own on device `index` (from libtorch's pool):
/// libtorch then queues this thread's work there instead of on the default stream. Waits
/// first for all work already queued on the device (the weights' upload on the default
/// stream, which pool streams do not wait for). The error says why, and how to do without.
pub fn use_worker_stream(index: usize) -> Result<(), String> {
    Cuda::synchronize(index as i64);
    streams::use_pool_stream(index).map_err(|e| {
        format!(
            "cannot give a model worker its own CUDA stream: {e} \
             (TILEFEAT_CUDA_STREAMS=0 makes the workers share the default stream)"
        )
    })
}

/// The id of the calling thread's current CUDA stream on device `index` (0: the default).
pub fn current_stream_id(index: usize) -> Result<i64, String> {
    streams::current_stream_id(index)
}

/// The c10::cuda stream shim (`src/cuda/streams.cpp`, compiled by build.rs where libtorch
/// has CUDA and the CUDA headers are found).
mod streams {
    #[cfg(tilefeat_cuda_streams)]
    mod imp {
        use std::ffi::{c_char, c_int, c_longlong, CStr};

        extern "C" {
            fn tilefeat_use_pool_stream(device: c_int, err: *mut c_char, len: usize) -> c_int;
            fn tilefeat_current_stream_id(
                device: c_int,
                id: *mut c_longlong,
                err: *mut c_char,
                len: usize,
            ) -> c_int;
        }

        pub const BUILT: bool = true;

        fn message(buf: &[c_char]) -> String {
            // SAFETY: the shim always NUL-terminates what it writes; the buffer starts zeroed.
            let text = unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy();
            crate::error::first_line(&text).to_string()
        }

        pub fn use_pool_stream(index: usize) -> Result<(), String> {
            let mut err = [0 as c_char; 512];
            // SAFETY: a valid buffer of the given length; the shim catches every exception.
            match unsafe { tilefeat_use_pool_stream(index as c_int, err.as_mut_ptr(), err.len()) } {
                0 => Ok(()),
                _ => Err(message(&err)),
            }
        }

        pub fn current_stream_id(index: usize) -> Result<i64, String> {
            let mut err = [0 as c_char; 512];
            let mut id: c_longlong = 0;
            // SAFETY: valid pointers; the shim catches every exception.
            let r = unsafe {
                tilefeat_current_stream_id(index as c_int, &mut id, err.as_mut_ptr(), err.len())
            };
            if r == 0 {
                Ok(id)
            } else {
                Err(message(&err))
            }
        }
    }

    #[cfg(not(tilefeat_cuda_streams))]
    mod imp {
        pub const BUILT: bool = false;
        const WHY: &str = "this build has no CUDA stream support";
        pub fn use_pool_stream(_: usize) -> Result<(), String> {
            Err(WHY.into())
        }
        pub fn current_stream_id(_: usize) -> Result<i64, String> {
            Err(WHY.into())
        }
    }

    pub use imp::{current_stream_id, use_pool_stream, BUILT};
}

/// The CUDA runtime libtorch loaded, reached through the dynamic linker (tch has no binding
/// for device flags): present when this libtorch was built with CUDA, whether or not a GPU
/// is there.
mod cuda_runtime {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    mod imp {
        use std::ffi::{c_int, c_uint, c_void, CStr};

        /// `cudaDeviceScheduleBlockingSync`.
        const BLOCKING_SYNC: c_uint = 0x04;

        fn sym(name: &CStr) -> Result<*mut c_void, String> {
            // SAFETY: looks a name up in the libraries already loaded; loads nothing.
            let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
            if p.is_null() {
                Err(format!(
                    "{} not found: libtorch without the CUDA runtime",
                    name.to_string_lossy()
                ))
            } else {
                Ok(p)
            }
        }

        /// `error N (the runtime's description)`.
        fn describe(code: c_int) -> String {
            type ErrorString = unsafe extern "C" fn(c_int) -> *const std::ffi::c_char;
            let text = sym(c"cudaGetErrorString").ok().and_then(|f| {
                // SAFETY: `const char* cudaGetErrorString(cudaError_t)` returns a static
                // NUL-terminated string (or null).
                let f: ErrorString = unsafe { std::mem::transmute(f) };
                let p = unsafe { f(code) };
                (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
            });
            match text {
                Some(t) => format!("error {code}: {t}"),
                None => format!("error {code}"),
            }
        }

        type IntOut = unsafe extern "C" fn(*mut c_int) -> c_int;
        type UintOut = unsafe extern "C" fn(*mut c_uint) -> c_int;
        type IntIn = unsafe extern "C" fn(c_int) -> c_int;
        type UintIn = unsafe extern "C" fn(c_uint) -> c_int;

        pub fn version() -> Result<i32, String> {
            // SAFETY: the CUDA runtime's `cudaError_t cudaRuntimeGetVersion(int*)`.
            let f: IntOut = unsafe { std::mem::transmute(sym(c"cudaRuntimeGetVersion")?) };
            let mut v: c_int = 0;
            match unsafe { f(&mut v) } {
                0 => Ok(v),
                e => Err(format!("cudaRuntimeGetVersion returned {}", describe(e))),
            }
        }

        /// Set the scheduling flag of device `index` and make it this thread's current
        /// device. The old current device is not put back: selecting it would create a
        /// context on it (CUDA 12+), taking memory on a GPU the run does not use.
        pub fn blocking_sync(index: usize) -> Result<(), String> {
            // SAFETY: the CUDA runtime's functions of these exact signatures.
            let (set, set_flags, get_flags) = unsafe {
                (
                    std::mem::transmute::<*mut c_void, IntIn>(sym(c"cudaSetDevice")?),
                    std::mem::transmute::<*mut c_void, UintIn>(sym(c"cudaSetDeviceFlags")?),
                    std::mem::transmute::<*mut c_void, UintOut>(sym(c"cudaGetDeviceFlags")?),
                )
            };
            let index = index as c_int;
            // SAFETY: plain CUDA runtime calls with valid pointers. The flags belong to the
            // device's primary context, which libtorch then uses; CUDA 12+ applies them to a
            // context that already exists.
            unsafe {
                let e = set(index);
                if e != 0 {
                    return Err(format!("cudaSetDevice({index}) returned {}", describe(e)));
                }
                let e = set_flags(BLOCKING_SYNC);
                if e != 0 {
                    return Err(format!("cudaSetDeviceFlags returned {}", describe(e)));
                }
                let mut flags: c_uint = 0;
                let read = get_flags(&mut flags);
                if read != 0 || flags & BLOCKING_SYNC == 0 {
                    return Err(format!(
                        "flags read back as {flags:#x} (cudaGetDeviceFlags: {})",
                        describe(read)
                    ));
                }
            }
            Ok(())
        }
    }

    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    mod imp {
        pub fn version() -> Result<i32, String> {
            Err("only looked up on Linux (glibc)".into())
        }
        pub fn blocking_sync(_: usize) -> Result<(), String> {
            Err("only set on Linux (glibc)".into())
        }
    }

    pub use imp::{blocking_sync, version};
}

/// The CUDA runtime's version as `13.0`, or why it cannot be told.
pub fn cuda_runtime_version() -> Result<String, String> {
    cuda_runtime::version().map(|v| format!("{}.{}", v / 1000, (v % 1000) / 10))
}

/// Human name of a device.
pub fn device_name(d: Device) -> String {
    match d {
        Device::Cpu => "cpu".into(),
        Device::Cuda(n) => format!("cuda:{n}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// CPUs this process may use: the affinity mask (Slurm, taskset, cgroup cpusets).
pub fn available_cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// `tilefeat info`.
pub fn info(out: &mut dyn std::io::Write) -> Result<()> {
    writeln!(out, "tilefeat {}", env!("CARGO_PKG_VERSION"))?;
    writeln!(out, "tch {}", crate::TCH_VERSION)?;
    writeln!(out, "libtorch {} (built against)", libtorch_version())?;
    writeln!(
        out,
        "libtorch lib dir (build time) {}",
        env!("TILEFEAT_LIBTORCH_LIB")
    )?;
    let cuda = Cuda::is_available();
    writeln!(out, "cuda available: {cuda}")?;
    writeln!(
        out,
        "cuda devices: {}",
        if cuda { Cuda::device_count() } else { 0 }
    )?;
    writeln!(out, "cudnn available: {}", Cuda::cudnn_is_available())?;
    writeln!(
        out,
        "cuda runtime: {}",
        cuda_runtime_version().unwrap_or_else(|e| format!("none ({e})"))
    )?;
    if let Ok(v) = std::env::var("CUDA_VISIBLE_DEVICES") {
        writeln!(out, "CUDA_VISIBLE_DEVICES: {v}")?;
    }
    writeln!(
        out,
        "stream per model worker (TILEFEAT_CUDA_STREAMS): {}",
        if streams::BUILT {
            "built in"
        } else {
            "not in this build (no CUDA headers at build time)"
        }
    )?;
    writeln!(out, "cpus available: {}", available_cpus())?;
    let cpu = crate::cpu::CpuInfo::detect();
    writeln!(
        out,
        "cpu: {} ({})",
        if cpu.model.is_empty() {
            "unknown"
        } else {
            &cpu.model
        },
        if cpu.instruction_sets.is_empty() {
            "none of avx2, avx512f, avx512_bf16, avx512_fp16, amx".to_string()
        } else {
            cpu.instruction_sets.join(" ")
        }
    )?;
    for p in [
        crate::cli::Precision::Fp32,
        crate::cli::Precision::Bf16,
        crate::cli::Precision::Fp16,
    ] {
        writeln!(
            out,
            "cpu {p}: {}",
            if cpu.native(p) {
                "native"
            } else {
                "emulated (slower than fp32 here: use fp32 on this CPU)"
            }
        )?;
    }
    writeln!(out, "libtorch intra-op threads: {}", tch::get_num_threads())?;
    writeln!(out, "mkldnn (oneDNN): {}", tch::utils::has_mkldnn())?;
    writeln!(out, "openmp: {}", tch::utils::has_openmp())?;
    writeln!(
        out,
        "jpeg decoding: libjpeg-turbo, SIMD {}",
        if crate::pixels::decode::jpeg_simd() {
            "on"
        } else {
            "off (built without nasm: about 2x slower, same pixels)"
        }
    )?;
    writeln!(
        out,
        "heap tuning for libtorch: {}",
        crate::alloc::heap_tuning()
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The runtime is found wherever libtorch has CUDA (the pip build used here and on GPU
    /// nodes), GPU or not: otherwise `configure_cuda` could never make waits sleep.
    #[test]
    fn cuda_runtime_is_found_when_libtorch_has_cuda() {
        let lib = std::path::Path::new(env!("TILEFEAT_LIBTORCH_LIB"));
        let v = cuda_runtime_version();
        if lib.join("libtorch_cuda.so").exists() {
            let v = v.expect("libtorch has CUDA, so its runtime is loaded");
            let major: u32 = v.split('.').next().unwrap().parse().unwrap();
            assert!(major >= 11, "{v}");
        } else {
            assert!(v.is_err(), "{v:?}");
        }
    }

    /// Without a GPU the flags cannot be set, and the error says which call failed; with one
    /// they are set and read back.
    #[test]
    fn blocking_sync_is_set_or_explained() {
        match (Cuda::is_available(), cuda_runtime::blocking_sync(0)) {
            (true, r) => assert_eq!(r, Ok(())),
            (false, Err(e)) => assert!(
                e.contains("returned error ") || e.contains("not found"),
                "{e}"
            ),
            (false, Ok(())) => panic!("device flags set without a GPU"),
        }
        assert_eq!(configure_cuda(Device::Cpu), None);
    }

    /// The stream shim is built wherever libtorch has CUDA and its headers are there (the pip
    /// wheels used here and in the containers). Without a GPU, c10's exception comes back as
    /// an error message instead of crossing into Rust; with one, the thread gets a stream of
    /// its own.
    #[test]
    fn worker_streams_are_set_or_explained() {
        let lib = std::path::Path::new(env!("TILEFEAT_LIBTORCH_LIB"));
        // pip's CUDA wheels plus nvidia-cuda-crt (scripts/setup.sh) hold every header needed.
        let crt = std::fs::read_dir(lib.join("../../nvidia"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|d| d.path().join("include/crt/host_defines.h").exists());
        let cuda_lib = lib.join("libc10_cuda.so").exists();
        assert!(
            streams::BUILT || !(cuda_lib && crt),
            "the shim is built where libtorch has CUDA and the headers are"
        );
        if !streams::BUILT {
            return;
        }
        if Cuda::is_available() {
            std::thread::spawn(|| {
                assert_eq!(current_stream_id(0), Ok(0), "the default stream first");
                use_worker_stream(0).unwrap();
                assert_ne!(current_stream_id(0), Ok(0));
            })
            .join()
            .unwrap();
        } else {
            let e = streams::use_pool_stream(0).expect_err("no GPU, no stream");
            assert!(!e.is_empty() && !e.contains('\n'), "{e}");
            assert!(streams::current_stream_id(0).is_err());
        }
    }
}
