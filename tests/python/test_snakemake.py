"""The Snakemake workflow in snakemake/.

Static checks (lint, snakefmt, dry-run flags against src/cli.rs, use as a module) always
run. With the release binary present, the workflow runs for real on CPU: locally, and on a
single-node Slurm cluster (scripts/slurm/start.sh; started here if it is not up and we are
root, stopped again afterwards), and both results are checked against plain
`tilefeat extract` runs of each sample.

A missing binary or test image, or no Slurm cluster when not root, fails the tests: nothing
that CI must run is skipped (scripts/test.sh fails on any skip not in
tests/python/allowed_skips.txt).

Environment: TILEFEAT_BIN (default target/release/tilefeat); TILEFEAT_TEST_IMAGE (default
../shared/data/ihc.png, else demo/ihc.png); TILEFEAT_TEST_SLURM=0 skips the Slurm test (an
explicit opt-out, reported as "opt-out: TILEFEAT_TEST_SLURM=0").
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_archive

REPO = Path(__file__).resolve().parents[2]
SMK = REPO / "snakemake"
SNAKEFILE = SMK / "workflow" / "Snakefile"
BINARY = Path(os.environ.get("TILEFEAT_BIN", REPO / "target" / "release" / "tilefeat"))
# The shared copy of the IHC image when present, else the repository's copy (conftest.py's
# source_image() looks in the same places).
SHARED_IHC = REPO.parent / "shared" / "data" / "ihc.png"
IHC = Path(
    os.environ.get("TILEFEAT_TEST_IMAGE")
    or (SHARED_IHC if SHARED_IHC.is_file() else REPO / "demo" / "ihc.png")
)
SAMPLES = {"s1": 4, "s2": 3, "s3": 5}  # sample -> number of tiles
THREADS = 1  # per extract job, in the workflow and in the reference runs alike


def require_binary():
    """The binary must be there (CI builds it first): missing, the tests fail, never skip."""
    if not BINARY.is_file():
        pytest.fail(
            f"{BINARY} not built (scripts/setup.sh --no-demo, or set TILEFEAT_BIN)", pytrace=False
        )


@pytest.fixture(scope="session")
def built_binary():
    require_binary()
    return BINARY


needs_binary = pytest.mark.usefixtures("built_binary")


def tool(name: str) -> str:
    """An executable from the Python environment running the tests, else from PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} is not installed (pip install -r requirements-dev.txt)")
    return found


def versions_env() -> dict[str, str]:
    pairs = {}
    for line in (REPO / "versions.env").read_text().splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            key, value = line.split("=", 1)
            pairs[key.strip()] = value.strip()
    return pairs


def run(cmd, *, timeout=300, cwd=None, env=None, check=True) -> subprocess.CompletedProcess:
    """Run with a hard limit: `timeout -k` also ends a Snakemake that ignores SIGTERM."""
    cmd = ["timeout", "-k", "10", str(timeout), *map(str, cmd)]
    proc = subprocess.run(
        cmd, cwd=cwd, env=env, text=True, capture_output=True, timeout=timeout + 30
    )
    if check and proc.returncode != 0:
        pytest.fail(
            f"exit {proc.returncode}: {' '.join(cmd)}\n--- stdout\n{proc.stdout[-6000:]}"
            f"\n--- stderr\n{proc.stderr[-8000:]}"
        )
    return proc


def snakemake(workdir: Path, *args, timeout=300, check=True, env=None):
    return run(
        [tool("snakemake"), "-s", SNAKEFILE, "-d", workdir, *args],
        timeout=timeout,
        check=check,
        env=env,
    )


def write_config(path: Path, root: Path, **overrides) -> Path:
    """A workflow config (YAML is a superset of JSON, so json.dumps does)."""
    import json

    extract = {
        "weights": "random:0",
        "device": "cpu",
        "threads": THREADS,
        "gpus": 0,
        "mem_mb": 1000,
        "runtime": 10,
    }
    extract.update(overrides.pop("extract", {}))
    config = {
        "tiles_root": str(root),
        "tilefeat": str(BINARY),
        "extract": extract,
        **overrides,
    }
    path.write_text(json.dumps(config, indent=1))
    return path


def make_tiles(root: Path) -> Path:
    """Small PNG/JPEG crops of the IHC image: one folder per sample."""
    import cv2

    image = cv2.imread(str(IHC), cv2.IMREAD_COLOR)
    if image is None:  # never random pixels instead: the tests are about real tiles
        pytest.fail(f"cannot read the test image {IHC} (TILEFEAT_TEST_IMAGE)", pytrace=False)
    h, w = image.shape[:2]
    for s, (sample, n) in enumerate(SAMPLES.items()):
        folder = root / sample
        folder.mkdir(parents=True)
        for i in range(n):
            size = 64 + 8 * ((s + i) % 5)
            y, x = (37 * (s * 7 + i)) % (h - size), (53 * (s * 5 + i)) % (w - size)
            crop = image[y : y + size, x : x + size]
            ext = "jpg" if i % 2 else "png"
            assert cv2.imwrite(str(folder / f"tile_{i:02d}_{x}_{y}.{ext}"), crop)
    return root


def read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows, f"{path} is empty"
    return rows[0], rows[1:]


def cli_long_flags(args_struct: str) -> set[str]:
    """Long flags of one clap Args struct in src/cli.rs (field `batch_size` -> --batch-size)."""
    src = (REPO / "src" / "cli.rs").read_text()
    body = re.search(rf"pub struct {args_struct} \{{(.*?)\n\}}", src, re.S)
    assert body, f"struct {args_struct} not found in src/cli.rs"
    fields = re.findall(r"^\s*pub (\w+):", body.group(1), re.M)
    return {"--" + f.replace("_", "-") for f in fields}


def shell_commands(dry_run_stdout: str, program: str) -> list[str]:
    return [
        line
        for line in dry_run_stdout.splitlines()
        if re.search(rf"(^|\s){re.escape(program)}\s", line)
    ]


# --------------------------------------------------------------------------- static checks


@pytest.fixture(scope="module")
def tiles(tmp_path_factory) -> Path:
    return make_tiles(tmp_path_factory.mktemp("tiles"))


def test_snakefmt_clean():
    proc = run([tool("snakefmt"), "--check", "--diff", SMK], check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_lint_clean(tmp_path, tiles):
    config = write_config(tmp_path / "config.yaml", tiles)
    proc = snakemake(tmp_path, "--configfile", config, "--lint", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Congratulations" in out, out


def test_container_matches_versions_env():
    v = versions_env()
    image = f"docker://ghcr.io/tilefeat/tilefeat:{v['TILEFEAT_VERSION']}-cuda{v['CUDA_VERSION']}"
    assert f'container: "{image}"' in (SMK / "config" / "config.yaml").read_text()
    assert (
        f'default: "{image}"' in (SMK / "workflow" / "schemas" / "config.schema.yaml").read_text()
    )


def test_dry_run_passes_every_option(tmp_path, tiles):
    """Every configured option reaches the command line, with a flag that src/cli.rs has."""
    config = write_config(
        tmp_path / "config.yaml",
        tiles,
        outdir="out",
        extract={
            "device": "cuda:1",
            "threads": 3,
            "batch_size": 7,
            "decode_threads": 2,
            "precision": "bf16",
            "layer": "layer3",
            "pool": "avg",
            "normalize": "imagenet",
            "size": 112,
            "on_error": "skip",
            "cache_dir": str(tmp_path / "cache dir"),
            "quiet": True,
            "profile": True,
            "gpus": 2,
        },
        join={"aggregate": "mean", "output": "cohort_mean.csv"},
    )
    proc = snakemake(tmp_path, "--configfile", config, "-n", "-p", "--cores", "8")
    extracts = shell_commands(proc.stdout, str(BINARY))
    extracts = [c for c in extracts if " extract " in c]
    assert len(extracts) == len(SAMPLES), proc.stdout
    for sample in SAMPLES:
        (cmd,) = [c for c in extracts if f"--sample {sample} " in c]
        for flag in [
            f"extract {tiles / sample} --output out/features/{sample}.csv",
            "--threads 3",
            "--weights random:0",
            "--device cuda:1",
            "--batch-size 7",
            "--decode-threads 2",
            "--precision bf16",
            "--layer layer3",
            "--pool avg",
            "--normalize imagenet",
            "--size 112",
            "--on-error skip",
            f"--cache-dir '{tmp_path / 'cache dir'}'",
            "--quiet",
            "--profile",
            f"> logs/extract/{sample}.log",
        ]:
            assert flag in cmd, f"{flag!r} missing from: {cmd}"
    assert "gpu=2" in proc.stdout  # the GPU resource each extract job asks for
    (join,) = [c for c in shell_commands(proc.stdout, str(BINARY)) if " join " in c]
    assert "--aggregate mean" in join and "--output out/cohort_mean.csv" in join, join

    # The flags the workflow uses all exist in the CLI (no drift from src/cli.rs).
    used = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", " ".join(extracts)))
    assert used <= cli_long_flags("ExtractArgs"), used - cli_long_flags("ExtractArgs")
    used = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", join))
    assert used <= cli_long_flags("JoinArgs"), used - cli_long_flags("JoinArgs")


def test_samplesheet_and_config_errors(tmp_path, tiles):
    sheet = tmp_path / "samples.csv"
    sheet.write_text("sample,tiles\n" + "".join(f"{s},{tiles / s}\n" for s in ["s3", "s1"]))
    config = write_config(tmp_path / "config.yaml", tiles, tiles_root=None, samples=str(sheet))
    proc = snakemake(tmp_path, "--configfile", config, "-n")
    assert re.search(r"extract\s+2\b", proc.stdout), proc.stdout

    # both sample sources, a duplicate sample, a bad sample ID, a bad option: refused, each
    # with its own message (not any failure: a crash or a missing tool must not pass)
    bad = [
        ({"samples": str(sheet)}, ["ValueError", "config: set exactly one of `samples`"]),
        ({"tiles_root": None, "samples": str(tmp_path / "dup.csv")},
         ["ValueError", f"{tmp_path / 'dup.csv'}: sample 's1' appears twice"]),
        ({"tiles_root": None, "samples": str(tmp_path / "badid.csv")},
         ["Error validating config file.", "ValidationError: 'bad id' does not match",
          "schema['properties']['sample']"]),
        ({"extract": {"precision": "fp64"}},
         ["Error validating config file.", "ValidationError: 'fp64' is not one of",
          "instance['extract']['precision']"]),
        # a plain file that is no archive, in place of a tile folder or archive
        ({"tiles_root": None, "samples": str(tmp_path / "notes.csv")},
         ["ValueError", f"{tmp_path / 'notes.csv'}: sample 's2': tiles "
          f"'{tmp_path / 'notes.txt'}' is a file but neither a tile archive (.zip, .tar, .tar.gz, "
          ".tgz) nor a slide (.svs, .tif, .tiff, .ndpi"]),
        # a path that is not there: refused before any job runs (issue 28: Snakemake ran the
        # other samples' jobs, exited 0 and kept the old cohort)
        ({"tiles_root": None, "samples": str(tmp_path / "missing.csv")},
         ["ValueError", f"{tmp_path / 'missing.csv'}: sample 's2': tiles '{tiles / 'nope'}' does not exist",
          "tiles_from_rules to true"]),
    ]  # fmt: skip
    (tmp_path / "missing.csv").write_text(f"sample,tiles\ns1,{tiles}/s1\ns2,{tiles}/nope\n")
    (tmp_path / "dup.csv").write_text(f"sample,tiles\ns1,{tiles}/s1\ns1,{tiles}/s2\n")
    (tmp_path / "badid.csv").write_text(f"sample,tiles\nbad id,{tiles}/s1\n")
    (tmp_path / "notes.txt").write_text("not tiles\n")
    (tmp_path / "notes.csv").write_text(
        f"sample,tiles\ns1,{tiles}/s1\ns2,{tmp_path / 'notes.txt'}\n"
    )
    for i, (overrides, messages) in enumerate(bad):
        config = write_config(tmp_path / f"bad{i}.yaml", tiles, **overrides)
        proc = snakemake(tmp_path, "--configfile", config, "-n", check=False)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 1, f"exit {proc.returncode} for {overrides}:\n{out}"
        for message in messages:
            assert message in out, f"{overrides}: {message!r} not in:\n{out}"
    # Made by a host workflow's rule: allowed at start-up, and Snakemake names what no rule makes.
    config = write_config(tmp_path / "upstream.yaml", tiles, tiles_root=None, samples=str(tmp_path / "missing.csv"),
                          tiles_from_rules=True)
    proc = snakemake(tmp_path, "--configfile", config, "-n", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "does not exist" not in out, out
    assert "MissingInputException" in out and str(tiles / "nope") in out, out


def test_samplesheet_archive_kinds(tmp_path, tiles):
    """`tiles` may be a folder (whatever its name) or a .zip, .tar, .tar.gz or .tgz file
    (suffix in any case), passed as it is to `tilefeat extract`; another plain file is
    refused before anything runs, with its own message."""
    archives = tmp_path / "archives"
    archives.mkdir()
    shutil.copytree(tiles / "s1", archives / "folder.zip")
    accepted = {"folder": archives / "folder.zip"}
    for sample, name in [("z", "a.Zip"), ("t", "b.TAR"), ("tg", "c.tar.gz"), ("g", "d.TGZ")]:
        accepted[sample] = make_archive(tiles / "s1", archives / name)
    sheet = tmp_path / "samples.csv"
    sheet.write_text("sample,tiles\n" + "".join(f"{s},{p}\n" for s, p in accepted.items()))
    config = write_config(tmp_path / "config.yaml", tiles, tiles_root=None, samples=str(sheet))
    proc = snakemake(tmp_path, "--configfile", config, "-n", "-p")
    extracts = [c for c in shell_commands(proc.stdout, str(BINARY)) if " extract " in c]
    assert len(extracts) == len(accepted), proc.stdout
    for sample, path in accepted.items():
        assert any(f"extract {path} --output results/features/{sample}.csv" in c for c in extracts)

    (archives / "e.tar.bz2").write_bytes((archives / "b.TAR").read_bytes())
    sheet.write_text(f"sample,tiles\nz,{accepted['z']}\nbz,{archives / 'e.tar.bz2'}\n")
    proc = snakemake(tmp_path, "--configfile", config, "-n", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    message = (
        f"{sheet}: sample 'bz': tiles '{archives / 'e.tar.bz2'}' is a file but neither a tile "
        "archive (.zip, .tar, .tar.gz, .tgz) nor a slide (.svs, .tif, .tiff, .ndpi, .vms, "
        ".vmu, .scn, .mrxs, .svslide, .bif, .dcm); give the sample's tile folder, an archive "
        "of its tiles or its slide file (suffixes in any case)"
    )
    assert message in out, out


def test_usable_as_module(tmp_path, tiles):
    """The README's module recipe, verbatim but for a local path instead of github()."""
    readme = (SMK / "README.md").read_text()
    (snippet,) = [
        block
        for block in re.findall(r"```python\n(.*?)```", readme, re.S)
        if "module tilefeat:" in block
    ]
    snippet, n = re.subn(r"github\([^)]*\)", f'"{SNAKEFILE}"', snippet)
    assert n == 1, snippet
    (tmp_path / "Snakefile").write_text(snippet)
    write_config(tmp_path / "tf.json", tiles, outdir="results/tilefeat")
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.yaml").write_text(
        "tilefeat: " + (tmp_path / "tf.json").read_text().replace("\n", " ") + "\n"
    )
    proc = run([tool("snakemake"), "-n", "--cores", "2"], cwd=tmp_path)
    for rule, n in [("tilefeat_extract", 3), ("tilefeat_join", 1), ("tilefeat_versions", 1)]:
        assert re.search(rf"\n{rule}\s+{n}\b", proc.stdout), proc.stdout
    assert "results/tilefeat/cohort.csv" in proc.stdout
    # Batched, the batch rules come in under the same prefix.
    write_config(tmp_path / "tf.json", tiles, outdir="results/tilefeat", extract={"samples_per_job": 2})
    (tmp_path / "config" / "config.yaml").write_text(
        "tilefeat: " + (tmp_path / "tf.json").read_text().replace("\n", " ") + "\n"
    )
    proc = run([tool("snakemake"), "-n", "--cores", "2"], cwd=tmp_path)
    for rule in ("tilefeat_extract_batch0", "tilefeat_extract_batch1"):
        assert re.search(rf"\n{rule}\s+1\b", proc.stdout), proc.stdout
    proc = run([tool("snakefmt"), "--check", "--diff", tmp_path / "Snakefile"], check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ------------------------------------------------------------------------------ real runs


def reference_csv(tiles: Path, sample: str, out: Path) -> Path:
    """What a plain `tilefeat extract` of one sample writes (same options as the workflow)."""
    csv_path = out / f"{sample}.csv"
    run(
        [BINARY, "extract", tiles / sample, "--output", csv_path, "--sample", sample,
         "--weights", "random:0", "--device", "cpu", "--threads", THREADS, "--quiet"],
        timeout=120,
    )  # fmt: skip
    return csv_path


@pytest.fixture(scope="module")
def references(tiles, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("reference")
    return {sample: reference_csv(tiles, sample, out) for sample in SAMPLES}


def check_cohort(cohort: Path, references: dict[str, Path]):
    header, rows = read_csv(cohort)
    assert header[0] == "sample", header
    by_sample: dict[str, list[list[str]]] = {}
    for row in rows:
        by_sample.setdefault(row[0], []).append(row[1:])
    assert sorted(by_sample) == sorted(SAMPLES), sorted(by_sample)
    for sample, path in references.items():
        ref_header, ref_rows = read_csv(path)
        assert header == ["sample", *ref_header], (header[:4], ref_header[:4])
        assert len(by_sample[sample]) == len(ref_rows) == SAMPLES[sample]
        # Same binary, options and threads: join must carry every tile's row over verbatim,
        # in the sample's tile order.
        assert by_sample[sample] == ref_rows, f"{sample}: cohort rows differ from {path}"


def check_workdir(workdir: Path, outdir: str):
    for sample in SAMPLES:
        for suffix in ["csv", "provenance.yaml", "rejected.tsv"]:
            assert (workdir / outdir / "features" / f"{sample}.{suffix}").is_file()
        assert (workdir / "benchmarks" / "extract" / f"{sample}.tsv").is_file()
    assert (workdir / "benchmarks" / "join.tsv").is_file()
    version = versions_env()["TILEFEAT_VERSION"]
    assert f'tilefeat: "{version}"' in (workdir / outdir / "versions.yaml").read_text()


def extract_log_header(workdir: Path, sample: str) -> dict[str, str]:
    first = (workdir / "logs" / "extract" / f"{sample}.log").read_text().splitlines()[0]
    return dict(re.findall(r"(\w+)=(\S*)", first))


@pytest.fixture(scope="module")
def local_run(tiles, tmp_path_factory) -> Path:
    require_binary()
    workdir = tmp_path_factory.mktemp("local")
    config = write_config(workdir / "config.yaml", tiles)
    snakemake(
        workdir, "--configfile", config, "--profile", SMK / "profiles" / "local",
        "--cores", "2", timeout=240,
    )  # fmt: skip
    return workdir


@needs_binary
def test_local_run_matches_plain_extract(local_run, references):
    check_workdir(local_run, "results")
    check_cohort(local_run / "results" / "cohort.csv", references)
    for sample in SAMPLES:
        assert extract_log_header(local_run, sample)["SLURM_JOB_ID"] == "none"
    # nothing left to do: a second run is a no-op
    proc = snakemake(local_run, "--configfile", local_run / "config.yaml", "-n", "--cores", "2")
    assert "Nothing to be done" in proc.stdout + proc.stderr


def slurm_up() -> bool:
    if not shutil.which("sinfo"):
        return False
    proc = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    return proc.returncode == 0 and bool({"idle", "mixed", "allocated"} & set(proc.stdout.split()))


@pytest.fixture(scope="module")
def slurm_cluster():
    """A running Slurm cluster: the one already up, or scripts/slurm/start.sh (root only)."""
    if os.environ.get("TILEFEAT_TEST_SLURM") == "0":
        pytest.skip("opt-out: TILEFEAT_TEST_SLURM=0 (the Slurm run is not tested)")
    if slurm_up():
        yield
        return
    if os.geteuid() != 0:
        pytest.fail(
            "no Slurm cluster up and not root: run scripts/slurm/start.sh as root, "
            "or opt out with TILEFEAT_TEST_SLURM=0",
            pytrace=False,
        )
    run([REPO / "scripts" / "slurm" / "start.sh"], timeout=240)
    assert slurm_up(), "scripts/slurm/start.sh returned but sinfo shows no usable node"
    try:
        yield
    finally:
        run([REPO / "scripts" / "slurm" / "stop.sh"], timeout=120, check=False)


@needs_binary
def test_slurm_run_matches_local(slurm_cluster, tiles, local_run, references, tmp_path):
    # The job asks for a (fake) GPU through Slurm but computes on CPU: the node has no CUDA.
    config = write_config(tmp_path / "config.yaml", tiles, extract={"gpus": 1, "mem_mb": 1000})
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    snakemake(
        tmp_path, "--configfile", config, "--profile", SMK / "profiles" / "slurm",
        "--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "2",
        "--jobs", "10", "--latency-wait", "5", timeout=300, env=env,
    )  # fmt: skip
    check_workdir(tmp_path, "results")
    job_ids = []
    for sample in SAMPLES:
        header = extract_log_header(tmp_path, sample)
        assert header["SLURM_JOB_ID"].isdigit(), header  # ran inside a Slurm job
        assert re.fullmatch(r"\d+(,\d+)*", header["CUDA_VISIBLE_DEVICES"]), header  # got its GPU
        job_ids.append(header["SLURM_JOB_ID"])
    join_log = (tmp_path / "logs" / "join.log").read_text()
    assert re.search(r"SLURM_JOB_ID=\d+", join_log), join_log
    # Slurm itself knows these jobs, and they completed
    states = run(["squeue", "--states=all", "-h", "-o", "%i %T", "-j", ",".join(job_ids)]).stdout
    assert sorted(states.split()[1::2]) == ["COMPLETED"] * len(SAMPLES), states
    check_cohort(tmp_path / "results" / "cohort.csv", references)
    assert (tmp_path / "results" / "cohort.csv").read_text() == (
        local_run / "results" / "cohort.csv"
    ).read_text()


@needs_binary
def test_batched_jobs_match_plain_extract(tiles, references, tmp_path):
    """extract.samples_per_job: 2 -> two jobs (s1+s2, then s3), each one `tilefeat extract
    DIR... --outdir` process; the same rows as plain per-sample runs."""
    config = write_config(tmp_path / "config.yaml", tiles, extract={"samples_per_job": 2})
    snakemake(tmp_path, "--configfile", config, "--cores", "2", timeout=240)
    for sample in SAMPLES:
        for suffix in ["csv", "provenance.yaml", "rejected.tsv"]:
            assert (tmp_path / "results" / "features" / f"{sample}.{suffix}").is_file()
    check_cohort(tmp_path / "results" / "cohort.csv", references)
    logs = tmp_path / "logs" / "extract"
    assert sorted(p.name for p in logs.iterdir()) == ["batch0.log", "batch1.log"]
    assert (logs / "batch0.log").read_text().startswith("tilefeat extract s1 s2: host=")
    assert (logs / "batch1.log").read_text().startswith("tilefeat extract s3: host=")

    # Sample IDs from a samplesheet, unlike their folders' names, name the outputs: the job
    # passes one --sample per folder, in the same order.
    sheet = tmp_path / "samples.csv"
    sheet.write_text(f"sample,tiles\nA,{tiles / 's2'}\nB,{tiles / 's1'}\nC,{tiles / 's3'}\n")
    config = write_config(
        tmp_path / "sheet.yaml", tiles, tiles_root=None, samples=str(sheet), outdir="out2",
        extract={"samples_per_job": 2},
    )  # fmt: skip
    proc = snakemake(tmp_path, "--configfile", config, "-n", "-p", "--cores", "2")
    extracts = [c for c in shell_commands(proc.stdout, str(BINARY)) if " extract " in c]
    assert len(extracts) == 2, proc.stdout
    expected = f"extract {tiles / 's2'} {tiles / 's1'} --outdir out2/features --sample A --sample B "
    assert any(expected in c for c in extracts), extracts
    # Slurm --time: the per-sample runtime (10 min here) for each sample of the job.
    assert "runtime=20" in proc.stdout and "runtime=10" in proc.stdout, proc.stdout
    used = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", " ".join(extracts)))
    assert used <= cli_long_flags("ExtractArgs"), used - cli_long_flags("ExtractArgs")


@needs_binary
@pytest.mark.parametrize("samples_per_job", [1, 2], ids=["per-sample", "batched"])
def test_archives_match_plain_extract(tiles, references, tmp_path, samples_per_job):
    """A samplesheet's `tiles` may be an archive: the workflow really runs a .zip and a
    .TAR.GZ (named unlike their samples) beside a folder, one job per sample and batched, and
    each sample's CSV is byte for byte a plain `tilefeat extract` of the unpacked folder."""
    archives = tmp_path / "archives"
    archives.mkdir()
    sources = {  # sample ID -> (its tiles in the samplesheet, the folder they came from)
        "zipped": (make_archive(tiles / "s1", archives / "slide_one.zip"), "s1"),
        "tarred": (make_archive(tiles / "s2", archives / "slide_two.TAR.GZ"), "s2"),
        "plain": (tiles / "s3", "s3"),
    }
    sheet = tmp_path / "samples.csv"
    sheet.write_text(
        "sample,tiles\n" + "".join(f"{s},{path}\n" for s, (path, _) in sources.items())
    )
    config = write_config(
        tmp_path / "config.yaml", tiles, tiles_root=None, samples=str(sheet),
        extract={"samples_per_job": samples_per_job},
    )  # fmt: skip
    proc = snakemake(tmp_path, "--configfile", config, "--cores", "2", "-p", timeout=240)
    # the archives themselves went to tilefeat (nothing unpacked them)
    printed = proc.stdout + proc.stderr
    extracts = [c for c in shell_commands(printed, str(BINARY)) if " extract " in c]
    for path, _ in sources.values():
        assert any(f" {path} " in c for c in extracts), (path, extracts)
    features = tmp_path / "results" / "features"
    for sample, (path, folder) in sources.items():
        assert (features / f"{sample}.csv").read_bytes() == references[folder].read_bytes(), (
            f"{sample}: the CSV of {path.name} differs from `tilefeat extract` of {folder}/"
        )
        provenance = (features / f"{sample}.provenance.yaml").read_text()
        assert f"sample: {sample}\n" in provenance, provenance
        assert f"tile_dir: {path}\n" in provenance, provenance
    header, rows = read_csv(tmp_path / "results" / "cohort.csv")
    for sample, (_, folder) in sources.items():
        assert [r[1:] for r in rows if r[0] == sample] == read_csv(references[folder])[1]
    assert len(rows) == sum(SAMPLES.values())
    logs = sorted(p.name for p in (tmp_path / "logs" / "extract").iterdir())
    if samples_per_job == 1:
        assert logs == ["plain.log", "tarred.log", "zipped.log"], logs
    else:
        assert logs == ["batch0.log", "batch1.log"], logs


# ------------------------------------------------------------------------- output formats


def test_dry_run_formats(tmp_path, tiles):
    """extract.format and join.format reach the rules: per-sample `--output features/S.h5`
    (the extension sets the format), batched `--outdir features --format h5`, the join's
    inputs and its `--output cohort.parquet`; csv, the default, adds no flag (the commands of
    a csv run are those of before)."""
    config = write_config(
        tmp_path / "h5.yaml", tiles, extract={"format": "h5"}, join={"format": "parquet"}
    )
    proc = snakemake(tmp_path, "--configfile", config, "-n", "-p", "--cores", "2")
    commands = shell_commands(proc.stdout, str(BINARY))
    extracts = [c for c in commands if " extract " in c]
    assert len(extracts) == len(SAMPLES), proc.stdout
    for sample in SAMPLES:
        assert any(
            f"extract {tiles / sample} --output results/features/{sample}.h5 --sample {sample} " in c
            for c in extracts
        ), extracts
    (join,) = [c for c in commands if " join " in c]
    assert "--output results/cohort.parquet" in join, join
    for sample in SAMPLES:  # the join (and its list) takes the .h5 files
        assert f"results/features/{sample}.h5" in proc.stdout
    assert "results/features/s1.csv" not in proc.stdout

    config = write_config(
        tmp_path / "batched.yaml", tiles, outdir="out",
        extract={"format": "parquet", "samples_per_job": 2}, join={"output": "all.parquet", "format": "parquet"},
    )  # fmt: skip
    proc = snakemake(tmp_path, "--configfile", config, "-n", "-p", "--cores", "2")
    commands = shell_commands(proc.stdout, str(BINARY))
    extracts = [c for c in commands if " extract " in c]
    expected = f"extract {tiles / 's1'} {tiles / 's2'} --outdir out/features --format parquet --sample s1 --sample s2 "
    assert len(extracts) == 2 and any(expected in c for c in extracts), extracts
    (join,) = [c for c in commands if " join " in c]
    assert "--output out/all.parquet" in join, join
    used = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", " ".join(extracts)))
    assert used <= cli_long_flags("ExtractArgs"), used - cli_long_flags("ExtractArgs")

    # the default, csv: no --format anywhere, and the file names of before
    for name, extract in (("csv1.yaml", {}), ("csv2.yaml", {"samples_per_job": 2})):
        config = write_config(tmp_path / name, tiles, extract=extract)
        proc = snakemake(tmp_path, "--configfile", config, "-n", "-p", "--cores", "2")
        commands = shell_commands(proc.stdout, str(BINARY))
        assert commands and not any("--format" in c for c in commands), commands
        assert "--output results/cohort.csv" in proc.stdout
        assert all(f"results/features/{s}.csv" in proc.stdout for s in SAMPLES)


def test_format_config_errors(tmp_path, tiles):
    """A cohort file name whose extension is not join.format's, or a format tilefeat does
    not write, is refused before anything runs, each with its own message."""
    bad = [
        ({"join": {"format": "parquet", "output": "cohort.csv"}},
         ["ValueError", "config: join.output 'cohort.csv' does not end in .parquet (join.format is 'parquet'"]),
        ({"join": {"output": "cohort.parquet"}},
         ["ValueError", "config: join.output 'cohort.parquet' does not end in .csv (join.format is 'csv'"]),
        ({"join": {"format": "h5"}},
         ["Error validating config file.", "ValidationError: 'h5' is not one of", "instance['join']['format']"]),
        ({"join": {"output": "cohort.h5"}},
         ["Error validating config file.", "ValidationError: 'cohort.h5' does not match", "instance['join']['output']"]),
        ({"extract": {"format": "tsv"}},
         ["Error validating config file.", "ValidationError: 'tsv' is not one of", "instance['extract']['format']"]),
    ]  # fmt: skip
    for i, (overrides, messages) in enumerate(bad):
        config = write_config(tmp_path / f"bad{i}.yaml", tiles, **overrides)
        proc = snakemake(tmp_path, "--configfile", config, "-n", check=False)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 1, f"exit {proc.returncode} for {overrides}:\n{out}"
        for message in messages:
            assert message in out, f"{overrides}: {message!r} not in:\n{out}"


def as_rows(features: Path, out: Path) -> list[list[str]]:
    """A per-sample feature file of any format as `sample,tile,0..D-1` rows, through
    `tilefeat join FILE --output X.csv` (join reads all three formats)."""
    run([BINARY, "join", features, "--output", out, "--quiet"], timeout=120)
    header, rows = read_csv(out)
    return [header, *rows]


@needs_binary
@pytest.mark.parametrize(
    "extract_format, join_format, samples_per_job",
    [("h5", "csv", 1), ("parquet", "parquet", 2), ("h5", "parquet", 2)],
    ids=["h5-csv-per-sample", "parquet-parquet-batched", "h5-parquet-batched"],
)
def test_formats_match_plain_extract(tiles, tmp_path, extract_format, join_format, samples_per_job):
    """The workflow for real with extract.format h5|parquet and join.format csv|parquet, one
    job per sample and batched: each sample's features/S.<format> (provenance and rejected
    list beside it) holds what plain `tilefeat extract --output S.<format>` holds, and the
    cohort file is plain `tilefeat join` of those. (Needs a tilefeat with output formats.)"""
    config = write_config(
        tmp_path / "config.yaml", tiles,
        extract={"format": extract_format, "samples_per_job": samples_per_job},
        join={"format": join_format},
    )  # fmt: skip
    snakemake(tmp_path, "--configfile", config, "--cores", "2", timeout=240)
    features = tmp_path / "results" / "features"
    plain = tmp_path / "plain"
    plain.mkdir()
    for sample in SAMPLES:
        reference = plain / f"{sample}.{extract_format}"
        run(
            [BINARY, "extract", tiles / sample, "--output", reference, "--sample", sample,
             "--weights", "random:0", "--device", "cpu", "--threads", THREADS, "--quiet"],
            timeout=120,
        )  # fmt: skip
        for suffix in [extract_format, "provenance.yaml", "rejected.tsv"]:
            assert (features / f"{sample}.{suffix}").is_file(), (sample, suffix)
        assert not (features / f"{sample}.csv").exists()
        assert f"sample: {sample}\n" in (features / f"{sample}.provenance.yaml").read_text()
        rows = as_rows(features / f"{sample}.{extract_format}", tmp_path / f"{sample}-wf.csv")
        assert rows == as_rows(reference, tmp_path / f"{sample}-plain.csv"), sample
        assert len(rows) == 1 + SAMPLES[sample]
    cohort = tmp_path / "results" / f"cohort.{join_format}"
    assert cohort.is_file()
    if join_format != "csv":
        assert not (tmp_path / "results" / "cohort.csv").exists()
    plain_cohort = plain / f"cohort.{join_format}"
    run(
        [BINARY, "join", *(plain / f"{s}.{extract_format}" for s in sorted(SAMPLES)),
         "--output", plain_cohort, "--quiet"],
        timeout=120,
    )  # fmt: skip
    if join_format == "csv":
        assert read_csv(cohort) == read_csv(plain_cohort)
    else:
        import pyarrow.parquet as pq

        table = pq.read_table(cohort)
        assert table.equals(pq.read_table(plain_cohort)), "the workflow's Parquet cohort differs"
        assert table.num_rows == sum(SAMPLES.values())


# ------------------------------------------------------- a TorchScript encoder (extract.model)

TINY_SIDECAR = {
    "tilefeat_encoder": 1, "name": "tiny", "source": "test", "size": 64,
    "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "output": "embedding",
    "output_dim": 8, "weights_sha256": None,
}  # fmt: skip
DEMO = REPO / "demo" / "tiles"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny TorchScript encoder made here, no download (8 features; seeded random init),
    with its sidecar tiny.json beside it (64 x 64 tiles, mean 0.5, std 0.25)."""
    import warnings

    import torch

    folder = tmp_path_factory.mktemp("encoder")
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, stride=4),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
    ).eval()
    model = folder / "tiny.pt"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit: what tilefeat reads
        torch.jit.save(torch.jit.trace(net, torch.rand(2, 3, 64, 64)), str(model))
    (folder / "tiny.json").write_text(json.dumps(TINY_SIDECAR))
    return model


def model_config(path: Path, encoder: Path, sheet: Path, outdir="results", **extract) -> Path:
    """A config with extract.model `encoder` (unless `extract` says otherwise) and no weights,
    and the ResNet50 settings as the shipped config/config.yaml has them (layer4, tutorial,
    224): the samples of `sheet`."""
    settings = {"weights": "", "model": str(encoder), "layer": "layer4", "normalize": "tutorial"}
    return write_config(
        path, DEMO, tiles_root=None, samples=str(sheet), outdir=outdir,
        extract={**settings, "size": 224, **extract},
    )  # fmt: skip


def demo_sheet(path: Path) -> Path:
    if not DEMO.is_dir():
        pytest.fail(f"{DEMO} is missing: it is tracked in git", pytrace=False)
    path.write_text(f"sample,tiles\nsampleA,{DEMO / 'sampleA'}\nsampleB,{DEMO / 'sampleB'}\n")
    return path


def test_model_dry_run_and_refusals(tmp_path, tiny_model):
    """extract.model reaches the command as `--model PATH`, with neither --weights nor the
    ResNet50's --layer, --normalize tutorial and --size 224 (the sidecar sets those); a
    normalize or size other than those is passed. The model and its sidecar are the jobs'
    inputs. Without a model the command is what it was. With weights, or a layer other than
    layer4, the model is refused before anything runs."""
    sheet = demo_sheet(tmp_path / "samples.csv")
    config = model_config(tmp_path / "model.yaml", tiny_model, sheet, pool="avg")
    proc = snakemake(tmp_path, "--configfile", config, "-n", "-p", "--cores", "2")
    extracts = [c for c in shell_commands(proc.stdout, str(BINARY)) if " extract " in c]
    assert len(extracts) == 2, proc.stdout
    for cmd in extracts:
        assert f" --model {tiny_model} --device cpu --pool avg >> " in cmd, cmd
        assert not re.search(r"--(weights|layer|normalize|size) ", cmd), cmd
    sidecar = tiny_model.with_suffix(".json")
    for sample in ("sampleA", "sampleB"):  # the jobs' inputs: tiles, model, sidecar
        assert f"input: {DEMO / sample}, {tiny_model}, {sidecar}\n" in proc.stdout, proc.stdout
    used = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", " ".join(extracts)))
    assert used <= cli_long_flags("ExtractArgs"), used - cli_long_flags("ExtractArgs")

    config = model_config(
        tmp_path / "custom.yaml", tiny_model, sheet, normalize="imagenet", size=96,
        samples_per_job=2,
    )  # fmt: skip
    proc = snakemake(tmp_path, "--configfile", config, "-n", "-p", "--cores", "2")
    (cmd,) = [c for c in shell_commands(proc.stdout, str(BINARY)) if " extract " in c]
    assert "--outdir results/features --sample sampleA --sample sampleB " in cmd, cmd
    assert f" --model {tiny_model} --device cpu --normalize imagenet --size 96 >> " in cmd, cmd

    # no model: the ResNet50's settings are passed as they always were
    config = model_config(tmp_path / "none.yaml", tiny_model, sheet, model="")
    proc = snakemake(tmp_path, "--configfile", config, "-n", "-p", "--cores", "2")
    extracts = [c for c in shell_commands(proc.stdout, str(BINARY)) if " extract " in c]
    assert len(extracts) == 2, proc.stdout
    for cmd in extracts:
        assert " --threads 1 --device cpu --layer layer4 --normalize tutorial --size 224 >> " in cmd
        assert "--model" not in cmd, cmd

    bad = [
        ({"weights": "random:0"},
         f"config: extract.model ({str(tiny_model)!r}) and extract.weights ('random:0') "
         "exclude each other: the model replaces the ResNet50, whose weights do not apply to it"),
        ({"weights": "/refs/resnet50-0676ba61.pth"},
         "and extract.weights ('/refs/resnet50-0676ba61.pth') exclude each other"),
        ({"layer": "layer3"},
         f"config: extract.layer 'layer3' picks a ResNet50 stage: it does not apply to "
         f"extract.model ({str(tiny_model)!r})"),
    ]  # fmt: skip
    for i, (extract, message) in enumerate(bad):
        config = model_config(tmp_path / f"bad{i}.yaml", tiny_model, sheet, **extract)
        proc = snakemake(tmp_path, "--configfile", config, "-n", check=False)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 1, f"exit {proc.returncode} for {extract}:\n{out}"
        assert "ValueError" in out and message in out, f"{extract}: {message!r} not in:\n{out}"


@needs_binary
def test_model_runs_match_plain_extract(tmp_path, tiny_model):
    """The workflow for real with extract.model (and the shipped config's ResNet50 settings),
    one job per sample and batched: each sample's CSV is byte for byte plain
    `tilefeat extract demo/tiles/S -o x.csv --model tiny.pt` (8 feature columns), its
    provenance records the model and its sidecar; editing the sidecar reruns the extraction."""
    import hashlib

    import yaml

    sheet = demo_sheet(tmp_path / "samples.csv")
    (tmp_path / "encoder").mkdir()  # a copy of its own: its sidecar is edited below
    for source in (tiny_model, tiny_model.with_suffix(".json")):
        shutil.copy(source, tmp_path / "encoder" / source.name)
    tiny_model = tmp_path / "encoder" / tiny_model.name
    sha256 = hashlib.sha256(tiny_model.read_bytes()).hexdigest()
    plain = tmp_path / "plain"
    plain.mkdir()
    for sample in ("sampleA", "sampleB"):
        run(
            [BINARY, "extract", DEMO / sample, "-o", plain / f"{sample}.csv",
             "--model", tiny_model, "--device", "cpu"],
            timeout=120,
        )  # fmt: skip
    for samples_per_job in (1, 2):
        outdir = f"out{samples_per_job}"
        config = model_config(
            tmp_path / f"run{samples_per_job}.yaml", tiny_model, sheet, outdir=outdir,
            samples_per_job=samples_per_job,
        )  # fmt: skip
        snakemake(tmp_path, "--configfile", config, "--cores", "2", timeout=240)
        for sample in ("sampleA", "sampleB"):
            features = tmp_path / outdir / "features" / f"{sample}.csv"
            assert features.read_bytes() == (plain / f"{sample}.csv").read_bytes(), (
                f"{sample} (samples_per_job {samples_per_job}): not plain --model's CSV"
            )
            assert read_csv(features)[0] == ["tile", *map(str, range(8))]
            provenance = yaml.safe_load(features.with_suffix(".provenance.yaml").read_text())
            assert provenance["model"]["sha256"] == sha256, provenance["model"]
            assert provenance["model"]["file"] == str(tiny_model), provenance["model"]
            assert provenance["model"]["sidecar"] == str(tiny_model.with_suffix(".json"))
            assert provenance["settings"]["size"] == 64, provenance["settings"]
        header, rows = read_csv(tmp_path / outdir / "cohort.csv")
        assert header == ["sample", "tile", *map(str, range(8))] and rows

    # the sidecar is an input: an edited one reruns both samples' extraction (Snakemake
    # compares small inputs' checksums: a newer mtime alone would not)
    proc = snakemake(tmp_path, "--configfile", tmp_path / "run1.yaml", "-n", "--cores", "2")
    assert "Nothing to be done" in proc.stdout + proc.stderr, proc.stdout
    sidecar = tiny_model.with_suffix(".json")
    sidecar.write_text(json.dumps({**TINY_SIDECAR, "size": 48}))
    proc = snakemake(tmp_path, "--configfile", tmp_path / "run1.yaml", "-n", "--cores", "2")
    assert re.search(r"\nextract\s+2\b", proc.stdout), proc.stdout
    assert f"Updated input files: {sidecar}" in proc.stdout, proc.stdout


# ----------------------------------------------- formats for the MIL tools (pt, stamp, clam)


def coord_tiles(tiles: Path, root: Path) -> Path:
    """The samples' tiles renamed as histolab names them (`tile_N_level0_x0-y0-x1-y1.png`):
    coordinates and extent (256 px at level 0) for index.npz and STAMP's layout."""
    for sample in SAMPLES:
        (root / sample).mkdir(parents=True)
        for n, tile in enumerate(sorted((tiles / sample).iterdir())):
            x, y = 256 * n, 512
            shutil.copy(tile, root / sample / f"tile_{n}_level0_{x}-{y}-{x + 256}-{y + 256}{tile.suffix}")
    return root


@pytest.fixture(scope="module")
def ctiles(tiles, tmp_path_factory) -> Path:
    return coord_tiles(tiles, tmp_path_factory.mktemp("ctiles"))


def dry_run(tmp_path, name, tiles, **overrides):
    config = write_config(tmp_path / f"{name}.yaml", tiles, **overrides)
    proc = snakemake(tmp_path, "--configfile", config, "-n", "-p", "--cores", "2")
    extracts = [c for c in shell_commands(proc.stdout, str(BINARY)) if " extract " in c]
    joins = [c for c in shell_commands(proc.stdout, str(BINARY)) if " join " in c]
    used = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", " ".join(extracts)))
    assert used <= cli_long_flags("ExtractArgs"), used - cli_long_flags("ExtractArgs")
    return proc.stdout, extracts, joins


def job_outputs(stdout: str) -> set[str]:
    """Every output a dry run's jobs declare (`output: a, b`)."""
    return {p for line in re.findall(r"^\s*output: (.*)$", stdout, re.M) for p in line.split(", ")}


def test_dry_run_mil_formats(tmp_path, tiles):
    """extract.format pt|stamp|clam reach the commands and the declared outputs, one job per
    sample and batched: pt `--output S.pt`, stamp `--output S.h5 --format stamp`, clam
    `--outdir features --format clam` declaring h5_files/S.h5 (+ provenance, rejected list)
    and pt_files/S.pt; the join only for clam (its h5_files/*.h5), none for pt and stamp,
    whose default target is the per-sample files. (index.npz is not declared: it exists only
    when the tiles have coordinates.)"""
    per_sample = {
        "pt": ("--output results/features/{s}.pt --sample {s} ",
               ["{s}.pt", "{s}.provenance.yaml", "{s}.rejected.tsv"]),
        "stamp": ("--output results/features/{s}.h5 --format stamp --sample {s} --slide-mpp 0.5 ",
                  ["{s}.h5", "{s}.provenance.yaml", "{s}.rejected.tsv"]),
        "clam": ("--outdir results/features --format clam --sample {s} ",
                 ["h5_files/{s}.h5", "h5_files/{s}.provenance.yaml", "h5_files/{s}.rejected.tsv", "pt_files/{s}.pt"]),
    }  # fmt: skip
    for fmt, (flags, files) in per_sample.items():
        extract = {"format": fmt, **({"slide_mpp": 0.5} if fmt == "stamp" else {})}
        stdout, extracts, joins = dry_run(tmp_path, fmt, tiles, extract=extract)
        assert len(extracts) == len(SAMPLES), stdout
        outputs = job_outputs(stdout)
        for sample in SAMPLES:
            assert any(f"extract {tiles / sample} {flags.format(s=sample)}" in c for c in extracts), (fmt, extracts)
            for f in files:
                assert f"results/features/{f.format(s=sample)}" in outputs, (fmt, f, outputs)
        assert not any(o.endswith(".index.npz") for o in outputs), outputs
        assert "results/versions.yaml" in outputs
        if fmt == "clam":
            (join,) = joins
            assert "--output results/cohort.csv" in join, join
            for sample in SAMPLES:  # the join list takes the h5_files/ .h5 of each sample
                assert f"results/features/h5_files/{sample}.h5" in re.search(
                    r"rule join_list:.*?\n\n", stdout, re.S
                ).group(0)
        else:
            assert joins == [] and "results/cohort.csv" not in stdout, stdout
            assert not re.search(r"^join(_list)?\s+\d", stdout, re.M), stdout

    # batched: --outdir features --format F, the same outputs per sample
    for fmt, (_, files) in per_sample.items():
        extract = {"format": fmt, "samples_per_job": 2, **({"slide_mpp": 0.5} if fmt == "stamp" else {})}
        stdout, extracts, joins = dry_run(tmp_path, f"{fmt}-batched", tiles, extract=extract)
        assert len(extracts) == 2, stdout
        mpp = " --slide-mpp 0.5" if fmt == "stamp" else ""
        expected = (
            f"extract {tiles / 's1'} {tiles / 's2'} --outdir results/features --format {fmt}"
            f" --sample s1 --sample s2{mpp} --threads 1 "
        )
        assert any(expected in c for c in extracts), extracts
        outputs = job_outputs(stdout)
        for sample in SAMPLES:
            for f in files:
                assert f"results/features/{f.format(s=sample)}" in outputs, (fmt, f, outputs)
        assert bool(joins) == (fmt == "clam"), joins


def test_slide_mpp_per_sample(tmp_path, tiles):
    """A samplesheet's slide_mpp column (else extract.slide_mpp) reaches each sample's command
    as --slide-mpp; batched, samples with different mpps go to different jobs (one
    --slide-mpp per process). extract.patch_size_level0 is passed as --patch-size-level0."""
    sheet = tmp_path / "samples.csv"
    sheet.write_text(
        f"sample,tiles,slide_mpp\ns1,{tiles / 's1'},0.25\ns2,{tiles / 's2'},\ns3,{tiles / 's3'},0.25\n"
    )
    base = {"tiles_root": None, "samples": str(sheet)}
    _, extracts, _ = dry_run(tmp_path, "one", tiles, **base, extract={"slide_mpp": 0.5, "patch_size_level0": 512})
    for sample, mpp in (("s1", "0.25"), ("s2", "0.5"), ("s3", "0.25")):
        (cmd,) = [c for c in extracts if f"--sample {sample} " in c]
        assert f"--sample {sample} --slide-mpp {mpp} --threads 1 " in cmd, cmd
        assert "--patch-size-level0 512" in cmd, cmd
    # extract.slide_mpp from the command line (`--config 'extract={...}'` gives strings)
    config = write_config(tmp_path / "cli.yaml", tiles, **base)
    proc = snakemake(
        tmp_path, "--configfile", config, "--config", 'extract={"slide_mpp": "0.5"}', "-n", "-p", "--cores", "2"
    )  # fmt: skip
    (cmd,) = [c for c in shell_commands(proc.stdout, str(BINARY)) if "--sample s2 " in c]
    assert "--sample s2 --slide-mpp 0.5 --threads 1 " in cmd, cmd
    # no extract.slide_mpp: s2 has none (and the command of before)
    _, extracts, _ = dry_run(tmp_path, "none", tiles, **base)
    (cmd,) = [c for c in extracts if "--sample s2 " in c]
    assert "--slide-mpp" not in cmd and "--sample s2 --threads 1 " in cmd, cmd
    # batched: s1 and s3 (0.25) share a job, s2 (none) has its own
    _, extracts, _ = dry_run(tmp_path, "batched", tiles, **base, extract={"samples_per_job": 2})
    assert len(extracts) == 2, extracts
    assert any(
        f"extract {tiles / 's1'} {tiles / 's3'} --outdir results/features --sample s1 --sample s3 --slide-mpp 0.25 " in c
        for c in extracts
    ), extracts
    assert any(f"extract {tiles / 's2'} --outdir results/features --sample s2 --threads" in c for c in extracts)

    bad = [
        # stamp without a slide mpp for every sample: refused at start-up, naming them
        ({**base, "extract": {"format": "stamp"}},
         ["ValueError", "config: extract.format stamp writes STAMP's coordinates in micrometres",
          "set extract.slide_mpp, or a slide_mpp column in the samplesheet; none for s2"]),
        ({"extract": {"format": "stamp"}}, ["ValueError", "none for s1, s2, s3"]),
        ({"extract": {"slide_mpp": 352.78}},
         ["Error validating config file.", "352.78 is greater than the maximum of 100"]),
        ({"tiles_root": None, "samples": str(tmp_path / "range.csv")},
         ["ValueError", f"{tmp_path / 'range.csv'}: sample 's1': slide_mpp 0.001 is not a slide's micrometres per pixel"]),
        ({"tiles_root": None, "samples": str(tmp_path / "text.csv")},
         ["ValidationError: 'x40' does not match", "schema['properties']['slide_mpp']"]),
    ]  # fmt: skip
    (tmp_path / "range.csv").write_text(f"sample,tiles,slide_mpp\ns1,{tiles / 's1'},0.001\n")
    (tmp_path / "text.csv").write_text(f"sample,tiles,slide_mpp\ns1,{tiles / 's1'},x40\n")
    for i, (overrides, messages) in enumerate(bad):
        config = write_config(tmp_path / f"bad{i}.yaml", tiles, **overrides)
        proc = snakemake(tmp_path, "--configfile", config, "-n", check=False)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 1, f"exit {proc.returncode} for {overrides}:\n{out}"
        for message in messages:
            assert message in out, f"{overrides}: {message!r} not in:\n{out}"
    # with every sample's mpp, stamp is accepted
    sheet.write_text(sheet.read_text().replace("s2,", "s2,").replace(f"{tiles / 's2'},\n", f"{tiles / 's2'},1\n"))
    _, extracts, _ = dry_run(tmp_path, "stamp-ok", tiles, **base, extract={"format": "stamp"})
    assert len(extracts) == 3 and all("--format stamp" in c for c in extracts), extracts


def plain_extract(tiles: Path, sample: str, out: Path, *flags) -> None:
    run(
        [BINARY, "extract", tiles / sample, *flags, "--sample", sample, "--weights", "random:0",
         "--device", "cpu", "--threads", THREADS, "--quiet"],
        timeout=120,
    )  # fmt: skip


def load_bag(path: Path):
    import torch

    return torch.load(path, weights_only=True)


@needs_binary
@pytest.mark.parametrize("samples_per_job", [1, 2], ids=["per-sample", "batched"])
def test_mil_formats_match_plain_extract(ctiles, tmp_path, samples_per_job):
    """The workflow for real with pt, stamp and clam: each sample's files are those of plain
    `tilefeat extract` with the same format (the .pt bag equal tensor for tensor, its
    index.npz the same centres, STAMP's feats/coords and attributes, CLAM's h5_files/ and
    pt_files/), the provenance and rejected list where the format puts them, the cohort from
    clam's .h5 files, and no cohort for pt and stamp."""
    import h5py
    import numpy as np

    plain = tmp_path / "plain"
    for fmt in ("pt", "stamp", "clam"):
        extract = {"format": fmt, "samples_per_job": samples_per_job, "slide_mpp": 0.5}
        config = write_config(tmp_path / f"{fmt}.yaml", ctiles, outdir=fmt, extract=extract)
        snakemake(tmp_path, "--configfile", config, "--cores", "2", timeout=240)
        features = tmp_path / fmt / "features"
        for sample in SAMPLES:
            if fmt == "clam":
                plain_extract(ctiles, sample, plain, "--outdir", plain / "clam", "--format", "clam", "--slide-mpp", "0.5")
                ours, theirs = features, plain / "clam"
                h5, bag = f"h5_files/{sample}.h5", f"pt_files/{sample}.pt"
                side = f"h5_files/{sample}"
                index = f"pt_files/{sample}.index.npz"
            else:
                ext = "h5" if fmt == "stamp" else "pt"
                (plain / fmt).mkdir(parents=True, exist_ok=True)
                flags = ["--format", "stamp"] if fmt == "stamp" else []
                plain_extract(ctiles, sample, plain, "--output", plain / fmt / f"{sample}.{ext}", *flags, "--slide-mpp", "0.5")
                ours, theirs = features, plain / fmt
                h5 = f"{sample}.h5" if fmt == "stamp" else None
                bag = f"{sample}.pt" if fmt == "pt" else None
                side = sample
                index = f"{sample}.index.npz" if fmt == "pt" else None
            assert (ours / f"{side}.rejected.tsv").read_bytes() == (theirs / f"{side}.rejected.tsv").read_bytes()
            assert f"sample: {sample}\n" in (ours / f"{side}.provenance.yaml").read_text()
            if bag:
                got, want = load_bag(ours / bag), load_bag(theirs / bag)
                assert got.dtype == want.dtype and got.shape == (SAMPLES[sample], 2048), got.shape
                assert bool((got == want).all()), f"{fmt} {sample}: the bag differs from plain extract's"
                got, want = np.load(ours / index), np.load(theirs / index)
                assert np.array_equal(got["arr_0"], want["arr_0"]) and got["arr_0"].shape == (SAMPLES[sample], 2)
            if h5:
                with h5py.File(ours / h5) as a, h5py.File(theirs / h5) as b:
                    assert sorted(a) == sorted(b) and sorted(a.attrs) == sorted(b.attrs)
                    assert np.array_equal(a["features"][:], b["features"][:])
                    assert np.array_equal(a["coords"][:], b["coords"][:])
                    if fmt == "stamp":
                        assert a.attrs["unit"] == "um" and a.attrs["feat_type"] == "tile", dict(a.attrs)
                        assert np.array_equal(a["feats"][:], b["feats"][:])
                    if bag:  # clam: the bag is the .h5's features, row for row
                        assert np.array_equal(a["features"][:], load_bag(ours / bag).numpy())
        cohort = tmp_path / fmt / "cohort.csv"
        if fmt == "clam":
            rows = as_rows(features / "h5_files" / "s1.h5", tmp_path / "s1-rows.csv")
            header, cohort_rows = read_csv(cohort)
            assert header == rows[0] and [r for r in cohort_rows if r[0] == "s1"] == rows[1:]
            assert len(cohort_rows) == sum(SAMPLES.values())
        else:
            assert not cohort.exists() and not (tmp_path / fmt / "join").exists()
            assert (tmp_path / fmt / "versions.yaml").is_file()


# ------------------------------------------------------------------------ whole-slide images

SLIDE_FLAGS = {"magnification": 5, "patch_size": 512, "tissue": "clam"}
SLIDE_CLI = ["--magnification", "5", "--patch-size", "512", "--tissue", "clam"]


@pytest.fixture(scope="module")
def tissue_slide(tmp_path_factory) -> Path:
    """tests/python/make_slides.py's Aperio SVS with tissue (CLAM finds it)."""
    sys.path.insert(0, str(Path(__file__).parent))
    import make_slides

    path = tmp_path_factory.mktemp("slides") / "tissue.SVS"
    make_slides.write_tissue_svs(path)
    return path


def test_slide_suffixes_match_nextflow():
    """The slide suffixes are the same in both workflows."""
    smk = (REPO / "snakemake" / "workflow" / "rules" / "common.smk").read_text()
    nf = (REPO / "nextflow" / "main.nf").read_text()
    smk_list = re.findall(r'"(\.[a-z]+)"', re.search(r"SLIDE_SUFFIXES = \((.*?)\)", smk, re.S).group(1))
    nf_list = re.findall(r"'(\.[a-z]+)'", re.search(r"def SLIDE_SUFFIXES = \[(.*?)\]", nf, re.S).group(1))
    assert smk_list == nf_list and ".svs" in smk_list, (smk_list, nf_list)


def test_slide_dry_run_flags_only_for_slides(tmp_path, tiles, tissue_slide):
    """Slide flags go to slide samples only, and batches keep slides and tile folders apart."""
    sheet = tmp_path / "samples.csv"
    folder = tmp_path / "folder.svs"  # a tile folder, whatever its name
    shutil.copytree(tiles / "s2", folder)
    sheet.write_text(f"sample,tiles\nslideA,{tissue_slide}\ns1,{tiles / 's1'}\ns2,{folder}\n")
    for per_job in (1, 3):
        config = write_config(
            tmp_path / f"c{per_job}.yaml", tiles, tiles_root=None, samples=str(sheet),
            extract={**SLIDE_FLAGS, "samples_per_job": per_job},
        )  # fmt: skip
        proc = snakemake(tmp_path, "--configfile", config, "-n", "-p")
        extracts = [c for c in shell_commands(proc.stdout, str(BINARY)) if " extract " in c]
        assert len(extracts) == (3 if per_job == 1 else 2), proc.stdout
        for c in extracts:
            slide = f" {tissue_slide} " in c
            assert (" ".join(SLIDE_CLI) in c) == slide, c
            if per_job > 1 and slide:
                assert str(tiles) not in c, c
    # without slide flags, a job may mix slides and tile folders (the batches of before)
    plain = write_config(
        tmp_path / "plain.yaml", tiles, tiles_root=None, samples=str(sheet),
        extract={"samples_per_job": 3},
    )  # fmt: skip
    proc = snakemake(tmp_path, "--configfile", plain, "-n", "-p")
    extracts = [c for c in shell_commands(proc.stdout, str(BINARY)) if " extract " in c]
    assert len(extracts) == 1 and "--patch-size" not in extracts[0], proc.stdout
    both = write_config(
        tmp_path / "both.yaml", tiles, tiles_root=None, samples=str(sheet),
        extract={"magnification": 20, "mpp": 0.5},
    )  # fmt: skip
    proc = snakemake(tmp_path, "--configfile", both, "-n", check=False)
    assert proc.returncode == 1
    assert "extract.magnification and extract.mpp exclude each other" in proc.stdout + proc.stderr


@needs_binary
@pytest.mark.parametrize("samples_per_job", [1, 2])
def test_slide_matches_plain_extract(tmp_path, tiles, tissue_slide, samples_per_job):
    """A samplesheet naming a slide runs end to end: its CSV is byte for byte a plain
    `tilefeat extract` of the slide with the same flags, and its tissue picture is there."""
    reference = tmp_path / "ref" / "slideA.csv"
    run([BINARY, "extract", tissue_slide, "--output", reference, "--sample", "slideA",
         "--weights", "random:0", "--device", "cpu", "--threads", THREADS, "--no-cache",
         "--quiet", *SLIDE_CLI])  # fmt: skip
    sheet = tmp_path / "samples.csv"
    sheet.write_text(f"sample,tiles\nslideA,{tissue_slide}\ns1,{tiles / 's1'}\n")
    config = write_config(
        tmp_path / "config.yaml", tiles, tiles_root=None, samples=str(sheet),
        extract={**SLIDE_FLAGS, "samples_per_job": samples_per_job, "no_cache": True},
    )  # fmt: skip
    snakemake(tmp_path, "--configfile", config, "--cores", "2", timeout=300)
    features = tmp_path / "results" / "features"
    assert (features / "slideA.csv").read_bytes() == reference.read_bytes()
    assert (features / "slideA.tissue.png").is_file()
    assert not (features / "s1.tissue.png").exists()
    _, rows = read_csv(tmp_path / "results" / "cohort.csv")
    assert {r[0] for r in rows} == {"slideA", "s1"}


def test_preset_is_passed_alone_and_matches_plain_extract(tmp_path, tiles):
    """extract.preset (issue 28: with `--preset` given through `extra`, the config's layer,
    pool, normalize and size were passed beside it, which tilefeat refuses): the preset alone
    reaches the command line, the run gives a plain `extract --preset`'s numbers, and a
    setting that disagrees with the preset (or a model) is refused before anything runs."""
    config = write_config(tmp_path / "config.yaml", tiles, outdir="out",
                          extract={"preset": "resnet50-trunc"})  # fmt: skip
    proc = snakemake(tmp_path, "--configfile", config, "-n", "-p", "--cores", "2")
    extracts = [c for c in shell_commands(proc.stdout, str(BINARY)) if " extract " in c]
    assert len(extracts) == len(SAMPLES), proc.stdout
    for cmd in extracts:
        assert "--preset resnet50-trunc" in cmd, cmd
        for flag in ("--layer", "--pool", "--normalize", "--size"):
            assert flag not in cmd, cmd
    snakemake(tmp_path, "--configfile", config, "--cores", "2", timeout=600)
    sample = next(iter(SAMPLES))
    ref = tmp_path / "ref.csv"
    plain_extract(tiles, sample, ref, "-o", ref, "--preset", "resnet50-trunc")
    ours = tmp_path / "out" / "features" / f"{sample}.csv"
    assert ours.read_bytes() == ref.read_bytes()
    assert len(ours.read_text().splitlines()[0].split(",")) == 1 + 1024  # layer3: 1024 values
    bad = [
        ({"preset": "resnet50-trunc", "size": 448},
         "config: extract.size 448 disagrees with extract.preset 'resnet50-trunc' (size 224)"),
        ({"preset": "tutorial", "layer": "layer3"},
         "config: extract.layer 'layer3' disagrees with extract.preset 'tutorial' (layer 'layer4')"),
        ({"preset": "tutorial", "model": str(tmp_path / "m.pt")},
         "config: extract.preset ('tutorial') sets the ResNet50's settings"),
    ]  # fmt: skip
    for i, (extract, message) in enumerate(bad):
        config = write_config(tmp_path / f"bad{i}.yaml", tiles, extract=extract)
        proc = snakemake(tmp_path, "--configfile", config, "-n", check=False)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 1 and message in out, f"{extract}:\n{out}"
