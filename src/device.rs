//! Choosing the compute device, and what `tilefeat info` reports about libtorch and CUDA.
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
    if let Ok(v) = std::env::var("CUDA_VISIBLE_DEVICES") {
        writeln!(out, "CUDA_VISIBLE_DEVICES: {v}")?;
    }
    writeln!(out, "cpus available: {}", available_cpus())?;
    writeln!(out, "libtorch intra-op threads: {}", tch::get_num_threads())?;
    writeln!(out, "mkldnn (oneDNN): {}", tch::utils::has_mkldnn())?;
    writeln!(out, "openmp: {}", tch::utils::has_openmp())?;
    writeln!(
        out,
        "jpeg decoding: libjpeg-turbo, SIMD {}",
        if crate::decode::jpeg_simd() {
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
