//! Checking a state dict against the trunk: every key and shape it needs, named when missing,
//! mis-shaped or unexpected.

use std::collections::HashMap;

use anyhow::{bail, Result};
use tch::{Kind, Tensor};

use crate::cli::Layer;
use crate::encoder::resnet::parameter_shapes;

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
