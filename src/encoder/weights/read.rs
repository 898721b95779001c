//! Reading state dicts: `.pth` files written by `torch.save` (zip, torch >= 1.6, and the
//! legacy format older torchvision files use) and `.safetensors`, into named CPU tensors.
//!
//! Pickles are read by [`super::pickle`], which never executes anything. Storages that lie
//! uncompressed in the file are borrowed from its bytes (after their CRC-32 is checked), not
//! copied before the tensor's own copy.

use std::borrow::Cow;
use std::collections::HashMap;
use std::io::Read;

use anyhow::{bail, Context, Result};
use tch::{Kind, Tensor};

use super::pickle::{self, Value};

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
