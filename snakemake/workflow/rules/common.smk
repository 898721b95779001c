import csv
import os
import shlex
from pathlib import Path

import yaml

from snakemake import __version__ as SNAKEMAKE_VERSION
from snakemake.utils import validate


def coerce_cli_strings(values, schema):
    """`--config 'extract={"gpus": 0}'` gives nested values as strings: type them per schema."""
    for key, sub in schema.get("properties", {}).items():
        value = values.get(key) if isinstance(values, dict) else None
        types = sub.get("type", [])
        types = [types] if isinstance(types, str) else types
        if isinstance(value, dict):
            coerce_cli_strings(value, sub)
        elif isinstance(value, str):
            if "integer" in types and value.strip().isdigit():
                values[key] = int(value)
            elif "boolean" in types and value.lower() in ("true", "false"):
                values[key] = value.lower() == "true"
            elif value in ("null", "~") and (
                "null" in types or None in sub.get("enum", [])
            ):
                values[key] = None


with open(workflow.source_path("../schemas/config.schema.yaml")) as fh:
    coerce_cli_strings(config, yaml.safe_load(fh))
validate(config, "../schemas/config.schema.yaml", set_default=True)

OUTDIR = os.path.normpath(config["outdir"])
TILEFEAT = config["tilefeat"]
EXTRACT = config["extract"]
JOIN = config["join"]
# Per-sample feature files: features/{sample}.<FORMAT> (csv, h5 or parquet).
FORMAT = EXTRACT["format"]


def cohort_file():
    """The cohort file in outdir: join.output, else cohort.<join.format>; tilefeat join takes
    the format from the extension, so join.output must have join.format's."""
    name = JOIN["output"] or f"cohort.{JOIN['format']}"
    if not name.endswith(f".{JOIN['format']}"):
        raise ValueError(
            f"config: join.output {name!r} does not end in .{JOIN['format']} (join.format is "
            f"{JOIN['format']!r}; `tilefeat join` writes the format its output's extension "
            "names): set both to the same format, or leave join.output empty"
        )
    return f"{OUTDIR}/{name}"


COHORT = cohort_file()


# Archives `tilefeat extract` reads in place instead of a tile folder (suffix in any case).
TILE_ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")


def check_tiles(where, sample, tiles):
    """A sample's tiles: a folder, or an archive file. A plain file that is no archive is
    refused here; a path that is not there yet is left to Snakemake (missing input, or made
    by a rule of a host workflow)."""
    if os.path.isfile(tiles) and not tiles.lower().endswith(TILE_ARCHIVE_SUFFIXES):
        raise ValueError(
            f"{where}: sample {sample!r}: tiles {tiles!r} is a file but not a .zip, .tar, "
            ".tar.gz or .tgz archive; give the sample's tile folder or an archive of its tiles"
        )


def read_samples():
    """Sample ID -> tile folder or archive, from the samplesheet or the sub-folders of
    tiles_root."""
    sheet, root = config["samples"] or "", config["tiles_root"] or ""
    if bool(sheet) == bool(root):
        raise ValueError(
            "config: set exactly one of `samples` (a sample,tiles samplesheet) and "
            f"`tiles_root` (a folder of per-sample tile folders); got samples={sheet!r}, "
            f"tiles_root={root!r}"
        )
    if sheet:
        delimiter = "\t" if sheet.endswith(".tsv") else ","
        with open(sheet, newline="") as fh:
            rows = [
                {k.strip(): (v or "").strip() for k, v in row.items() if k}
                for row in csv.DictReader(fh, delimiter=delimiter)
                if any((v or "").strip() for v in row.values())
            ]
        for row in rows:
            validate(row, "../schemas/samples.schema.yaml")
        where = sheet
    else:
        if not os.path.isdir(root):
            raise ValueError(f"config: tiles_root {root!r} is not a folder")
        rows = [
            {"sample": entry.name, "tiles": os.path.join(root, entry.name)}
            for entry in sorted(os.scandir(root), key=lambda e: e.name)
            if entry.is_dir() and not entry.name.startswith(".")
        ]
        for row in rows:
            validate(row, "../schemas/samples.schema.yaml")
        where = root
    samples = {}
    for row in rows:
        if row["sample"] in samples:
            raise ValueError(f"{where}: sample {row['sample']!r} appears twice")
        check_tiles(where, row["sample"], row["tiles"])
        samples[row["sample"]] = row["tiles"]
    if not samples:
        raise ValueError(f"{where}: no samples")
    return samples


SAMPLES = read_samples()

# config key of `extract` -> `tilefeat extract` flag taking a value. Keys left out or null
# are not passed (tilefeat's default applies). tests/python/test_snakemake.py checks that
# every flag here exists in src/cli.rs.
EXTRACT_VALUE_FLAGS = {
    "weights": "--weights",
    "model": "--model",
    "device": "--device",
    "batch_size": "--batch-size",
    "decode_threads": "--decode-threads",
    "precision": "--precision",
    "layer": "--layer",
    "pool": "--pool",
    "normalize": "--normalize",
    "size": "--size",
    "on_error": "--on-error",
    "cache_dir": "--cache-dir",
}
EXTRACT_SWITCH_FLAGS = {
    "no_cache": "--no-cache",
    "quiet": "--quiet",
    "profile": "--profile",
}

if EXTRACT.get("cache_dir") and EXTRACT.get("no_cache"):
    raise ValueError(
        "config: extract.cache_dir and extract.no_cache exclude each other"
    )

# extract.model: a TorchScript encoder run instead of the ResNet50 (`--model FILE.pt`), whose
# sidecar FILE.json (beside it, same stem) sets the tile size and the normalization. The
# ResNet50's weights and layer do not apply to it (tilefeat refuses them, exit 2), and the
# ResNet50's settings at these defaults are not passed with it, so that the sidecar's apply;
# a normalize or size other than these is passed (and overrides the sidecar's).
RESNET50_DEFAULTS = {"layer": "layer4", "normalize": "tutorial", "size": 224}
MODEL = EXTRACT.get("model") or ""

if MODEL and EXTRACT.get("weights"):
    raise ValueError(
        f"config: extract.model ({MODEL!r}) and extract.weights "
        f"({EXTRACT['weights']!r}) exclude each other: the model replaces the ResNet50, "
        'whose weights do not apply to it; set weights to ""'
    )
if MODEL and EXTRACT.get("layer") not in (None, "", RESNET50_DEFAULTS["layer"]):
    raise ValueError(
        f"config: extract.layer {EXTRACT['layer']!r} picks a ResNet50 stage: it does not "
        f"apply to extract.model ({MODEL!r}); set layer to layer4 or null"
    )


def extract_options():
    """The configured `tilefeat extract` flags as one shell-quoted string."""
    args = []
    for key, flag in EXTRACT_VALUE_FLAGS.items():
        value = EXTRACT.get(key)
        if MODEL and key in RESNET50_DEFAULTS and value == RESNET50_DEFAULTS[key]:
            continue  # the ResNet50's default: the model's sidecar sets its own
        if value is not None and value != "":
            args += [flag, str(value)]
    for key, flag in EXTRACT_SWITCH_FLAGS.items():
        if EXTRACT.get(key):
            args.append(flag)
    options = shlex.join(args)
    if EXTRACT.get("extra"):
        options = f"{options} {EXTRACT['extra']}"
    return options


def weights_input(wildcards):
    """A weights file is an input (tracked, checked before the job); `random:N` is not."""
    weights = EXTRACT.get("weights")
    if weights and not weights.startswith("random:"):
        return weights
    return []


def model_sidecar_path(model):
    """Where tilefeat looks for a model's sidecar: FILE.pt -> FILE.json (the last extension
    replaced, as Rust's Path::with_extension does)."""
    return os.path.splitext(model)[0] + ".json"


def model_input(wildcards):
    """extract.model is an input (tracked: changing it reruns the extraction)."""
    return MODEL or []


def model_sidecar_input(wildcards):
    """So is its sidecar, when it has one (tilefeat reads it from beside the model)."""
    if MODEL and os.path.isfile(model_sidecar_path(MODEL)):
        return model_sidecar_path(MODEL)
    return []


def extract_resources(samples=1):
    """Slurm resources of an extract job running `samples` samples one after the other."""
    resources = {"mem_mb": EXTRACT["mem_mb"], "runtime": EXTRACT["runtime"] * samples}
    if EXTRACT["gres"]:
        resources["gres"] = EXTRACT["gres"]
    elif EXTRACT["gpus"] > 0:
        resources["gpu"] = EXTRACT["gpus"]
    return resources


def extract_batches():
    """Sample IDs in groups of extract.samples_per_job, in sample order (one job each)."""
    names = sorted(SAMPLES)
    size = EXTRACT["samples_per_job"]
    return [names[i : i + size] for i in range(0, len(names), size)]


def format_flag():
    """` --format FORMAT` for `tilefeat extract --outdir`; nothing for csv, its default (so
    that a csv run's command stays as it was). With --output, the extension says it."""
    return "" if FORMAT == "csv" else f" --format {FORMAT}"


def sample_features(wildcards=None):
    return expand(f"{OUTDIR}/features/{{sample}}.{FORMAT}", sample=SAMPLES)


def sample_provenances(wildcards=None):
    return expand(f"{OUTDIR}/features/{{sample}}.provenance.yaml", sample=SAMPLES)


def write_join_list(features, listing, log):
    """`tilefeat join --from-list` input: absolute paths, one a line."""
    Path(listing).write_text("".join(f"{os.path.abspath(p)}\n" for p in features))
    Path(log).write_text(
        f"{len(features)} per-sample feature files listed in {listing}\n"
    )


def tilefeat_targets():
    """Everything the workflow makes: for `rule all`, or a host workflow's target rule."""
    return [COHORT, f"{OUTDIR}/versions.yaml"]
