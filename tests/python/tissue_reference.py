"""cv2 reference of tilefeat's tissue segmentation (src/input/slide/tissue.rs).

The algorithm is CLAM's (mahmoodlab/CLAM, WholeSlideImage.segmentTissue and the four_pt
patch check), written here from its description with the OpenCV calls it is made of:
cvtColor(RGB2HSV) saturation, medianBlur, threshold (binary or Otsu), morphologyEx(MORPH_CLOSE)
with a square of ones, findContours(RETR_CCOMP, CHAIN_APPROX_NONE), contourArea,
pointPolygonTest. tilefeat's Rust must give the same mask byte for byte, the same contours and
the same tiles. One deliberate difference from CLAM, shared with the Rust: tiles are asked about
on one grid over the whole slide (`keep`), not on one grid per contour; `clam_coords` gives
CLAM's own per-contour grid too.

Usage as a script:
  tissue_reference.py IMAGE.png SCALE_X SCALE_Y PRESET OTSU(0|1) EXTENT STRIDE W0 H0 OUTDIR
writes OUTDIR/ref_mask.raw (the mask bytes) and OUTDIR/ref.json (threshold, contours with
parents, tissue regions at both levels, tiles kept on the grid 0, STRIDE, ... < W0/H0, and
CLAM's per-contour coordinates).
"""

import json
import sys

import cv2
import numpy as np

REF_PATCH_SIZE = 512

PRESETS = {
    # create_patches_fp.py defaults
    "clam": dict(sthresh=8, sthresh_up=255, mthresh=7, close=4, use_otsu=False,
                 a_t=100, a_h=16, max_n_holes=8),
    # presets/tcga.csv
    "tcga": dict(sthresh=8, sthresh_up=255, mthresh=7, close=4, use_otsu=False,
                 a_t=16, a_h=4, max_n_holes=8),
    # presets/bwh_biopsy.csv
    "bwh_biopsy": dict(sthresh=15, sthresh_up=255, mthresh=11, close=2, use_otsu=False,
                       a_t=1, a_h=1, max_n_holes=2),
}


def tissue_mask(rgb, p):
    """The mask that is contoured, and the threshold used."""
    sat = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[:, :, 1]
    med = cv2.medianBlur(sat, p["mthresh"])
    if p["use_otsu"]:
        t, mask = cv2.threshold(med, 0, p["sthresh_up"], cv2.THRESH_OTSU + cv2.THRESH_BINARY)
    else:
        t, mask = cv2.threshold(med, p["sthresh"], p["sthresh_up"], cv2.THRESH_BINARY)
    if p["close"] > 0:
        kernel = np.ones((p["close"], p["close"]), np.uint8)
        mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, kernel)
    return mask, int(t)


def segment(rgb, scale, p):
    """Contours, tissue regions (seg level and level 0) of an RGB uint8 picture."""
    mask, t = tissue_mask(rgb, p)
    contours, hierarchy = cv2.findContours(mask, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    parents = [] if hierarchy is None else [int(h[3]) for h in hierarchy[0]]
    ref_area = int(REF_PATCH_SIZE ** 2 / (scale[0] * scale[1]))
    a_t = p["a_t"] * ref_area
    a_h = p["a_h"] * ref_area
    regions = []
    for i, cont in enumerate(contours):
        if parents[i] != -1:
            continue
        holes = [contours[j] for j in range(len(contours)) if parents[j] == i]
        area = cv2.contourArea(cont) - np.array([cv2.contourArea(h) for h in holes]).sum()
        if area == 0 or not a_t < area:
            continue
        ranked = sorted(holes, key=cv2.contourArea, reverse=True)[: p["max_n_holes"]]
        kept = [h for h in ranked if cv2.contourArea(h) > a_h]
        sc = np.array(scale, dtype=np.float64)
        regions.append(dict(
            area=float(area),
            contour=cont,
            holes=kept,
            contour0=np.array(cont * sc, dtype="int32"),
            holes0=[np.array(h * sc, dtype="int32") for h in kept],
        ))
    return dict(mask=mask, threshold=t, contours=contours, parents=parents, regions=regions)


def region_keeps(region, x, y, extent):
    """CLAM's four_pt check against the level-0 contour, then its centre-in-hole check."""
    cx, cy = x + extent // 2, y + extent // 2
    s = int(extent // 2 * 0.5)
    pts = [(cx - s, cy - s), (cx + s, cy + s), (cx + s, cy - s), (cx - s, cy + s)]
    cont = region["contour0"]
    if not any(cv2.pointPolygonTest(cont, (float(a), float(b)), False) >= 0 for a, b in pts):
        return False
    centre = (x + extent / 2, y + extent / 2)
    return not any(cv2.pointPolygonTest(h, centre, False) > 0 for h in region["holes0"])


def keep(seg, x, y, extent):
    """Whether any tissue region keeps the tile at level-0 (x, y) of side extent."""
    return any(region_keeps(r, x, y, extent) for r in seg["regions"])


def grid_keep(seg, w0, h0, extent, stride):
    """Kept tiles of the grid 0, stride, ... (< w0, < h0), rows first."""
    return [(x, y) for y in range(0, h0, stride) for x in range(0, w0, stride)
            if keep(seg, x, y, extent)]


def clam_coords(seg, extent, stride):
    """CLAM's own list: per region, a grid from its level-0 bounding box's top-left."""
    out = []
    for r in seg["regions"]:
        x0, y0, w, h = cv2.boundingRect(r["contour0"])
        xs, ys = np.meshgrid(np.arange(x0, x0 + w, stride), np.arange(y0, y0 + h, stride),
                             indexing="ij")
        for x, y in zip(xs.flatten(), ys.flatten()):
            if region_keeps(r, int(x), int(y), extent):
                out.append((int(x), int(y)))
    return out


def _pts(c):
    return c.reshape(-1, 2).tolist()


def main(argv):
    path, sx, sy, preset, otsu, extent, stride, w0, h0, outdir = argv
    rgb = cv2.cvtColor(cv2.imread(path, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    p = dict(PRESETS[preset])
    p["use_otsu"] = otsu == "1"
    scale = (float(sx), float(sy))
    extent, stride, w0, h0 = int(extent), int(stride), int(w0), int(h0)
    seg = segment(rgb, scale, p)
    seg["mask"].tofile(f"{outdir}/ref_mask.raw")
    out = dict(
        threshold=seg["threshold"],
        contours=[dict(hole=seg["parents"][i] != -1, parent=seg["parents"][i], points=_pts(c))
                  for i, c in enumerate(seg["contours"])],
        regions=[dict(area=r["area"], contour=_pts(r["contour"]),
                      holes=[_pts(h) for h in r["holes"]], contour0=_pts(r["contour0"]),
                      holes0=[_pts(h) for h in r["holes0"]]) for r in seg["regions"]],
        kept=[list(t) for t in grid_keep(seg, w0, h0, extent, stride)],
        clam=[list(t) for t in clam_coords(seg, extent, stride)],
    )
    with open(f"{outdir}/ref.json", "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main(sys.argv[1:])
