import csv
import os
import re
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
            elif "number" in types and re.fullmatch(
                r"\s*([0-9]+\.?[0-9]*|\.[0-9]+)\s*", value
            ):
                values[key] = float(value)
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
# Per-sample feature files (FEATURE_FILES below): features/{sample}.<FORMAT> for csv, h5,
# parquet and pt, features/{sample}.h5 for stamp, features/h5_files/ + pt_files/ for clam.
FORMAT = EXTRACT["format"]
# The formats `tilefeat join` reads (clam: its h5_files/*.h5): a cohort file is made only for
# these. A .pt bag holds no tile names and join refuses STAMP's micrometre files (exit 3).
JOINABLE_FORMATS = ("csv", "h5", "parquet", "clam")
JOINABLE = FORMAT in JOINABLE_FORMATS


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
# Whole-slide images `tilefeat extract` opens through OpenSlide (OpenSlide 4's formats; suffix
# in any case; .ome.tif/.ome.tiff are .tif/.tiff). nextflow/main.nf has the same lists
# (tests/python/test_snakemake.py checks it).
SLIDE_SUFFIXES = (
    ".svs",
    ".tif",
    ".tiff",
    ".ndpi",
    ".vms",
    ".vmu",
    ".scn",
    ".mrxs",
    ".svslide",
    ".bif",
    ".dcm",
)


def is_slide(tiles):
    """A sample path naming a slide file (by its suffix; a folder so named is a tile folder):
    tilefeat tiles it itself."""
    return tiles.lower().endswith(SLIDE_SUFFIXES) and not os.path.isdir(tiles)


def check_tiles(where, sample, tiles):
    """A sample's path: a tile folder, a tile archive or a slide file. A plain file that is
    neither an archive nor a slide (by suffix) is refused here, and so is a path that is not
    there, before any job runs (Snakemake would run what it can and keep earlier outputs),
    unless `tiles_from_rules` says rules of a host workflow make them."""
    if not os.path.exists(tiles) and not config["tiles_from_rules"]:
        raise ValueError(
            f"{where}: sample {sample!r}: tiles {tiles!r} does not exist (relative paths are "
            f"relative to the working directory, {os.getcwd()}); fix the path or drop the "
            "sample (or set tiles_from_rules to true when your workflow makes it)"
        )
    if (
        os.path.isfile(tiles)
        and not tiles.lower().endswith(TILE_ARCHIVE_SUFFIXES)
        and not is_slide(tiles)
    ):
        raise ValueError(
            f"{where}: sample {sample!r}: tiles {tiles!r} is a file but neither a tile "
            f"archive ({', '.join(TILE_ARCHIVE_SUFFIXES)}) nor a slide "
            f"({', '.join(SLIDE_SUFFIXES)}); give the sample's tile folder, an archive of "
            "its tiles or its slide file (suffixes in any case)"
        )


def read_samples():
    """Sample ID -> tile folder, tile archive or slide file, from the samplesheet or the
    sub-folders of tiles_root."""
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
    samples, slide_mpps = {}, {}
    for row in rows:
        if row["sample"] in samples:
            raise ValueError(f"{where}: sample {row['sample']!r} appears twice")
        check_tiles(where, row["sample"], row["tiles"])
        samples[row["sample"]] = row["tiles"]
        slide_mpps[row["sample"]] = read_slide_mpp(where, row)
    if not samples:
        raise ValueError(f"{where}: no samples")
    return samples, slide_mpps


# `tilefeat extract --slide-mpp` takes 0.01 to 100 (exit 2 otherwise): checked at start-up.
SLIDE_MPP_RANGE = (0.01, 100.0)


def read_slide_mpp(where, row):
    """A sample's slide micrometres per pixel at level 0: the samplesheet's `slide_mpp`
    column when it has a value, else extract.slide_mpp, else None (not passed)."""
    text = (row.get("slide_mpp") or "").strip()
    if not text:
        return EXTRACT.get("slide_mpp")
    value = float(text)  # the samplesheet schema's pattern allows only decimal numbers
    low, high = SLIDE_MPP_RANGE
    if not low <= value <= high:
        raise ValueError(
            f"{where}: sample {row['sample']!r}: slide_mpp {text} is not a slide's micrometres "
            f"per pixel at level 0 ({low:g} to {high:g}, e.g. 0.25 for a 40x scan)"
        )
    return value


SAMPLES, SLIDE_MPP = read_samples()

if FORMAT == "stamp":
    # STAMP's layout holds micrometre coordinates: pixel tile names need the slide's mpp,
    # and tilefeat would refuse each sample without it (exit 3) deep in its job.
    missing = sorted(s for s, mpp in SLIDE_MPP.items() if mpp is None)
    if missing:
        raise ValueError(
            "config: extract.format stamp writes STAMP's coordinates in micrometres, which "
            "needs each slide's micrometres per pixel at level 0: set extract.slide_mpp, or a "
            f"slide_mpp column in the samplesheet; none for {', '.join(missing)}"
        )

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
    "preset": "--preset",
    "layer": "--layer",
    "pool": "--pool",
    "normalize": "--normalize",
    "size": "--size",
    "on_error": "--on-error",
    "cache_dir": "--cache-dir",
    "patch_size_level0": "--patch-size-level0",
}
# config key of `extract` -> `tilefeat extract` flag for slides only: passed to slide samples
# (SLIDE_SUFFIXES) and never to tile folders or archives (tilefeat refuses them there, exit 2).
EXTRACT_SLIDE_FLAGS = {
    "magnification": "--magnification",
    "mpp": "--mpp",
    "patch_size": "--patch-size",
    "stride": "--stride",
    "tissue": "--tissue",
}
EXTRACT_SWITCH_FLAGS = {
    "no_cache": "--no-cache",
    "quiet": "--quiet",
    "profile": "--profile",
}

if EXTRACT.get("magnification") is not None and EXTRACT.get("mpp") is not None:
    raise ValueError(
        "config: extract.magnification and extract.mpp exclude each other (both set the "
        "resolution slides are tiled at): set one of them to null"
    )

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

# extract.preset (`--preset`): a published recipe's ResNet50 settings at once. tilefeat refuses
# a flag that disagrees with the preset (exit 2), so these settings are not passed with one
# when they are at the tutorial's defaults (the config's own), and any other value must be
# the preset's.
PRESETS = {
    "tutorial": {
        "layer": "layer4",
        "pool": "max",
        "normalize": "tutorial",
        "size": 224,
    },
    "resnet50-trunc": {
        "layer": "layer3",
        "pool": "avg",
        "normalize": "imagenet",
        "size": 224,
    },
}
PRESETS["resnet50_trunc"] = PRESETS["resnet50-trunc"]
PRESET = EXTRACT.get("preset") or ""
if PRESET and MODEL:
    raise ValueError(
        f"config: extract.preset ({PRESET!r}) sets the ResNet50's settings: it does not apply "
        f"to extract.model ({MODEL!r}); set preset to null"
    )
for key, value in (PRESETS.get(PRESET) or {}).items():
    given = EXTRACT.get(key)
    if given not in (None, "", PRESETS["tutorial"][key], value):
        raise ValueError(
            f"config: extract.{key} {given!r} disagrees with extract.preset {PRESET!r} "
            f"({key} {value!r}): set {key} to null (or to {value!r})"
        )

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
        if PRESET and key in PRESETS[PRESET]:
            continue  # the preset sets it (a disagreeing value was refused above)
        if value is not None and value != "":
            args += [flag, str(value)]
    for key, flag in EXTRACT_SWITCH_FLAGS.items():
        if EXTRACT.get(key):
            args.append(flag)
    options = shlex.join(args)
    if EXTRACT.get("extra"):
        options = f"{options} {EXTRACT['extra']}"
    return options


def slide_options():
    """The configured slide flags (EXTRACT_SLIDE_FLAGS) as a list of arguments."""
    args = []
    for key, flag in EXTRACT_SLIDE_FLAGS.items():
        value = EXTRACT.get(key)
        if value is not None and value != "":
            args += [flag, str(value)]
    return args


def slide_flags(names):
    """` --magnification M ...` for a job's samples when they are slides (extract_batches keeps
    slides and tile folders apart when slide flags are set); nothing for tile folders and
    archives, nor when no slide flag is set."""
    args = slide_options()
    if not args:
        return ""  # the jobs may then mix slides and tile folders: nothing to pass
    (slide,) = {is_slide(SAMPLES[name]) for name in names}
    return f" {shlex.join(args)}" if slide else ""


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
    """Sample IDs in groups of extract.samples_per_job, in sample order (one job each). One
    `tilefeat extract` process takes one --slide-mpp: samples with different slide mpps go
    to different jobs (in sample order within each mpp; the same groups as before when
    every sample has the same mpp, or none)."""
    size = EXTRACT["samples_per_job"]
    # With slide flags set, slides and tile folders go to different jobs too (the flags are
    # passed to slides only); without, the groups of before.
    split_slides = bool(slide_options())
    by_mpp = {}
    for name in sorted(SAMPLES):
        key = (SLIDE_MPP[name], split_slides and is_slide(SAMPLES[name]))
        by_mpp.setdefault(key, []).append(name)
    return [
        names[i : i + size]
        for names in by_mpp.values()
        for i in range(0, len(names), size)
    ]


def slide_mpp_flag(names):
    """` --slide-mpp F` for samples sharing one slide mpp (extract_batches groups them so);
    nothing without one."""
    (mpp,) = {SLIDE_MPP[name] for name in names}
    return "" if mpp is None else f" --slide-mpp {mpp}"


def format_flag():
    """` --format FORMAT` for `tilefeat extract --outdir`; nothing for csv, its default (so
    that a csv run's command stays as it was). With --output, the extension says it."""
    return "" if FORMAT == "csv" else f" --format {FORMAT}"


def output_flags(wildcards, output):
    """How the one-sample extract job names its output: `--output features/{sample}.<ext>`
    (the extension sets the format; STAMP's is an .h5, so `--format stamp` says it), or for
    clam, whose layout is two folders, `--outdir features --format clam`."""
    if FORMAT == "clam":  # features/h5_files/{sample}.h5 -> features
        outdir = os.path.dirname(os.path.dirname(output.features))
        return f"--outdir {shlex.quote(outdir)} --format clam"
    flags = f"--output {shlex.quote(output.features)}"
    return f"{flags} --format stamp" if FORMAT == "stamp" else flags


# Each sample's files under features/, as {sample} patterns: (features, provenance,
# rejected, bag). `features` is the file `tilefeat join` reads (clam: its .h5); `bag` is
# CLAM's pt_files/{sample}.pt (None for the other formats). `.pt` bags get {sample}.index.npz
# beside them only when the tiles have coordinates (tilefeat decides, and says so in the
# log): it is not a declared output (Snakemake has no optional outputs), and tilefeat
# replaces or removes a stale one itself. Likewise a slide's {sample}.tissue.png (the tissue
# tilefeat found, beside the feature file; none with extract.tissue none) is not declared.
if FORMAT == "clam":
    FEATURE_FILES = (
        "h5_files/{sample}.h5",
        "h5_files/{sample}.provenance.yaml",
        "h5_files/{sample}.rejected.tsv",
        "pt_files/{sample}.pt",
    )
else:
    FEATURE_FILES = (
        "{sample}.h5" if FORMAT == "stamp" else f"{{sample}}.{FORMAT}",
        "{sample}.provenance.yaml",
        "{sample}.rejected.tsv",
        None,
    )


def feature_path(which, sample="{sample}"):
    """outdir/features/<one of FEATURE_FILES> for `sample` (a wildcard pattern by default)."""
    index = ("features", "provenance", "rejected", "bag").index(which)
    return f"{OUTDIR}/features/{FEATURE_FILES[index].replace('{sample}', sample)}"


def extract_outputs(names=None):
    """The extract rule's named outputs: patterns (one sample per job) or, for a batch's
    `names`, lists of paths."""
    whats = ["features", "provenance", "rejected"] + (
        ["bag"] if FEATURE_FILES[3] else []
    )
    if names is None:
        return {what: feature_path(what) for what in whats}
    return {what: [feature_path(what, s) for s in names] for what in whats}


def sample_features(wildcards=None):
    return [feature_path("features", s) for s in SAMPLES]


def sample_provenances(wildcards=None):
    return [feature_path("provenance", s) for s in SAMPLES]


def write_join_list(features, listing, log):
    """`tilefeat join --from-list` input: absolute paths, one a line."""
    Path(listing).write_text("".join(f"{os.path.abspath(p)}\n" for p in features))
    Path(log).write_text(
        f"{len(features)} per-sample feature files listed in {listing}\n"
    )


def tilefeat_targets():
    """Everything the workflow makes: for `rule all`, or a host workflow's target rule. The
    cohort file where `tilefeat join` reads the format (JOINABLE_FORMATS); for pt and stamp,
    each sample's files (the join rules are not defined then)."""
    if JOINABLE:
        return [COHORT, f"{OUTDIR}/versions.yaml"]
    return [*sample_features(), *sample_provenances(), f"{OUTDIR}/versions.yaml"]
