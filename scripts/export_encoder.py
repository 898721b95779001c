#!/usr/bin/env python3
"""Export an image encoder to TorchScript for `tilefeat extract --model FILE.pt` (issue 20).

The encoder is built in eval mode on the CPU in float32, traced with torch.jit.trace, saved,
reloaded and compared with the eager model on a random batch of another batch size (the export
fails, and writes nothing, when the maximum relative difference exceeds 1e-5). Beside FILE.pt
goes the sidecar FILE.json that tells tilefeat how to preprocess tiles for it (size, mean, std)
and records where the weights came from (see docs/encoders.md for the format and recipes).

Usable as a script (see --help) or as a module, for encoders no built-in builder covers:

    import export_encoder as ee
    ee.export_module(my_module, "enc.pt", size=224, mean=ee.IMAGENET[0], std=ee.IMAGENET[1],
                     name="my-encoder", source="python", weights="my_weights.pth")
"""

from __future__ import annotations

import os

# Never download anything: every model is built with pretrained=False and loaded from a local
# file (or seeded random init). Set before timm / huggingface_hub are imported.
os.environ["HF_HUB_OFFLINE"] = "1"

import argparse
import hashlib
import importlib
import importlib.util
import json
import re
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence


def _project_python() -> None:
    """Run as written (`scripts/export_encoder.py ...`) by a python without torch, go on in
    the project's venv, which scripts/setup.sh made and which has it; else say what to do."""
    if importlib.util.find_spec("torch") is not None:
        return
    venv = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "python"
    if venv.exists() and Path(sys.prefix).resolve() != venv.parents[1].resolve():
        os.execv(venv, [str(venv), str(Path(__file__).resolve()), *sys.argv[1:]])
    sys.exit(
        f"export_encoder.py: {sys.executable} has no torch: run scripts/setup.sh (which makes "
        ".venv), or pip install torch torchvision timm"
    )


if __name__ == "__main__":
    _project_python()

import torch  # noqa: E402
from torch import nn  # noqa: E402

SIDECAR_VERSION = 1
TOLERANCE = 1e-5  # max |traced - eager| / max |eager| on the verification batch
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
TUTORIAL = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
NORMALIZE = {"imagenet": IMAGENET, "tutorial": TUTORIAL}
RESNET50_TRUNK = "torchvision-resnet50-trunk"
TORCHVISION_VITS = ("vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14")
TOKEN_POOLS = ("cls", "mean", "cls+mean", "virchow")

EPILOG = """\
models:
  torchvision-resnet50-trunk  torchvision resnet50 without avgpool/fc: feature map (N,2048,S/32,S/32);
                              tilefeat pools it (--pool max|avg). Default mean/std: ImageNet
  vit_b_16, vit_l_16, ...     torchvision ViT, `heads` replaced by Identity: class-token embedding
                              (N, hidden_dim). Default mean/std: ImageNet
  timm:NAME                   timm.create_model(NAME, pretrained=False, num_classes=0, **--timm-kwargs);
                              default size: the model's img_size; default mean/std: timm's
                              pretrained_cfg for NAME (timm's, NOT a Hugging Face repo's config.json:
                              for foundation models pass --mean/--std or --normalize explicitly)
  --module-from SPEC          any nn.Module from your own Python code (see below)

weights (one of):
  --weights FILE              a local state dict (.pth/.pt/.bin via torch.load(weights_only=True), or
                              .safetensors), loaded strictly; its SHA-256 goes into the sidecar
  --random-init SEED          seeded random init, with non-trivial BatchNorm statistics and LayerScale
                              factors (for tests and demos: NOT trained features)

examples:
  # ResNet50 trunk from a torchvision state dict, with the tutorial's normalization
  scripts/export_encoder.py torchvision-resnet50-trunk --weights resnet50-0676ba61.pth \\
      --normalize tutorial --output trunk.pt
  tilefeat extract tiles/ --model trunk.pt --pool max --output features.csv

  # torchvision ViT-B/16, random init (seed 0), and its state dict for later comparisons
  scripts/export_encoder.py vit_b_16 --random-init 0 --output vit.pt --save-state-dict vit_b_16.pth

  # a timm model from a local weights file (UNI: see docs/encoders.md for all recipes)
  scripts/export_encoder.py timm:vit_large_patch16_224 --weights uni/pytorch_model.bin \\
      --timm-kwargs '{"img_size": 224, "patch_size": 16, "init_values": 1e-5, "dynamic_img_size": true}' \\
      --normalize imagenet --name UNI --output uni.pt

  # token outputs pooled in the module: Virchow's class token + mean patch token (2 x 1280)
  scripts/export_encoder.py timm:vit_huge_patch14_224 --weights virchow/pytorch_model.bin \\
      --timm-kwargs '{"img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375, "global_pool": "",
                      "dynamic_img_size": true, "mlp_layer": "timm.layers.SwiGLUPacked",
                      "act_layer": "torch.nn.SiLU"}' \\
      --pool-tokens virchow --normalize imagenet --name Virchow --output virchow.pt

  # your own module: FUNCTION(weights=None|str, seed=None|int) returns an nn.Module, or
  # (nn.Module, {"size": .., "mean": .., "std": .., "name": .., "notes": ..})
  scripts/export_encoder.py --module-from my_encoders.py:conch_image_tower \\
      --weights conch/pytorch_model.bin --output conch.pt

--timm-kwargs is JSON; a string value naming a class or function under timm. or torch.
(e.g. "timm.layers.SwiGLUPacked", "torch.nn.SiLU") is imported, so that mlp_layer / act_layer /
norm_layer can be given. The traced module only takes S x S inputs (S = --size); the batch size is free.
"""


class ExportError(Exception):
    """A problem with the request or the model; main() prints it and exits 1."""


# --- small helpers ------------------------------------------------------------------------------


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def parse_triplet(text: str, what: str) -> tuple[float, float, float]:
    """'0.485,0.456,0.406' (or a preset name: imagenet, tutorial) -> three floats."""
    if text in NORMALIZE:
        return NORMALIZE[text][0 if what == "mean" else 1]
    parts = [p for p in re.split(r"[,\s]+", text.strip()) if p]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise ExportError(f"--{what} {text!r}: expected three numbers R,G,B") from None
    if len(values) != 3:
        raise ExportError(f"--{what} {text!r}: expected three numbers R,G,B, got {len(values)}")
    if what == "std" and any(v <= 0 for v in values):
        raise ExportError(f"--std {text!r}: every value must be > 0")
    return values  # type: ignore[return-value]


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a local file: .safetensors, or anything torch.load reads with
    weights_only=True (.pth, .pt, .bin). A checkpoint that wraps it in {"state_dict": ...} or
    {"model": ...} is unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"--weights {path}: no such file")
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path), device="cpu")
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - reported with the file name
            raise ExportError(f"--weights {path}: not a state dict torch.load can read safely: {e}") from e
    for _ in range(2):
        if isinstance(sd, dict) and sd and not any(isinstance(v, torch.Tensor) for v in sd.values()):
            for key in ("state_dict", "model", "module"):
                if isinstance(sd.get(key), dict):
                    sd = sd[key]
                    break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ExportError(f"--weights {path}: not a state dict (a mapping of names to tensors)")
    return sd


def load_strict(model: nn.Module, path: str | Path) -> None:
    try:
        model.load_state_dict(load_state_dict(path), strict=True)
    except RuntimeError as e:
        raise ExportError(f"--weights {path} does not fit the model (strict load):\n{e}") from e


def save_state_dict(model: nn.Module, path: str | Path, extra: dict[str, torch.Tensor] | None = None) -> None:
    """The source model's state dict (torchvision / timm key names; `extra` adds entries of parts
    the export removed, e.g. a ViT's heads) as .safetensors or torch.save."""
    path = Path(path)
    sd = {k: v.detach().contiguous() for k, v in {**model.state_dict(), **(extra or {})}.items()}
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path))
    else:
        torch.save(sd, path)


def randomize_(model: nn.Module, seed: int) -> nn.Module:
    """Make a random-init model's features depend on all its parts: BatchNorm affine parameters
    and running statistics away from (1, 0, 0, 1), LayerScale factors away from a tiny
    init_values (1e-5 would make the transformer blocks all but vanish). Seeded, like
    tests/python/tutorial_reference.make_random_weights."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                n = m.num_features
                if m.weight is not None:
                    m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                    m.bias.copy_((torch.rand(n, generator=g) - 0.5) * 0.4)
                m.running_mean.copy_((torch.rand(n, generator=g) - 0.5) * 0.4)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            elif type(m).__name__ == "LayerScale" and isinstance(getattr(m, "gamma", None), torch.Tensor):
                m.gamma.copy_(torch.rand(m.gamma.shape, generator=g) * 0.45 + 0.05)
    return model


def resolve_dotted(value: Any) -> Any:
    """'timm.layers.SwiGLUPacked' -> the class (only names under timm. or torch.)."""
    if isinstance(value, str) and re.fullmatch(r"(timm|torch)(\.[A-Za-z_]\w*)+", value):
        module, _, attr = value.rpartition(".")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ExportError(f"--timm-kwargs: cannot import {value}: {e}") from e
    return value


def _versions() -> dict[str, str | None]:
    """Versions of what built and traced the model (timm: null when it was never imported)."""
    import torchvision

    timm = sys.modules.get("timm")
    return {"torch": torch.__version__, "torchvision": torchvision.__version__, "timm": getattr(timm, "__version__", None)}


# --- builders: each returns (module, defaults) --------------------------------------------------


def build_resnet50_trunk(weights: str | None, seed: int | None) -> tuple[nn.Module, dict, nn.Module]:
    import torchvision

    if seed is not None:
        torch.manual_seed(seed)
    model = torchvision.models.resnet50(weights=None)
    if weights:
        load_strict(model, weights)
    else:
        randomize_(model, seed)
    names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    trunk = nn.Sequential(*[getattr(model, n) for n in names])
    defaults = {"size": 224, "mean": IMAGENET[0], "std": IMAGENET[1], "name": "resnet50_trunk"}
    return trunk, defaults, model


def build_torchvision_vit(name: str, weights: str | None, seed: int | None, size: int | None) -> tuple[nn.Module, dict, nn.Module]:
    import torchvision

    if seed is not None:
        torch.manual_seed(seed)
    kwargs = {"image_size": size} if size else {}
    model = torchvision.models.get_model(name, weights=None, **kwargs)
    if weights:
        load_strict(model, weights)
    else:
        randomize_(model, seed)
    heads = {f"heads.{k}": v for k, v in model.heads.state_dict().items()}
    model.heads = nn.Identity()
    defaults = {"size": model.image_size, "mean": IMAGENET[0], "std": IMAGENET[1], "name": name, "_extra_state": heads}
    return model, defaults, model


class TokenPool(nn.Module):
    """(N, T, D) tokens from a timm model's forward_features -> (N, D) or (N, 2D).

    cls: the class token; mean: the mean of the patch tokens (prefix tokens, i.e. the class
    token and any register tokens, left out); cls+mean (alias virchow): both, concatenated,
    as the Virchow / Virchow2 model cards build their tile embedding."""

    def __init__(self, model: nn.Module, how: str, num_prefix_tokens: int):
        super().__init__()
        self.model = model
        self.how = "cls+mean" if how == "virchow" else how
        self.num_prefix_tokens = num_prefix_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.model.forward_features(x)
        cls = tokens[:, 0]
        patches = tokens[:, self.num_prefix_tokens :].mean(dim=1)
        if self.how == "cls":
            return cls
        if self.how == "mean":
            return patches
        return torch.cat([cls, patches], dim=-1)


def build_timm(
    name: str, weights: str | None, seed: int | None, kwargs: dict, pool_tokens: str | None
) -> tuple[nn.Module, dict, nn.Module]:
    import timm

    kwargs = {k: resolve_dotted(v) for k, v in kwargs.items()}
    kwargs.setdefault("num_classes", 0)
    if seed is not None:
        torch.manual_seed(seed)
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except Exception as e:  # noqa: BLE001 - unknown name, bad kwarg: say which
        raise ExportError(f"timm.create_model({name!r}, pretrained=False, **{kwargs}) failed: {e}") from e
    if weights:
        load_strict(model, weights)
    else:
        randomize_(model, seed)
    cfg = timm.data.resolve_model_data_config(model)
    size = cfg["input_size"][-1]
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if isinstance(img_size, (tuple, list)) and len(img_size) == 2 and img_size[0] == img_size[1]:
        size = int(img_size[0])  # the img_size it was built for (timm's data config ignores it)
    defaults = {"size": size, "mean": tuple(cfg["mean"]), "std": tuple(cfg["std"]), "name": name}
    module = model
    if pool_tokens:
        if not hasattr(model, "forward_features"):
            raise ExportError(f"--pool-tokens: {name} has no forward_features")
        module = TokenPool(model, pool_tokens, int(getattr(model, "num_prefix_tokens", 1)))
    return module, defaults, model


def build_from_python(spec: str, weights: str | None, seed: int | None) -> tuple[nn.Module, dict, nn.Module]:
    """SPEC is MODULE:FUNCTION or path/to/file.py:FUNCTION."""
    target, sep, func_name = spec.rpartition(":")
    if not sep or not target or not func_name:
        raise ExportError(f"--module-from {spec!r}: expected MODULE:FUNCTION or FILE.py:FUNCTION")
    if target.endswith(".py") or os.sep in target:
        path = Path(target)
        if not path.is_file():
            raise ExportError(f"--module-from: no such file {path}")
        sys.path.insert(0, str(path.resolve().parent))
        mod_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise ExportError(f"--module-from {spec!r}: {func_name} is not a function of {target}")
    if seed is not None:
        torch.manual_seed(seed)
    result = fn(weights=weights, seed=seed)
    defaults: dict = {}
    if isinstance(result, tuple):
        result, defaults = result
    if not isinstance(result, nn.Module):
        raise ExportError(f"--module-from {spec!r}: {func_name} returned {type(result).__name__}, not an nn.Module")
    defaults = dict(defaults)
    defaults.setdefault("name", func_name)
    return result, defaults, result


# --- trace, verify, save ------------------------------------------------------------------------


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (b the reference)."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(torch.finfo(torch.float32).tiny))


def output_kind(shape: Sequence[int]) -> tuple[str, int]:
    if len(shape) == 2:
        return "embedding", int(shape[1])
    if len(shape) == 4:
        return "feature_map", int(shape[1])
    hint = " (tokens? a timm model can pool them with --pool-tokens)" if len(shape) == 3 else ""
    raise ExportError(f"model output has shape {tuple(shape)}: tilefeat needs (N,D) or (N,C,H,W){hint}")


def trace_module(module: nn.Module, size: int, trace_batch: int = 2) -> torch.jit.ScriptModule:
    module = module.eval().float().cpu()
    for p in module.parameters():
        p.requires_grad_(False)
    example = torch.randn(trace_batch, 3, size, size, generator=torch.Generator().manual_seed(1234))
    with torch.no_grad(), warnings.catch_warnings():
        # Shape-dependent Python branches (timm's dynamic_img_size, asserts on the input size)
        # are fixed at S x S by tracing: harmless, as tilefeat always feeds S x S. A batch size
        # baked into the graph is not harmless, and the verification below catches it.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        try:
            return torch.jit.trace(module, example, check_trace=False)
        except Exception as e:  # noqa: BLE001
            raise ExportError(f"torch.jit.trace failed on a (N,3,{size},{size}) float32 batch: {e}") from e


def verify(saved: Path, module: nn.Module, size: int, batch: int = 3) -> tuple[tuple[int, ...], float]:
    """Reload the saved TorchScript and compare it with the eager module on a random batch of a
    batch size other than the traced one. Returns (output shape, max relative difference)."""
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(5678))
    reloaded = torch.jit.load(str(saved), map_location="cpu").eval()
    with torch.no_grad():
        eager = module(x)
        traced = reloaded(x)
    if not isinstance(eager, torch.Tensor) or not isinstance(traced, torch.Tensor):
        raise ExportError(f"the model returns {type(eager).__name__}, not one tensor")
    if eager.shape != traced.shape:
        raise ExportError(
            f"the traced module's output shape {tuple(traced.shape)} differs from eager {tuple(eager.shape)} "
            f"for a batch of {batch}: something in forward() depends on the traced batch size"
        )
    if not torch.isfinite(eager).all():
        raise ExportError("the eager model's output holds NaN or Inf on a random batch")
    if eager.abs().max() == 0:
        raise ExportError("the eager model's output is all zeros on a random batch")
    if eager.shape[0] != batch:
        raise ExportError(f"output shape {tuple(eager.shape)}: the first dimension is not the batch ({batch})")
    return tuple(eager.shape), max_rel_diff(traced, eager)


def sidecar_path(output: str | Path) -> Path:
    return Path(output).with_suffix(".json")


def export_module(
    module: nn.Module,
    output: str | Path,
    *,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    name: str,
    source: str,
    weights: str | Path | None = None,
    notes: str = "",
    tolerance: float = TOLERANCE,
    random_init: int | None = None,
) -> dict:
    """Trace `module` on (N,3,size,size) float32 CPU input, save it to `output` (.pt) and the
    sidecar beside it (.json), after checking the reloaded file against eager. Returns the
    sidecar. Raises ExportError (and leaves no file behind) when the check fails.
    `random_init` is the seed of a random initialisation: tilefeat's provenance then says the
    features are not trained ones."""
    output = Path(output)
    if output.suffix != ".pt":
        raise ExportError(f"--output {output}: must end in .pt (the sidecar is FILE.json beside FILE.pt)")
    if len(mean) != 3 or len(std) != 3:
        raise ExportError("mean and std need three values each (R, G, B)")
    output.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval().float().cpu()
    traced = trace_module(module, size)
    fd, tmp = tempfile.mkstemp(prefix=f".{output.stem}.", suffix=".pt.tmp", dir=output.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        traced.save(str(tmp))
        shape, diff = verify(tmp, module, size)
        kind, dim = output_kind(shape)
        if not diff <= tolerance:
            raise ExportError(
                f"the reloaded TorchScript differs from the eager model: max relative difference "
                f"{diff:.3e} > {tolerance:.0e} (data-dependent control flow in forward()? use a "
                "wrapper without it, or torch.jit.script)"
            )
        sidecar = {
            "tilefeat_encoder": SIDECAR_VERSION,
            "name": name,
            "source": source,
            "size": int(size),
            "mean": [float(v) for v in mean],
            "std": [float(v) for v in std],
            "output": kind,
            "output_dim": dim,
            "weights_sha256": sha256_file(weights) if weights else None,
            "random_init": random_init,
            "exported_with": _versions(),
            "notes": notes,
        }
        side = sidecar_path(output)
        side_tmp = side.with_name(f".{side.name}.tmp")
        side_tmp.write_text(json.dumps(sidecar, indent=2) + "\n")
        os.replace(tmp, output)
        os.replace(side_tmp, side)
    except BaseException:
        tmp.unlink(missing_ok=True)
        sidecar_path(output).with_name(f".{sidecar_path(output).name}.tmp").unlink(missing_ok=True)
        raise
    print(
        f"wrote {output} ({kind}, output {list(shape[1:])} per tile at {size}x{size}; "
        f"traced vs eager max relative difference {diff:.1e}) and {sidecar_path(output)}",
        file=sys.stderr,
    )
    return sidecar


# --- command line -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="export_encoder.py",
        description="Export an image encoder to TorchScript (+ FILE.json sidecar) for "
        "`tilefeat extract --model FILE.pt`.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", nargs="?", metavar="MODEL",
                   help=f"{RESNET50_TRUNK}, a torchvision ViT ({', '.join(TORCHVISION_VITS)}), or timm:NAME")
    p.add_argument("--module-from", metavar="SPEC",
                   help="MODULE:FUNCTION or FILE.py:FUNCTION building the nn.Module (instead of MODEL)")
    w = p.add_mutually_exclusive_group()
    w.add_argument("--weights", metavar="FILE", help="local state dict (.pth/.pt/.bin/.safetensors), strict load")
    w.add_argument("--random-init", metavar="SEED", type=int, help="seeded random init (NOT trained features)")
    p.add_argument("--output", "-o", metavar="FILE.pt", required=True,
                   help="TorchScript file to write; the sidecar FILE.json goes beside it")
    p.add_argument("--size", type=int, metavar="S", help="input size S (tiles are resized to S x S) [default: the model's]")
    p.add_argument("--normalize", choices=sorted(NORMALIZE), help="mean/std preset (tutorial: 0.5; imagenet)")
    p.add_argument("--mean", metavar="R,G,B", help="per-channel mean of x/255 (RGB) [default: the model's]")
    p.add_argument("--std", metavar="R,G,B", help="per-channel std of x/255 (RGB) [default: the model's]")
    p.add_argument("--name", help="name recorded in the sidecar [default: the model name]")
    p.add_argument("--notes", default="", help="free text recorded in the sidecar")
    p.add_argument("--timm-kwargs", metavar="JSON", default="{}", help="extra timm.create_model keyword arguments")
    p.add_argument("--pool-tokens", choices=TOKEN_POOLS,
                   help="timm only: pool forward_features tokens (N,T,D) in the module: cls, mean (patch "
                        "tokens), cls+mean (= virchow: concatenation, 2D)")
    p.add_argument("--save-state-dict", metavar="FILE",
                   help="also save the source model's state dict (e.g. a random init, for tilefeat --weights)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if bool(args.model) == bool(args.module_from):
        parser.error("give either MODEL or --module-from")
    if not args.module_from and args.weights is None and args.random_init is None:
        parser.error("give --weights FILE or --random-init SEED")
    if args.normalize and (args.mean or args.std):
        parser.error("--normalize and --mean/--std exclude each other")
    if args.size is not None and args.size < 1:
        parser.error("--size must be positive")
    try:
        timm_kwargs = json.loads(args.timm_kwargs)
    except json.JSONDecodeError as e:
        parser.error(f"--timm-kwargs is not JSON: {e}")
    if not isinstance(timm_kwargs, dict):
        parser.error("--timm-kwargs must be a JSON object")
    model_name = args.model or ""
    if timm_kwargs and not model_name.startswith("timm:"):
        parser.error("--timm-kwargs only applies to timm:NAME")
    if args.pool_tokens and not model_name.startswith("timm:"):
        parser.error("--pool-tokens only applies to timm:NAME")

    try:
        torch.set_grad_enabled(False)
        seed = args.random_init
        used_timm = False
        if args.module_from:
            module, defaults, source_model = build_from_python(args.module_from, args.weights, seed)
            source = "python"
        elif model_name == RESNET50_TRUNK:
            module, defaults, source_model = build_resnet50_trunk(args.weights, seed)
            source = "torchvision"
        elif model_name in TORCHVISION_VITS:
            module, defaults, source_model = build_torchvision_vit(model_name, args.weights, seed, args.size)
            source = "torchvision"
        elif model_name.startswith("timm:") and len(model_name) > 5:
            module, defaults, source_model = build_timm(model_name[5:], args.weights, seed, timm_kwargs, args.pool_tokens)
            source, used_timm = "timm", True
        else:
            parser.error(f"unknown MODEL {model_name!r}: {RESNET50_TRUNK}, {', '.join(TORCHVISION_VITS)} or timm:NAME")

        size = args.size or defaults.get("size")
        if not size:
            raise ExportError("no input size known for this model: give --size")
        if args.normalize:
            mean, std = NORMALIZE[args.normalize]
        else:
            mean = parse_triplet(args.mean, "mean") if args.mean else defaults.get("mean")
            std = parse_triplet(args.std, "std") if args.std else defaults.get("std")
        if mean is None or std is None:
            raise ExportError("no mean/std known for this model: give --mean and --std (or --normalize)")
        img_size = getattr(getattr(source_model, "patch_embed", None), "img_size", None)
        dynamic = getattr(source_model, "dynamic_img_size", False)
        if used_timm and isinstance(img_size, (tuple, list)) and tuple(img_size) != (size, size) and not dynamic:
            raise ExportError(
                f"--size {size}: {model_name} was built for {tuple(img_size)} inputs; add "
                f'"img_size": {size} to --timm-kwargs (or "dynamic_img_size": true)'
            )
        notes = args.notes
        if seed is not None:
            extra = f"random init (seed {seed}): NOT trained features"
            notes = f"{extra}; {notes}" if notes else extra
        elif defaults.get("notes"):
            notes = f"{defaults['notes']}; {notes}" if notes else defaults["notes"]
        if args.pool_tokens:
            extra = f"token pooling: {'cls+mean' if args.pool_tokens == 'virchow' else args.pool_tokens}"
            notes = f"{notes}; {extra}" if notes else extra
        if used_timm and timm_kwargs:
            extra = f"timm kwargs: {json.dumps(timm_kwargs, sort_keys=True)}"
            notes = f"{notes}; {extra}" if notes else extra
        export_module(
            module, args.output, size=int(size), mean=mean, std=std,
            name=args.name or defaults.get("name") or model_name, source=defaults.get("source", source),
            weights=args.weights, notes=notes, random_init=seed,
        )  # fmt: skip
        if args.save_state_dict:
            save_state_dict(source_model, args.save_state_dict, defaults.get("_extra_state"))
            print(f"wrote {args.save_state_dict}", file=sys.stderr)
    except ExportError as e:
        print(f"export_encoder.py: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
