"""Bring your own encoder (issue 20): scripts/export_encoder.py and `tilefeat extract --model`.

* export_encoder.py writes TorchScript + sidecar for the torchvision ResNet50 trunk, a
  torchvision ViT-B/16, timm ViTs (random init, or a local .pth / .safetensors state dict,
  strictly loaded), timm token outputs pooled as Virchow does (class token + mean patch token,
  register tokens left out), and a module from the user's Python (--module-from). Each sidecar
  has exactly the documented fields with the right values; each reloaded TorchScript equals an
  eager model rebuilt here from the state dict (not by the script). An export whose trace does
  not reproduce eager (a batch size baked in) fails and writes nothing; a state dict that does
  not fit is refused.
* tilefeat extract --model: the CSV (`tile,0..D-1`, rows sorted by tile name) equals PyTorch
  eager on the same preprocessed pixels (cv2.imread -> INTER_LINEAR resize -> RGB -> /255 ->
  (x - mean) / std) within 1e-4 relative (max |diff| / max |ref| per tile), with the
  preprocessing taken from the sidecar or, without one, from --size / --normalize / --mean --std;
  feature maps pooled with --pool max|avg.
* The traced ResNet50 trunk with --pool max|avg equals the native `--weights` path (same
  random-init weights saved as a torchvision state dict) within 1e-5.
* Bad models: not TorchScript (a plain state dict, a text file) -> exit 4 naming the file; a
  module that wants another input rank, one that returns (N,T,D) ("shape"), one that returns
  NaN ("NaN") -> exit 4 naming the file, no CSV, no panic.
* Hostile models (issues 12, 13): code that calls torch.from_file (in forward or in
  __setstate__, which loading runs) or torch.save is refused with exit 4 before it runs, also
  with --dry-run (the file it would touch is never created), and runs with
  --allow-unsafe-model; complex, -inf, (N, 8, 0, 0), input-dependent widths and 10^7 features
  are exit 4 naming the model (and the tile); 65,536 features work in CSV, HDF5 and Parquet;
  FILE_OPS covers every file op of torch's registry.
* CSV bytes do not depend on --batch-size (1/7/32) or --threads (1/2) with --model.

The tilefeat tests need a binary with --model (TILEFEAT_BIN or target/release/tilefeat).
"""

from __future__ import annotations

import filecmp
import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
import torch
from torch import nn

from conftest import ROOT, read_features, source_image
from tutorial_reference import find_tiles

SCRIPT = ROOT / "scripts" / "export_encoder.py"
SAMPLE_A = ROOT / "demo" / "tiles" / "sampleA"
SIDECAR_KEYS = [
    "tilefeat_encoder", "name", "source", "size", "mean", "std", "output", "output_dim",
    "weights_sha256", "random_init", "exported_with", "notes",
]  # fmt: skip
IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
TUTORIAL = ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
EXPORT_TOL = 1e-5  # reloaded TorchScript vs eager
PARITY_TOL = 1e-4  # tilefeat --model vs PyTorch eager on the same pixels
NATIVE_TOL = 1e-5  # tilefeat --model trunk.pt vs tilefeat --weights (native ResNet50)
VIRCHOW_LIKE = {  # Virchow's kwargs on a tiny ViT, plus Virchow2's 4 register tokens
    "init_values": 1e-5, "mlp_ratio": 5.3375, "global_pool": "", "dynamic_img_size": True,
    "mlp_layer": "timm.layers.SwiGLUPacked", "act_layer": "torch.nn.SiLU", "reg_tokens": 4,
}  # fmt: skip

HOOKS = '''
import torch
from torch import nn


def small_cnn(weights=None, seed=None):
    """A fully convolutional (N,16,h,w) feature map with BatchNorm; exported at 64 x 64."""
    torch.manual_seed(0 if seed is None else seed)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        m[1].running_mean.copy_(torch.rand(8, generator=g) - 0.5)
        m[1].running_var.copy_(torch.rand(8, generator=g) + 0.5)
    return m.eval(), {"size": 64, "mean": (0.6, 0.5, 0.4), "std": (0.2, 0.25, 0.3), "name": "small_cnn"}


class BatchOfTwo(nn.Module):
    def forward(self, x):
        y = x.mean(dim=(2, 3))
        if x.shape[0] == 2:  # Python control flow: tracing (on a batch of 2) bakes this branch in
            return y * 2
        return y


def batch_dependent(weights=None, seed=None):
    return BatchOfTwo(), {"size": 32, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
'''


# --- helpers ------------------------------------------------------------------------------------


def export(*args, check=True) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=600)
    if check and r.returncode != 0:
        raise AssertionError(f"export_encoder.py {' '.join(map(str, args))} exited {r.returncode}:\n{r.stderr}")
    return r


def sidecar(pt: Path) -> dict:
    return json.loads(pt.with_suffix(".json").read_text())


def rel_err(ours, ref) -> np.ndarray:
    """Per row: max |ours - ref| / max |ref|."""
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    ours, ref = ours.reshape(len(ours), -1), ref.reshape(len(ref), -1)
    return np.abs(ours - ref).max(axis=1) / np.abs(ref).max(axis=1)


def preprocess(path: Path, size: int, mean, std) -> torch.Tensor:
    """tilefeat's preprocessing, OpenCV's arithmetic: decode, INTER_LINEAR resize to size x size,
    RGB, x/255, (x - mean) / std per channel."""
    img = cv2.imread(str(path))
    assert img is not None, path
    img = cv2.cvtColor(cv2.resize(img, (size, size)), cv2.COLOR_BGR2RGB)
    x = torch.from_numpy(img).permute(2, 0, 1).float().div(255)
    return (x - torch.tensor(mean, dtype=torch.float32)[:, None, None]) / torch.tensor(std, dtype=torch.float32)[:, None, None]


@torch.no_grad()
def eager_features(module: nn.Module, folder: Path, size: int, mean, std, pool: str | None = None):
    """(relative tile names, features) of an eager module on folder's tiles, tilefeat's order."""
    tiles = find_tiles(folder)
    x = torch.stack([preprocess(p, size, mean, std) for p in tiles])
    y = torch.cat([module.eval()(x[i : i + 4]) for i in range(0, len(x), 4)])
    if pool == "max":
        y = y.amax(dim=(2, 3))
    elif pool == "avg":
        y = y.mean(dim=(2, 3))
    return [p.relative_to(folder).as_posix() for p in tiles], y.numpy()


def check_csv(csv: Path, names: list[str], dim: int) -> np.ndarray:
    """The CSV's header is tile,0..dim-1 and its rows are `names`, sorted; returns the values."""
    header = csv.read_text().splitlines()[0]
    assert header == ",".join(["tile", *map(str, range(dim))]), header[:200]
    got_names, values = read_features(csv)
    assert got_names == names == sorted(names)
    assert values.shape == (len(names), dim)
    return values


def reloaded(pt: Path):
    return torch.jit.load(str(pt), map_location="cpu").eval()


def assert_equal_to_eager(pt: Path, eager: nn.Module, size: int, batch: int = 2) -> torch.Tensor:
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        ref = eager.eval()(x)
        got = reloaded(pt)(x)
    assert got.shape == ref.shape
    err = rel_err(got, ref).max()
    assert err <= EXPORT_TOL, f"{pt.name}: reloaded TorchScript vs eager {err:.2e}"
    return ref


def assert_sidecar(pt: Path, **expected) -> dict:
    import torchvision

    sc = sidecar(pt)
    assert list(sc) == SIDECAR_KEYS, list(sc)
    assert sc["tilefeat_encoder"] == 1
    for key, value in expected.items():
        if key in ("mean", "std"):
            assert sc[key] == pytest.approx(value, abs=1e-12), (key, sc[key])
        else:
            assert sc[key] == value, (key, sc[key], value)
    assert sc["exported_with"]["torch"] == torch.__version__
    assert sc["exported_with"]["torchvision"] == torchvision.__version__
    assert isinstance(sc["notes"], str)
    return sc


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def torchvision_trunk(state_dict_path: Path) -> nn.Module:
    import torchvision

    m = torchvision.models.resnet50(weights=None)
    m.load_state_dict(torch.load(state_dict_path, map_location="cpu", weights_only=True))
    return nn.Sequential(*list(m.children())[:-2])


def timm_model(name: str, state_dict_path: Path | None = None, **kwargs) -> nn.Module:
    import timm

    kwargs = {k: {"timm.layers.SwiGLUPacked": timm.layers.SwiGLUPacked, "torch.nn.SiLU": nn.SiLU}.get(v, v)
              if isinstance(v, str) else v for k, v in kwargs.items()}  # fmt: skip
    m = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    if state_dict_path is not None:
        if state_dict_path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(state_dict_path))
        else:
            sd = torch.load(state_dict_path, map_location="cpu", weights_only=True)
        m.load_state_dict(sd, strict=True)
    return m.eval()


# --- exported encoders (session fixtures) -------------------------------------------------------


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    return tmp_path_factory.mktemp("encoders")


@pytest.fixture(scope="session")
def trunk(models):
    """ResNet50 trunk, random init seed 3, tutorial normalization in the sidecar, and the same
    weights as a torchvision state dict."""
    pt, sd = models / "trunk.pt", models / "trunk_seed3.pth"
    export("torchvision-resnet50-trunk", "--random-init", 3, "--normalize", "tutorial", "-o", pt, "--save-state-dict", sd)
    return pt, sd


@pytest.fixture(scope="session")
def vit(models):
    pt, sd = models / "vit.pt", models / "vit_b_16_seed0.pth"
    export("vit_b_16", "--random-init", 0, "-o", pt, "--save-state-dict", sd)
    return pt, sd


@pytest.fixture(scope="session")
def tiny(models):
    pt, sd = models / "tiny.pt", models / "tiny_seed0.pth"
    export("timm:vit_tiny_patch16_224", "--random-init", 0, "-o", pt, "--save-state-dict", sd)
    return pt, sd


@pytest.fixture(scope="session")
def hooks(models):
    path = models / "my_hooks.py"
    path.write_text(HOOKS)
    return path


@pytest.fixture(scope="session")
def small_cnn(models, hooks):
    pt = models / "small_cnn.pt"
    export("--module-from", f"{hooks}:small_cnn", "-o", pt)
    spec = importlib.util.spec_from_file_location("my_hooks", hooks)
    my_hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(my_hooks)
    return pt, my_hooks.small_cnn()[0]  # the same seeded module, eager


@pytest.fixture(scope="session")
def many_tiles(tmp_path_factory):
    """26 PNG tiles cropped from the IHC image, 160..320 px (so resized up and down)."""
    im = source_image()
    h, w = im.shape[:2]
    rng = np.random.default_rng(20)
    d = tmp_path_factory.mktemp("many_tiles")
    for k in range(26):
        n = (160, 224, 256, 320)[k % 4]
        y, x = rng.integers(0, h - n + 1), rng.integers(0, w - n + 1)
        cv2.imwrite(str(d / f"tile_{k:02d}.png"), im[y : y + n, x : x + n])
    return d


# --- export_encoder.py ---------------------------------------------------------------------------


def test_help_explains_with_examples():
    r = export("--help")
    for text in ("examples:", "torchvision-resnet50-trunk", "vit_b_16", "timm:", "--weights", "--random-init",
                 "--size", "--mean", "--std", "--output", "--name", "--timm-kwargs", "--pool-tokens", "--module-from"):  # fmt: skip
        assert text in r.stdout, text
    r = export("vit_b_16", "-o", "x.pt", check=False)  # neither --weights nor --random-init
    assert r.returncode == 2 and "--random-init" in r.stderr


def test_runs_as_written_from_a_python_without_torch(tmp_path):
    """Regression (issue 28): `scripts/export_encoder.py ...` as the README writes it ran the
    system python (`#!/usr/bin/env python3`), which has no torch. Run by one, it goes on in the
    project's venv; with no venv beside it, it says what to do."""
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", bare], check=True)
    python = bare / "bin" / "python"
    assert subprocess.run([python, "-c", "import torch"], capture_output=True).returncode != 0
    r = subprocess.run([python, SCRIPT, "--help"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "examples:" in r.stdout, r.stderr
    lone = tmp_path / "scripts" / "export_encoder.py"
    lone.parent.mkdir()
    shutil.copy(SCRIPT, lone)
    r = subprocess.run([python, lone, "--help"], capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "has no torch" in r.stderr and "setup.sh" in r.stderr, r.stderr


def test_resnet50_trunk_export(trunk):
    pt, sd = trunk
    assert_sidecar(pt, name="resnet50_trunk", source="torchvision", size=224, mean=TUTORIAL[0], std=TUTORIAL[1],
                   output="feature_map", output_dim=2048, weights_sha256=None)  # fmt: skip
    assert sidecar(pt)["exported_with"]["timm"] is None
    assert "random" in sidecar(pt)["notes"].lower()
    ref = assert_equal_to_eager(pt, torchvision_trunk(sd), 224)
    assert ref.shape == (2, 2048, 7, 7)
    # The random init is meant to be non-trivial: BatchNorm statistics are not (0, 1).
    state = torch.load(sd, weights_only=True)
    assert state["bn1.running_var"].std() > 0.1 and state["layer4.2.bn3.running_mean"].abs().max() > 0.05


def test_random_init_models_are_not_called_trained(tilefeat, tmp_path, trunk, models):
    """Regression (issue 28): a --model exported with --random-init gave `trained: true`, no
    warning, and ResNet-only settings (layer4, tutorial) beside the model's own mean/std."""
    import h5py

    pt, sd = trunk
    assert sidecar(pt)["random_init"] == 3
    r = tilefeat("extract", SAMPLE_A, "--model", pt, "-o", tmp_path / "r.h5")
    assert "NOT a trained model" in r.stderr, r.stderr
    prov = yaml.safe_load((tmp_path / "r.provenance.yaml").read_text())
    assert prov["weights"]["trained"] is False and "NOT a trained model" in prov["warning"]
    assert "layer" not in prov["settings"] and "normalize" not in prov["settings"]
    assert prov["settings"]["mean_std"].startswith("mean=")
    with h5py.File(tmp_path / "r.h5", "r") as f:
        assert f.attrs["trained"] == "false" and f.attrs["layer"] == "output"
    # The same weights exported from the file (no --random-init): trained as far as it knows.
    pt2 = models / "trunk_trained.pt"
    export("torchvision-resnet50-trunk", "--weights", sd, "--normalize", "tutorial", "-o", pt2)
    assert sidecar(pt2)["random_init"] is None
    tilefeat("extract", SAMPLE_A, "--model", pt2, "-o", tmp_path / "t.csv", "--quiet")
    prov = yaml.safe_load((tmp_path / "t.provenance.yaml").read_text())
    assert prov["weights"]["trained"] is True and "warning" not in prov


def test_resnet50_trunk_from_weights_file(trunk, models):
    """--weights: the same state dict gives the same TorchScript outputs; its SHA-256 is recorded."""
    pt, sd = trunk
    pt2 = models / "trunk_from_weights.pt"
    export("torchvision-resnet50-trunk", "--weights", sd, "--mean", "0.5,0.5,0.5", "--std", "0.5,0.5,0.5", "-o", pt2)
    assert_sidecar(pt2, weights_sha256=sha256(sd), output="feature_map", output_dim=2048, mean=TUTORIAL[0])
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(reloaded(pt)(x), reloaded(pt2)(x))


def test_torchvision_vit_export(vit):
    import torchvision

    pt, sd = vit
    assert_sidecar(pt, name="vit_b_16", source="torchvision", size=224, mean=IMAGENET[0], std=IMAGENET[1],
                   output="embedding", output_dim=768, weights_sha256=None)  # fmt: skip
    eager = torchvision.models.vit_b_16(weights=None)
    eager.load_state_dict(torch.load(sd, map_location="cpu", weights_only=True))
    eager.heads = nn.Identity()
    assert assert_equal_to_eager(pt, eager, 224, batch=3).shape == (3, 768)


def test_timm_random_init_export(tiny):
    import timm

    pt, sd = tiny
    cfg = timm.data.resolve_model_data_config(timm_model("vit_tiny_patch16_224"))
    sc = assert_sidecar(pt, name="vit_tiny_patch16_224", source="timm", size=224, mean=list(cfg["mean"]),
                        std=list(cfg["std"]), output="embedding", output_dim=192, weights_sha256=None)  # fmt: skip
    assert sc["exported_with"]["timm"] == timm.__version__
    assert_equal_to_eager(pt, timm_model("vit_tiny_patch16_224", sd), 224)


@pytest.mark.parametrize("fmt", [".pth", ".safetensors"])
def test_timm_from_local_weights(tmp_path, fmt):
    """A timm state dict from a local file (strict load), its SHA-256 in the sidecar; explicit
    --size, --mean, --std and --name are recorded as given."""
    from safetensors.torch import save_file

    torch.manual_seed(11)
    m = timm_model("vit_tiny_patch16_224", img_size=160)
    sd = {k: (v + 0.01 * torch.randn_like(v)).contiguous() for k, v in m.state_dict().items()}
    weights = tmp_path / f"tiny_weights{fmt}"
    if fmt == ".safetensors":
        save_file(sd, str(weights))
    else:
        torch.save(sd, weights)
    pt = tmp_path / "tiny160.pt"
    export("timm:vit_tiny_patch16_224", "--weights", weights, "--timm-kwargs", '{"img_size": 160}', "--size", 160,
           "--mean", "0.7,0.6,0.7", "--std", "0.2,0.25,0.18", "--name", "my-tiny", "-o", pt)  # fmt: skip
    assert_sidecar(pt, name="my-tiny", source="timm", size=160, mean=[0.7, 0.6, 0.7], std=[0.2, 0.25, 0.18],
                   output="embedding", output_dim=192, weights_sha256=sha256(weights))  # fmt: skip
    assert_equal_to_eager(pt, timm_model("vit_tiny_patch16_224", weights, img_size=160), 160)


def test_timm_weights_that_do_not_fit_are_refused(tmp_path):
    weights = tmp_path / "small.pth"
    torch.save(timm_model("vit_small_patch16_224").state_dict(), weights)
    pt = tmp_path / "tiny.pt"
    r = export("timm:vit_tiny_patch16_224", "--weights", weights, "-o", pt, check=False)
    assert r.returncode == 1, r.stderr
    assert "small.pth" in r.stderr and "strict" in r.stderr
    assert not pt.exists() and not pt.with_suffix(".json").exists()


def test_timm_tokens_pooled_as_virchow(tmp_path):
    """--pool-tokens virchow on Virchow2-like kwargs (SwiGLUPacked, SiLU, LayerScale, 4 register
    tokens, global_pool ''): the model card's concat(class token, mean of the patch tokens)."""
    pt, sd = tmp_path / "virchowish.pt", tmp_path / "virchowish.pth"
    export("timm:vit_tiny_patch16_224", "--random-init", 5, "--timm-kwargs", json.dumps(VIRCHOW_LIKE),
           "--pool-tokens", "virchow", "--normalize", "imagenet", "-o", pt, "--save-state-dict", sd)  # fmt: skip
    assert_sidecar(pt, output="embedding", output_dim=2 * 192, mean=IMAGENET[0], std=IMAGENET[1], size=224)
    model = timm_model("vit_tiny_patch16_224", sd, **VIRCHOW_LIKE)
    assert model.num_prefix_tokens == 5

    class CardRecipe(nn.Module):
        def forward(self, x):
            output = model(x)  # (N, 1 + 4 + 196, 192): global_pool "" keeps the tokens
            return torch.cat([output[:, 0], output[:, 5:].mean(1)], dim=-1)

    assert_equal_to_eager(pt, CardRecipe(), 224)


def test_module_from_python(small_cnn):
    pt, eager = small_cnn
    assert_sidecar(pt, name="small_cnn", source="python", size=64, mean=[0.6, 0.5, 0.4], std=[0.2, 0.25, 0.3],
                   output="feature_map", output_dim=16, weights_sha256=None)  # fmt: skip
    assert_equal_to_eager(pt, eager, 64)


def test_trace_that_differs_from_eager_fails(tmp_path, hooks):
    """A branch on the batch size is baked in by tracing: the check on another batch size
    catches it; nothing is written."""
    pt = tmp_path / "bad.pt"
    r = export("--module-from", f"{hooks}:batch_dependent", "-o", pt, check=False)
    assert r.returncode == 1, r.stderr
    assert "relative difference" in r.stderr
    assert not pt.exists() and not pt.with_suffix(".json").exists()
    assert not list(tmp_path.glob(".*tmp")), list(tmp_path.iterdir())


# --- tilefeat extract --model ---------------------------------------------------------------------


def test_vit_features_match_eager(tilefeat, tmp_path, vit):
    """Preprocessing from vit.json (224, ImageNet mean/std); CSV against eager ViT-B/16."""
    import torchvision

    pt, sd = vit
    out = tmp_path / "o.csv"
    tilefeat("extract", SAMPLE_A, "--model", pt, "--output", out, "--quiet")
    eager = torchvision.models.vit_b_16(weights=None)
    eager.load_state_dict(torch.load(sd, map_location="cpu", weights_only=True))
    eager.heads = nn.Identity()
    names, ref = eager_features(eager, SAMPLE_A, 224, *IMAGENET)
    ours = check_csv(out, names, 768)
    err = rel_err(ours, ref)
    print(f"vit_b_16 --model: max relative error {err.max():.2e} over {len(names)} tiles")
    assert err.max() <= PARITY_TOL, dict(zip(names, err))
    # The comparison can see a preprocessing mistake: ignoring the sidecar's mean/std (tilefeat's
    # default is the tutorial's 0.5) moves every tile far beyond the tolerance.
    _, wrong = eager_features(eager, SAMPLE_A, 224, *TUTORIAL)
    assert rel_err(wrong, ref).min() > 100 * PARITY_TOL


@pytest.mark.parametrize("flags,mean,std", [
    (["--normalize", "imagenet"], *IMAGENET),
    (["--normalize", "tutorial"], *TUTORIAL),
    (["--mean", "0.7,0.6,0.7", "--std", "0.2,0.25,0.18"], [0.7, 0.6, 0.7], [0.2, 0.25, 0.18]),
])  # fmt: skip
def test_model_without_sidecar_takes_flags(tilefeat, tmp_path, tiny, flags, mean, std):
    pt, sd = tiny
    bare = tmp_path / "bare" / "tiny.pt"  # no tiny.json beside it
    bare.parent.mkdir()
    shutil.copy(pt, bare)
    out = tmp_path / "o.csv"
    tilefeat("extract", SAMPLE_A, "--model", bare, "--size", 224, *flags, "-o", out, "--quiet")
    names, ref = eager_features(timm_model("vit_tiny_patch16_224", sd), SAMPLE_A, 224, mean, std)
    err = rel_err(check_csv(out, names, 192), ref)
    assert err.max() <= PARITY_TOL, dict(zip(names, err))


@pytest.mark.parametrize("pool", ["max", "avg"])
def test_feature_map_pooled_with_sidecar_size(tilefeat, tmp_path, small_cnn, pool):
    """small_cnn.json says 64 px and its own mean/std; the (N,16,h,w) map is pooled by --pool."""
    pt, eager = small_cnn
    out = tmp_path / "o.csv"
    tilefeat("extract", SAMPLE_A, "--model", pt, "--pool", pool, "-o", out, "--quiet")
    names, ref = eager_features(eager, SAMPLE_A, 64, [0.6, 0.5, 0.4], [0.2, 0.25, 0.3], pool=pool)
    err = rel_err(check_csv(out, names, 16), ref)
    assert err.max() <= PARITY_TOL, dict(zip(names, err))


@pytest.mark.parametrize("pool", ["max", "avg"])
def test_traced_trunk_equals_native(tilefeat, tmp_path, trunk, pool):
    """The traced ResNet50 trunk (sidecar: 224, tutorial mean/std) against tilefeat's own
    ResNet50 (BatchNorm folded, channels-last) with the same weights, tutorial normalization."""
    pt, sd = trunk
    ours, native = tmp_path / "model.csv", tmp_path / "native.csv"
    tilefeat("extract", SAMPLE_A, "--model", pt, "--pool", pool, "-o", ours, "--quiet")
    tilefeat("extract", SAMPLE_A, "--weights", sd, "--pool", pool, "--normalize", "tutorial", "-o", native, "--quiet")
    names = [p.relative_to(SAMPLE_A).as_posix() for p in find_tiles(SAMPLE_A)]
    a, b = check_csv(ours, names, 2048), check_csv(native, names, 2048)
    err = rel_err(a, b)
    print(f"trunk --model vs native, {pool}: max relative difference {err.max():.2e}")
    assert err.max() <= NATIVE_TOL, dict(zip(names, err))


class ExpectsMatrix(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.dim() == 2, "this model takes (N, D) input"
        return x


class WrongBmm(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(1, 5, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).bmm(self.w).flatten(1)  # wants (N, 5) rows of 5: not (N, 3, S*S)


class Tokens(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).transpose(1, 2)[:, :10, :]  # (N, 10, 3)


class SomeNaN(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.mean(dim=(2, 3))
        return torch.cat([y[:, :1], y[:, 1:2] * float("nan"), y[:, 2:]], dim=1)


def write_bad_model(kind: str, path: Path) -> Path:
    if kind == "state_dict":
        torch.save({"fc.weight": torch.ones(2, 3)}, path)
    elif kind == "text":
        path.write_text("this is not a TorchScript archive\n")
    else:
        module = {"rank_assert": ExpectsMatrix, "rank_bmm": WrongBmm, "tokens": Tokens, "nan": SomeNaN}[kind]()
        torch.jit.script(module).save(str(path))
    return path


@pytest.mark.parametrize("kind,keyword", [
    ("state_dict", "not a torchscript module"),
    ("text", "not a torchscript module"),
    ("rank_assert", "does not take"),
    ("rank_bmm", "does not take"),
    ("tokens", "shape"),
    ("nan", "nan"),
])  # fmt: skip
def test_bad_models_are_refused(tilefeat, tmp_path, kind, keyword):
    model = write_bad_model(kind, tmp_path / f"bad_{kind}_model.pt")
    out = tmp_path / "o.csv"
    r = tilefeat("extract", SAMPLE_A, "--model", model, "-o", out, "--quiet", check=False)
    assert r.returncode == 4, r.stderr  # README, exit codes: 4 = weights or model
    assert "panicked" not in r.stderr, r.stderr  # an error, not a panic
    assert model.name in r.stderr, r.stderr
    assert keyword in r.stderr.lower(), r.stderr
    assert not out.exists()


# --- hostile models (issue 12: file operations; issue 13: outputs) ------------------------------


def hostile_model(kind: str, path: Path, target: Path) -> Path:
    """A TorchScript model that touches `target` (a file) or returns a bad output, exported with
    torch.jit.script. The file operations make `target`'s bytes the features, so no compiler
    pass can drop them."""
    t = str(target)
    src = {
        # torch.from_file(shared=True) creates and maps `target` read-write: in forward...
        "from_file": f"""
class M(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = torch.from_file({t!r}, True, 16, dtype=torch.uint8).float()
        return x.mean(dim=(2, 3)) + f[:3].unsqueeze(0) * 0
""",
        # ... or in __setstate__, which torch.jit.load runs while loading the file.
        "setstate": f"""
class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.k = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3)) * self.k

    @torch.jit.export
    def __getstate__(self) -> Tuple[int, bool]:
        return (self.k, self.training)

    @torch.jit.export
    def __setstate__(self, s: Tuple[int, bool]) -> None:
        f = torch.from_file({t!r}, True, 16, dtype=torch.uint8)
        self.k = s[0] + int(f.sum()) * 0
        self.training = s[1]
""",
        # torch.save (aten::save) writes a file.
        "save": f"""
class M(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.mean(dim=(2, 3))
        torch.save(y, {t!r})
        return y
""",
        "complex": """
class M(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.mean(dim=(2, 3))
        return torch.complex(y, y)
""",
        # Finite on the blank tile it is checked with at load; -inf on the real tiles whose
        # pixel (0, 0) is redder than pixel (5, 5) (the test computes which).
        "inf": """
class M(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.mean(dim=(2, 3))
        return torch.where(x[0, 0, 0, 0] > x[0, 0, 5, 5], torch.full_like(y, -float("inf")), y)
""",
        "empty_map": """
class M(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(x.shape[0], 8, 0, 0)
""",
        # 6 features for the blank tile; 4 or 5 for a real one, as two of its pixels compare.
        "width": """
class M(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.mean(dim=(2, 3))
        y = torch.cat([y, y], dim=1)
        if bool(x.abs().amax() > 0):
            return y[:, : 4 + int(x[0, 0, 0, 0] > x[0, 0, 5, 5])]
        return y
""",
        "huge": """
class M(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(x.shape[0], 10_000_000)
""",
    }[kind]
    module_file = path.with_suffix(".py")  # torch.jit.script reads the class's source
    module_file.write_text("import torch\nfrom torch import nn\nfrom typing import Tuple\n" + src)
    spec = importlib.util.spec_from_file_location(f"hostile_{kind}", module_file)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.jit.script(mod.M()).save(str(path))
    return path


@pytest.mark.parametrize("kind,op", [("from_file", "aten::from_file"), ("setstate", "aten::from_file"), ("save", "aten::save")])
@pytest.mark.parametrize("dry_run", [True, False])
def test_models_that_touch_files_are_refused_before_they_run(tilefeat, tmp_path, kind, op, dry_run):
    target = tmp_path / "victim.bin"
    model = hostile_model(kind, tmp_path / f"{kind}.pt", target)
    if kind != "save":  # the exported file really does what it says when torch loads and runs it
        torch.jit.load(str(model))(torch.zeros(1, 3, 16, 16))
        assert target.exists()
        target.unlink()
    out = tmp_path / "o.csv"
    args = ["extract", SAMPLE_A, "--model", model, "--size", 32, "-o", out, "--quiet"]
    r = tilefeat(*args, *(["--dry-run"] if dry_run else []), check=False)
    assert r.returncode == 4, r.stderr
    assert model.name in r.stderr and op in r.stderr and "--allow-unsafe-model" in r.stderr, r.stderr
    assert "/code/__torch__" in r.stderr, r.stderr  # the archive entry that calls it
    assert not target.exists() and not out.exists()
    if kind == "from_file" and not dry_run:
        # The documented opt-in runs it, with a warning naming the op.
        r = tilefeat(*args, "--allow-unsafe-model", check=False)
        assert r.returncode == 0, r.stderr
        assert op in r.stderr and "warning" in r.stderr, r.stderr
        assert target.exists() and out.exists()


@pytest.mark.parametrize("kind,keyword", [
    ("complex", "complex"),
    ("inf", "-inf"),
    ("empty_map", "shape [1, 8, 0, 0]"),
    ("width", "for a batch of 1; expected (1, 6)"),
    ("huge", "at most 65536"),
])  # fmt: skip
def test_bad_outputs_are_refused(tilefeat, tmp_path, kind, keyword):
    model = hostile_model(kind, tmp_path / f"{kind}.pt", tmp_path / "unused")
    out = tmp_path / "out" / "o.parquet"
    out.parent.mkdir()
    r = tilefeat("extract", SAMPLE_A, "--model", model, "--size", 32, "-o", out, "--quiet", check=False)
    assert r.returncode == 4, r.stderr
    assert "panicked" not in r.stderr, r.stderr
    assert model.name in r.stderr and keyword in r.stderr, r.stderr
    if kind == "inf":  # the first tile of the failing batch whose features are not finite is
        # named (one batch here: with several, the batch that fails first is reported)
        bad = [p for p in find_tiles(SAMPLE_A) if (lambda x: x[0, 0, 0] > x[0, 5, 5])(preprocess(p, 32, *TUTORIAL))]
        assert bad and len(bad) < len(find_tiles(SAMPLE_A)), bad  # some tiles, not all
        assert f"model failed on tile {bad[0]}:" in r.stderr, (bad, r.stderr)
    if kind == "width":  # found on a real tile: its batch is named
        assert "model failed on the batch starting at" in r.stderr and "sampleA/tile_" in r.stderr, r.stderr
    assert list(out.parent.iterdir()) == [], r.stderr  # no output, temp file or lock left


def test_the_largest_feature_dimension_works_in_every_format(tilefeat, tmp_path):
    """MAX_FEATURE_DIM (65,536) features per tile: CSV, HDF5 and Parquet write and read back."""
    import h5py
    import pandas as pd

    dim = 65536
    src = f"""
class M(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3)).repeat(1, {dim // 2})[:, :{dim}] + torch.arange({dim}).float() * 1e-3
"""
    module_file = tmp_path / "wide.py"
    module_file.write_text("import torch\nfrom torch import nn\n" + src.replace("{dim // 2}", str(dim // 2)))
    spec = importlib.util.spec_from_file_location("wide", module_file)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model = tmp_path / "wide.pt"
    torch.jit.script(mod.M()).save(str(model))
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    for name in sorted(p.name for p in SAMPLE_A.iterdir())[:3]:
        shutil.copy(SAMPLE_A / name, tiles / name)
    values = {}
    for fmt in ("csv", "h5", "parquet"):
        out = tmp_path / fmt / f"wide.{fmt}"  # a folder each: formats share side-file names
        out.parent.mkdir()
        tilefeat("extract", tiles, "--model", model, "--size", 32, "-o", out, "--quiet")
        if fmt == "csv":
            values[fmt] = read_features(out)[1]
        elif fmt == "h5":
            with h5py.File(out) as f:
                values[fmt] = f["features"][:]
        else:
            values[fmt] = pd.read_parquet(out)[[str(i) for i in range(dim)]].to_numpy(dtype=np.float32)
        assert values[fmt].shape == (3, dim), (fmt, values[fmt].shape)
    np.testing.assert_array_equal(values["csv"], values["h5"])
    np.testing.assert_array_equal(values["csv"], values["parquet"])


def test_model_csv_bytes_do_not_depend_on_batch_or_threads(tilefeat, tmp_path, tiny, many_tiles):
    pt, _ = tiny
    runs = [(1, 2), (7, 2), (32, 2), (32, 1)]  # --batch-size 1/7/32, --threads 1/2
    outs = []
    for batch, threads in runs:
        out = tmp_path / f"b{batch}_t{threads}.csv"
        tilefeat("extract", many_tiles, "--model", pt, "--batch-size", batch, "--threads", threads, "-o", out, "--quiet")
        outs.append(out)
    names = [p.relative_to(many_tiles).as_posix() for p in find_tiles(many_tiles)]
    assert len(names) == 26
    check_csv(outs[0], names, 192)
    for (batch, threads), out in zip(runs[1:], outs[1:]):
        assert filecmp.cmp(outs[0], out, shallow=False), f"--batch-size {batch} --threads {threads} differs from --batch-size 1 --threads 2"


def test_file_operation_list_covers_the_op_registry():
    """Every op of this torch's registry (and torchvision's) that takes a file name, or whose name
    says it loads, saves or opens something, is in src/encoder/audit.rs's FILE_OPS (a torch
    upgrade that adds one fails here)."""
    import re

    import torchvision  # noqa: F401  (registers its image:: ops, two of which touch files)

    listed = set(re.findall(r'\("\w+", "(\w+::\w+)"\)', (ROOT / "src" / "encoder" / "audit.rs").read_text()))
    assert {"aten::from_file", "aten::save"} <= listed, listed
    touching = set()
    for schema in torch._C._jit_get_all_schemas():
        strs = [a.name for a in schema.arguments if "str" in str(a.type)]
        if any(re.search(r"file|path|dir$", a, re.I) for a in strs) or re.search(
            r"(^|_)(load|save|open|file|exec|system|popen|spawn)(_|$)", schema.name.split("::")[1]
        ):
            touching.add(schema.name)
    assert touching <= listed, sorted(touching - listed)


def test_a_model_run_with_a_cache(tilefeat, tmp_path, models, hooks, small_cnn, many_tiles):
    """Issue 27 (4): `--model` with a cache. The rerun is all hits and byte-identical to an
    uncached run, at another batch size too; a copy of the model elsewhere hits (paths are not
    in the key); the same network with other weights (another SHA-256), or the same file with
    another mean in its sidecar, hits nothing and gives other numbers."""
    pt, _ = small_cnn
    cache = tmp_path / "cache"

    def run(model, name, *flags):
        out = tmp_path / f"{name}.csv"
        tilefeat("extract", many_tiles, "--model", model, "-o", out, "--quiet", *flags)
        prov = yaml.safe_load(out.with_suffix(".provenance.yaml").read_text())
        cached = prov.get("cache") or {}
        return out, cached.get("hits"), prov["tiles"]["computed"]

    reference, _, _ = run(pt, "reference", "--no-cache")
    first, hits, computed = run(pt, "first", "--cache-dir", cache)
    assert (hits, computed) == (0, 26)
    assert filecmp.cmp(first, reference, shallow=False)
    again, hits, computed = run(pt, "again", "--cache-dir", cache, "--batch-size", 5)
    assert (hits, computed) == (26, 0)
    assert filecmp.cmp(again, reference, shallow=False), "hits are the stored bytes"

    moved = tmp_path / "elsewhere" / "renamed.pt"
    moved.parent.mkdir()
    shutil.copy(pt, moved)
    shutil.copy(pt.with_suffix(".json"), moved.with_suffix(".json"))
    out, hits, _ = run(moved, "moved", "--cache-dir", cache)
    assert hits == 26 and filecmp.cmp(out, reference, shallow=False)

    reseeded = models / "small_cnn_seed5.pt"
    export("--module-from", f"{hooks}:small_cnn", "--random-init", 5, "-o", reseeded)
    assert sha256(reseeded) != sha256(pt)
    out, hits, computed = run(reseeded, "reseeded", "--cache-dir", cache)
    assert (hits, computed) == (0, 26)
    assert not filecmp.cmp(out, reference, shallow=False)

    sc = json.loads(moved.with_suffix(".json").read_text())
    sc["mean"] = [0.4, 0.5, 0.6]
    moved.with_suffix(".json").write_text(json.dumps(sc))
    out, hits, computed = run(moved, "other_mean", "--cache-dir", cache)
    assert (hits, computed) == (0, 26)
    assert not filecmp.cmp(out, reference, shallow=False)


def test_flags_that_disagree_with_the_sidecar_win_with_a_warning(tilefeat, tmp_path, small_cnn):
    """Issue 27 (promises with no test), README: the sidecar sets --size, --mean and --std;
    flags that disagree with it win, with a warning naming both. small_cnn.json says 64 px and
    mean (0.6, 0.5, 0.4): the numbers must be those of the flags' preprocessing."""
    pt, eager = small_cnn
    cases = [
        (["--size", 48], "--size 48 differs from", 48, [0.6, 0.5, 0.4], [0.2, 0.25, 0.3]),
        (["--normalize", "imagenet"], "normalization", 64, *IMAGENET),
    ]
    for flags, warning, size, mean, std in cases:
        out = tmp_path / f"o{len(warning)}.csv"
        r = tilefeat("extract", SAMPLE_A, "--model", pt, "--pool", "avg", "-o", out, *flags)
        lines = [l for l in r.stderr.splitlines() if "warning" in l and warning in l]
        assert len(lines) == 1 and pt.with_suffix(".json").name in lines[0], r.stderr
        names, ref = eager_features(eager, SAMPLE_A, size, mean, std, pool="avg")
        err = rel_err(check_csv(out, names, 16), ref)
        assert err.max() <= PARITY_TOL, (flags, dict(zip(names, err)))
    # Without flags: the sidecar's, and no warning.
    out = tmp_path / "plain.csv"
    r = tilefeat("extract", SAMPLE_A, "--model", pt, "--pool", "avg", "-o", out)
    assert "warning" not in r.stderr, r.stderr
