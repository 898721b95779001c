//! Finding, reading, checking and hashing ResNet50 weights.
//!
//! Reads what users actually have: torchvision `.pth` state dicts written by `torch.save`, in
//! the zip format (torch >= 1.6) and the legacy format torchvision's older files use, and
//! `.safetensors`. Pickles are parsed by [`crate::pickle`] without executing anything. Every key
//! and shape the trunk needs is checked, and what is missing or wrong is named. Without
//! `--weights`, the torchvision cache is searched (`$TORCH_HOME/hub/checkpoints`). The SHA-256
//! of the file is part of every result's fingerprint. `random:SEED` builds deterministic
//! random weights (with non-trivial BatchNorm statistics) for demos and benchmarks only.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use sha2::{Digest, Sha256};
use std::borrow::Cow;
use tch::{Kind, Tensor};

use crate::cli::Layer;
use crate::model::parameter_shapes;
use crate::pickle::{self, Value};

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
    writeln!(out, "downloading {TORCHVISION_URL} -> {}", target.display())?;
    let status = std::process::Command::new("curl")
        .args(["-fL", "--retry", "3", "-o"])
        .arg(&partial)
        .arg(TORCHVISION_URL)
        .status()
        .or_else(|_| {
            std::process::Command::new("wget")
                .args(["-q", "-O"])
                .arg(&partial)
                .arg(TORCHVISION_URL)
                .status()
        });
    let ok = matches!(&status, Ok(s) if s.success());
    if !ok {
        let _ = std::fs::remove_file(&partial);
        return Err(fail(
            ExitKind::Weights,
            format!(
                "download of {TORCHVISION_URL} failed ({}); compute nodes are often offline: run                  this on a login node, or copy the file to {}",
                match status {
                    Ok(s) => format!("exit status {s}"),
                    Err(e) => format!("neither curl nor wget could run: {e}"),
                },
                target.display()
            ),
        ));
    }
    let sha = sha256_file(&partial)?;
    if !sha.starts_with(TORCHVISION_SHA256_PREFIX) {
        let _ = std::fs::remove_file(&partial);
        return Err(fail(
            ExitKind::Weights,
            format!("downloaded file has SHA-256 {sha}, expected it to start with {TORCHVISION_SHA256_PREFIX}; not installed"),
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

/// Read a `.pth` (zip or legacy) or `.safetensors` file into named f32 CPU tensors.
pub fn read_state_dict(bytes: &[u8]) -> Result<HashMap<String, Tensor>> {
    if bytes.starts_with(b"PK\x03\x04") {
        read_zip_pth(bytes)
    } else if bytes.len() > 8 && bytes[8] == b'{' {
        read_safetensors(bytes)
    } else if bytes.first() == Some(&0x80) {
        read_legacy_pth(bytes)
    } else {
        bail!("not a PyTorch .pth (zip or legacy pickle) or .safetensors file")
    }
}

fn read_safetensors(bytes: &[u8]) -> Result<HashMap<String, Tensor>> {
    let st = safetensors::SafeTensors::deserialize(bytes).context("invalid safetensors file")?;
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        use safetensors::Dtype;
        let kind = match view.dtype() {
            Dtype::F32 => Kind::Float,
            Dtype::F64 => Kind::Double,
            Dtype::F16 => Kind::Half,
            Dtype::BF16 => Kind::BFloat16,
            Dtype::I64 => Kind::Int64,
            other => bail!("tensor {name}: unsupported dtype {other:?}"),
        };
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let t = Tensor::from_data_size(view.data(), &shape, kind);
        out.insert(name, t);
    }
    Ok(out)
}

/// Storage element type from a pickled storage class name such as `torch.FloatStorage`.
fn storage_kind(class: &str) -> Result<(Kind, usize)> {
    Ok(match class.rsplit('.').next().unwrap_or("") {
        "FloatStorage" => (Kind::Float, 4),
        "DoubleStorage" => (Kind::Double, 8),
        "HalfStorage" => (Kind::Half, 2),
        "BFloat16Storage" => (Kind::BFloat16, 2),
        "LongStorage" => (Kind::Int64, 8),
        "IntStorage" => (Kind::Int, 4),
        "ShortStorage" => (Kind::Int16, 2),
        "CharStorage" => (Kind::Int8, 1),
        "ByteStorage" => (Kind::Uint8, 1),
        "BoolStorage" => (Kind::Bool, 1),
        other => bail!("unsupported storage type {other}"),
    })
}

/// A tensor description from the pickle: storage key, kind, offset, size, stride.
struct TensorRef {
    key: String,
    kind: Kind,
    elem: usize,
    offset: i64,
    size: Vec<i64>,
    stride: Vec<i64>,
}

fn int_list(v: &Value, what: &str) -> Result<Vec<i64>> {
    v.as_tuple()
        .with_context(|| format!("{what} is not a tuple"))?
        .iter()
        .map(|x| {
            x.as_int()
                .with_context(|| format!("{what} holds a non-integer"))
        })
        .collect()
}

/// Interpret `_rebuild_tensor_v2(storage, offset, size, stride, ...)` (and parameters).
fn tensor_ref(v: &Value) -> Result<TensorRef> {
    let (func, args) = match v {
        Value::Call(f, a) => (f.as_ref(), a.as_ref()),
        Value::Build(obj, _) => return tensor_ref(obj),
        other => bail!("expected a tensor, found {}", short(other)),
    };
    let name = match func {
        Value::Global(g) => g.as_str(),
        _ => bail!("expected a tensor reconstructor"),
    };
    let args = args
        .as_tuple()
        .context("tensor arguments are not a tuple")?;
    match name {
        "torch._utils._rebuild_parameter" | "torch._utils._rebuild_parameter_with_state" => {
            tensor_ref(args.first().context("empty parameter")?)
        }
        "torch._utils._rebuild_tensor_v2" | "torch._utils._rebuild_tensor" => {
            if args.len() < 4 {
                bail!("{name} with {} arguments", args.len());
            }
            let pid = match &args[0] {
                Value::PersId(p) => p.as_tuple().context("storage id is not a tuple")?,
                other => bail!(
                    "tensor storage is {}, not a storage reference",
                    short(other)
                ),
            };
            // ('storage', StorageClass, key, location, numel[, view_metadata])
            if pid.len() < 5 || pid[0].as_str() != Some("storage") {
                bail!("unrecognised storage reference");
            }
            let class = match &pid[1] {
                Value::Global(g) => g.clone(),
                other => bail!("storage class is {}", short(other)),
            };
            let (kind, elem) = storage_kind(&class)?;
            let key = match &pid[2] {
                Value::Str(s) => s.clone(),
                Value::Int(i) => i.to_string(),
                _ => bail!("storage key is not a string"),
            };
            Ok(TensorRef {
                key,
                kind,
                elem,
                offset: args[1]
                    .as_int()
                    .context("storage offset is not an integer")?,
                size: int_list(&args[2], "tensor size")?,
                stride: int_list(&args[3], "tensor stride")?,
            })
        }
        other => bail!("unsupported object {other} in the state dict (only tensors are read)"),
    }
}

fn short(v: &Value) -> String {
    let s = format!("{v:?}");
    s.chars().take(60).collect()
}

/// The state dict inside a checkpoint: the top-level dict, or its `state_dict` / `model` entry.
fn state_dict_entries(top: &Value) -> Result<&[(Value, Value)]> {
    let entries = match top {
        Value::Dict(d) => d.as_slice(),
        _ => bail!("the file does not hold a dict of tensors (a whole pickled model is not supported; save model.state_dict())"),
    };
    for wrapper in ["state_dict", "model"] {
        if let Some((_, Value::Dict(inner))) =
            entries.iter().find(|(k, _)| k.as_str() == Some(wrapper))
        {
            return Ok(inner.as_slice());
        }
    }
    Ok(entries)
}

fn build_tensor(r: &TensorRef, storage: &[u8]) -> Result<Tensor> {
    let numel_storage = (storage.len() / r.elem) as i64;
    let base = Tensor::from_data_size(storage, &[numel_storage], r.kind);
    // Bounds check before as_strided: the furthest element must lie inside the storage.
    let last: i64 = r.offset
        + r.size
            .iter()
            .zip(&r.stride)
            .map(|(&n, &s)| if n == 0 { 0 } else { (n - 1) * s })
            .sum::<i64>();
    if r.size.iter().all(|&n| n > 0) && last >= numel_storage {
        bail!("tensor view exceeds its storage ({last} >= {numel_storage})");
    }
    Ok(base
        .as_strided(&r.size, &r.stride, Some(r.offset))
        .contiguous())
}

/// Build the state dict's tensors from `top` (the unpickled dict), with `storage` giving each
/// storage's bytes: borrowed from the file's bytes where they lie there as they are (no copy
/// before the tensor's own).
fn collect_tensors<'a>(
    top: &Value,
    mut storage: impl FnMut(&str) -> Result<Cow<'a, [u8]>>,
) -> Result<HashMap<String, Tensor>> {
    let mut cache: HashMap<String, Cow<'a, [u8]>> = HashMap::new();
    let mut out = HashMap::new();
    for (k, v) in state_dict_entries(top)? {
        let name = k
            .as_str()
            .context("state dict key is not a string")?
            .to_string();
        let r = tensor_ref(v).with_context(|| format!("entry {name}"))?;
        if !cache.contains_key(&r.key) {
            cache.insert(
                r.key.clone(),
                storage(&r.key).with_context(|| format!("entry {name}"))?,
            );
        }
        let t = build_tensor(&r, &cache[&r.key]).with_context(|| format!("entry {name}"))?;
        out.insert(name, t);
    }
    Ok(out)
}

fn read_zip_pth(bytes: &[u8]) -> Result<HashMap<String, Tensor>> {
    let mut zip =
        zip::ZipArchive::new(std::io::Cursor::new(bytes)).context("invalid zip archive")?;
    let names: Vec<String> = zip.file_names().map(String::from).collect();
    let pkl = names
        .iter()
        .find(|n| n.ends_with("data.pkl") && n.matches('/').count() == 1)
        .context("zip archive has no <name>/data.pkl: not a torch.save file")?
        .clone();
    let prefix = pkl.trim_end_matches("data.pkl").to_string();
    if let Some(bo) = names.iter().find(|n| **n == format!("{prefix}byteorder")) {
        let mut s = String::new();
        zip.by_name(bo)?.read_to_string(&mut s)?;
        if s.trim() != "little" {
            bail!("big-endian checkpoints are not supported");
        }
    }
    let mut data = Vec::new();
    zip.by_name(&pkl)?.read_to_end(&mut data)?;
    let top = pickle::parse(&data, &mut 0).context("cannot parse data.pkl")?;
    collect_tensors(&top, |key| {
        let mut f = zip
            .by_name(&format!("{prefix}data/{key}"))
            .with_context(|| format!("storage {key} missing from the archive"))?;
        // torch.save stores its entries uncompressed: use them where they lie, once their
        // CRC-32 matches (else read them through the zip reader, which reports the damage).
        if f.compression() == zip::CompressionMethod::Stored && !f.encrypted() {
            let start = f.data_start() as usize;
            let len = f.size() as usize;
            if let Some(data) = bytes.get(start..start.saturating_add(len)) {
                if f.compressed_size() == f.size() && crc32fast::hash(data) == f.crc32() {
                    return Ok(Cow::Borrowed(data));
                }
            }
        }
        let mut buf = Vec::with_capacity((f.size() as usize).min(bytes.len()));
        f.read_to_end(&mut buf)?;
        Ok(Cow::Owned(buf))
    })
}

fn read_legacy_pth(bytes: &[u8]) -> Result<HashMap<String, Tensor>> {
    let mut pos = 0;
    let magic = pickle::parse(bytes, &mut pos).context("cannot parse the magic number")?;
    // 0x1950a86a20f9469cfc6c, of which we keep the low 64 bits.
    if magic.as_int() != Some(0xa86a_20f9_469c_fc6c_u64 as i64) {
        bail!("not a PyTorch legacy checkpoint (bad magic number)");
    }
    let _protocol = pickle::parse(bytes, &mut pos).context("cannot parse the protocol version")?;
    let _sys_info = pickle::parse(bytes, &mut pos).context("cannot parse sys_info")?;
    let top = pickle::parse(bytes, &mut pos).context("cannot parse the state dict pickle")?;
    let keys = pickle::parse(bytes, &mut pos).context("cannot parse the storage key list")?;
    let keys: Vec<String> = keys
        .as_tuple()
        .context("storage key list is not a list")?
        .iter()
        .map(|k| {
            k.as_str()
                .map(String::from)
                .context("storage key is not a string")
        })
        .collect::<Result<_>>()?;
    // Element sizes per key come from the tensors that reference them.
    let mut elem_of: HashMap<String, usize> = HashMap::new();
    for (_, v) in state_dict_entries(&top)? {
        if let Ok(r) = tensor_ref(v) {
            elem_of.insert(r.key, r.elem);
        }
    }
    let mut storages: HashMap<String, &[u8]> = HashMap::new();
    for key in keys {
        let n = bytes
            .get(pos..pos.saturating_add(8))
            .context("legacy checkpoint truncated in storage header")?;
        let numel = u64::from_le_bytes(n.try_into()?) as usize;
        pos += 8;
        let elem = *elem_of.get(&key).unwrap_or(&4);
        let data = numel
            .checked_mul(elem)
            .and_then(|len| bytes.get(pos..pos.checked_add(len)?))
            .with_context(|| format!("legacy checkpoint truncated in storage {key}"))?;
        pos += data.len();
        storages.insert(key, data);
    }
    collect_tensors(&top, |key| {
        storages
            .remove(key)
            .map(Cow::Borrowed)
            .with_context(|| format!("storage {key} missing from the checkpoint"))
    })
}

/// Check every key and shape the trunk needs; return the needed tensors as f32.
///
/// A `module.` prefix (DataParallel) is stripped. `fc.*`, `num_batches_tracked` and, for
/// `layer3`, `layer4.*` are ignored. Anything else unexpected means this is not a torchvision
/// ResNet50, and is an error, as are missing keys and wrong shapes.
pub fn check_state_dict(
    tensors: HashMap<String, Tensor>,
    layer: Layer,
) -> Result<HashMap<String, Tensor>> {
    let tensors: HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, v)| (k.strip_prefix("module.").map(String::from).unwrap_or(k), v))
        .collect();
    let needed = parameter_shapes(layer);
    let full: std::collections::HashSet<String> = parameter_shapes(Layer::Layer4)
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    let mut missing = Vec::new();
    let mut wrong = Vec::new();
    let mut out = HashMap::new();
    for (key, shape) in &needed {
        match tensors.get(key) {
            None => missing.push(key.clone()),
            Some(t) if t.size() != *shape => {
                wrong.push(format!("{key}: expected {shape:?}, found {:?}", t.size()))
            }
            Some(t) => {
                if !t.is_floating_point() {
                    wrong.push(format!(
                        "{key}: expected a floating-point tensor, found {:?}",
                        t.kind()
                    ));
                } else {
                    out.insert(key.clone(), t.to_kind(Kind::Float));
                }
            }
        }
    }
    let mut unexpected: Vec<String> = tensors
        .keys()
        .filter(|k| {
            !full.contains(*k) && !k.starts_with("fc.") && !k.ends_with("num_batches_tracked")
        })
        .cloned()
        .collect();
    unexpected.sort();
    let list = |v: &[String]| {
        let mut s = v.iter().take(8).cloned().collect::<Vec<_>>().join(", ");
        if v.len() > 8 {
            s.push_str(&format!(", ... ({} in all)", v.len()));
        }
        s
    };
    let mut problems = Vec::new();
    if !missing.is_empty() {
        problems.push(format!("missing keys: {}", list(&missing)));
    }
    if !wrong.is_empty() {
        problems.push(format!("wrong shapes: {}", list(&wrong)));
    }
    if !unexpected.is_empty() {
        problems.push(format!("unexpected keys: {}", list(&unexpected)));
    }
    if !problems.is_empty() {
        bail!(
            "not a torchvision ResNet50 state dict ({} tensors found): {}",
            tensors.len(),
            problems.join("; ")
        );
    }
    Ok(out)
}

/// SplitMix64: a tiny, portable PRNG, so random weights are identical on every machine,
/// thread and libtorch version.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Standard normal (Box-Muller).
    fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform();
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

/// Deterministic random weights: Kaiming-normal convolutions (fan-out, as torchvision) and
/// BatchNorm with non-trivial statistics, so that a wrong BatchNorm shows up in features.
/// Each tensor has its own stream, seeded by `seed` and its key, so the tensors are made on
/// all cores (ResNet50's 25M values took 0.7 s on one) with the same values on any number.
pub fn random_state_dict(seed: u64, layer: Layer) -> HashMap<String, Tensor> {
    let mut shapes = parameter_shapes(layer);
    // Largest first, taken in turn by the threads: they finish together.
    shapes.sort_by_key(|(_, shape)| std::cmp::Reverse(shape.iter().product::<i64>()));
    let next = std::sync::atomic::AtomicUsize::new(0);
    let threads = crate::device::available_cpus().min(8);
    let mut values: Vec<(usize, Vec<f32>)> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some((key, shape)) = shapes.get(i) else {
                            return done;
                        };
                        done.push((i, random_values(seed, key, shape)));
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("random weights thread"))
            .collect()
    });
    values.sort_by_key(|(i, _)| *i);
    shapes
        .into_iter()
        .zip(values)
        .map(|((key, shape), (_, v))| {
            let t = Tensor::from_slice(&v).view(shape.as_slice());
            (key, t)
        })
        .collect()
}

/// The values of one random tensor (see [`random_state_dict`]).
fn random_values(seed: u64, key: &str, shape: &[i64]) -> Vec<f32> {
    let digest = Sha256::digest(format!("{seed}:{key}").as_bytes());
    let mut rng = SplitMix64(u64::from_le_bytes(digest[..8].try_into().expect("8 bytes")));
    let n = shape.iter().product::<i64>() as usize;
    let mut gen = |f: &mut dyn FnMut(&mut SplitMix64) -> f64| -> Vec<f32> {
        (0..n).map(|_| f(&mut rng) as f32).collect()
    };
    if key.ends_with("running_var") {
        gen(&mut |r| r.uniform() * 1.5 + 0.5)
    } else if key.ends_with("running_mean") {
        gen(&mut |r| r.normal() * 0.1)
    } else if shape.len() == 4 {
        let std = (2.0 / (shape[0] * shape[2] * shape[3]) as f64).sqrt();
        gen(&mut |r| r.normal() * std)
    } else if key.ends_with(".weight") {
        gen(&mut |r| r.uniform() + 0.5)
    } else {
        gen(&mut |r| r.normal() * 0.1)
    }
}

#[cfg(test)]
mod tests {
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
