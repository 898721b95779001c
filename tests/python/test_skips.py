"""Skips cannot hide in CI: scripts/test.sh fails when pytest skips a test for a reason that
tests/python/allowed_skips.txt does not allow (scripts/check-skips.py on the -ra summary).

* check-skips.py, on fabricated pytest output: an allowed skip passes; a skip outside the
  allow-list, an opt-out whose variable is not set, and output whose skips the summary does
  not list (no -ra, cut short) all fail, naming the skip.
* scripts/test.sh's own pytest step, run with a stand-in for pytest: it shows pytest's output,
  fails on a disallowed skip, and still fails with pytest's exit status.
* Every pytest.skip(...) in tests/python has a reason the allow-list allows, and nothing
  skips through skipif or importorskip (those would bypass the tags).
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHECK = REPO / "scripts" / "check-skips.py"
ALLOW = REPO / "tests" / "python" / "allowed_skips.txt"

PASSED = ".....s...                                                                [100%]\n"
HEADER = "=========================== short test summary info ============================\n"


def pytest_output(*skips: tuple[int, str], final: str | None = None) -> str:
    """What `pytest -q -ra` prints for 7 passed tests and these (count, reason) skips."""
    lines = [f"SKIPPED [{n}] tests/python/test_x.py:{10 + i}: {reason}\n" for i, (n, reason) in enumerate(skips)]
    skipped = sum(n for n, _ in skips)
    if final is None:
        final = f"7 passed, {skipped} skipped in 3.21s" if skipped else "7 passed in 3.21s"
    return PASSED + (HEADER + "".join(lines) if lines else "") + final + "\n"


def check_skips(tmp_path, output: str, env: dict[str, str] | None = None, allow: Path = ALLOW):
    log = tmp_path / "pytest.log"
    log.write_text(output)
    base = {k: v for k, v in os.environ.items() if not k.startswith("TILEFEAT_TEST_")}
    return subprocess.run(
        [sys.executable, str(CHECK), "--allow", str(allow), str(log)],
        capture_output=True, text=True, timeout=60, env={**base, **(env or {})},
    )  # fmt: skip


def test_no_skips_pass(tmp_path):
    result = check_skips(tmp_path, pytest_output())
    assert result.returncode == 0, result.stderr


def test_allowed_skips_pass(tmp_path):
    output = pytest_output(
        (1, "opt-out: TILEFEAT_TEST_SLURM=0 (the Slurm run is not tested)"),
        (2, "opt-out: TILEFEAT_TEST_STAGE=0 (stage-runtime.sh is not tested)"),
        (1, "gpu: needs a CUDA device"),
    )
    result = check_skips(tmp_path, output, env={"TILEFEAT_TEST_SLURM": "0", "TILEFEAT_TEST_STAGE": "0"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("check-skips: allowed by allowed_skips.txt: SKIPPED") == 3, result.stdout


@pytest.mark.parametrize(
    "reason",
    [
        "no torch in .venv (scripts/setup.sh installs it)",
        "tilefeat binary not built: target/release/tilefeat does not exist",
        "no Slurm cluster up and not root: run scripts/slurm/start.sh as root",
        "needs root and unshare to hide the venv",
        "demo/tiles/ not in this checkout yet",
        "TILEFEAT_TEST_SLURM=0",  # an opt-out without its tag
        "could not import 'torch': No module named 'torch'",  # importorskip
        "gpu:",  # a tag with no reason
    ],
)
def test_disallowed_skip_fails_and_is_named(tmp_path, reason):
    output = pytest_output((1, "opt-out: TILEFEAT_TEST_SLURM=0 (allowed)"), (2, reason))
    result = check_skips(tmp_path, output, env={"TILEFEAT_TEST_SLURM": "0"})
    assert result.returncode == 1, result.stdout + result.stderr
    assert "check-skips: FAILED" in result.stderr, result.stderr
    assert f"not allowed: SKIPPED [2] tests/python/test_x.py:11: {reason}" in result.stderr, result.stderr
    assert "test_x.py:10" not in result.stderr, "the allowed skip was reported too"


def test_opt_out_counts_only_when_its_variable_is_set(tmp_path):
    output = pytest_output((1, "opt-out: TILEFEAT_TEST_STAGE=0 (stage-runtime.sh is not tested)"))
    for env in ({}, {"TILEFEAT_TEST_STAGE": "1"}):
        result = check_skips(tmp_path, output, env=env)
        assert result.returncode == 1, (env, result.stderr)
        assert "claims an opt-out but TILEFEAT_TEST_STAGE is not '0' here" in result.stderr, result.stderr
    assert check_skips(tmp_path, output, env={"TILEFEAT_TEST_STAGE": "0"}).returncode == 0


def test_skips_the_summary_does_not_list_fail(tmp_path):
    # pytest without -ra: the final line counts a skip no SKIPPED line explains
    result = check_skips(tmp_path, PASSED + "7 passed, 1 skipped in 3.21s\n")
    assert result.returncode == 1 and "pytest reports 1 skipped but its summary lists 0" in result.stderr
    # output cut short before pytest's final line
    result = check_skips(tmp_path, PASSED + HEADER + "SKIPPED [1] tests/python/test_x.py:3: gpu: x\n")
    assert result.returncode == 1 and "no pytest final line" in result.stderr, result.stderr
    # a non-quiet run, in colour: still read
    colour = pytest_output((1, "no torch in .venv"), final="===== 7 passed, 1 skipped in 3.21s =====")
    colour = colour.replace("SKIPPED [1]", "\x1b[33mSKIPPED\x1b[0m [1]")
    result = check_skips(tmp_path, colour)
    assert result.returncode == 1 and "not allowed: SKIPPED [1] tests/python/test_x.py:10: no torch" in result.stderr


def test_bad_allow_list_is_a_usage_error(tmp_path):
    allow = tmp_path / "allow.txt"
    allow.write_text("# comment\n^opt-out: (\n")
    result = check_skips(tmp_path, pytest_output(), allow=allow)
    assert result.returncode == 2 and "bad regex" in result.stderr, result.stderr


def test_allow_list_entries_are_explained_and_tagged():
    lines = ALLOW.read_text().splitlines()
    entries = [(i, line) for i, line in enumerate(lines) if line.strip() and not line.startswith("#")]
    assert entries, "the allow-list is empty"
    for i, line in entries:
        assert i > 0 and lines[i - 1].startswith("#"), f"allowed_skips.txt: {line!r} has no comment saying why"
        assert re.match(r"\^(opt-out: TILEFEAT_TEST_\w+=0\\b|gpu:\\s)$", line), f"untagged entry {line!r}"


# --- scripts/test.sh's pytest step ------------------------------------------------------------


def pytest_step() -> str:
    """The lines of scripts/test.sh from its `==> pytest` step on."""
    text = (REPO / "scripts" / "test.sh").read_text()
    marker = 'echo "==> pytest"\n'
    assert marker in text, "scripts/test.sh has no pytest step"
    step = text[text.index(marker) :]
    assert ".venv/bin/python -m pytest tests/python -q -ra" in step, step
    assert "scripts/check-skips.py --allow tests/python/allowed_skips.txt" in step, step
    return step


@pytest.fixture
def fake_repo(tmp_path):
    """A folder where test.sh's pytest step runs with .venv/bin/python standing in for pytest
    (it prints $FAKE_OUTPUT and exits $FAKE_STATUS) and the real check-skips.py."""
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "check-skips.py").symlink_to(CHECK)
    (tmp_path / "tests" / "python").mkdir(parents=True)
    (tmp_path / "tests" / "python" / "allowed_skips.txt").symlink_to(ALLOW)
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    python = tmp_path / ".venv" / "bin" / "python"
    python.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = -m ] && [ "$2" = pytest ]; then cat "$FAKE_OUTPUT"; exit "$FAKE_STATUS"; fi\n'
        f'exec "{sys.executable}" "$@"\n'
    )
    python.chmod(0o755)
    # scripts/test-containers.sh stands in as: echo, exit $FAKE_CONTAINERS_STATUS.
    containers = tmp_path / "scripts" / "test-containers.sh"
    containers.write_text('#!/bin/sh\necho "containers ran"\nexit "$FAKE_CONTAINERS_STATUS"\n')
    containers.chmod(0o755)
    (tmp_path / "step.sh").write_text("set -euo pipefail\n" + pytest_step())
    return tmp_path


def run_step(
    fake_repo, output: str, status: int, containers: int = 0, **env_extra: str
) -> subprocess.CompletedProcess:
    (fake_repo / "fake-output.txt").write_text(output)
    ours = ("TILEFEAT_TEST_", "TILEFEAT_SKIP_", "TILEFEAT_REQUIRE_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(ours)}
    env.update(FAKE_OUTPUT=str(fake_repo / "fake-output.txt"), FAKE_STATUS=str(status),
               FAKE_CONTAINERS_STATUS=str(containers), **env_extra)  # fmt: skip
    return subprocess.run(
        ["bash", "step.sh"], cwd=fake_repo, env=env, capture_output=True, text=True, timeout=60
    )


def test_test_sh_fails_on_a_disallowed_skip(fake_repo):
    output = pytest_output((1, "no torch in .venv (scripts/setup.sh installs it)"))
    result = run_step(fake_repo, output, 0)
    assert result.returncode == 1, result.stdout + result.stderr
    assert output in result.stdout, "pytest's output must still be shown"
    assert "not allowed: SKIPPED [1] tests/python/test_x.py:10: no torch in .venv" in result.stderr


def test_test_sh_passes_allowed_and_keeps_pytest_status(fake_repo):
    assert run_step(fake_repo, pytest_output(), 0).returncode == 0
    assert run_step(fake_repo, pytest_output((1, "gpu: needs CUDA")), 0).returncode == 0
    failed = pytest_output(final="1 failed, 6 passed in 3.21s")
    result = run_step(fake_repo, failed, 1)
    assert result.returncode == 1 and failed in result.stdout, result.stdout + result.stderr
    # pytest's status wins over the skip check's
    result = run_step(fake_repo, pytest_output((1, "no torch in .venv"), final="1 skipped in 1s"), 3)
    assert result.returncode == 3 and "not allowed" in result.stderr, result.stdout + result.stderr


def test_test_sh_runs_the_container_test_and_keeps_its_status(fake_repo):
    ok = pytest_output()
    result = run_step(fake_repo, ok, 0)
    assert result.returncode == 0 and "containers ran" in result.stdout, result.stdout + result.stderr
    result = run_step(fake_repo, ok, 0, containers=1)
    assert result.returncode == 1, result.stdout + result.stderr
    # 77: this machine cannot build images; said, not a failure
    result = run_step(fake_repo, ok, 0, containers=77)
    assert result.returncode == 0 and "SKIPPED: container images not built" in result.stdout, result.stdout
    # run even when pytest failed, whose status wins
    result = run_step(fake_repo, pytest_output(final="1 failed, 6 passed in 3.21s"), 1, containers=1)
    assert result.returncode == 1 and "containers ran" in result.stdout, result.stdout + result.stderr
    # skipped on purpose, loudly
    result = run_step(fake_repo, ok, 0, containers=1, TILEFEAT_SKIP_CONTAINERS="1")
    assert result.returncode == 0 and "containers ran" not in result.stdout, result.stdout
    assert "SKIPPED: container images not built or run (TILEFEAT_SKIP_CONTAINERS is set)" in result.stdout


def test_test_sh_runs_every_step_when_an_early_one_fails(fake_repo):
    """Regression: `cargo test` stopped at the first failing test binary and a failing step
    stopped the script, so on an AMX CPU (one precision bound off) pytest and the container
    checks never ran. Here `cargo fmt` and `cargo test` fail; every later step still runs, and
    the script exits with the first failure's status, naming each."""
    (fake_repo / "scripts" / "test.sh").write_text((REPO / "scripts" / "test.sh").read_text())
    (fake_repo / "scripts" / "setup.sh").write_text("#!/bin/sh\nexit 0\n")
    (fake_repo / "scripts" / "setup.sh").chmod(0o755)
    log = fake_repo / "cargo.log"
    cargo = fake_repo / ".venv" / "bin" / "cargo"
    cargo.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> "{log}"\n'
        'case "$1" in fmt) exit 3 ;; test) exit 101 ;; esac\n'
        "exit 0\n"
    )
    cargo.chmod(0o755)
    (fake_repo / "fake-output.txt").write_text(pytest_output())
    ours = ("TILEFEAT_TEST_", "TILEFEAT_SKIP_", "TILEFEAT_REQUIRE_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(ours)}
    env.update(FAKE_OUTPUT=str(fake_repo / "fake-output.txt"), FAKE_STATUS="0", FAKE_CONTAINERS_STATUS="0")
    result = subprocess.run(["bash", "scripts/test.sh"], cwd=fake_repo, env=env, capture_output=True, text=True, timeout=60)
    calls = log.read_text().splitlines()
    assert [c.split()[0] for c in calls] == ["fmt", "clippy", "test"], calls
    assert "--no-fail-fast" in calls[2].split(), calls[2]
    assert "containers ran" in result.stdout, result.stdout
    assert result.returncode == 3, result.stdout + result.stderr
    assert "cargo fmt --check (exit 3)" in result.stderr and "cargo test (exit 101)" in result.stderr, result.stderr


# --- the skips in the tests themselves --------------------------------------------------------


def skip_calls() -> list[tuple[str, int, str, str | None]]:
    """(file, line, kind, leading literal text of the reason) for every skip in tests/python."""
    found = []
    for path in sorted((REPO / "tests" / "python").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            if name.endswith(("pytest.skip", "pytest.importorskip", "mark.skipif", "mark.skip")):
                reason = None
                args = list(node.args[:1]) + [k.value for k in node.keywords if k.arg in ("reason", "msg")]
                for arg in args:
                    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                        reason = arg.value
                    elif isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
                        reason = arg.values[0].value
                found.append((path.name, node.lineno, name.rsplit(".", 1)[-1], reason))
    return found


def test_every_skip_in_the_tests_is_allowed():
    patterns = [re.compile(line) for line in ALLOW.read_text().splitlines() if line.strip() and not line.startswith("#")]
    calls = skip_calls()
    assert any(kind == "skip" for _, _, kind, _ in calls), "no pytest.skip found: is the scan broken?"
    for where, line, kind, reason in calls:
        assert kind == "skip", f"{where}:{line}: {kind}: use pytest.skip('<allowed tag>: ...') or pytest.fail"
        assert reason is not None, f"{where}:{line}: the reason must start with literal text (a tag)"
        assert any(p.match(reason) for p in patterns), f"{where}:{line}: skip reason {reason!r} is not in allowed_skips.txt"
