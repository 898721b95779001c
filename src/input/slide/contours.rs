//! Contours of a binary mask with their holes, and their areas, as OpenCV gives them, so that
//! the tissue found here is the tissue CLAM finds.
//!
//! [`find_contours`] is Suzuki and Abe's border following (1985) as OpenCV's
//! `findContours(mask, RETR_CCOMP, CHAIN_APPROX_NONE)` runs it (OpenCV 4.10+/5.x, whose
//! implementation this one was written against from its published description and verified
//! against `opencv-python-headless` 5.0.0.93): the mask is framed by one pixel of background,
//! every non-zero pixel is foreground, and a raster scan starts a border at each unvisited
//! foreground pixel whose left neighbour is background (an outer border, followed
//! counter-clockwise on screen starting from the left neighbour) and at each foreground pixel,
//! not marked as a right edge, whose right neighbour is background (a hole border). A border is
//! followed by searching the 8 neighbours of the current pixel for the next non-zero one,
//! marking each pixel with the border's label, and with a "right edge" flag when its right
//! neighbour was examined and found zero, so that a border is never started twice. Every pixel
//! of the border is listed (no approximation), starting at the pixel where the scan met it.
//!
//! The result is a two-level hierarchy: outer borders (whose parent is the frame) and the hole
//! borders inside each; an island inside a hole is again an outer border. A hole's parent is the
//! border last crossed on the hole's row to the left of its start, found as OpenCV finds it:
//! borders are labelled 2..=127 cyclically (so several may share a label), and among the borders
//! with that label whose bounding box contains the crossing (the same signed comparison), the
//! newest one is taken unless tracing it shows it does not pass through the crossing, and so on.
//! This is exact OpenCV behaviour also for images with more than 126 borders, where the labels
//! repeat. The contours come out in OpenCV's order: a depth-first walk of the hierarchy in
//! which the borders found last come first, each outer border followed by its holes.
//!
//! [`contour_area`] is the shoelace formula (`cv2.contourArea`, not oriented), computed in
//! integers: OpenCV sums the same products in doubles, which is exact for coordinates under
//! 2^24.

/// One border of the mask, in image coordinates of the mask (x right, y down).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Contour {
    /// Every pixel of the border in order of following (cv2's `CHAIN_APPROX_NONE`).
    pub points: Vec<(i32, i32)>,
    /// A hole border (the inner border of a foreground region).
    pub is_hole: bool,
    /// For a hole, the index (in the returned list) of the outer border it belongs to; `None`
    /// for an outer border (cv2's hierarchy parent, -1 there).
    pub parent: Option<usize>,
}

/// The 8 chain directions: 0 is +x (right), counting counter-clockwise on screen (y down).
const DELTAS: [(i32, i32); 8] = [
    (1, 0),
    (1, -1),
    (0, -1),
    (-1, -1),
    (-1, 0),
    (-1, 1),
    (0, 1),
    (1, 1),
];
/// The largest direction index a search may reach (two turns, as OpenCV's table).
const MAX_DIR: u8 = 15;
const RIGHT_FLAG: u8 = 0x80;

struct Node {
    is_hole: bool,
    /// Start pixel, framed-image coordinates.
    origin: (i32, i32),
    /// Bounding box x, y, width, height in framed-image coordinates.
    brect: Rect,
    parent: i32,
    first_child: i32,
    prev: i32,
    next: i32,
    same_label_next: i32,
    points: Vec<(i32, i32)>,
}

impl Node {
    fn new(is_hole: bool, origin: (i32, i32)) -> Node {
        Node {
            is_hole,
            origin,
            brect: (0, 0, 0, 0),
            parent: -1,
            first_child: -1,
            prev: -1,
            next: -1,
            same_label_next: -1,
            points: Vec::new(),
        }
    }
}

/// The framed label image: 0 background, 1 unvisited foreground, a label (2..=127), possibly
/// with [`RIGHT_FLAG`].
struct Framed {
    px: Vec<u8>,
    step: isize,
}

impl Framed {
    fn at(&self, i: isize) -> u8 {
        self.px[i as usize]
    }
    fn index(&self, p: (i32, i32)) -> isize {
        p.1 as isize * self.step + p.0 as isize
    }
    fn delta(&self, s: u8) -> isize {
        let (dx, dy) = DELTAS[(s % 8) as usize];
        dy as isize * self.step + dx as isize
    }
}

/// The first neighbour found searching clockwise from `s_end` (exclusive) around `i0`, as
/// `(direction, index)`; the direction equals `s_end` when every neighbour is zero.
fn first_clockwise(img: &Framed, i0: isize, s_end: u8) -> (u8, isize) {
    let mut s = s_end;
    loop {
        s = (s + 7) & 7;
        let i1 = i0 + img.delta(s);
        if img.at(i1) != 0 || s == s_end {
            return (s, i1);
        }
    }
}

/// A bounding box: x, y, width, height.
type Rect = (i32, i32, i32, i32);

/// Follows the border starting at `start` (framed coordinates), marks it with `label`, and
/// returns its points (image coordinates) and bounding box (framed coordinates).
fn follow(
    img: &mut Framed,
    start: (i32, i32),
    label: u8,
    is_hole: bool,
) -> (Vec<(i32, i32)>, Rect) {
    let i0 = img.index(start);
    let mut pt = (start.0 - 1, start.1 - 1);
    let (mut min_x, mut min_y, mut max_x, mut max_y) = (pt.0, pt.1, pt.0, pt.1);
    let mut points = Vec::new();
    let first_s_end = if is_hole { 0 } else { 4 };
    let (mut s, i1) = first_clockwise(img, i0, first_s_end);
    if s == first_s_end {
        img.px[i0 as usize] = label | RIGHT_FLAG;
        points.push(pt);
    } else {
        let mut i3 = i0;
        let mut prev_s = s ^ 4;
        loop {
            let s_end = s;
            s = s.min(MAX_DIR);
            let mut i4 = i3;
            while s < MAX_DIR {
                s += 1;
                i4 = i3 + img.delta(s);
                if img.at(i4) != 0 {
                    break;
                }
            }
            s &= 7;
            if s.wrapping_sub(1) < s_end {
                img.px[i3 as usize] = label | RIGHT_FLAG;
            } else if img.at(i3) == 1 {
                img.px[i3 as usize] = label;
            }
            points.push(pt);
            if s != prev_s {
                if pt.0 < min_x {
                    min_x = pt.0;
                } else if pt.0 > max_x {
                    max_x = pt.0;
                }
                if pt.1 < min_y {
                    min_y = pt.1;
                } else if pt.1 > max_y {
                    max_y = pt.1;
                }
            }
            prev_s = s;
            pt.0 += DELTAS[s as usize].0;
            pt.1 += DELTAS[s as usize].1;
            if i4 == i0 && i3 == i1 {
                break;
            }
            i3 = i4;
            s = (s + 4) & 7;
        }
    }
    let brect = (min_x + 1, min_y + 1, max_x - min_x + 1, max_y - min_y + 1);
    (points, brect)
}

/// Whether following the border that starts at `start` reaches `end` in a way that makes it the
/// border crossed there (OpenCV's check when several borders share a label).
fn passes_through(img: &Framed, start: (i32, i32), end: (i32, i32), is_hole: bool) -> bool {
    let stop = img.index(end);
    let i0 = img.index(start);
    let first_s_end = if is_hole { 0 } else { 4 };
    let (mut s, i1) = first_clockwise(img, i0, first_s_end);
    let mut i3 = i0;
    if s == first_s_end {
        return i3 == stop;
    }
    loop {
        s = s.min(MAX_DIR);
        let mut i4 = i3;
        while s < MAX_DIR {
            s += 1;
            i4 = i3 + img.delta(s);
            if img.at(i4) != 0 {
                break;
            }
        }
        if i3 == stop {
            if img.at(i3) & RIGHT_FLAG == 0 {
                return true;
            }
            let mut t = s;
            loop {
                t = (t + 7) & 7;
                if img.at(i3 + img.delta(t)) != 0 {
                    break;
                }
                if t == 0 {
                    return true;
                }
            }
        }
        if i4 == i0 && i3 == i1 {
            return false;
        }
        i3 = i4;
        s = (s + 4) & 7;
    }
}

struct Scanner {
    img: Framed,
    width: i32,
    height: i32,
    nodes: Vec<Node>,
    same_label: [i32; 128],
    label: u8,
}

impl Scanner {
    fn add_child(&mut self, parent: usize, child: usize) {
        let first = self.nodes[parent].first_child;
        if first != -1 {
            self.nodes[first as usize].prev = child as i32;
            self.nodes[child].next = first;
        }
        self.nodes[parent].first_child = child as i32;
        self.nodes[child].parent = parent as i32;
        self.nodes[child].prev = -1;
    }

    fn first_bounding(&self, last: (i32, i32), y: i32, label: usize) -> i32 {
        let end = (last.0, y);
        let mut res = -1i32;
        let mut cur = self.same_label[label];
        while cur != -1 {
            let n = &self.nodes[cur as usize];
            if last.0 - n.brect.0 < n.brect.2 && last.1 - n.brect.1 < n.brect.3 {
                if res != -1 {
                    let r = &self.nodes[res as usize];
                    if passes_through(&self.img, r.origin, end, r.is_hole) {
                        break;
                    }
                }
                res = cur;
            }
            cur = n.same_label_next;
        }
        res
    }

    /// Starts a border at (x, y) if the transition prev -> p starts one; returns whether it did.
    fn try_start(&mut self, prev: u8, p: u8, last: &mut (i32, i32), x: i32, y: i32) -> bool {
        let mut is_hole = false;
        if !(prev == 0 && p == 1) {
            // A hole border starts at a foreground pixel (1 or a label, not right-flagged)
            // followed by background.
            if p != 0 || prev == 0 || prev & RIGHT_FLAG != 0 {
                return false;
            }
            if prev & 0xFE != 0 {
                last.0 = x - 1;
            }
            is_hole = true;
        }
        let mut parent = 0i32;
        if is_hole && last.0 > 0 {
            let label = (self.img.at(self.img.index(*last)) & 0x7F) as usize;
            parent = self.first_bounding(*last, y, label);
            if parent < 0 {
                parent = 0;
            }
            let pn = &self.nodes[parent as usize];
            if pn.is_hole == is_hole {
                parent = if pn.parent != -1 { pn.parent } else { 0 };
            }
        }
        last.0 = x - i32::from(is_hole);
        let start = (x - i32::from(is_hole), y);
        let label = self.label;
        self.label = (self.label + 1) & 0x7F;
        if self.label == 0 {
            self.label = 3;
        }
        let (points, brect) = follow(&mut self.img, start, label, is_hole);
        let mut node = Node::new(is_hole, start);
        node.points = points;
        node.brect = brect;
        node.same_label_next = self.same_label[label as usize];
        let idx = self.nodes.len();
        self.nodes.push(node);
        self.same_label[label as usize] = idx as i32;
        self.add_child(parent as usize, idx);
        true
    }

    fn scan(&mut self) {
        let (w, h) = (self.width, self.height);
        for y in 1..h - 1 {
            let mut last = (0, y);
            let mut prev = 0u8;
            let mut x = 1;
            while x < w - 1 {
                // The next pixel that differs from the previous one.
                let row = self.img.index((0, y));
                let mut p = self.img.at(row + x as isize);
                while x < w - 1 && p == prev {
                    x += 1;
                    if x < w - 1 {
                        p = self.img.at(row + x as isize);
                    }
                }
                if x >= w - 1 {
                    break;
                }
                if self.try_start(prev, p, &mut last, x, y) {
                    // The scan resumes after the start, reading the (possibly relabelled) pixel.
                    prev = self.img.at(row + x as isize);
                } else {
                    prev = p;
                    if prev & 0xFE != 0 {
                        last.0 = x;
                    }
                }
                x += 1;
            }
        }
    }
}

/// The contours of `mask` (`width` x `height`, row-major, non-zero = foreground) with their
/// holes, as `cv2.findContours(mask, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)` lists them.
pub fn find_contours(mask: &[u8], width: usize, height: usize) -> Vec<Contour> {
    assert_eq!(mask.len(), width * height, "mask size");
    let (fw, fh) = (width + 2, height + 2);
    let mut px = vec![0u8; fw * fh];
    for y in 0..height {
        for x in 0..width {
            px[(y + 1) * fw + x + 1] = u8::from(mask[y * width + x] != 0);
        }
    }
    let mut root = Node::new(true, (0, 0));
    root.brect = (0, 0, fw as i32, fh as i32);
    let mut scanner = Scanner {
        img: Framed {
            px,
            step: fw as isize,
        },
        width: fw as i32,
        height: fh as i32,
        nodes: vec![root],
        same_label: [-1; 128],
        label: 2,
    };
    scanner.scan();

    // Depth-first, children newest first (they are prepended as found).
    let nodes = &mut scanner.nodes;
    let mut order = Vec::with_capacity(nodes.len() - 1);
    let mut stack = vec![0usize];
    while let Some(i) = stack.pop() {
        if i != 0 {
            order.push(i);
        }
        let mut children = Vec::new();
        let mut c = nodes[i].first_child;
        while c != -1 {
            children.push(c as usize);
            c = nodes[c as usize].next;
        }
        stack.extend(children.into_iter().rev());
    }
    let mut position = vec![usize::MAX; nodes.len()];
    for (k, &i) in order.iter().enumerate() {
        position[i] = k;
    }
    order
        .iter()
        .map(|&i| {
            let parent = nodes[i].parent;
            Contour {
                points: std::mem::take(&mut nodes[i].points),
                is_hole: nodes[i].is_hole,
                parent: (parent > 0).then(|| position[parent as usize]),
            }
        })
        .collect()
}

/// Twice the signed shoelace area of a closed polygon (exact).
pub fn twice_signed_area(points: &[(i32, i32)]) -> i64 {
    let Some(&last) = points.last() else {
        return 0;
    };
    let mut prev = last;
    let mut sum = 0i64;
    for &p in points {
        sum += prev.0 as i64 * p.1 as i64 - prev.1 as i64 * p.0 as i64;
        prev = p;
    }
    sum
}

/// `cv2.contourArea(points)`: the unsigned shoelace area of the closed polygon.
pub fn contour_area(points: &[(i32, i32)]) -> f64 {
    twice_signed_area(points).unsigned_abs() as f64 * 0.5
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `w` x `h` mask with the listed `(x0, y0, x1, y1)` rectangles (inclusive) set to
    /// `value`, later ones over earlier ones.
    fn mask(w: usize, h: usize, rects: &[(usize, usize, usize, usize, u8)]) -> Vec<u8> {
        let mut m = vec![0u8; w * h];
        for &(x0, y0, x1, y1, v) in rects {
            for y in y0..=y1 {
                for x in x0..=x1 {
                    m[y * w + x] = v;
                }
            }
        }
        m
    }

    #[test]
    fn filled_square_is_one_border_followed_down_the_left_side_first() {
        // Outer borders start at their top-left pixel and go counter-clockwise on screen:
        // down the left side, along the bottom, up the right side, back along the top.
        let m = mask(8, 8, &[(2, 2, 5, 5, 255)]);
        let c = find_contours(&m, 8, 8);
        assert_eq!(c.len(), 1);
        assert!(!c[0].is_hole);
        assert_eq!(c[0].parent, None);
        let expected = vec![
            (2, 2),
            (2, 3),
            (2, 4),
            (2, 5),
            (3, 5),
            (4, 5),
            (5, 5),
            (5, 4),
            (5, 3),
            (5, 2),
            (4, 2),
            (3, 2),
        ];
        assert_eq!(c[0].points, expected);
        // The polygon through the pixel centres: 3 x 3.
        assert_eq!(contour_area(&c[0].points), 9.0);
    }

    #[test]
    fn square_with_a_hole_lists_the_hole_after_its_outer_border() {
        // A 6 x 6 square with a 2 x 2 hole. The hole border starts at the foreground pixel
        // left of the hole's first pixel and goes clockwise on screen through the pixels
        // 4-adjacent to the hole (its corners are cut: an octagon of area 9 - 4 / 2 = 7).
        let m = mask(8, 8, &[(1, 1, 6, 6, 1), (3, 3, 4, 4, 0)]);
        let c = find_contours(&m, 8, 8);
        assert_eq!(c.len(), 2);
        assert!(!c[0].is_hole && c[0].parent.is_none());
        assert!(c[1].is_hole);
        assert_eq!(c[1].parent, Some(0));
        assert_eq!(c[0].points.len(), 20);
        assert_eq!(c[0].points[0], (1, 1));
        assert_eq!(contour_area(&c[0].points), 25.0);
        let hole = vec![
            (2, 3),
            (3, 2),
            (4, 2),
            (5, 3),
            (5, 4),
            (4, 5),
            (3, 5),
            (2, 4),
        ];
        assert_eq!(c[1].points, hole);
        assert_eq!(contour_area(&c[1].points), 7.0);
        // Counter-clockwise outer border, clockwise hole (on screen, y down).
        assert!(twice_signed_area(&c[0].points) < 0);
        assert!(twice_signed_area(&c[1].points) > 0);
    }

    #[test]
    fn one_pixel_wide_line_is_traced_there_and_back_with_no_area() {
        let m = mask(7, 5, &[(1, 2, 5, 2, 9)]);
        let c = find_contours(&m, 7, 5);
        assert_eq!(c.len(), 1);
        let expected = vec![
            (1, 2),
            (2, 2),
            (3, 2),
            (4, 2),
            (5, 2),
            (4, 2),
            (3, 2),
            (2, 2),
        ];
        assert_eq!(c[0].points, expected);
        assert_eq!(contour_area(&c[0].points), 0.0);
    }

    #[test]
    fn single_pixel_and_pixels_on_the_image_edge() {
        // The image is framed by background: a pixel in a corner is a border of one point.
        let m = mask(3, 3, &[(0, 0, 0, 0, 1)]);
        let c = find_contours(&m, 3, 3);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].points, vec![(0, 0)]);
        // A full image is one border along the image's edge.
        let full = vec![1u8; 4 * 3];
        let c = find_contours(&full, 4, 3);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].points.len(), 10);
        assert_eq!(contour_area(&c[0].points), 6.0);
        assert!(find_contours(&[0u8; 12], 4, 3).is_empty());
    }

    #[test]
    fn ring_and_island_two_levels_newest_first() {
        // A ring (outer + hole) with an island in its hole, and a second blob below. cv2's
        // order: the borders found last come first, each outer followed by its holes, and the
        // island is an outer border of its own (RETR_CCOMP has two levels).
        let m = mask(
            12,
            14,
            &[
                (1, 1, 9, 9, 1),
                (3, 3, 7, 7, 0),
                (5, 5, 5, 5, 1),
                (2, 11, 4, 12, 1),
            ],
        );
        let c = find_contours(&m, 12, 14);
        assert_eq!(c.len(), 4);
        // Found in raster order: ring (1,1), its hole (started at (2,3)), island (5,5),
        // blob (2,11); listed newest first.
        assert_eq!(c[0].points[0], (2, 11));
        assert_eq!(c[1].points, vec![(5, 5)]);
        assert_eq!(c[2].points[0], (1, 1));
        assert!(c[3].is_hole);
        assert_eq!(c[3].points[0], (2, 3));
        assert_eq!(c[3].parent, Some(2));
        assert!(c[..3].iter().all(|k| k.parent.is_none() && !k.is_hole));
    }

    #[test]
    fn hundreds_of_borders_keep_their_holes() {
        // More borders than labels (2..=127): each of 300 framed squares with a one-pixel
        // hole, so the labels repeat and the hole's parent must still be its own square.
        let (w, h) = (20 * 5, 15 * 4);
        let mut m = vec![0u8; w * h];
        for by in 0..15 {
            for bx in 0..20 {
                for y in 0..3 {
                    for x in 0..3 {
                        if (x, y) != (1, 1) {
                            m[(by * 4 + y) * w + bx * 5 + x] = 1;
                        }
                    }
                }
            }
        }
        let c = find_contours(&m, w, h);
        assert_eq!(c.len(), 600);
        for (i, k) in c.iter().enumerate() {
            if k.is_hole {
                let p = k.parent.expect("a hole has a parent");
                assert_eq!(p, i - 1);
                // The hole's start is the square's left column, the square's start its corner.
                let (hx, hy) = k.points[0];
                assert_eq!((hx, hy - 1), c[p].points[0]);
            }
        }
    }
}
