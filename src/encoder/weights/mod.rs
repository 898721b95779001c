//! Finding, reading, checking and hashing ResNet50 weights.
//!
//! Reads what users actually have: torchvision `.pth` state dicts written by `torch.save`, in
//! the zip format (torch >= 1.6) and the legacy format torchvision's older files use, and
//! `.safetensors`. Pickles are parsed by [`pickle`] without executing anything. Every key
//! and shape the trunk needs is checked, and what is missing or wrong is named. Without
//! `--weights`, the torchvision cache is searched (`$TORCH_HOME/hub/checkpoints`). The SHA-256
//! of the file is part of every result's fingerprint. `random:SEED` builds deterministic
//! random weights (with non-trivial BatchNorm statistics) for demos and benchmarks only.

use std::collections::HashMap;
use std::io::Read;

mod check;
pub mod pickle;
mod random;
mod read;

pub use check::check_state_dict;
pub use random::random_state_dict;
pub use read::read_state_dict;

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use sha2::{Digest, Sha256};
use tch::Tensor;

use crate::cli::Layer;

/// File name torchvision uses for `ResNet50_Weights.IMAGENET1K_V1`.
pub const TORCHVISION_FILE: &str = "resnet50-0676ba61.pth";
/// Where torchvision publishes it.
pub const TORCHVISION_URL: &str = "https://download.pytorch.org/models/resnet50-0676ba61.pth";
/// torchvision names files by the first 8 hex digits of their SHA-256.
pub const TORCHVISION_SHA256_PREFIX: &str = "0676ba61";

/// Where the weights come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WeightsSource {
    File(PathBuf),
    Random(u64),
}

impl WeightsSource {
    /// Parse `--weights`: a path, or `random:SEED`.
    pub fn parse(arg: &str) -> Result<Self> {
        if let Some(seed) = arg.strip_prefix("random:") {
            let seed = seed
                .parse()
                .with_context(|| format!("--weights {arg}: SEED must be a non-negative integer"))?;
            return Ok(WeightsSource::Random(seed));
        }
        Ok(WeightsSource::File(PathBuf::from(arg)))
    }

    pub fn is_random(&self) -> bool {
        matches!(self, WeightsSource::Random(_))
    }

    pub fn describe(&self) -> String {
        match self {
            WeightsSource::File(p) => p.display().to_string(),
            WeightsSource::Random(s) => format!("random:{s}"),
        }
    }
}

/// The torchvision hub checkpoint directory: `$TORCH_HOME/hub/checkpoints`, where TORCH_HOME
/// defaults to `$XDG_CACHE_HOME/torch` or `~/.cache/torch`, as torch.hub does.
pub fn torch_hub_checkpoints() -> Option<PathBuf> {
    let home = if let Some(t) = std::env::var_os("TORCH_HOME") {
        PathBuf::from(t)
    } else if let Some(x) = std::env::var_os("XDG_CACHE_HOME") {
        PathBuf::from(x).join("torch")
    } else {
        PathBuf::from(std::env::var_os("HOME")?)
            .join(".cache")
            .join("torch")
    };
    Some(home.join("hub").join("checkpoints"))
}

/// Resolve `--weights` (or its absence) to a source; fail with instructions when nothing is found.
pub fn resolve(arg: Option<&str>) -> Result<WeightsSource> {
    if let Some(a) = arg {
        let src = WeightsSource::parse(a)?;
        if let WeightsSource::File(p) = &src {
            if !p.is_file() {
                bail!(
                    "weights file {} does not exist or is not a file",
                    p.display()
                );
            }
        }
        return Ok(src);
    }
    let dir = torch_hub_checkpoints();
    if let Some(d) = &dir {
        let p = d.join(TORCHVISION_FILE);
        if p.is_file() {
            return Ok(WeightsSource::File(p));
        }
    }
    let looked = dir
        .map(|d| d.join(TORCHVISION_FILE).display().to_string())
        .unwrap_or_else(|| "$TORCH_HOME/hub/checkpoints (HOME is not set)".into());
    Err(anyhow!(
        "no weights given and none found at {looked}\n\
         Compute nodes are usually offline. Get the file once, on a machine with network access \
         (e.g. a login node), with one of:\n  \
           tilefeat weights fetch\n  \
           python -c 'import torchvision; torchvision.models.resnet50(weights=\"IMAGENET1K_V1\")'\n  \
           curl -L -o {TORCHVISION_FILE} {TORCHVISION_URL}\n\
         then pass --weights FILE, set TILEFEAT_WEIGHTS, or set TORCH_HOME to a shared directory."
    ))
}

/// Loaded, checked weights.
pub struct Weights {
    pub source: WeightsSource,
    /// SHA-256 of the file, or `random:SEED`.
    pub id: String,
    pub tensors: HashMap<String, Tensor>,
}

impl Weights {
    /// Load and check weights for the trunk up to `layer`.
    pub fn load(source: &WeightsSource, layer: Layer) -> Result<Weights> {
        match source {
            WeightsSource::Random(seed) => Ok(Weights {
                source: source.clone(),
                id: format!("random:{seed}"),
                tensors: random_state_dict(*seed, layer),
            }),
            WeightsSource::File(path) => {
                let bytes = std::fs::read(path)
                    .with_context(|| format!("cannot read weights file {}", path.display()))?;
                // The file's hash (its identity in the cache key) on another core while it
                // is parsed: each takes about as long for ResNet50's 100 MB.
                let (id, tensors) = std::thread::scope(|s| {
                    let hash = s.spawn(|| hex::encode(Sha256::digest(&bytes)));
                    let tensors = read_state_dict(&bytes);
                    (hash.join(), tensors)
                });
                let id = id.unwrap_or_else(|p| std::panic::resume_unwind(p));
                let tensors = tensors
                    .with_context(|| format!("cannot read weights file {}", path.display()))?;
                let tensors = check_state_dict(tensors, layer)
                    .with_context(|| format!("weights file {} is not usable", path.display()))?;
                Ok(Weights {
                    source: source.clone(),
                    id,
                    tensors,
                })
            }
        }
    }
}

/// `tilefeat weights fetch`: download torchvision's file with curl or wget (login nodes have
/// one), check its SHA-256 prefix as torch.hub does and its contents, then move it in place.
pub fn fetch(dest: Option<&Path>, out: &mut dyn std::io::Write) -> Result<()> {
    use crate::error::{fail, ExitKind, WithKind};
    // A site mirror (or a test's file:// URL) of the same file, and its SHA-256.
    let url = std::env::var("TILEFEAT_WEIGHTS_URL").unwrap_or_else(|_| TORCHVISION_URL.into());
    let want = std::env::var("TILEFEAT_WEIGHTS_SHA256")
        .map(|s| s.trim().to_ascii_lowercase())
        .unwrap_or_else(|_| TORCHVISION_SHA256_PREFIX.into());
    let dir = match dest {
        Some(d) => d.to_path_buf(),
        None => torch_hub_checkpoints().ok_or_else(|| {
            fail(
                ExitKind::Usage,
                "HOME and TORCH_HOME are unset: pass --dest DIR",
            )
        })?,
    };
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create {}", dir.display()))
        .kind(ExitKind::Output)?;
    let target = dir.join(TORCHVISION_FILE);
    let partial = dir.join(format!(
        ".{TORCHVISION_FILE}.partial.{}",
        std::process::id()
    ));
    writeln!(out, "downloading {url} -> {}", target.display())?;
    let status = std::process::Command::new("curl")
        .args(["-fL", "--retry", "3", "-o"])
        .arg(&partial)
        .arg(&url)
        .status()
        .or_else(|_| {
            std::process::Command::new("wget")
                .args(["-q", "-O"])
                .arg(&partial)
                .arg(&url)
                .status()
        });
    let ok = matches!(&status, Ok(s) if s.success());
    if !ok {
        let _ = std::fs::remove_file(&partial);
        return Err(fail(
            ExitKind::Weights,
            format!(
                "download of {url} failed ({}); compute nodes are often offline: run \
                 this on a login node, or copy the file to {}",
                match status {
                    Ok(s) => format!("exit status {s}"),
                    Err(e) => format!("neither curl nor wget could run: {e}"),
                },
                target.display()
            ),
        ));
    }
    let sha = sha256_file(&partial)?;
    if !sha.starts_with(&want) {
        let _ = std::fs::remove_file(&partial);
        return Err(fail(
            ExitKind::Weights,
            format!("downloaded file has SHA-256 {sha}, expected it to start with {want}; not installed"),
        ));
    }
    if let Err(e) = Weights::load(&WeightsSource::File(partial.clone()), Layer::Layer4) {
        let _ = std::fs::remove_file(&partial);
        return Err(e).kind(ExitKind::Weights);
    }
    std::fs::rename(&partial, &target)
        .with_context(|| format!("cannot move the download to {}", target.display()))
        .kind(ExitKind::Output)?;
    writeln!(out, "installed {} (sha256 {sha})", target.display())?;
    Ok(())
}

/// SHA-256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

#[cfg(test)]
mod tests {
    use tch::Kind;

    use super::*;

    #[test]
    fn parse_weights_arg() {
        assert_eq!(
            WeightsSource::parse("random:7").unwrap(),
            WeightsSource::Random(7)
        );
        assert!(WeightsSource::parse("random:x").is_err());
        assert_eq!(
            WeightsSource::parse("a.pth").unwrap(),
            WeightsSource::File(PathBuf::from("a.pth"))
        );
    }

    #[test]
    fn random_weights_are_deterministic_and_complete() {
        let a = random_state_dict(3, Layer::Layer3);
        let b = random_state_dict(3, Layer::Layer3);
        let k = "layer2.1.conv2.weight";
        assert!(a[k].equal(&b[k]));
        assert!(check_state_dict(a, Layer::Layer3).is_ok());
    }

    #[test]
    fn check_names_missing_wrong_and_unexpected() {
        let mut sd = random_state_dict(0, Layer::Layer4);
        sd.remove("layer3.1.bn2.running_mean");
        sd.insert(
            "conv1.weight".into(),
            Tensor::zeros([64, 3, 3, 3], (Kind::Float, tch::Device::Cpu)),
        );
        sd.insert(
            "layer5.0.conv1.weight".into(),
            Tensor::zeros([1], (Kind::Float, tch::Device::Cpu)),
        );
        let err = check_state_dict(sd, Layer::Layer4).unwrap_err().to_string();
        assert!(
            err.contains("missing keys: layer3.1.bn2.running_mean"),
            "{err}"
        );
        assert!(
            err.contains("conv1.weight: expected [64, 3, 7, 7]"),
            "{err}"
        );
        assert!(
            err.contains("unexpected keys: layer5.0.conv1.weight"),
            "{err}"
        );
    }

    #[test]
    fn garbage_is_not_weights() {
        assert!(read_state_dict(b"hello, this is not a checkpoint").is_err());
        assert!(read_state_dict(b"PK\x03\x04truncated").is_err());
    }
}
