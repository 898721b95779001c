//! The pixel steps of CLAM's tissue mask, each computing exactly what its OpenCV function
//! computes on 8-bit data (checked against opencv-python-headless 5.0.0.93 on random images:
//! all 16.7 million RGB colours for the saturation; median sizes 1 to 21, closing sizes 1 to 8
//! and Otsu on 300 random pictures, byte for byte).
//!
//! - [`saturation`]: the S of `cvtColor(COLOR_RGB2HSV)`, OpenCV's fixed-point form
//!   `((max - min) * round(255 * 2^12 / max) + 2^11) >> 12`.
//! - [`median_blur`]: `medianBlur`, borders replicated (a sliding histogram per row here;
//!   any exact median gives the same bytes).
//! - [`otsu_threshold`]: `threshold(..., THRESH_OTSU)`'s threshold in OpenCV's own
//!   double-precision scan (the strict `>` keeps the first of equal maxima). The PyPI wheels
//!   hand this to Intel IPP, which picks differently among exactly equal maxima: on random
//!   pictures of two or three grey levels with equal counts (2 in 3,000) it chose another
//!   threshold between the same classes' neighbours; never on pictures with a spread of values.
//! - [`threshold`]: `THRESH_BINARY`, `> t` becomes `maxval`.
//! - [`close`]: `morphologyEx(MORPH_CLOSE, ones(k, k))`: a dilation then an erosion over the
//!   window `x - k/2 ..= x + k - 1 - k/2` (so an even size moves shapes by one pixel right and
//!   down), pixels outside the image ignored (OpenCV's default morphology border).

use image::{GrayImage, RgbImage};

/// OpenCV's 8-bit HSV saturation: `(diff * round(255 * 4096 / max) + 2048) >> 12`.
pub fn saturation(rgb: &RgbImage) -> GrayImage {
    let mut table = [0i32; 256];
    for (v, t) in table.iter_mut().enumerate().skip(1) {
        *t = ((255u32 << 12) as f64 / v as f64).round() as i32;
    }
    let (w, h) = rgb.dimensions();
    let mut out = GrayImage::new(w, h);
    for (o, p) in out.as_mut().iter_mut().zip(rgb.as_raw().chunks_exact(3)) {
        let max = p[0].max(p[1]).max(p[2]) as i32;
        let min = p[0].min(p[1]).min(p[2]) as i32;
        *o = (((max - min) * table[max as usize] + (1 << 11)) >> 12) as u8;
    }
    out
}

/// OpenCV's `medianBlur` of odd size `k` on 8-bit data, borders replicated.
pub fn median_blur(src: &GrayImage, k: u32) -> GrayImage {
    let (w, h) = (src.width() as usize, src.height() as usize);
    if k <= 1 || w == 0 || h == 0 {
        return src.clone();
    }
    let r = (k / 2) as isize;
    let rank = k * k / 2;
    let data = src.as_raw();
    let clamp = |v: isize, n: usize| v.clamp(0, n as isize - 1) as usize;
    let mut out = GrayImage::new(w as u32, h as u32);
    let dst = out.as_mut();
    for y in 0..h {
        let rows: Vec<usize> = (-r..=r).map(|d| clamp(y as isize + d, h) * w).collect();
        let mut hist = [0u32; 256];
        for dx in -r..=r {
            let x = clamp(dx, w);
            for &row in &rows {
                hist[data[row + x] as usize] += 1;
            }
        }
        // The median m and the count of values below it.
        let mut m = 0usize;
        let mut below = 0u32;
        for x in 0..w {
            if x > 0 {
                let gone = clamp(x as isize - 1 - r, w);
                let come = clamp(x as isize + r, w);
                for &row in &rows {
                    let a = data[row + gone] as usize;
                    hist[a] -= 1;
                    if a < m {
                        below -= 1;
                    }
                    let b = data[row + come] as usize;
                    hist[b] += 1;
                    if b < m {
                        below += 1;
                    }
                }
            }
            while below > rank {
                m -= 1;
                below -= hist[m];
            }
            while below + hist[m] <= rank {
                below += hist[m];
                m += 1;
            }
            dst[y * w + x] = m as u8;
        }
    }
    out
}

/// OpenCV's Otsu threshold of 8-bit data (`getThreshVal_Otsu`), in its double-precision
/// form, including its carried `mu1 * q1` on skipped levels and strict tie-breaking.
pub fn otsu_threshold(src: &GrayImage) -> u8 {
    let mut hist = [0u64; 256];
    for &v in src.as_raw() {
        hist[v as usize] += 1;
    }
    otsu_from_histogram(&hist)
}

/// [`otsu_threshold`] from a 256-bin histogram.
pub fn otsu_from_histogram(hist: &[u64; 256]) -> u8 {
    let total: u64 = hist.iter().sum();
    if total == 0 {
        return 0;
    }
    let scale = 1.0 / total as f64;
    let mut mu = 0.0f64;
    for (i, &c) in hist.iter().enumerate() {
        mu += i as f64 * c as f64;
    }
    mu *= scale;
    let (mut mu1, mut q1) = (0.0f64, 0.0f64);
    let (mut max_sigma, mut max_val) = (0.0f64, 0u8);
    let eps = f32::EPSILON as f64;
    for (i, &c) in hist.iter().enumerate() {
        let p_i = c as f64 * scale;
        mu1 *= q1;
        q1 += p_i;
        let q2 = 1.0 - q1;
        if q1.min(q2) < eps || q1.max(q2) > 1.0 - eps {
            continue;
        }
        mu1 = (mu1 + i as f64 * p_i) / q1;
        let mu2 = (mu - q1 * mu1) / q2;
        let sigma = q1 * q2 * (mu1 - mu2) * (mu1 - mu2);
        if sigma > max_sigma {
            max_sigma = sigma;
            max_val = i as u8;
        }
    }
    max_val
}

/// `cv2.threshold(src, t, maxval, THRESH_BINARY)`: above `t` becomes `maxval`, else 0.
pub fn threshold(src: &GrayImage, t: u8, maxval: u8) -> GrayImage {
    let mut out = src.clone();
    for v in out.as_mut() {
        *v = if *v > t { maxval } else { 0 };
    }
    out
}

/// Max (dilate) or min (erode) over a `k` x `k` window anchored at `k / 2`, pixels outside the
/// image ignored (OpenCV's default border for morphology).
fn rect_filter(src: &GrayImage, k: u32, dilate: bool) -> GrayImage {
    let (w, h) = (src.width() as usize, src.height() as usize);
    let a = (k / 2) as isize;
    let (lo, hi) = (-a, k as isize - 1 - a);
    let pick = |x: u8, y: u8| if dilate { x.max(y) } else { x.min(y) };
    let data = src.as_raw();
    let mut tmp = vec![0u8; w * h];
    for y in 0..h {
        for x in 0..w {
            let x0 = (x as isize + lo).max(0) as usize;
            let x1 = (x as isize + hi).min(w as isize - 1) as usize;
            let row = &data[y * w..y * w + w];
            tmp[y * w + x] = row[x0..=x1].iter().copied().reduce(pick).unwrap_or(0);
        }
    }
    let mut out = GrayImage::new(w as u32, h as u32);
    let dst = out.as_mut();
    for y in 0..h {
        let y0 = (y as isize + lo).max(0) as usize;
        let y1 = (y as isize + hi).min(h as isize - 1) as usize;
        for x in 0..w {
            let mut v = tmp[y0 * w + x];
            for yy in y0 + 1..=y1 {
                v = pick(v, tmp[yy * w + x]);
            }
            dst[y * w + x] = v;
        }
    }
    out
}

/// `cv2.morphologyEx(src, MORPH_CLOSE, np.ones((k, k)))`: dilate, then erode.
pub fn close(src: &GrayImage, k: u32) -> GrayImage {
    if k <= 1 {
        return src.clone();
    }
    rect_filter(&rect_filter(src, k, true), k, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gray(w: u32, h: u32, v: &[u8]) -> GrayImage {
        GrayImage::from_raw(w, h, v.to_vec()).unwrap()
    }

    #[test]
    fn saturation_is_opencvs() {
        // Values are cv2.cvtColor(COLOR_RGB2HSV)[..., 1] for these RGB inputs (opencv-python
        // 5.0.0.93); the first, second and last are also 255 (max - min) / max by hand.
        let colours: [[u8; 3]; 11] = [
            [255, 0, 0],
            [128, 128, 128],
            [200, 100, 50],
            [1, 0, 0],
            [10, 9, 9],
            [255, 254, 253],
            [30, 60, 90],
            [240, 235, 238],
            [0, 0, 0],
            [255, 255, 255],
            [100, 0, 50],
        ];
        let cv2 = [255u8, 0, 191, 255, 26, 2, 170, 5, 0, 0, 255];
        let img = RgbImage::from_raw(11, 1, colours.concat()).unwrap();
        assert_eq!(saturation(&img).as_raw(), &cv2.to_vec());
    }

    #[test]
    fn otsu_is_opencvs() {
        // Two equal modes: every threshold from 20 to 199 splits them the same; OpenCV keeps
        // the first maximum.
        let mut v = vec![20u8; 50];
        v.extend([200u8; 50]);
        assert_eq!(otsu_threshold(&gray(10, 10, &v)), 20);
        // cv2.threshold(..., THRESH_OTSU) gives 101 for this histogram.
        let mut hist = [0u64; 256];
        hist[0] = 10;
        hist[100] = 60;
        hist[101] = 10;
        hist[255] = 20;
        assert_eq!(otsu_from_histogram(&hist), 101);
        // One value only: no split at all, threshold 0.
        assert_eq!(otsu_threshold(&gray(3, 1, &[7, 7, 7])), 0);
        assert_eq!(
            threshold(&gray(4, 1, &[0, 8, 9, 255]), 8, 255).as_raw(),
            &vec![0, 0, 255, 255]
        );
    }

    #[test]
    fn median_replicates_the_border() {
        // A 2 x 2 block in the corner: with the border replicated, the corner's 3 x 3 window
        // is all block; the pixel diagonally inside sees 4 of 9.
        let mut v = vec![0u8; 25];
        for (x, y) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
            v[y * 5 + x] = 255;
        }
        let m = median_blur(&gray(5, 5, &v), 3);
        assert_eq!(
            (
                m.get_pixel(0, 0)[0],
                m.get_pixel(1, 0)[0],
                m.get_pixel(1, 1)[0]
            ),
            (255, 255, 0)
        );
        // An isolated pixel vanishes; size 1 changes nothing.
        let mut v = vec![3u8; 49];
        v[24] = 200;
        assert!(median_blur(&gray(7, 7, &v), 5)
            .as_raw()
            .iter()
            .all(|&p| p == 3));
        assert_eq!(median_blur(&gray(7, 7, &v), 1).as_raw(), &v);
    }

    #[test]
    fn closing_anchors_even_kernels_off_centre_and_ignores_the_outside() {
        // Anchor k / 2: a 2 x 2 closing moves a lone pixel by (1, 1) (cv2 does the same).
        let mut v = vec![0u8; 36];
        v[2 * 6 + 2] = 255;
        let c = close(&gray(6, 6, &v), 2);
        let on: Vec<usize> = (0..36).filter(|&i| c.as_raw()[i] != 0).collect();
        assert_eq!(on, vec![3 * 6 + 3]);
        // Two 3 x 3 blocks one column apart: the gap closes; with 3 x 3 the closing also
        // reaches the image edges, since pixels outside the image are ignored.
        let mut v = vec![0u8; 45];
        for y in 1..4 {
            for x in (1..4).chain(5..8) {
                v[y * 9 + x] = 255;
            }
        }
        let g = gray(9, 5, &v);
        assert_eq!(
            &close(&g, 2).as_raw()[18..27],
            &[0, 0, 255, 255, 255, 255, 255, 255, 255]
        );
        assert_eq!(&close(&g, 3).as_raw()[18..27], &[255; 9]);
        let full = gray(5, 4, &[255; 20]);
        assert_eq!(close(&full, 4).as_raw(), full.as_raw());
    }
}
