"""STAMP's feature-file readers, vendored unchanged but for the lines marked `# tilefeat:`.

From KatherLab/STAMP (MIT licence, notice below), commit c54ce06739622c127a83eccb35a7082e504b9aef,
src/stamp/modeling/data.py: `detect_feature_type`, `CoordsInfo`, `get_coords`, `get_stride`.
STAMP itself needs Python 3.13 (this project tests on 3.11), so the functions its training
calls on every feature file are kept here as they are, to read tilefeat's files exactly as
STAMP does. The `stamp_version` check is left out (tilefeat writes no `stamp_version`);
the type aliases are plain floats and ints.

"""

# MIT License
#
# Copyright (c) 2023 Omar El Nahhas
#
# Permission is hereby granted, free of charge, to any person obtaining a copy
# of this software and associated documentation files (the "Software"), to deal
# in the Software without restriction, including without limitation the rights
# to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
# copies of the Software, and to permit persons to whom the Software is
# furnished to do so, subject to the following conditions:
#
# The above copyright notice and this permission notice shall be included in all
# copies or substantial portions of the Software.
#
# THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
# IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
# FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
# AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
# LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
# OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
# SOFTWARE.

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import h5py
import numpy as np
import torch
from torch import Tensor

_logger = logging.getLogger("stamp")

Microns = float  # tilefeat: stamp.types aliases
TilePixels = int  # tilefeat: stamp.types aliases
SlideMPP = float  # tilefeat: stamp.types aliases

def detect_feature_type(feature_dir: Path) -> str:
    """
    Detects feature type by inspecting all .h5 files in feature_dir.

    Returns:
        "tile" if all files are tile-level, "patient" if all are patient-level.
        If files have mixed types, raises an error.
        If no .h5 files are found, raises an error.
    """
    feature_types = set()
    files_checked = 0

    for file in feature_dir.rglob("*.h5"):
        files_checked += 1
        with h5py.File(file, "r") as h5:
            feat_type = h5.attrs.get("feat_type")
            encoder = h5.attrs.get("encoder")

            if feat_type is not None or encoder is not None:
                feature_types.add(str(feat_type))
            else:
                # If feat_type is missing, always treat as tile-level feature
                feature_types.add("tile")

    if files_checked == 0:
        raise RuntimeError("No .h5 feature files found in feature_dir.")

    if len(feature_types) > 1:
        raise RuntimeError(
            f"Multiple feature types detected in {feature_dir}: {feature_types}. "
            "All feature files must have the same type."
        )

    return feature_types.pop()



@dataclass
class CoordsInfo:
    coords_um: np.ndarray
    tile_size_um: Microns
    tile_size_px: TilePixels | None = None

    @property
    def mpp(self) -> SlideMPP:
        if not self.tile_size_px:
            raise RuntimeError(
                "tile size in pixels is not available. Please reextract them using `stamp preprocess`."
            )
        return SlideMPP(self.tile_size_um / self.tile_size_px)


def get_coords(feature_h5: h5py.File) -> CoordsInfo:
    # NEW: handle missing coords - multiplex data bypass: no coords found; generated fake coords
    if "coords" not in feature_h5:
        feats_obj = feature_h5["patch_embeddings"]

        if not isinstance(feats_obj, h5py.Dataset):
            raise RuntimeError(
                f"{feature_h5.filename}: expected 'feats' to be an HDF5 dataset but got {type(feats_obj)}"
            )

        n = feats_obj.shape[0]

        coords_um = np.stack([np.arange(n), np.zeros(n)], axis=1).astype(np.float32)
        tile_size_um = Microns(0.0)
        tile_size_px = TilePixels(0)

        return CoordsInfo(coords_um, tile_size_um, tile_size_px)
    coords_obj = feature_h5["coords"]
    if not isinstance(coords_obj, h5py.Dataset):
        raise RuntimeError(
            f"{feature_h5.filename}: expected 'coords' to be an HDF5 dataset but got {type(coords_obj)}"
        )
    coords: np.ndarray = coords_obj[:]
    tile_size_um: Microns | None = None
    tile_size_px: TilePixels | None = None
    coords_um: np.ndarray | None = None
    if (tile_size := feature_h5.attrs.get("tile_size", None)) and feature_h5.attrs.get(
        "unit", None
    ) == "um":
        # STAMP v2 format
        tile_size_um = Microns(float(tile_size))
        coords_um = coords
    elif tile_size := feature_h5.attrs.get("tile_size_um", None):
        # Newer STAMP format
        tile_size_um = Microns(float(tile_size))
        coords_um = coords
    elif (
        round(
            feature_h5.attrs.get(
                "tile_size", get_stride(torch.from_numpy(coords).float())
            )
        )
        == 224
    ):
        # Historic STAMP format
        _logger.debug(
            f"{feature_h5.filename}: tile stride is roughly 224, assuming coordinates have unit 256um/224px (historic STAMP format)"
        )
        tile_size_um = Microns(256.0)
        tile_size_px = TilePixels(224)
        coords_um = coords / 224 * 256

    # tilefeat: the stamp_version check is left out

    if not tile_size_px and "tile_size_px" in feature_h5.attrs:
        tile_size_px = TilePixels(int(feature_h5.attrs["tile_size_px"]))  # pyright: ignore[reportArgumentType]

    if not tile_size_um or coords_um is None:
        raise RuntimeError(
            "unable to infer coordinates from feature file. Please reextract them using `stamp preprocess`."
        )

    return CoordsInfo(coords_um, tile_size_um, tile_size_px)


def get_stride(coords: Tensor) -> float:
    """Gets the minimum step width between any two coordintes."""
    xs: Tensor = coords[:, 0].unique(sorted=True)
    ys: Tensor = coords[:, 1].unique(sorted=True)
    stride = cast(
        float,
        min(
            (xs[1:] - xs[:-1]).min().item(),
            (ys[1:] - ys[:-1]).min().item(),
        ),
    )
    return stride
