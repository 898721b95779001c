//! Tile decoding with OpenCV `cv2.imread(path)` semantics, returning 8-bit RGB.
//!
//! The tutorial reads tiles with `cv2.imread` (IMREAD_COLOR) and then swaps BGR to RGB, so the
//! pixels that reach the network are: 8 bits per channel, alpha dropped without compositing,
//! gray expanded to three equal channels, palettes expanded, 16-bit PNG reduced to its high byte
//! (libpng's strip-16, as OpenCV configures it) and 16-bit TIFF scaled by 1/257 with rounding
//! (OpenCV's TIFF decoder), JPEG EXIF orientation applied. The format is sniffed from the bytes,
//! not trusted from the file name. Failures come back as a one-line reason for the caller to
//! attach to the tile's path.

use std::io::Cursor;

use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader};

use super::resize::Image;

/// Decode encoded tile bytes into an 8-bit RGB [`Image`].
pub fn decode_rgb(bytes: &[u8]) -> Result<Image, String> {
    if bytes.is_empty() {
        return Err("empty file".into());
    }
    let format = image::guess_format(bytes)
        .map_err(|_| "not a PNG, JPEG or TIFF image (unrecognised file signature)".to_string())?;
    if !matches!(
        format,
        ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::Tiff
    ) {
        return Err(format!("unsupported image format {format:?}"));
    }
    if format == ImageFormat::Jpeg {
        return decode_jpeg(bytes);
    }
    let reader = ImageReader::with_format(Cursor::new(bytes), format);
    let decoder = reader
        .into_decoder()
        .map_err(|e| format!("cannot decode {format:?}: {e}"))?;
    let img = DynamicImage::from_decoder(decoder)
        .map_err(|e| format!("cannot decode {format:?}: {e}"))?;
    to_rgb8(img, format)
}

extern "C" {
    /// libjpeg-turbo's own check (linked in from mozjpeg-sys): 1 when its SIMD kernels were
    /// built (x86 needs `nasm` at build time) and the CPU supports them.
    fn jsimd_can_idct_islow() -> std::os::raw::c_int;
}

/// Whether JPEG decoding uses libjpeg-turbo's SIMD kernels (about 2x faster; same pixels).
pub fn jpeg_simd() -> bool {
    // SAFETY: a pure query of compile-time configuration and CPU flags.
    unsafe { jsimd_can_idct_islow() != 0 }
}

/// JPEG through libjpeg-turbo's own decoder (mozjpeg is a libjpeg-turbo fork), configured as
/// OpenCV configures it (ISLOW IDCT, fancy upsampling), so pixels match `cv2.imread` exactly;
/// pure-Rust decoders differ by up to 4 levels in a quarter of the pixels.
fn decode_jpeg(bytes: &[u8]) -> Result<Image, String> {
    // libjpeg pads a truncated stream with gray and only warns; we refuse it instead.
    let tail = &bytes[bytes.len().saturating_sub(64)..];
    if !tail.windows(2).any(|w| w == [0xFF, 0xD9]) {
        return Err("truncated JPEG (no end-of-image marker)".into());
    }
    let orientation = ImageReader::with_format(Cursor::new(bytes), ImageFormat::Jpeg)
        .into_decoder()
        .ok()
        .and_then(|mut d| d.orientation().ok());
    // libjpeg's errors unwind as panics, caught here and reported against the tile.
    let result = crate::error::catch_panic(|| -> std::io::Result<(usize, usize, Vec<u8>)> {
        let mut d = mozjpeg::Decompress::new_mem(bytes)?;
        d.dct_method(mozjpeg::DctMethod::IntegerSlow);
        d.do_fancy_upsampling(true);
        let mut s = d.rgb()?;
        let (w, h) = (s.width(), s.height());
        let data: Vec<u8> = s.read_scanlines()?;
        s.finish()?;
        Ok((w, h, data))
    });
    let (w, h, data) = match result {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => return Err(format!("cannot decode JPEG: {e}")),
        Err(msg) => return Err(format!("cannot decode JPEG: {msg}")),
    };
    if w == 0 || h == 0 || data.len() != w * h * 3 {
        return Err("cannot decode JPEG: unexpected image size".into());
    }
    let img = Image::new(w, h, 3, data);
    match orientation {
        Some(o) if o != image::metadata::Orientation::NoTransforms => {
            let buf =
                image::RgbImage::from_raw(w as u32, h as u32, img.data).expect("size checked");
            let mut dynimg = DynamicImage::ImageRgb8(buf);
            dynimg.apply_orientation(o);
            to_rgb8(dynimg, ImageFormat::Jpeg)
        }
        _ => Ok(img),
    }
}

/// Reduce any decoded pixel layout to 8-bit RGB the way OpenCV's IMREAD_COLOR does.
fn to_rgb8(img: DynamicImage, format: ImageFormat) -> Result<Image, String> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    if w == 0 || h == 0 {
        return Err("image has zero width or height".into());
    }
    let reduce16 = |v: u16| -> u8 {
        if format == ImageFormat::Tiff {
            ((v as f64) / 257.0).round_ties_even() as u8
        } else {
            (v >> 8) as u8
        }
    };
    let data: Vec<u8> = match img {
        DynamicImage::ImageRgb8(b) => b.into_raw(),
        DynamicImage::ImageRgba8(b) => b
            .into_raw()
            .chunks_exact(4)
            .flat_map(|p| [p[0], p[1], p[2]])
            .collect(),
        DynamicImage::ImageLuma8(b) => b.into_raw().iter().flat_map(|&v| [v, v, v]).collect(),
        DynamicImage::ImageLumaA8(b) => b
            .into_raw()
            .chunks_exact(2)
            .flat_map(|p| [p[0], p[0], p[0]])
            .collect(),
        DynamicImage::ImageRgb16(b) => b.into_raw().iter().map(|&v| reduce16(v)).collect(),
        DynamicImage::ImageRgba16(b) => b
            .into_raw()
            .chunks_exact(4)
            .flat_map(|p| [reduce16(p[0]), reduce16(p[1]), reduce16(p[2])])
            .collect(),
        DynamicImage::ImageLuma16(b) => b
            .into_raw()
            .iter()
            .flat_map(|&v| {
                let g = reduce16(v);
                [g, g, g]
            })
            .collect(),
        DynamicImage::ImageLumaA16(b) => b
            .into_raw()
            .chunks_exact(2)
            .flat_map(|p| {
                let g = reduce16(p[0]);
                [g, g, g]
            })
            .collect(),
        other => {
            return Err(format!(
                "unsupported pixel type {:?} (floating-point images are not tiles)",
                other.color()
            ))
        }
    };
    Ok(Image::new(w, h, 3, data))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode_png(img: DynamicImage) -> Vec<u8> {
        let mut out = Vec::new();
        img.write_to(&mut Cursor::new(&mut out), ImageFormat::Png)
            .unwrap();
        out
    }

    #[test]
    fn gray_is_expanded_and_alpha_dropped() {
        let gray = image::GrayImage::from_raw(2, 1, vec![10, 200]).unwrap();
        let img = decode_rgb(&encode_png(DynamicImage::ImageLuma8(gray))).unwrap();
        assert_eq!(img.data, vec![10, 10, 10, 200, 200, 200]);
        let rgba = image::RgbaImage::from_raw(1, 1, vec![1, 2, 3, 0]).unwrap();
        let img = decode_rgb(&encode_png(DynamicImage::ImageRgba8(rgba))).unwrap();
        assert_eq!(img.data, vec![1, 2, 3]);
    }

    #[test]
    fn png16_keeps_high_byte() {
        let buf =
            image::ImageBuffer::<image::Rgb<u16>, _>::from_raw(1, 1, vec![0x12ff, 0x0080, 0xff7f])
                .unwrap();
        let img = decode_rgb(&encode_png(DynamicImage::ImageRgb16(buf))).unwrap();
        assert_eq!(img.data, vec![0x12, 0x00, 0xff]);
    }

    #[test]
    fn garbage_and_truncation_are_reported() {
        assert!(decode_rgb(b"").unwrap_err().contains("empty"));
        assert!(decode_rgb(b"hello world")
            .unwrap_err()
            .contains("signature"));
        let rgb = image::RgbImage::from_raw(8, 8, vec![7; 192]).unwrap();
        let png = encode_png(DynamicImage::ImageRgb8(rgb));
        assert!(decode_rgb(&png[..png.len() / 2]).is_err());
    }
}
