"""A faithful re-implementation of the tutorial pipeline that tilefeat replaces.

See ../shared/reference/tutorial-pipeline.md: cv2.imread (BGR), cv2.resize to 224x224
(INTER_LINEAR), BGR->RGB, ToTensor, Normalize(0.5, 0.5), torchvision resnet50 children run in
order, keep layer4 (or layer3), global max (or mean) over space. Used by the parity tests and
by the benchmark (`scripts/benchmark.py`), which also times the batched DataLoader variant.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import torch
import torchvision
from torchvision import transforms

EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
NORMALIZE = {
    "tutorial": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def find_tiles(folder: str | Path) -> list[Path]:
    """Tiles under folder, sorted by relative path (tilefeat's row order)."""
    folder = Path(folder)
    out = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for f in files:
            if not f.startswith(".") and f.lower().endswith(EXTENSIONS):
                out.append(Path(root) / f)
    return sorted(out, key=lambda p: p.relative_to(folder).as_posix())


def load_model(weights: str | Path, device: str = "cpu") -> torch.nn.Module:
    model = torchvision.models.resnet50(weights=None)
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.eval().to(device)


def preprocess(path: Path, size: int = 224, normalize: str = "tutorial") -> torch.Tensor:
    img = cv2.imread(str(path))
    if img is None:
        raise ValueError(f"cv2.imread could not read {path}")
    img = cv2.resize(img, (size, size))
    img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    mean, std = NORMALIZE[normalize]
    t = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean=mean, std=std)])
    return t(img)


def trunk(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Run the children in order, as the notebook does; return layer3 and layer4 outputs."""
    outs = {}
    for name, child in model.named_children():
        if name in ("avgpool", "fc"):
            break
        x = child(x)
        if name in ("layer3", "layer4"):
            outs[name] = x
    return outs


def pool(t: torch.Tensor, how: str) -> torch.Tensor:
    return t.amax(dim=(2, 3)) if how == "max" else t.mean(dim=(2, 3))


@torch.no_grad()
def tutorial_loop(folder, weights, device="cpu", layer="layer4", how="max", normalize="tutorial", size=224, model=None):
    """One tile at a time, exactly as the notebook. Returns (relative paths, features)."""
    model = model or load_model(weights, device)
    tiles = find_tiles(folder)
    feats = []
    for p in tiles:
        x = preprocess(p, size, normalize).unsqueeze(0).to(device)
        feats.append(pool(trunk(model, x)[layer], how).float().cpu().numpy()[0])
    return [p.relative_to(folder).as_posix() for p in tiles], np.stack(feats)


@torch.no_grad()
def batched_all(folder, weights, normalize="tutorial", size=224, batch=16, device="cpu"):
    """Same preprocessing per tile, model in batches; all four layer/pool combinations."""
    model = load_model(weights, device)
    tiles = find_tiles(folder)
    res = {(l, h): [] for l in ("layer3", "layer4") for h in ("max", "avg")}
    for i in range(0, len(tiles), batch):
        x = torch.stack([preprocess(p, size, normalize) for p in tiles[i : i + batch]]).to(device)
        outs = trunk(model, x)
        for (l, h), acc in res.items():
            acc.append(pool(outs[l], h).float().cpu().numpy())
    rel = [p.relative_to(folder).as_posix() for p in tiles]
    return rel, {k: np.concatenate(v) for k, v in res.items()}


class TileDataset(torch.utils.data.Dataset):
    def __init__(self, folder, size=224, normalize="tutorial"):
        self.tiles = find_tiles(folder)
        self.size, self.normalize = size, normalize

    def __len__(self):
        return len(self.tiles)

    def __getitem__(self, i):
        return preprocess(self.tiles[i], self.size, self.normalize)


@torch.no_grad()
def dataloader_pipeline(folder, weights, device="cpu", batch=32, workers=2, precision="fp32", model=None):
    """The usual 'fast' Python recipe: DataLoader workers decode, the model runs batched."""
    model = model or load_model(weights, device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    model = model.to(dtype=dtype)
    if device.startswith("cuda"):
        model = model.to(memory_format=torch.channels_last)
    dl = torch.utils.data.DataLoader(
        TileDataset(folder), batch_size=batch, num_workers=workers, pin_memory=device.startswith("cuda")
    )
    feats = []
    for x in dl:
        x = x.to(device, non_blocking=True).to(dtype)
        if device.startswith("cuda"):
            x = x.contiguous(memory_format=torch.channels_last)
        feats.append(pool(trunk(model, x)["layer4"], "max").float().cpu())
    return torch.cat(feats).numpy()


def make_random_weights(path_stem: str | Path, seed: int = 0) -> dict[str, Path]:
    """Deterministic random-init ResNet50 with non-trivial BatchNorm statistics, saved as a zip
    .pth, a legacy .pth and a .safetensors file."""
    torch.manual_seed(seed)
    model = torchvision.models.resnet50(weights=None)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_((torch.rand(n, generator=g) - 0.5) * 0.4)
                m.running_mean.copy_((torch.rand(n, generator=g) - 0.5) * 0.4)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
    sd = model.state_dict()
    stem = Path(path_stem)
    paths = {
        "zip": stem.with_suffix(".pth"),
        "legacy": stem.with_name(stem.name + "_legacy.pth"),
        "safetensors": stem.with_suffix(".safetensors"),
    }
    torch.save(sd, paths["zip"])
    torch.save(sd, paths["legacy"], _use_new_zipfile_serialization=False)
    try:
        from safetensors.torch import save_file
    except ImportError:  # e.g. a GPU machine without safetensors: .pth files only
        del paths["safetensors"]
        return paths
    save_file({k: v.contiguous() for k, v in sd.items()}, paths["safetensors"])
    return paths
