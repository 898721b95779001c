//! Tile decoding with OpenCV `cv2.imread(path)` semantics, returning 8-bit RGB.
//!
//! The tutorial reads tiles with `cv2.imread` (IMREAD_COLOR) and then swaps BGR to RGB, so the
//! pixels that reach the network are: 8 bits per channel, alpha dropped without compositing,
//! gray expanded to three equal channels, palettes expanded, 16-bit PNG reduced to its high byte
//! (libpng's strip-16, as OpenCV configures it) and 16-bit TIFF scaled by 1/257 with rounding
//! (OpenCV's TIFF decoder), JPEG EXIF orientation applied. The format is sniffed from the bytes,
//! not trusted from the file name. CMYK and YCCK JPEGs become RGB with OpenCV's own formula
//! (`icvCvt_CMYK2BGR_8u_C4C3R`: `k - ((255 - c) * k >> 8)`, for Adobe's inverted CMYK).
//! Failures come back as a one-line reason for the caller to attach to the tile's path.
//!
//! Hostile files are bad tiles, never an abort or a huge allocation: a declared size over
//! [`MAX_PIXELS`] (or [`MAX_SIDE`] on a side) is refused from the header, before anything is
//! allocated; a PNG that declares more pixel data than its compressed bytes could ever hold
//! (deflate expands at most 1032:1) is refused as a bomb; a JPEG whose data ends before its
//! last scan line (libjpeg only warns, "premature end", and pads with gray) is refused.

use std::io::Cursor;

use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader};

use super::resize::Image;

/// The largest tile decoded: 2^28 pixels (16,384 x 16,384; 768 MB as RGB). OpenCV's `imread`
/// refuses more than 2^30; tiles are a few hundred pixels a side, and each decode thread may
/// hold one image at a time, so tilefeat is stricter.
pub const MAX_PIXELS: u64 = 1 << 28;
/// The longest side decoded (OpenCV's `CV_IO_MAX_IMAGE_WIDTH`/`HEIGHT`).
pub const MAX_SIDE: u64 = 1 << 20;

/// Refuse a declared size before anything is allocated for it.
fn check_declared_size(format: &str, w: u64, h: u64) -> Result<(), String> {
    if w == 0 || h == 0 {
        return Err(format!("{format} declares a size of {w} x {h} pixels"));
    }
    if w > MAX_SIDE || h > MAX_SIDE || w * h > MAX_PIXELS {
        return Err(format!(
            "{format} declares {w} x {h} pixels, more than tilefeat decodes ({MAX_PIXELS} pixels, \
             {MAX_SIDE} a side): not a tile (or a decompression bomb)"
        ));
    }
    Ok(())
}

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
    let (w, h) = decoder.dimensions();
    check_declared_size(&format!("{format:?}"), w as u64, h as u64)?;
    if format == ImageFormat::Png {
        // Deflate expands at most 1032:1, so no real PNG holds more than that many bytes of
        // pixel data (plus a filter byte a row) per byte of file.
        let declared = decoder.total_bytes().saturating_add(h as u64);
        if declared > 1032 * bytes.len() as u64 + 4096 {
            return Err(format!(
                "PNG declares {w} x {h} pixels ({declared} bytes) but is only {} bytes long: \
                 truncated, or a decompression bomb",
                bytes.len()
            ));
        }
    }
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

/// libjpeg's fatal errors unwind (as mozjpeg's own error manager does) with the message,
/// to be caught by [`crate::error::catch_panic`] and reported against the tile.
extern "C-unwind" fn jpeg_error_exit(cinfo: &mut mozjpeg_sys::jpeg_common_struct) {
    std::panic::resume_unwind(Box::new(jpeg_message(cinfo)));
}

/// Warnings libjpeg would print and go on from: the one that means the entropy-coded data
/// ended before the last scan line ("premature end of data segment", after which libjpeg pads
/// the image with gray) unwinds as an error; the others are ignored, as `cv2.imread` goes on
/// too. Among those is "premature end of JPEG file" alone: the data ran out where libjpeg
/// looked for a marker, as when only the end-of-image marker is missing (every scan line is
/// there; OpenCV reads identical pixels). Data cut inside a scan always also needs bits that
/// are not there, which is the error. A JPEG of several scans cut between two of them is
/// complete as far as libjpeg knows, but some component never had its scan (sequential) or
/// some coefficients never reached full precision (progressive) ([`scans_incomplete`]): an
/// error too.
extern "C-unwind" fn jpeg_emit_message(cinfo: &mut mozjpeg_sys::jpeg_common_struct, level: i32) {
    // SAFETY: libjpeg calls this with its own, initialised error manager.
    let code = unsafe { cinfo.err.as_ref() }.map_or(0, |e| e.msg_code);
    if level < 0 && code == mozjpeg_sys::JWRN_JPEG_EOF && scans_incomplete(cinfo) {
        std::panic::resume_unwind(Box::new(
            "JPEG data ends before its last scan (cut between scans)".to_string(),
        ));
    }
    if level < 0 && code == mozjpeg_sys::JWRN_HIT_MARKER {
        std::panic::resume_unwind(Box::new(format!(
            "JPEG data ends before the last scan line ({})",
            jpeg_message(cinfo)
        )));
    }
}

/// Whether a JPEG being decoded still lacks data of some component. Progressive: libjpeg's
/// `coef_bits[c][k]` is -1 before any scan brought coefficient k of component c, then the
/// point transform of the last scan that did, 0 once it is known in full. Sequential
/// (`coef_bits` NULL): each component is coded in one scan, and libjpeg latches its
/// quantization table (`quant_table`, NULL until then) when the first scan holding it starts,
/// so a component without one never had its scan (regression, review: a non-interleaved
/// baseline JPEG cut after its Y scan was read with flat chroma).
fn scans_incomplete(cinfo: &mut mozjpeg_sys::jpeg_common_struct) -> bool {
    if cinfo.is_decompressor == 0 {
        return false;
    }
    // SAFETY: a decompressor's common struct is the first field of its
    // `jpeg_decompress_struct`; `coef_bits`, when not NULL, points to `num_components` arrays
    // of DCTSIZE2 ints (jdinput.c); `comp_info` to `num_components` component records once
    // the frame header is read (NULL before).
    unsafe {
        let d = &*(cinfo as *mut mozjpeg_sys::jpeg_common_struct
            as *const mozjpeg_sys::jpeg_decompress_struct);
        let n = d.num_components.max(0) as usize;
        let bits = d.coef_bits as *const [std::os::raw::c_int; 64];
        if !bits.is_null() {
            return (0..n).any(|c| (*bits.add(c)).iter().any(|&b| b != 0));
        }
        !d.comp_info.is_null() && (0..n).any(|c| (*d.comp_info.add(c)).quant_table.is_null())
    }
}

/// libjpeg's text for its current message.
fn jpeg_message(cinfo: &mut mozjpeg_sys::jpeg_common_struct) -> String {
    let mut buffer = [0u8; 200]; // JMSG_LENGTH
                                 // SAFETY: `format_message` writes at most JMSG_LENGTH bytes, NUL-terminated.
    let format = unsafe { cinfo.err.as_ref() }.and_then(|e| e.format_message);
    if let Some(format) = format {
        unsafe {
            let f: unsafe extern "C-unwind" fn(&mut mozjpeg_sys::jpeg_common_struct, *mut u8) =
                std::mem::transmute(format);
            f(cinfo, buffer.as_mut_ptr());
        }
    }
    let end = buffer.iter().position(|&c| c == 0).unwrap_or(buffer.len());
    String::from_utf8_lossy(&buffer[..end]).into_owned()
}

/// An error manager that unwinds on errors and on "premature end" warnings.
fn jpeg_error_mgr() -> mozjpeg::decompress::DecompressBuilder<'static> {
    // SAFETY: `jpeg_std_error` initialises every field of the zeroed struct.
    let mut err: mozjpeg_sys::jpeg_error_mgr = unsafe { std::mem::zeroed() };
    unsafe { mozjpeg_sys::jpeg_std_error(&mut err) };
    err.error_exit = Some(jpeg_error_exit);
    err.emit_message = Some(jpeg_emit_message);
    mozjpeg::Decompress::builder().with_err(err)
}

/// OpenCV's CMYK to RGB (`icvCvt_CMYK2BGR_8u_C4C3R`, for Adobe's inverted CMYK, which is what
/// libjpeg hands back for CMYK and YCCK files): each channel `k - ((255 - c) * k >> 8)`.
fn cmyk_to_rgb(cmyk: &[u8]) -> Vec<u8> {
    cmyk.chunks_exact(4)
        .flat_map(|p| {
            let k = p[3] as i32;
            let f = |c: u8| (k - (((255 - c as i32) * k) >> 8)) as u8;
            [f(p[0]), f(p[1]), f(p[2])]
        })
        .collect()
}

/// JPEG through libjpeg-turbo's own decoder (mozjpeg is a libjpeg-turbo fork), configured as
/// OpenCV configures it (ISLOW IDCT, fancy upsampling), so pixels match `cv2.imread` exactly;
/// pure-Rust decoders differ by up to 4 levels in a quarter of the pixels.
fn decode_jpeg(bytes: &[u8]) -> Result<Image, String> {
    let orientation = ImageReader::with_format(Cursor::new(bytes), ImageFormat::Jpeg)
        .into_decoder()
        .ok()
        .and_then(|mut d| d.orientation().ok());
    // libjpeg's errors (and "premature end" warnings) unwind as panics, caught here and
    // reported against the tile.
    let result = crate::error::catch_panic(|| -> Result<(usize, usize, Vec<u8>), String> {
        let io = |e: std::io::Error| format!("cannot decode JPEG: {e}");
        let mut d = jpeg_error_mgr().from_mem(bytes).map_err(io)?;
        let (w, h) = d.size();
        check_declared_size("JPEG", w as u64, h as u64)?;
        d.dct_method(mozjpeg::DctMethod::IntegerSlow);
        d.do_fancy_upsampling(true);
        let cmyk = matches!(
            d.color_space(),
            mozjpeg::ColorSpace::JCS_CMYK | mozjpeg::ColorSpace::JCS_YCCK
        );
        let data = if cmyk {
            let mut s = d.to_colorspace(mozjpeg::ColorSpace::JCS_CMYK).map_err(io)?;
            let data: Vec<u8> = s.read_scanlines().map_err(io)?;
            s.finish().map_err(io)?;
            cmyk_to_rgb(&data)
        } else {
            let mut s = d.rgb().map_err(io)?;
            let data: Vec<u8> = s.read_scanlines().map_err(io)?;
            s.finish().map_err(io)?;
            data
        };
        Ok((w, h, data))
    });
    let (w, h, data) = match result {
        Ok(r) => r?,
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

    fn encode_jpeg(w: u32, h: u32) -> Vec<u8> {
        let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 99]));
        let mut out = Vec::new();
        DynamicImage::ImageRgb8(img)
            .write_to(&mut Cursor::new(&mut out), ImageFormat::Jpeg)
            .unwrap();
        out
    }

    /// Sets a PNG's IHDR size (and its CRC).
    fn forge_png_size(mut png: Vec<u8>, w: u32, h: u32) -> Vec<u8> {
        assert_eq!(&png[12..16], b"IHDR");
        png[16..20].copy_from_slice(&w.to_be_bytes());
        png[20..24].copy_from_slice(&h.to_be_bytes());
        let crc = crc32fast::hash(&png[12..29]);
        png[29..33].copy_from_slice(&crc.to_be_bytes());
        png
    }

    /// Sets a JPEG's SOF size.
    fn forge_jpeg_size(mut jpg: Vec<u8>, w: u16, h: u16) -> Vec<u8> {
        let sof = jpg
            .windows(2)
            .position(|m| m[0] == 0xFF && (0xC0..=0xC2).contains(&m[1]))
            .unwrap();
        jpg[sof + 5..sof + 7].copy_from_slice(&h.to_be_bytes());
        jpg[sof + 7..sof + 9].copy_from_slice(&w.to_be_bytes());
        jpg
    }

    /// Regression: a 100000 x 100000 PNG header aborted the process trying to allocate 30 GB.
    #[test]
    fn png_header_bomb_is_a_bad_tile() {
        let rgb = image::RgbImage::from_raw(2, 2, vec![7; 12]).unwrap();
        let bomb = forge_png_size(encode_png(DynamicImage::ImageRgb8(rgb)), 100_000, 100_000);
        assert!(bomb.len() < 1000);
        let e = decode_rgb(&bomb).unwrap_err();
        assert!(
            e.contains("100000 x 100000") && e.contains("more than"),
            "{e}"
        );
        // Within the size limit, but far more pixels than the bytes can hold.
        let rgb = image::RgbImage::from_raw(2, 2, vec![7; 12]).unwrap();
        let bomb = forge_png_size(encode_png(DynamicImage::ImageRgb8(rgb)), 12_000, 12_000);
        let e = decode_rgb(&bomb).unwrap_err();
        assert!(e.contains("decompression bomb"), "{e}");
    }

    /// Regression: a JPEG whose SOF claims 65500 x 65500 decoded for 50 s at 13 GB into gray
    /// padding; half a JPEG with an end marker appended was accepted.
    #[test]
    fn forged_and_cut_jpegs_are_bad_tiles() {
        let jpg = encode_jpeg(64, 64);
        let e = decode_rgb(&forge_jpeg_size(jpg.clone(), 65500, 65500)).unwrap_err();
        assert!(e.contains("65500 x 65500"), "{e}");
        // A larger size than the data holds, within the limit: the data ends early.
        let e = decode_rgb(&forge_jpeg_size(jpg.clone(), 64, 640)).unwrap_err();
        assert!(e.contains("ends before the last scan line"), "{e}");
        // Cut halfway through its scan, with an end marker appended and without.
        let sos = jpg.windows(2).position(|w| w == [0xFF, 0xDA]).unwrap();
        let mut half = jpg[..(sos + jpg.len()) / 2].to_vec();
        let e = decode_rgb(&half).unwrap_err();
        assert!(e.contains("ends before the last scan line"), "{e}");
        half.extend_from_slice(&[0xFF, 0xD9]);
        let e = decode_rgb(&half).unwrap_err();
        assert!(e.contains("ends before the last scan line"), "{e}");
        // Cut in its headers.
        let e = decode_rgb(&jpg[..sos]).unwrap_err();
        assert!(e.contains("missing SOS marker"), "{e}");
        assert_eq!(decode_rgb(&jpg).unwrap().data.len(), 64 * 64 * 3);
    }

    /// Regression: a JPEG missing only its end-of-image marker was refused; `cv2.imread`
    /// reads it with the same pixels as the whole file.
    #[test]
    fn a_jpeg_missing_only_its_end_marker_is_read() {
        for (w, h) in [(64, 64), (97, 131)] {
            let jpg = encode_jpeg(w, h);
            assert_eq!(&jpg[jpg.len() - 2..], [0xFF, 0xD9]);
            let whole = decode_rgb(&jpg).unwrap();
            let cut = decode_rgb(&jpg[..jpg.len() - 2]).unwrap();
            assert_eq!(cut.data, whole.data, "{w}x{h}");
        }
        // Progressive: every scan there, only the end marker missing, is read; cut before
        // its last scan (at a scan boundary, where libjpeg sees nothing wrong) it is not.
        let jpg = encode_progressive_jpeg(96, 80);
        let whole = decode_rgb(&jpg).unwrap();
        assert_eq!(decode_rgb(&jpg[..jpg.len() - 2]).unwrap().data, whole.data);
        let last_scan = jpg.windows(2).rposition(|w| w == [0xFF, 0xDA]).unwrap();
        let e = decode_rgb(&jpg[..last_scan]).unwrap_err();
        assert!(e.contains("cut between scans"), "{e}");
    }

    /// Regression (review): a sequential JPEG whose components each have a scan of their own
    /// (non-interleaved), cut after the first scan, was read with the missing components flat.
    #[test]
    fn a_sequential_jpeg_cut_between_its_scans_is_refused() {
        let jpg = encode_non_interleaved_jpeg(64, 48);
        let sos: Vec<usize> = (0..jpg.len() - 1)
            .filter(|&i| jpg[i..i + 2] == [0xFF, 0xDA])
            .collect();
        assert_eq!(sos.len(), 3, "one scan per component");
        let whole = decode_rgb(&jpg).unwrap();
        assert_eq!(decode_rgb(&jpg[..jpg.len() - 2]).unwrap().data, whole.data);
        for cut in [sos[1], sos[2]] {
            let e = decode_rgb(&jpg[..cut]).unwrap_err();
            assert!(e.contains("cut between scans"), "{e}");
        }
    }

    /// A baseline JPEG with one scan per component (what libjpeg writes for a scan script of
    /// three one-component scans), through libjpeg's own compressor.
    fn encode_non_interleaved_jpeg(w: u32, h: u32) -> Vec<u8> {
        use mozjpeg_sys::*;
        let px: Vec<u8> = (0..w * h)
            .flat_map(|i| [(i % w * 4) as u8, (i / w * 5) as u8, (i * 7 % 251) as u8])
            .collect();
        let scans: Vec<jpeg_scan_info> = (0..3)
            .map(|c| jpeg_scan_info {
                comps_in_scan: 1,
                component_index: [c, 0, 0, 0],
                Ss: 0,
                Se: 63,
                Ah: 0,
                Al: 0,
            })
            .collect();
        // SAFETY: the usual libjpeg compression sequence on zeroed, then initialised,
        // structs; the scan script and the pixels outlive the compression; the output buffer
        // is libjpeg's (malloc'd), copied then freed.
        unsafe {
            let mut err: jpeg_error_mgr = std::mem::zeroed();
            let mut c: jpeg_compress_struct = std::mem::zeroed();
            c.common.err = jpeg_std_error(&mut err);
            jpeg_CreateCompress(
                &mut c,
                JPEG_LIB_VERSION,
                std::mem::size_of::<jpeg_compress_struct>(),
            );
            let (mut buf, mut size): (*mut u8, std::os::raw::c_ulong) = (std::ptr::null_mut(), 0);
            jpeg_mem_dest(&mut c, &mut buf, &mut size);
            c.image_width = w;
            c.image_height = h;
            c.input_components = 3;
            c.in_color_space = J_COLOR_SPACE::JCS_RGB;
            jpeg_c_set_int_param(
                &mut c,
                J_INT_PARAM::JINT_COMPRESS_PROFILE,
                JCP_FASTEST as i32,
            );
            jpeg_set_defaults(&mut c);
            c.num_scans = 3;
            c.scan_info = scans.as_ptr();
            jpeg_start_compress(&mut c, 1);
            for row in px.chunks_exact(w as usize * 3) {
                let ptr = row.as_ptr();
                jpeg_write_scanlines(&mut c, &ptr, 1);
            }
            jpeg_finish_compress(&mut c);
            let out = std::slice::from_raw_parts(buf, size as usize).to_vec();
            jpeg_destroy_compress(&mut c);
            libc::free(buf.cast());
            out
        }
    }

    fn encode_progressive_jpeg(w: usize, h: usize) -> Vec<u8> {
        let mut c = mozjpeg::Compress::new(mozjpeg::ColorSpace::JCS_RGB);
        c.set_size(w, h);
        c.set_progressive_mode();
        let mut c = c.start_compress(Vec::new()).unwrap();
        let px: Vec<u8> = (0..w * h)
            .flat_map(|i| [(i % w) as u8, (i / w) as u8, (i * 7 % 251) as u8])
            .collect();
        c.write_scanlines(&px).unwrap();
        c.finish().unwrap()
    }

    /// OpenCV's formula: `k - ((255 - c) * k >> 8)` per channel (Adobe's inverted CMYK).
    #[test]
    fn cmyk_is_converted_as_opencv_does() {
        assert_eq!(cmyk_to_rgb(&[255, 0, 128, 255]), vec![255, 1, 129]);
        assert_eq!(cmyk_to_rgb(&[10, 20, 30, 0]), vec![0, 0, 0]);
        assert_eq!(cmyk_to_rgb(&[0, 255, 200, 100]), vec![1, 100, 79]);
    }
}
