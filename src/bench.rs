//! `tilefeat bench`: model-only throughput on random input, the ceiling `extract` is measured
//! against (same trunk, batch, precision, layout and device; no decoding, no I/O).

use std::io::Write;
use std::time::Instant;

use anyhow::Result;
use tch::{Device, Kind, Tensor};

use crate::cli::{BenchArgs, Pool};
use crate::device::{available_cpus, device_name, parse_device};
use crate::error::{fail, ExitKind};
use crate::model::{to_channels_last, ResNetTrunk, RunOptions};
use crate::weights::random_state_dict;

pub fn run(a: &BenchArgs, out: &mut dyn Write) -> Result<()> {
    if a.batch_size == 0 || a.batches == 0 {
        return Err(fail(ExitKind::Usage, "--batch-size and --batches must be at least 1"));
    }
    let device = parse_device(&a.device)?;
    let threads = a.threads.unwrap_or(available_cpus());
    tch::set_num_threads(threads as i32);
    if let Device::Cuda(_) = device {
        tch::Cuda::cudnn_set_benchmark(true);
    }
    let opts = RunOptions {
        device,
        precision: a.precision,
        channels_last: a.layout == "nhwc",
    };
    let model = ResNetTrunk::new(&random_state_dict(0, a.layer), a.layer, Pool::Max, opts)?;
    let s = a.size as i64;
    let x = Tensor::randn([a.batch_size as i64, 3, s, s], (Kind::Float, device));
    let x = if opts.channels_last { to_channels_last(&x) } else { x };
    let x = x.to_kind(opts.kind());
    // Each timed batch ends with the features on the CPU, as in `extract`.
    let step = || model.forward(&x).to_device(Device::Cpu);
    for _ in 0..a.warmup {
        let _ = step();
    }
    let t = Instant::now();
    for _ in 0..a.batches {
        let _ = step();
    }
    let secs = t.elapsed().as_secs_f64();
    let ips = (a.batches * a.batch_size) as f64 / secs;
    if a.machine {
        writeln!(out, "images_per_s={ips:.2}")?;
    } else {
        writeln!(
            out,
            "model-only: {ips:.2} images/s ({} batches of {} on {}, {:?}, {}, {} threads, {:?} {}px)",
            a.batches,
            a.batch_size,
            device_name(device),
            a.precision,
            a.layout,
            threads,
            a.layer,
            a.size
        )?;
    }
    Ok(())
}
