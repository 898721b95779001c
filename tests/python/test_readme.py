"""The README's command blocks, read from README.md itself (so the file cannot drift from what
is tested): every ```sh block is either run here as written or named below as what it is (a
synopsis with placeholders), and a new block fails until it is one or the other (issue 28: the
README's "on your own slides" command exited 6 as written).

What is run changes nothing in the commands but what cannot exist here: `/shared/` becomes a
folder of the test's own, the network is a site mirror (`TILEFEAT_WEIGHTS_URL=file://...`,
which `tilefeat weights fetch --help` documents), and `slides/`, `tiles/` hold a test slide
and the demo tiles."""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import h5py
import pandas as pd

from conftest import ROOT, tilefeat_bin
from make_slides import write_tissue_svs

README = ROOT / "README.md"

# Blocks that are not commands to run as written, by their first line: what each is.
SYNOPSES = {
    "tilefeat join a.csv b.h5 c.parquet ... --output cohort.csv|cohort.parquet":
        "join synopsis (a.csv ..., alternatives with |)",
}


def sh_blocks() -> list[tuple[int, list[str]]]:
    """(line number, command lines) of every ```sh block, continuation lines joined."""
    blocks, current, start = [], None, 0
    for n, line in enumerate(README.read_text().splitlines(), 1):
        if current is None:
            if re.fullmatch(r"```(sh|bash|console)\s*", line):
                current, start = [], n + 1
        elif line.startswith("```"):
            blocks.append((start, current))
            current = None
        else:
            current.append(line)
    return blocks


def commands(lines: list[str]) -> list[str]:
    out, pending = [], ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append((pending + line).strip())
        pending = ""
    return [c for c in out if c and not c.startswith("#")]


def block_starting(first: str) -> list[str]:
    found = [lines for _, lines in sh_blocks() if lines and lines[0].startswith(first)]
    assert len(found) == 1, f"README.md: {len(found)} ```sh blocks start with {first!r}"
    return commands(found[0])


def test_every_sh_block_is_run_or_named():
    blocks = sh_blocks()
    assert len(blocks) >= 3, blocks
    run_here = ("scripts/setup.sh", "tilefeat weights fetch", "tilefeat cache stats")
    for line, lines in blocks:
        first = lines[0] if lines else ""
        assert first.startswith(run_here + tuple(SYNOPSES)), (
            f"README.md line {line}: a ```sh block this test neither runs nor names: {first!r}")
    for first in SYNOPSES:
        assert any(lines and lines[0].startswith(first) for _, lines in blocks), f"gone from the README: {first!r}"


def test_the_quick_start_is_the_two_scripts_ci_runs():
    cmds = block_starting("scripts/setup.sh")
    assert [c.split()[0] for c in cmds] == ["scripts/setup.sh", "scripts/test.sh"], cmds
    for c in cmds:
        script = ROOT / c.split()[0]
        assert script.is_file() and os.access(script, os.X_OK), script
    # What CI runs is the README's test command.
    assert "exec scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
    # The first, as written (test.sh ran it with --no-demo): it ends with the demo, which
    # writes what the README says, with random weights where the torch cache has none.
    env = {**os.environ, "TORCH_HOME": "/nonexistent/torch-home"}
    for k in ("TILEFEAT_WEIGHTS", "TILEFEAT_CACHE_DIR", "TILEFEAT_DEFAULT_CACHE"):
        env.pop(k, None)
    r = subprocess.run(["bash", "-c", cmds[0]], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=1800)
    assert r.returncode == 0, f"{cmds[0]!r} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert "writes `demo/out/demo.csv` (+ `.provenance.yaml`, `.rejected.tsv`)" in README.read_text()
    out = ROOT / "demo" / "out"
    tiles = [p for p in (ROOT / "demo" / "tiles" / "sampleA").iterdir() if p.is_file()]
    assert len(pd.read_csv(out / "demo.csv", index_col=0)) == len(tiles)
    assert (out / "demo.provenance.yaml").is_file() and (out / "demo.rejected.tsv").is_file()
    assert "RANDOM" in r.stdout + r.stderr


def test_on_your_own_slides_runs_as_written(tmp_path, weights):
    """The block after "Then, on your own slides": fetch the weights (from a mirror), a slide
    folder to HDF5, a tile folder to CSV (its --output folder made), join the HDF5 files."""
    cmds = block_starting("tilefeat weights fetch")
    work = tmp_path / "project"
    (work / "slides").mkdir(parents=True)
    write_tissue_svs(work / "slides" / "TCGA-XX-5678.svs")
    shutil.copytree(ROOT / "demo" / "tiles" / "sampleA", work / "tiles" / "TCGA-XX-1234")
    shared = tmp_path / "shared"
    mirror = weights["zip"]
    env = {
        **os.environ,
        "PATH": f"{tilefeat_bin().parent}:{os.environ['PATH']}",
        "TORCH_HOME": str(tmp_path / "torch"),
        "TILEFEAT_WEIGHTS_URL": mirror.resolve().as_uri(),
        "TILEFEAT_WEIGHTS_SHA256": hashlib.sha256(mirror.read_bytes()).hexdigest(),
    }
    for k in ("TILEFEAT_WEIGHTS", "TILEFEAT_CACHE_DIR", "TILEFEAT_DEFAULT_CACHE"):
        env.pop(k, None)
    for c in cmds:
        assert c.startswith("tilefeat "), c
        ran = c.replace("/shared/", f"{shared}/")
        r = subprocess.run(["bash", "-c", ran], cwd=work, env=env, capture_output=True, text=True,
                           timeout=900)
        assert r.returncode == 0, f"README command {c!r} exited {r.returncode}:\n{r.stderr}"
    assert (tmp_path / "torch" / "hub" / "checkpoints" / "resnet50-0676ba61.pth").is_file()
    h5 = work / "features" / "TCGA-XX-5678.h5"
    with h5py.File(h5, "r") as f:
        n_slide = f["features"].shape[0]
        assert f["features"].shape[1] == 2048 and f["coords"].shape == (n_slide, 2)
    assert n_slide > 0
    csv = pd.read_csv(work / "features" / "TCGA-XX-1234.csv", index_col=0)
    assert csv.shape == (len(list((work / "tiles" / "TCGA-XX-1234").iterdir())), 2048)
    cohort = pd.read_csv(work / "cohort.csv")
    assert len(cohort) == n_slide, cohort.shape
    cache = shared / "tilefeat-cache"
    assert (cache / "packs").is_dir()
    # The cache block, on that cache: DIR is it, optional [...] parts left out.
    for c in block_starting("tilefeat cache stats"):
        ran = re.sub(r"\s*\[[^\]]*\](\.\.\.)?", "", c.split("#")[0]).replace("DIR", str(cache))
        r = subprocess.run(["bash", "-c", ran], cwd=work, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"README command {c!r} ({ran!r}) exited {r.returncode}:\n{r.stderr}"
    # Both the slide's and the tile folder's vectors are still there after gc.
    stats = subprocess.run([tilefeat_bin(), "cache", "stats", "--cache-dir", cache], env=env,
                           capture_output=True, text=True, check=True).stdout
    assert f"\nentries: {n_slide + len(csv)} (" in stats, stats
