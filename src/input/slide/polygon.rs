//! Whether a point is inside a polygon, as `cv2.pointPolygonTest(contour, pt, False)` answers:
//! -1 outside, 0 on an edge or a vertex, 1 inside. OpenCV counts the edges crossed by the ray
//! from the point to the right, each edge `v0 -> v` counted when the point's row is in the
//! half-open range between its ends, after checking whether the point lies on it (a vertex, a
//! horizontal edge, or a zero cross product). Integer points take OpenCV's integer branch
//! (64-bit cross products); others its floating branch (the point and the coordinate
//! differences in single precision, the products in double), both reproduced here. CLAM's
//! `four_pt` points are integers; its hole test uses the tile's centre, a half when the tile's
//! level-0 side is odd.
//!
//! [`IndexedPolygon`] gives the same answers faster: its edges are filed by bands of rows, and
//! only the edges whose closed row range holds the point are examined. The others can neither
//! be crossed nor hold the point, so the answer is unchanged (checked against the plain test on
//! every integer and half point around a few hundred polygons in the tests below).

/// One edge's part in OpenCV's crossing count for a point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Edge {
    /// The point is on the edge (or its end vertex): the answer is 0.
    On,
    /// The edge crosses the ray from the point to the right.
    Crosses,
    Misses,
}

/// OpenCV's test of the edge `v0 -> v` for the point `p`, in integers.
fn edge_int(v0: (i64, i64), v: (i64, i64), p: (i64, i64)) -> Edge {
    let ((x0, y0), (x1, y1), (px, py)) = (v0, v, p);
    if (y0 <= py && y1 <= py) || (y0 > py && y1 > py) || (x0 < px && x1 < px) {
        let between = (x0 <= px && px <= x1) || (x1 <= px && px <= x0);
        if py == y1 && (px == x1 || (py == y0 && between)) {
            return Edge::On;
        }
        return Edge::Misses;
    }
    let mut dist = (py - y0) * (x1 - x0) - (px - x0) * (y1 - y0);
    if dist == 0 {
        return Edge::On;
    }
    if y1 < y0 {
        dist = -dist;
    }
    if dist > 0 {
        Edge::Crosses
    } else {
        Edge::Misses
    }
}

/// OpenCV's test of the edge `v0 -> v` for the point `p`, in its floating branch
/// (single-precision coordinates and differences, double-precision products).
fn edge_float(v0: (f32, f32), v: (f32, f32), p: (f32, f32)) -> Edge {
    let ((x0, y0), (x1, y1), (px, py)) = (v0, v, p);
    if (y0 <= py && y1 <= py) || (y0 > py && y1 > py) || (x0 < px && x1 < px) {
        let between = (x0 <= px && px <= x1) || (x1 <= px && px <= x0);
        if py == y1 && (px == x1 || (py == y0 && between)) {
            return Edge::On;
        }
        return Edge::Misses;
    }
    let mut dist =
        f64::from(py - y0) * f64::from(x1 - x0) - f64::from(px - x0) * f64::from(y1 - y0);
    if dist == 0.0 {
        return Edge::On;
    }
    if y1 < y0 {
        dist = -dist;
    }
    if dist > 0.0 {
        Edge::Crosses
    } else {
        Edge::Misses
    }
}

/// OpenCV's answer over the edges ending at the listed point indices (each edge runs from
/// the point before, cyclically). Only edges whose closed y range holds the point can answer
/// `On` or `Crosses`, so leaving the others out changes nothing.
fn test_edges(points: &[(i32, i32)], ends: impl Iterator<Item = usize>, x: f64, y: f64) -> i32 {
    let n = points.len();
    if n == 0 {
        return -1;
    }
    let (px, py) = (x as f32, y as f32);
    let integer = px.fract() == 0.0 && py.fract() == 0.0 && px.abs() < 2e9 && py.abs() < 2e9;
    let mut crossings = 0u32;
    for i in ends {
        let (a, b) = (points[(i + n - 1) % n], points[i]);
        let edge = if integer {
            let p = (px as i64, py as i64);
            edge_int((a.0.into(), a.1.into()), (b.0.into(), b.1.into()), p)
        } else {
            let f = |q: (i32, i32)| (q.0 as f32, q.1 as f32);
            edge_float(f(a), f(b), (px, py))
        };
        match edge {
            Edge::On => return 0,
            Edge::Crosses => crossings += 1,
            Edge::Misses => {}
        }
    }
    if crossings & 1 == 0 {
        -1
    } else {
        1
    }
}

/// `cv2.pointPolygonTest(points, (x, y), False)`: 1 inside, 0 on an edge or vertex, -1
/// outside (also for an empty polygon). The point is taken in single precision, as OpenCV's
/// `Point2f` argument; integer points take OpenCV's integer branch.
pub fn point_polygon_test(points: &[(i32, i32)], x: f64, y: f64) -> i32 {
    test_edges(points, 0..points.len(), x, y)
}

/// A polygon with its edges filed by bands of rows, so that [`IndexedPolygon::test`] (the
/// same answer as [`point_polygon_test`]) looks only at the edges whose rows hold the point:
/// a slide's tiles are tested against contours of thousands of points.
#[derive(Debug, Clone, PartialEq)]
pub struct IndexedPolygon {
    pub points: Vec<(i32, i32)>,
    /// min x, min y, max x, max y.
    bbox: (i64, i64, i64, i64),
    band: i64,
    bins: Vec<Vec<u32>>,
}

impl IndexedPolygon {
    pub fn new(points: Vec<(i32, i32)>) -> IndexedPolygon {
        let bbox = points
            .iter()
            .fold((i64::MAX, i64::MAX, i64::MIN, i64::MIN), |b, &(x, y)| {
                let (x, y) = (i64::from(x), i64::from(y));
                (b.0.min(x), b.1.min(y), b.2.max(x), b.3.max(y))
            });
        let n = points.len();
        if n == 0 {
            return IndexedPolygon {
                points,
                bbox,
                band: 1,
                bins: Vec::new(),
            };
        }
        let height = bbox.3 - bbox.1 + 1;
        let count = ((n / 4).clamp(1, 1 << 16) as i64).min(height);
        let band = (height + count - 1) / count;
        let mut bins = vec![Vec::new(); ((height + band - 1) / band) as usize];
        for i in 0..n {
            let (a, b) = (points[(i + n - 1) % n].1, points[i].1);
            let lo = (i64::from(a.min(b)) - bbox.1) / band;
            let hi = (i64::from(a.max(b)) - bbox.1) / band;
            for bin in &mut bins[lo as usize..=hi as usize] {
                bin.push(i as u32);
            }
        }
        IndexedPolygon {
            points,
            bbox,
            band,
            bins,
        }
    }

    /// Level-0 bounding box, inclusive: min x, min y, max x, max y.
    pub fn bbox(&self) -> (i64, i64, i64, i64) {
        self.bbox
    }

    /// `cv2.pointPolygonTest(points, (x, y), False)`.
    pub fn test(&self, x: f64, y: f64) -> i32 {
        let (px, py) = (f64::from(x as f32), f64::from(y as f32));
        let b = self.bbox;
        // Outside the box no edge can answer: every one misses (and the point is outside).
        if self.points.is_empty()
            || px < b.0 as f64
            || px > b.2 as f64
            || py < b.1 as f64
            || py > b.3 as f64
        {
            return -1;
        }
        let bin =
            (((py - b.1 as f64) / self.band as f64).floor() as usize).min(self.bins.len() - 1);
        test_edges(
            &self.points,
            self.bins[bin].iter().map(|&i| i as usize),
            x,
            y,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::super::contours::find_contours;
    use super::*;

    #[test]
    fn point_polygon_test_edges_count_as_on() {
        let sq = vec![(0, 0), (0, 4), (4, 4), (4, 0)];
        assert_eq!(point_polygon_test(&sq, 2.0, 2.0), 1);
        assert_eq!(point_polygon_test(&sq, 0.0, 2.0), 0);
        assert_eq!(point_polygon_test(&sq, 4.0, 4.0), 0);
        assert_eq!(point_polygon_test(&sq, 2.0, 0.0), 0);
        assert_eq!(point_polygon_test(&sq, 5.0, 2.0), -1);
        assert_eq!(point_polygon_test(&sq, -1.0, -1.0), -1);
        // Non-integer points take the floating branch, same answers.
        assert_eq!(point_polygon_test(&sq, 2.5, 0.5), 1);
        assert_eq!(point_polygon_test(&sq, 4.0, 1.5), 0);
        assert_eq!(point_polygon_test(&sq, 2.0, 4.5), -1);
        assert_eq!(point_polygon_test(&sq, 3.5, 4.0), 0);
        // A degenerate polygon (a line there and back): only its points are on it.
        let line = vec![(1, 2), (2, 2), (3, 2), (2, 2)];
        assert_eq!(point_polygon_test(&line, 2.0, 2.0), 0);
        assert_eq!(point_polygon_test(&line, 2.5, 2.0), 0);
        assert_eq!(point_polygon_test(&line, 2.0, 3.0), -1);
        assert_eq!(point_polygon_test(&[], 0.0, 0.0), -1);
        // A concave polygon (an L): the notch is outside.
        let l = vec![(0, 0), (0, 6), (6, 6), (6, 4), (2, 4), (2, 0)];
        assert_eq!(point_polygon_test(&l, 1.0, 1.0), 1);
        assert_eq!(point_polygon_test(&l, 4.0, 2.0), -1);
        assert_eq!(point_polygon_test(&l, 4.0, 5.0), 1);
    }

    #[test]
    fn indexed_polygon_answers_as_the_plain_test() {
        // Contours of a speckled mask (xorshift noise, then blocks), scaled as level-0
        // contours are, tested at integer and half points on and around them.
        let (w, h) = (24usize, 18usize);
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut m = vec![0u8; w * h];
        for v in m.iter_mut() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            *v = u8::from((state >> 7) & 3 == 0);
        }
        let scale = 5.5f64;
        let mut polygons: Vec<Vec<(i32, i32)>> = find_contours(&m, w, h)
            .into_iter()
            .map(|c| {
                c.points
                    .iter()
                    .map(|&(x, y)| ((x as f64 * scale) as i32, (y as f64 * scale) as i32))
                    .collect()
            })
            .collect();
        polygons.push(vec![(0, 0), (0, 100), (140, 100), (70, 50), (140, 0)]);
        let mut tested = [0usize; 3];
        for poly in polygons {
            let indexed = IndexedPolygon::new(poly.clone());
            for y in -4..(h as i32 * 6 + 4) {
                for x in -4..(w as i32 * 6 + 4) {
                    for (dx, dy) in [(0.0, 0.0), (0.5, 0.0), (0.0, 0.5), (0.5, 0.5)] {
                        let (px, py) = (x as f64 + dx, y as f64 + dy);
                        let r = point_polygon_test(&poly, px, py);
                        assert_eq!(indexed.test(px, py), r, "{poly:?} at ({px}, {py})");
                        tested[(r + 1) as usize] += 1;
                    }
                }
            }
        }
        assert!(tested.iter().all(|&n| n > 1000), "{tested:?}");
    }
}
