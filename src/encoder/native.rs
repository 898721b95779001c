//! The native ResNet50 as an [`Encoder`]: u8 NHWC batches in, pooled features out.
//!
//! On the model worker's device: upload (from page-locked memory on a GPU), ToTensor and
//! Normalize in f32 as torchvision does, channels-last and precision cast, the trunk, pooling,
//! download. On a GPU, partial batches are padded to one shape (cuDNN plans are made once).

use anyhow::{Context, Result};
use tch::{Device, Kind, Tensor};

use super::resnet::{to_channels_last, ResNetTrunk};
use super::{check_finite, Encoder, PixelBuf};

/// Turns u8 NHWC batches into pooled features on the configured device.
pub(crate) struct NativeResNet {
    model: ResNetTrunk,
    mean: Tensor,
    std: Tensor,
    size: i64,
    /// Pad partial batches to this size (one input shape: cuDNN plans are made once).
    pad_to: Option<usize>,
    /// Give each model worker a CUDA stream of its own on this device (the default; see
    /// `device::configure_cuda`).
    worker_stream: Option<usize>,
    /// What its errors call it: the weights it was built from.
    label: String,
}

impl NativeResNet {
    /// Whether the input and the weights are channels-last (`--layout nhwc`).
    pub(crate) fn channels_last(&self) -> bool {
        self.model.options().channels_last
    }

    /// `(mean, std)` per channel, on the 0-1 scale; `weights` names them in errors.
    pub(crate) fn new(
        model: ResNetTrunk,
        (m, s): ([f32; 3], [f32; 3]),
        size: u32,
        pad_to: Option<usize>,
        worker_stream: Option<usize>,
        weights: &str,
    ) -> NativeResNet {
        let dev = model.options().device;
        NativeResNet {
            mean: Tensor::from_slice(&m).view([1, 3, 1, 1]).to_device(dev),
            std: Tensor::from_slice(&s).view([1, 3, 1, 1]).to_device(dev),
            model,
            size: size as i64,
            pad_to,
            worker_stream,
            label: format!("the ResNet50 with weights {weights}"),
        }
    }
}

impl NativeResNet {
    /// u8 NHWC on the model's device -> pooled features: ToTensor (x / 255) and Normalize
    /// ((x - mean) / std) in f32, as torchvision does, then the layout and precision cast and
    /// the trunk.
    fn forward_u8(&self, input: &Tensor) -> Tensor {
        self.model.forward(&self.model_input(input))
    }

    /// The tensor the trunk computes on: `[N, 3, H, W]` in the model's precision, with
    /// channels-last strides under `--layout nhwc` and contiguous NCHW otherwise.
    fn model_input(&self, input: &Tensor) -> Tensor {
        let opts = self.model.options();
        let x = input.permute([0, 3, 1, 2]).to_kind(Kind::Float);
        let x = ((x / 255.0) - &self.mean) / &self.std;
        let x = if opts.channels_last {
            to_channels_last(&x)
        } else {
            x.contiguous()
        };
        x.to_kind(opts.kind())
    }
}

impl Encoder for NativeResNet {
    /// A handle for another worker: shared weights.
    fn fork(&self) -> NativeResNet {
        NativeResNet {
            model: self.model.shallow_clone(),
            mean: self.mean.shallow_clone(),
            std: self.std.shallow_clone(),
            size: self.size,
            pad_to: self.pad_to,
            worker_stream: self.worker_stream,
            label: self.label.clone(),
        }
    }

    /// A u8 tensor of a whole (padded) batch, page-locked on a GPU: the tiles are put where
    /// the upload reads them.
    fn buffer(&self, tiles: usize) -> PixelBuf {
        let rows = self.pad_to.map_or(tiles, |p| p.max(tiles));
        let (buf, why) = PixelBuf::tensor(rows, self.size as usize, self.model.options().device);
        if let Some(why) = why {
            static ONCE: std::sync::Once = std::sync::Once::new();
            ONCE.call_once(|| {
                eprintln!(
                    "tilefeat: warning: cannot pin host memory for uploads ({why}); \
                     using pageable memory (slower, same results)"
                )
            });
        }
        buf
    }

    fn start_worker(&self) -> Result<()> {
        match self.worker_stream {
            Some(i) => crate::device::use_worker_stream(i).map_err(anyhow::Error::msg),
            None => Ok(()),
        }
    }

    /// `pixels` holds `n` RGB tiles of size x size; returns `n * D` features, all finite (a NaN
    /// or an infinity, e.g. from a `--std` of 1e-40, is an error naming the weights). On the
    /// CPU each tile goes through the network alone, so its features never depend on the
    /// batch.
    fn run(&self, pixels: &mut PixelBuf, n: usize) -> Result<Vec<f32>> {
        let _guard = tch::no_grad_guard();
        let opts = self.model.options();
        let input = pixels.upload(n, self.size as usize, self.pad_to, opts.device)?;
        let out = match opts.device {
            // On the CPU, one image at a time: oneDNN picks its kernels by the input's shape,
            // and a batch of 24 gave other last bits than a batch of 12, so features would
            // depend on --batch-size and on which tiles a cache already held. One image per
            // call is as fast here (a single-threaded worker: 17.6 images/s at 1 and at 8
            // on an AVX2 EPYC) and makes every row a function of its tile alone.
            Device::Cpu => Tensor::cat(
                &(0..n as i64)
                    .map(|i| self.forward_u8(&input.narrow(0, i, 1)))
                    .collect::<Vec<_>>(),
                0,
            ),
            _ => self.forward_u8(&input).narrow(0, 0, n as i64),
        }
        .to_device(Device::Cpu);
        let flat = out.contiguous().view([-1]);
        let v = Vec::<f32>::try_from(&flat).context("cannot read features back from the model")?;
        check_finite(&v, v.len() / n.max(1), &self.label)?;
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::Precision;
    use crate::encoder::resnet::RunOptions;
    use crate::encoder::weights;

    /// `--layout` reaches the tensors the network computes on. NCHW and NHWC may give the
    /// same bits on some CPUs (oneDNN's choice of kernels), so numbers cannot show an ignored
    /// layout (issue 27); strides can: channels-last input and convolution weights under
    /// nhwc, contiguous NCHW under nchw, in fp32 and in bf16.
    #[test]
    fn the_layout_reaches_the_input_and_the_weights() {
        use crate::cli::{Layer, Pool};
        for (channels_last, precision) in [
            (true, Precision::Fp32),
            (false, Precision::Fp32),
            (true, Precision::Bf16),
            (false, Precision::Bf16),
        ] {
            let opts = RunOptions {
                device: Device::Cpu,
                precision,
                channels_last,
            };
            let state = weights::random_state_dict(1, Layer::Layer3);
            let model = ResNetTrunk::new(&state, Layer::Layer3, Pool::Max, opts).unwrap();
            let net = NativeResNet::new(model, ([0.5; 3], [0.5; 3]), 32, None, None, "random:1");
            let x = net.model_input(&Tensor::zeros([2, 32, 32, 3], (Kind::Uint8, Device::Cpu)));
            let what = format!("channels_last {channels_last}, {precision:?}");
            assert_eq!(x.size(), [2, 3, 32, 32], "{what}");
            assert_eq!(x.kind(), opts.kind(), "{what}");
            let strides = if channels_last {
                [3 * 32 * 32, 1, 32 * 3, 3]
            } else {
                [3 * 32 * 32, 32 * 32, 32, 1]
            };
            assert_eq!(x.stride(), strides, "input, {what}");
            // A 1 x 1 kernel has the same strides either way; the stem's 7 x 7 and the
            // bottlenecks' 3 x 3 tell them apart.
            let spatial: Vec<&Tensor> = net
                .model
                .conv_weights()
                .into_iter()
                .filter(|w| w.size()[2] > 1)
                .collect();
            assert_eq!(
                spatial.len(),
                1 + 3 + 4 + 6,
                "stem and one 3 x 3 a bottleneck"
            );
            for w in spatial {
                let s = w.size();
                let nhwc = [s[1] * s[2] * s[3], 1, s[3] * s[1], s[1]];
                assert_eq!(w.stride() == nhwc, channels_last, "weights {s:?}, {what}");
                assert_eq!(w.is_contiguous(), !channels_last, "weights {s:?}, {what}");
            }
        }
    }

    /// A reused batch buffer, padded as on a GPU, gives each tile exactly the features it gets
    /// alone: pixels land in the right rows, reuse and padding are clean, and on the CPU the
    /// batch does not change a bit.
    #[test]
    fn padded_batches_in_a_reused_buffer_match_single_tiles() {
        use crate::cli::{Layer, Pool};
        let opts = RunOptions {
            device: Device::Cpu,
            precision: Precision::Fp32,
            channels_last: true,
        };
        let model = ResNetTrunk::new(
            &weights::random_state_dict(1, Layer::Layer4),
            Layer::Layer4,
            Pool::Max,
            opts,
        )
        .unwrap();
        let size = 32usize;
        let tile_bytes = size * size * 3;
        let tiles: Vec<Vec<u8>> = (0..4u32)
            .map(|t| {
                (0..tile_bytes as u32)
                    .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(t * 977) >> 13) as u8)
                    .collect()
            })
            .collect();
        let single = NativeResNet::new(
            model.shallow_clone(),
            ([0.5; 3], [0.5; 3]),
            32,
            None,
            None,
            "random:1",
        );
        let alone: Vec<Vec<f32>> = tiles
            .iter()
            .map(|t| {
                let mut b = single.buffer(1);
                b.push(t);
                single.run(&mut b, 1).unwrap()
            })
            .collect();
        let padded = NativeResNet::new(model, ([0.5; 3], [0.5; 3]), 32, Some(5), None, "random:1");
        // One buffer for every batch, as the model stage reuses them: a short batch after a
        // long one finds the old pixels beyond its tiles.
        let mut buf = padded.buffer(3);
        for group in [&[0usize, 1, 2][..], &[3, 1], &[2, 0, 3, 1]] {
            buf.clear();
            for &i in group {
                buf.push(&tiles[i]);
            }
            let got = padded.run(&mut buf, group.len()).unwrap();
            assert_eq!(got.len(), group.len() * 2048);
            for (k, &i) in group.iter().enumerate() {
                // On the CPU, bit for bit: each tile goes through the network alone.
                let row = &got[k * 2048..(k + 1) * 2048];
                assert!(row == &alone[i][..], "tile {i} in {group:?}");
            }
        }
    }
}
