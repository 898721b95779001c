"""The peers' path, as a test reference: the tile folder openslide-python and OpenCV cut from a
slide (CLAM's and TRIDENT's way of reading), which tilefeat's features on the slide must equal.

The level with the largest downsample not above the wanted factor,
`read_region(...).convert("RGB")` at that level, `cv2.resize(INTER_LINEAR)` to the patch
size, PNG under TRIDENT's names `{idx:06d}_x{x}_y{y}.png` (level-0 top left).
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import openslide


def rnd(v: float) -> int:
    """Half away from zero, as Rust's f64::round (Python's round() is banker's)."""
    return int(math.floor(v + 0.5))


def reference_tiles(slide: Path, out: Path, target_mpp: float, patch: int = 256, stride: int | None = None,
                    slide_mpp: float | None = None):
    """The tile folder the peers' path makes from `slide` (level 0 at `slide_mpp` µm/px, else
    the slide's `openslide.mpp-x`); returns the grid's (x, y), the level and the region side."""
    stride = stride or patch
    s = openslide.OpenSlide(slide)
    f = target_mpp / (slide_mpp or float(s.properties["openslide.mpp-x"]))
    ds = s.level_downsamples
    level = max((k for k, d in enumerate(ds) if d <= f * (1 + 1e-3)), key=lambda k: ds[k], default=0)
    extent, step = rnd(patch * f), rnd(stride * f)
    width, height = s.dimensions
    cols = (width - extent) // step + 1 if width >= extent else 0
    rows = (height - extent) // step + 1 if height >= extent else 0
    d = ds[level]
    lw, lh = s.level_dimensions[level]
    read = max(1, rnd(extent / d))
    n = cols * rows
    digits = max(6, len(str(n)))
    out.mkdir(parents=True)
    xy = []
    for idx in range(n):
        row, col = divmod(idx, cols)
        x, y = col * step, row * step
        w = max(1, min(read, lw - math.floor(x / d)))
        h = max(1, min(read, lh - math.floor(y / d)))
        im = np.asarray(s.read_region((x, y), level, (w, h)).convert("RGB"))
        if (w, h) != (patch, patch):
            im = cv2.resize(im, (patch, patch), interpolation=cv2.INTER_LINEAR)
        cv2.imwrite(str(out / f"{idx:0{digits}d}_x{x}_y{y}.png"), cv2.cvtColor(im, cv2.COLOR_RGB2BGR))
        xy.append((x, y))
    return xy, level, read
