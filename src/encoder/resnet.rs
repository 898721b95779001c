//! The ResNet50 trunk (torchvision's `resnet50`, v1.5: stride on the 3x3 conv) up to `layer3`
//! or `layer4`, with global max or average pooling, for inference only.
//!
//! Small builder functions mirror torchvision's module tree, so every parameter path equals
//! its state-dict key (`layer1.0.conv1.weight`, `layer2.0.downsample.1.running_var`).
//! [`parameter_shapes`] enumerates those keys, and is what weights are checked against.
//! BatchNorm runs in eval mode: it is folded into the preceding convolution once, at load
//! time (`w * gamma / sqrt(var + eps)`, `beta - mean * gamma / sqrt(var + eps)`), in f64, so a
//! forward pass is convolutions, ReLUs and one max-pool. Everything runs under `no_grad`.

use std::collections::HashMap;

use anyhow::{Context, Result};
use tch::{Device, Kind, Tensor};

use crate::cli::{Layer, Pool, Precision};

const BN_EPS: f64 = 1e-5;

/// (blocks, planes, stride) of layer1..layer4.
const STAGES: [(usize, i64, i64); 4] = [(3, 64, 1), (4, 128, 2), (6, 256, 2), (3, 512, 2)];

fn stages_for(layer: Layer) -> &'static [(usize, i64, i64)] {
    match layer {
        Layer::Layer3 => &STAGES[..3],
        Layer::Layer4 => &STAGES[..],
    }
}

/// Feature dimension of a pooled `layer` output.
pub fn feature_dim(layer: Layer) -> usize {
    match layer {
        Layer::Layer3 => 1024,
        Layer::Layer4 => 2048,
    }
}

/// One convolution with its BatchNorm, as state-dict prefixes and shapes.
struct ConvBnSpec {
    conv: String,
    bn: String,
    c_in: i64,
    c_out: i64,
    k: i64,
    stride: i64,
    pad: i64,
}

struct BlockSpec {
    convs: [ConvBnSpec; 3],
    downsample: Option<ConvBnSpec>,
}

fn conv_bn(conv: String, bn: String, c_in: i64, c_out: i64, k: i64, stride: i64) -> ConvBnSpec {
    ConvBnSpec {
        conv,
        bn,
        c_in,
        c_out,
        k,
        stride,
        pad: k / 2,
    }
}

fn stem_spec() -> ConvBnSpec {
    ConvBnSpec {
        pad: 3,
        ..conv_bn("conv1".into(), "bn1".into(), 3, 64, 7, 2)
    }
}

fn block_specs(layer: Layer) -> Vec<Vec<BlockSpec>> {
    let mut c_in = 64;
    let mut stages = Vec::new();
    for (i, &(blocks, planes, stride)) in stages_for(layer).iter().enumerate() {
        let mut stage = Vec::new();
        for b in 0..blocks {
            let p = format!("layer{}.{}", i + 1, b);
            let s = if b == 0 { stride } else { 1 };
            let c_out = planes * 4;
            let downsample = (b == 0 && (s != 1 || c_in != c_out)).then(|| {
                conv_bn(
                    format!("{p}.downsample.0"),
                    format!("{p}.downsample.1"),
                    c_in,
                    c_out,
                    1,
                    s,
                )
            });
            stage.push(BlockSpec {
                convs: [
                    conv_bn(format!("{p}.conv1"), format!("{p}.bn1"), c_in, planes, 1, 1),
                    conv_bn(
                        format!("{p}.conv2"),
                        format!("{p}.bn2"),
                        planes,
                        planes,
                        3,
                        s,
                    ),
                    conv_bn(
                        format!("{p}.conv3"),
                        format!("{p}.bn3"),
                        planes,
                        c_out,
                        1,
                        1,
                    ),
                ],
                downsample,
            });
            c_in = c_out;
        }
        stages.push(stage);
    }
    stages
}

fn all_conv_bn(layer: Layer) -> Vec<ConvBnSpec> {
    let mut out = vec![stem_spec()];
    for stage in block_specs(layer) {
        for block in stage {
            out.extend(block.convs);
            out.extend(block.downsample);
        }
    }
    out
}

/// Every state-dict key the trunk up to `layer` needs, with its shape, in module order.
pub fn parameter_shapes(layer: Layer) -> Vec<(String, Vec<i64>)> {
    let mut out = Vec::new();
    for s in all_conv_bn(layer) {
        out.push((
            format!("{}.weight", s.conv),
            vec![s.c_out, s.c_in, s.k, s.k],
        ));
        for name in ["weight", "bias", "running_mean", "running_var"] {
            out.push((format!("{}.{name}", s.bn), vec![s.c_out]));
        }
    }
    out
}

/// A convolution with BatchNorm folded in.
struct FusedConv {
    weight: Tensor,
    bias: Tensor,
    stride: i64,
    pad: i64,
}

impl FusedConv {
    fn shallow_clone(&self) -> FusedConv {
        FusedConv {
            weight: self.weight.shallow_clone(),
            bias: self.bias.shallow_clone(),
            stride: self.stride,
            pad: self.pad,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        x.conv2d(
            &self.weight,
            Some(&self.bias),
            [self.stride, self.stride],
            [self.pad, self.pad],
            [1, 1],
            1,
        )
    }
}

struct Bottleneck {
    convs: [FusedConv; 3],
    downsample: Option<FusedConv>,
}

impl Bottleneck {
    fn forward(&self, x: &Tensor) -> Tensor {
        let y = self.convs[0].forward(x).relu();
        let y = self.convs[1].forward(&y).relu();
        let y = self.convs[2].forward(&y);
        let identity = match &self.downsample {
            Some(d) => d.forward(x),
            None => x.shallow_clone(),
        };
        (y + identity).relu()
    }
}

/// How the model runs: device, precision and memory layout.
#[derive(Debug, Clone, Copy)]
pub struct RunOptions {
    pub device: Device,
    pub precision: Precision,
    pub channels_last: bool,
}

impl RunOptions {
    pub fn kind(&self) -> Kind {
        match self.precision {
            Precision::Fp32 => Kind::Float,
            Precision::Bf16 => Kind::BFloat16,
            Precision::Fp16 => Kind::Half,
        }
    }
}

/// NCHW-shaped view with NHWC (channels-last) strides; libtorch picks channels-last kernels.
pub fn to_channels_last(t: &Tensor) -> Tensor {
    t.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2])
}

/// The inference trunk with pooling.
pub struct ResNetTrunk {
    stem: FusedConv,
    stages: Vec<Vec<Bottleneck>>,
    pool: Pool,
    opts: RunOptions,
}

impl ResNetTrunk {
    /// Build from a checked state dict (see `weights::check_state_dict`).
    pub fn new(
        state: &HashMap<String, Tensor>,
        layer: Layer,
        pool: Pool,
        opts: RunOptions,
    ) -> Result<Self> {
        let _guard = tch::no_grad_guard();
        let fuse = |s: &ConvBnSpec| -> Result<FusedConv> {
            let get = |k: String| -> Result<Tensor> {
                Ok(state
                    .get(&k)
                    .with_context(|| format!("weights lack {k}"))?
                    .to_kind(Kind::Double))
            };
            let w = get(format!("{}.weight", s.conv))?;
            let gamma = get(format!("{}.weight", s.bn))?;
            let beta = get(format!("{}.bias", s.bn))?;
            let mean = get(format!("{}.running_mean", s.bn))?;
            let var = get(format!("{}.running_var", s.bn))?;
            let scale = gamma / (var + BN_EPS).sqrt();
            let weight = (w * scale.view([-1, 1, 1, 1])).to_kind(opts.kind());
            let bias = (beta - mean * &scale).to_kind(opts.kind());
            let weight = if opts.channels_last {
                to_channels_last(&weight)
            } else {
                weight.contiguous()
            };
            Ok(FusedConv {
                weight: weight.to_device(opts.device),
                bias: bias.to_device(opts.device),
                stride: s.stride,
                pad: s.pad,
            })
        };
        let stem = fuse(&stem_spec())?;
        let mut stages = Vec::new();
        for stage in block_specs(layer) {
            let mut blocks = Vec::new();
            for b in stage {
                blocks.push(Bottleneck {
                    convs: [fuse(&b.convs[0])?, fuse(&b.convs[1])?, fuse(&b.convs[2])?],
                    downsample: b.downsample.as_ref().map(fuse).transpose()?,
                });
            }
            stages.push(blocks);
        }
        Ok(ResNetTrunk {
            stem,
            stages,
            pool,
            opts,
        })
    }

    /// Another handle on the same weights (no copy), for another thread.
    pub fn shallow_clone(&self) -> ResNetTrunk {
        ResNetTrunk {
            stem: self.stem.shallow_clone(),
            stages: self
                .stages
                .iter()
                .map(|s| {
                    s.iter()
                        .map(|b| Bottleneck {
                            convs: [
                                b.convs[0].shallow_clone(),
                                b.convs[1].shallow_clone(),
                                b.convs[2].shallow_clone(),
                            ],
                            downsample: b.downsample.as_ref().map(FusedConv::shallow_clone),
                        })
                        .collect()
                })
                .collect(),
            pool: self.pool,
            opts: self.opts,
        }
    }

    pub fn options(&self) -> RunOptions {
        self.opts
    }

    /// Every convolution's (BatchNorm-fused) weight, stem first: what the layout test reads.
    #[cfg(test)]
    pub(crate) fn conv_weights(&self) -> Vec<&Tensor> {
        let blocks = self.stages.iter().flatten();
        std::iter::once(&self.stem.weight)
            .chain(blocks.flat_map(|b| b.convs.iter().chain(&b.downsample).map(|c| &c.weight)))
            .collect()
    }

    /// Normalized input `[N, 3, H, W]` in the model's kind and device -> pooled `[N, D]` f32.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let _guard = tch::no_grad_guard();
        let mut y = self
            .stem
            .forward(x)
            .relu()
            .max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false);
        for stage in &self.stages {
            for block in stage {
                y = block.forward(&y);
            }
        }
        let pooled = match self.pool {
            Pool::Max => y.amax([2, 3], false),
            Pool::Avg => {
                y.to_kind(Kind::Float)
                    .mean_dim(Some([2i64, 3].as_slice()), false, Kind::Float)
            }
        };
        pooled.to_kind(Kind::Float)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_match_torchvision_names_and_counts() {
        let shapes = parameter_shapes(Layer::Layer4);
        // torchvision resnet50: 53 convs, each with a BN of 4 tensors (num_batches_tracked and
        // fc excluded).
        assert_eq!(shapes.len(), 53 * 5);
        let get = |k: &str| shapes.iter().find(|(n, _)| n == k).map(|(_, s)| s.clone());
        assert_eq!(get("conv1.weight"), Some(vec![64, 3, 7, 7]));
        assert_eq!(
            get("layer1.0.downsample.0.weight"),
            Some(vec![256, 64, 1, 1])
        );
        assert_eq!(get("layer2.0.conv2.weight"), Some(vec![128, 128, 3, 3]));
        assert_eq!(get("layer4.2.bn3.running_var"), Some(vec![2048]));
        assert_eq!(get("layer1.1.downsample.0.weight"), None);
        let l3 = parameter_shapes(Layer::Layer3);
        assert!(l3.iter().all(|(k, _)| !k.starts_with("layer4")));
        assert_eq!(feature_dim(Layer::Layer3), 1024);
    }
}
