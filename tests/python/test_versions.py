"""versions.env is the one place for versions; everything that repeats one must agree with it.

Checked against versions.env (each source is read by a function below that returns the
disagreements it finds, so a test can also feed it a perturbed versions.env and see it fire):

* Cargo.toml (package version, `tch = "=X"`, `torch-sys = "=X"`) and Cargo.lock (tch, torch-sys);
* scripts/setup.sh sources versions.env and pins `torch==$LIBTORCH_VERSION`, no literal version;
* requirements-dev.txt pins torchvision==TORCHVISION_VERSION;
* containers/Dockerfile and Dockerfile.cpu: every `ARG NAME=default` whose NAME is a
  versions.env key, and the Python of the builder's Debian release;
* the Apptainer recipes: `From:` images and version labels;
* every literal image URI `ghcr.io/tilefeat/tilefeat:<tag>` in containers/, nextflow/,
  snakemake/ and README.md (found by regex, so new workflow files are covered without listing
  them): <tag> is TILEFEAT_VERSION-cudaCUDA_VERSION, ...-cpu, or ...-cudaCUDA_VERSION-sif,
  and a -sif tag is pulled with oras:// (and oras:// only pulls -sif tags). Templates such
  as `{version}-cuda{cuda}` are not literal versions and are skipped;
* the torch installed in .venv (torch/version.py): scripts/setup.sh installs it, so no torch
  in .venv is a problem too, not a pass.
"""

import re
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CONTAINERS = REPO / "containers"
DOCKERFILES = [CONTAINERS / "Dockerfile", CONTAINERS / "Dockerfile.cpu"]
DEFS = sorted(CONTAINERS.glob("*.def"))
URI_ROOTS = [CONTAINERS, REPO / "nextflow", REPO / "snakemake", REPO / "README.md"]
# Run-time litter inside the workflow folders (logs, caches, work dirs): not sources.
SKIP_DIRS = {".snakemake", ".nextflow", "work", "__pycache__", ".nf-test", "results"}
# python3 of the Debian release the Rust builder image is based on.
DEBIAN_PYTHON = {"bookworm": "3.11", "trixie": "3.13"}

IMAGE = "ghcr.io/tilefeat/tilefeat:"
URI = re.compile(r"(?P<scheme>[a-z]+://)?" + re.escape(IMAGE) + r"(?P<tag>[A-Za-z0-9_.{}<>$\-]*)")
TAG = re.compile(r"(?P<version>\d+\.\d+\.\d+(?:-[a-z]+\.?\d*)?)-(?:cuda(?P<cuda>\d+\.\d+)(?P<sif>-sif)?|(?P<cpu>cpu))")


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def read_versions_env() -> dict[str, str]:
    pairs = {}
    for line in (REPO / "versions.env").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep and re.fullmatch(r"[A-Z_]+", key) and value, f"versions.env: bad line {line!r}"
            pairs[key] = value
    return pairs


# --- the checks: each returns a list of "source: problem" strings ----------------------------


def check_cargo(v: dict[str, str]) -> list[str]:
    manifest = tomllib.loads((REPO / "Cargo.toml").read_text())
    problems = []
    if manifest["package"]["version"] != v["TILEFEAT_VERSION"]:
        problems.append(f"Cargo.toml: version {manifest['package']['version']} != TILEFEAT_VERSION")
    for crate in ("tch", "torch-sys"):
        spec = manifest["dependencies"].get(crate)
        spec = spec.get("version") if isinstance(spec, dict) else spec
        if spec != f"={v['TCH_VERSION']}":
            problems.append(f'Cargo.toml: {crate} = "{spec}" != "={v["TCH_VERSION"]}" (TCH_VERSION)')
    lock = tomllib.loads((REPO / "Cargo.lock").read_text())
    for package in lock["package"]:
        if package["name"] in ("tch", "torch-sys") and package["version"] != v["TCH_VERSION"]:
            problems.append(f"Cargo.lock: {package['name']} {package['version']} != TCH_VERSION")
    return problems


def check_setup_sh(v: dict[str, str]) -> list[str]:
    text = (REPO / "scripts/setup.sh").read_text()
    problems = []
    if not re.search(r"^\.\s+\./versions\.env\s*$", text, re.M):
        problems.append("scripts/setup.sh: does not source ./versions.env")
    if "torch==$LIBTORCH_VERSION" not in text:
        problems.append("scripts/setup.sh: does not install torch==$LIBTORCH_VERSION")
    for literal in re.findall(r"torch==[0-9][\w.+]*", text):
        problems.append(f"scripts/setup.sh: literal {literal} (use $LIBTORCH_VERSION)")
    return problems


def check_requirements(v: dict[str, str]) -> list[str]:
    pins = re.findall(r"^torchvision==(\S+)", (REPO / "requirements-dev.txt").read_text(), re.M)
    if pins != [v["TORCHVISION_VERSION"]]:
        return [f"requirements-dev.txt: torchvision pins {pins} != [TORCHVISION_VERSION]"]
    return []


def check_dockerfiles(v: dict[str, str]) -> list[str]:
    problems = []
    for path in DOCKERFILES:
        text = path.read_text()
        args = re.findall(r"^ARG\s+([A-Z_]+)=(\S*)\s*$", text, re.M)
        declared = {name for name, _ in args}
        needed = set(v) - {"TORCHVISION_VERSION"} - ({"CUDA_VERSION"} if path.name.endswith(".cpu") else set())
        for name in sorted(needed - declared):
            problems.append(f"{rel(path)}: no ARG {name}=... default")
        for name, default in args:
            if name in v and default != v[name]:
                problems.append(f"{rel(path)}: ARG {name}={default} != {name}={v[name]}")
        for release in re.findall(r"^(?:FROM\s+|ARG\s+BUILDER_IMAGE=)rust:\S+-(\w+)\s", text, re.M):
            if DEBIAN_PYTHON.get(release) != v["PYTHON_VERSION"]:
                problems.append(
                    f"{rel(path)}: rust:*-{release} has python3 {DEBIAN_PYTHON.get(release)} != PYTHON_VERSION"
                )
    return problems


LABELS = {
    "org.opencontainers.image.version": "TILEFEAT_VERSION",
    "io.github.tilefeat.tch.version": "TCH_VERSION",
    "io.github.tilefeat.libtorch.version": "LIBTORCH_VERSION",
    "io.github.tilefeat.cuda.version": "CUDA_VERSION",
}


def check_defs(v: dict[str, str]) -> list[str]:
    problems = []
    image = f"{IMAGE}{v['TILEFEAT_VERSION']}-cuda{v['CUDA_VERSION']}"
    for path in DEFS:
        text = path.read_text()
        for source in re.findall(r"^From:\s*(\S+)", text, re.M):
            if source.startswith("rust:"):
                if source != f"rust:{v['RUST_VERSION']}-bookworm":
                    problems.append(f"{rel(path)}: From: {source} != rust:RUST_VERSION-bookworm")
                release = source.rsplit("-", 1)[-1]
                if DEBIAN_PYTHON.get(release) != v["PYTHON_VERSION"]:
                    problems.append(f"{rel(path)}: {source} has python3 {DEBIAN_PYTHON.get(release)} != PYTHON_VERSION")
            elif source.startswith(IMAGE) and source != image:
                problems.append(f"{rel(path)}: From: {source} != {image}")
        for label, name in LABELS.items():
            for value in re.findall(rf"^\s*{re.escape(label)}\s+(\S+)\s*$", text, re.M):
                if value != v[name]:
                    problems.append(f"{rel(path)}: label {label} {value} != {name}")
        for lib, cuda in re.findall(r"libtorch (\d[\w.]*), CUDA (\d[\w.]*)\)", text):
            if (lib, cuda) != (v["LIBTORCH_VERSION"], v["CUDA_VERSION"]):
                problems.append(f"{rel(path)}: text says libtorch {lib}, CUDA {cuda}")
    return problems


def uri_files() -> list[Path]:
    files = []
    for root in URI_ROOTS:
        if root.is_file():
            files.append(root)
        elif root.is_dir():
            for path in sorted(root.rglob("*")):
                parts = set(path.relative_to(root).parts[:-1])
                if path.is_file() and not parts & SKIP_DIRS and not path.name.startswith(".nextflow"):
                    files.append(path)
    return files


def image_uris() -> list[tuple[str, str, str]]:
    """(file, scheme, tag) for every literal image URI in the scanned files."""
    found = []
    for path in uri_files():
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        for match in URI.finditer(text):
            tag = match.group("tag")
            if re.search(r"[{}<>$]", tag):
                continue  # a template, e.g. f"{version}-cuda{cuda}" or <TILEFEAT_VERSION>
            found.append((rel(path), match.group("scheme") or "", tag))
    return found


def check_uris(v: dict[str, str], uris: list[tuple[str, str, str]] | None = None) -> list[str]:
    problems = []
    for where, scheme, tag in image_uris() if uris is None else uris:
        match = TAG.fullmatch(tag)
        if not match:
            problems.append(f"{where}: tag {tag!r} is not VERSION-cudaX.Y[-sif] or VERSION-cpu")
            continue
        if match.group("version") != v["TILEFEAT_VERSION"]:
            problems.append(f"{where}: {tag} != TILEFEAT_VERSION {v['TILEFEAT_VERSION']}")
        if match.group("cuda") and match.group("cuda") != v["CUDA_VERSION"]:
            problems.append(f"{where}: {tag} != CUDA_VERSION {v['CUDA_VERSION']}")
        if bool(match.group("sif")) != (scheme == "oras://"):
            problems.append(f"{where}: {scheme or 'no scheme'} with {tag}: SIF images are oras:// and only they")
    return problems


def check_venv_torch(v: dict[str, str]) -> list[str]:
    found = sorted(REPO.glob(".venv/lib/python3*/site-packages/torch/version.py"))
    if not found:  # nothing to compare is a failure, not agreement
        return [".venv: no torch/version.py (scripts/setup.sh installs torch there)"]
    text = found[0].read_text()
    version = re.search(r"^__version__\s*=\s*'([^']+)'", text, re.M).group(1)
    cuda = re.search(r"^cuda(?:: [^=]+)?\s*=\s*'?([^'\n]+)'?", text, re.M).group(1)
    problems = []
    if version.split("+")[0] != v["LIBTORCH_VERSION"]:
        problems.append(f".venv: torch {version} != LIBTORCH_VERSION (rerun scripts/setup.sh)")
    if cuda not in ("None", v["CUDA_VERSION"]):
        problems.append(f".venv: torch built for CUDA {cuda} != CUDA_VERSION")
    return problems


CHECKS = [check_cargo, check_setup_sh, check_requirements, check_dockerfiles, check_defs, check_uris, check_venv_torch]


# --- tests ----------------------------------------------------------------------------------


def test_versions_env_has_every_key():
    assert set(read_versions_env()) == {
        "TILEFEAT_VERSION", "TCH_VERSION", "LIBTORCH_VERSION", "TORCHVISION_VERSION",
        "CUDA_VERSION", "PYTHON_VERSION", "RUST_VERSION",
    }  # fmt: skip


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_agrees_with_versions_env(check):
    assert check(read_versions_env()) == []


def test_image_uris_found_where_expected():
    uris = image_uris()
    files = {where for where, _, _ in uris}
    # The recipes themselves always name an image; workflow files are checked as they appear.
    assert "containers/tilefeat.def" in files, files
    assert any(where.startswith("containers/Dockerfile") for where in files), files
    workflow = sorted(f for f in files if f.startswith(("nextflow/", "snakemake/")))
    print(f"image URIs checked in {len(files)} files, workflow files: {workflow}")


@pytest.mark.parametrize("key", sorted(read_versions_env()))
def test_checks_fire_on_a_changed_version(key):
    """Change one version in (a copy of) versions.env: the sources that repeat it must object."""
    versions = read_versions_env()
    changed = {**versions, key: versions[key] + "9"}
    problems = [p for check in CHECKS for p in check(changed)]
    sources = {p.split(":")[0] for p in problems}
    expected = {
        "TILEFEAT_VERSION": {
            "Cargo.toml",
            "containers/Dockerfile",
            "containers/Dockerfile.cpu",
            "containers/tilefeat.def",
        },
        "TCH_VERSION": {"Cargo.toml", "Cargo.lock", "containers/Dockerfile", "containers/Dockerfile.cpu"},
        "LIBTORCH_VERSION": {"containers/Dockerfile", "containers/Dockerfile.cpu", "containers/tilefeat.def"},
        "TORCHVISION_VERSION": {"requirements-dev.txt"},
        "CUDA_VERSION": {"containers/Dockerfile", "containers/tilefeat.def"},
        "PYTHON_VERSION": {"containers/Dockerfile", "containers/Dockerfile.cpu"},
        "RUST_VERSION": {"containers/Dockerfile", "containers/Dockerfile.cpu"},
    }[key]
    if len(DEFS) > 1 and key != "TORCHVISION_VERSION":
        expected = expected | {"containers/tilefeat-native.def"}
    assert expected <= sources, (key, sorted(sources), problems)


def test_uri_rules():
    v = read_versions_env()
    good = [("x", "", "0.1.0-cuda13.0"), ("x", "docker://", "0.1.0-cpu"), ("x", "oras://", "0.1.0-cuda13.0-sif")]
    assert check_uris(v, good) == []
    for bad in [("x", "", "0.1.1-cuda13.0"), ("x", "", "0.1.0-cuda12.8"), ("x", "", "latest"),
                ("x", "docker://", "0.1.0-cuda13.0-sif"), ("x", "oras://", "0.1.0-cuda13.0")]:  # fmt: skip
        assert check_uris(v, [bad]), bad
