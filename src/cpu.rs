//! What this CPU can do natively for each `--precision`: libtorch runs bf16 and fp16 on any
//! x86 CPU, but only CPUs with AVX-512 BF16 / AMX (bf16) or AVX-512 FP16 / AMX-FP16 (fp16)
//! compute them natively. Elsewhere they are emulated, and slower than fp32 (bf16 measured
//! 7-10x slower than fp32 on an AVX2-only AMD EPYC, where an AVX-512 BF16 CPU runs it 2x
//! faster): `tilefeat info` says which, `extract` warns, the provenance records the CPU.

use serde::{Deserialize, Serialize};

use crate::cli::Precision;

/// The instruction sets that decide CPU inference speed, as `/proc/cpuinfo` names them.
const FLAGS: [&str; 9] = [
    "avx2",
    "fma",
    "avx512f",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_fp16",
    // 64-bit Arm: bf16 and half-precision arithmetic.
    "bf16",
];

/// This CPU, for `info` and the provenance.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CpuInfo {
    pub model: String,
    /// Those of the instruction sets that matter here that the CPU has.
    pub instruction_sets: Vec<String>,
}

impl CpuInfo {
    /// This machine's CPU (from `/proc/cpuinfo`; empty where it cannot be read).
    pub fn detect() -> CpuInfo {
        CpuInfo::parse(&std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default())
    }

    /// The first processor of a `/proc/cpuinfo` text.
    pub fn parse(text: &str) -> CpuInfo {
        let field = |names: &[&str]| {
            text.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                names.contains(&k.trim()).then(|| v.trim().to_string())
            })
        };
        let model = field(&["model name", "Model", "CPU part"]).unwrap_or_default();
        let flags = field(&["flags", "Features"]).unwrap_or_default();
        let have: Vec<&str> = flags.split_whitespace().collect();
        let mut instruction_sets: Vec<String> = FLAGS
            .iter()
            .filter(|f| have.contains(f))
            .map(|f| f.to_string())
            .collect();
        // Arm names half precision `fphp`/`asimdhp`.
        if have.contains(&"asimdhp") {
            instruction_sets.push("asimdhp".into());
        }
        CpuInfo {
            model,
            instruction_sets,
        }
    }

    fn has(&self, flag: &str) -> bool {
        self.instruction_sets.iter().any(|f| f == flag)
    }

    /// Whether `precision` runs natively here (fp32 always does).
    pub fn native(&self, precision: Precision) -> bool {
        match precision {
            Precision::Fp32 => true,
            Precision::Bf16 => self.has("avx512_bf16") || self.has("amx_bf16") || self.has("bf16"),
            Precision::Fp16 => {
                self.has("avx512_fp16") || self.has("amx_fp16") || self.has("asimdhp")
            }
        }
    }

    /// The warning for `precision` on this CPU, if it is emulated.
    pub fn emulation_warning(&self, precision: Precision) -> Option<String> {
        if self.native(precision) {
            return None;
        }
        let needs = match precision {
            Precision::Bf16 => "AVX512_BF16 or AMX-BF16",
            _ => "AVX512_FP16 or AMX-FP16",
        };
        Some(format!(
            "--precision {precision} on the CPU: this CPU ({}) has no {needs}, so libtorch \
             emulates {precision}, several times slower than fp32 (bf16 measured 7-10x slower \
             on an AVX2-only AMD EPYC); --precision fp32 is faster here",
            if self.model.is_empty() {
                "model unknown"
            } else {
                &self.model
            }
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_decide_which_precisions_are_native() {
        let epyc = CpuInfo::parse(
            "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu sse2 avx fma avx2 \
             sha_ni\n\nprocessor\t: 1\nmodel name\t: other\n",
        );
        assert_eq!(epyc.model, "AMD EPYC 7B13");
        assert_eq!(epyc.instruction_sets, ["avx2", "fma"]);
        assert!(epyc.native(Precision::Fp32));
        assert!(!epyc.native(Precision::Bf16) && !epyc.native(Precision::Fp16));
        let w = epyc.emulation_warning(Precision::Bf16).unwrap();
        assert!(
            w.contains("AMD EPYC 7B13") && w.contains("AVX512_BF16"),
            "{w}"
        );
        let spr = CpuInfo::parse(
            "model name : Intel(R) Xeon(R) Platinum 8480+\nflags : avx2 avx512f avx512_bf16 \
             avx512_fp16 amx_tile amx_bf16\n",
        );
        assert!(spr.native(Precision::Bf16) && spr.native(Precision::Fp16));
        assert_eq!(spr.emulation_warning(Precision::Bf16), None);
        let cpx = CpuInfo::parse("model name : Xeon 8380H\nflags : avx2 avx512f avx512_bf16\n");
        assert!(cpx.native(Precision::Bf16) && !cpx.native(Precision::Fp16));
        assert_eq!(CpuInfo::parse(""), CpuInfo::default());
    }
}
