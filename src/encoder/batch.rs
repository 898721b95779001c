//! Pixel buffers for batches: where the model stage puts the tiles of a batch, and what a
//! model worker reads them from.
//!
//! For the network a buffer is a u8 tensor of a whole batch (`[rows, size, size, 3]`); on a
//! GPU it is page-locked, so the upload is one DMA straight from where the tiles were put,
//! with no staging copy in between. For the pipeline bench's stand-in it is plain memory.
//! Buffers go round: filled by the model stage, read by a worker, handed back with the
//! batch's features, cleared and filled again. Whoever holds one owns it. A worker that
//! succeeded hands it back once its upload has finished (it waited for the features, which
//! come after the upload on the same stream); the buffer of a failed batch is dropped, never
//! refilled (its upload may still be running; libtorch's pinned allocator frees the memory
//! only once the copy is done).
//!
//! Memory: a GPU batch of 256 tiles of 224 px is 38.5 MB, which libtorch's pinned allocator
//! rounds up to 64 MB; with two model workers at most 8 buffers exist (about 4-5 in a steady
//! run), so up to 512 MB of page-locked host memory, kept until the process ends.

use tch::{Device, Kind, Tensor};

/// Tiles of one batch, back to back.
pub(crate) struct PixelBuf {
    storage: Storage,
    /// Bytes filled.
    len: usize,
}

enum Storage {
    Host(Vec<u8>),
    Tensor {
        tensor: Tensor,
        /// The tensor's data: contiguous, `cap` bytes, alive as long as `tensor`.
        ptr: *mut u8,
        cap: usize,
        pinned: bool,
    },
}

// SAFETY: `ptr` points into the storage of the `tensor` stored beside it, which moves with
// it (tch's Tensor is Send); a PixelBuf has one owner at a time and is never shared.
unsafe impl Send for PixelBuf {}

impl PixelBuf {
    /// Plain memory for `cap` bytes.
    pub fn host(cap: usize) -> PixelBuf {
        PixelBuf {
            storage: Storage::Host(Vec::with_capacity(cap)),
            len: 0,
        }
    }

    /// A u8 CPU tensor of `rows` tiles of `size` x `size` RGB pixels; page-locked for `device`
    /// when it is a GPU (if that fails, pageable memory works too: slower uploads, and the
    /// reason comes back beside the buffer).
    pub fn tensor(rows: usize, size: usize, device: Device) -> (PixelBuf, Option<String>) {
        let t = Tensor::empty(
            [rows as i64, size as i64, size as i64, 3],
            (Kind::Uint8, Device::Cpu),
        );
        let (tensor, pinned, why) = match device {
            Device::Cpu => (t, false, None),
            // `_pin_memory` directly: `pin_memory(device)` prints a deprecation warning.
            d => match t.f_internal_pin_memory(d) {
                Ok(p) => (p, true, None),
                Err(e) => {
                    let first = crate::error::first_line(&e.to_string()).to_string();
                    (t, false, Some(first))
                }
            },
        };
        assert!(tensor.is_contiguous() && tensor.kind() == Kind::Uint8);
        let cap = rows * size * size * 3;
        let ptr = tensor.data_ptr() as *mut u8;
        (
            PixelBuf {
                storage: Storage::Tensor {
                    tensor,
                    ptr,
                    cap,
                    pinned,
                },
                len: 0,
            },
            why,
        )
    }

    /// Bytes filled.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Append one tile's pixels.
    pub fn push(&mut self, pixels: &[u8]) {
        match &mut self.storage {
            Storage::Host(v) => v.extend_from_slice(pixels),
            Storage::Tensor { ptr, cap, .. } => {
                assert!(self.len + pixels.len() <= *cap, "batch buffer overflow");
                // SAFETY: in bounds (checked above) of memory this buffer owns alone.
                unsafe {
                    std::ptr::copy_nonoverlapping(pixels.as_ptr(), ptr.add(self.len), pixels.len())
                };
            }
        }
        self.len += pixels.len();
    }

    /// Fill with zeros up to `len` bytes (the padding rows of a GPU batch).
    pub fn pad_to(&mut self, len: usize) {
        if len > self.len {
            match &mut self.storage {
                Storage::Host(v) => v.resize(len, 0),
                Storage::Tensor { ptr, cap, .. } => {
                    assert!(len <= *cap, "batch buffer overflow");
                    // SAFETY: in bounds of memory this buffer owns alone.
                    unsafe { std::ptr::write_bytes(ptr.add(self.len), 0, len - self.len) };
                }
            }
            self.len = len;
        }
    }

    /// Empty it for the next batch (the memory stays).
    pub fn clear(&mut self) {
        if let Storage::Host(v) = &mut self.storage {
            v.clear();
        }
        self.len = 0;
    }

    /// The bytes filled.
    pub fn as_slice(&self) -> &[u8] {
        match &self.storage {
            Storage::Host(v) => v,
            // SAFETY: the first `len` bytes were written by `push`/`pad_to`.
            Storage::Tensor { ptr, .. } => unsafe { std::slice::from_raw_parts(*ptr, self.len) },
        }
    }

    /// The first `rows` tiles as a `[rows, size, size, 3]` tensor sharing this buffer's
    /// memory, and whether it is page-locked. None for plain memory or when fewer than `rows`
    /// tiles are filled. The view must be dropped (and any copy from it finished) before the
    /// buffer is written again or handed on: the model worker uses it within one batch.
    pub fn rows(&self, rows: usize) -> Option<(Tensor, bool)> {
        let Storage::Tensor { tensor, pinned, .. } = &self.storage else {
            return None;
        };
        let size = tensor.size();
        let row_bytes = (size[1] * size[2] * size[3]) as usize;
        (rows as i64 <= size[0] && rows * row_bytes <= self.len)
            .then(|| (tensor.narrow(0, 0, rows as i64), *pinned))
    }

    /// A model worker's input: `n` tiles of `size` px, padded to `pad_to` rows where given
    /// (one shape for cuDNN), as a u8 NHWC tensor on `device`. From page-locked memory the
    /// upload is non-blocking: it may still read the buffer when this returns, so the buffer
    /// goes back to the model stage (to be refilled) only with the batch's features, which
    /// come after the upload on the worker's stream.
    pub fn upload(
        &mut self,
        n: usize,
        size: usize,
        pad_to: Option<usize>,
        device: Device,
    ) -> anyhow::Result<Tensor> {
        let row_bytes = size * size * 3;
        anyhow::ensure!(
            self.len() == n * row_bytes,
            "batch of {n} tiles holds {} bytes, not {}",
            self.len(),
            n * row_bytes
        );
        let rows = pad_to.map_or(n, |p| p.max(n));
        self.pad_to(rows * row_bytes);
        let (staged, pinned) = self.rows(rows).ok_or_else(|| {
            anyhow::anyhow!("internal error: a batch buffer that is not the model's")
        })?;
        Ok(match device {
            Device::Cpu => staged,
            d => staged.to_device_(d, Kind::Uint8, pinned, false),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Filling, padding, reading back and reuse, for both kinds of memory.
    #[test]
    fn buffers_fill_pad_and_clear() {
        let (t, why) = PixelBuf::tensor(3, 2, Device::Cpu);
        assert!(why.is_none());
        for mut b in [PixelBuf::host(36), t] {
            let tile: Vec<u8> = (1..=12).collect();
            b.push(&tile);
            assert_eq!(b.as_slice(), &tile[..]);
            b.pad_to(24);
            assert_eq!(b.len(), 24);
            assert_eq!(&b.as_slice()[12..], &[0; 12]);
            if let Some((rows, pinned)) = b.rows(2) {
                assert!(!pinned);
                assert_eq!(rows.size(), [2, 2, 2, 3]);
                assert_eq!(Vec::<u8>::try_from(&rows.view([-1])).unwrap(), b.as_slice());
                assert!(b.rows(3).is_none(), "only two rows filled");
            }
            b.clear();
            b.push(&[7; 12]);
            b.push(&[9; 12]);
            b.pad_to(12); // never shrinks
            assert_eq!(b.as_slice(), [[7u8; 12], [9; 12]].concat());
        }
    }

    #[test]
    #[should_panic(expected = "batch buffer overflow")]
    fn a_tensor_buffer_never_grows() {
        let (mut b, _) = PixelBuf::tensor(1, 2, Device::Cpu);
        b.push(&[0; 12]);
        b.push(&[0; 1]);
    }
}
