#!/usr/bin/env python3
"""Fail when pytest skipped a test for a reason the allow-list does not name.

    scripts/check-skips.py [--allow FILE] PYTEST_OUTPUT

PYTEST_OUTPUT is what `pytest -ra` (or -rs) printed; scripts/test.sh tees it to a file.
Every "SKIPPED [N] file:line: reason" line of its "short test summary info" must match one
regex of the allow-list (default tests/python/allowed_skips.txt: one Python regex a line,
matched at the start of the reason; blank lines and # comments ignored). A reason
"opt-out: VAR=VALUE ..." is only allowed when VAR really is VALUE in this environment.

The skip count of pytest's final line ("... 2 skipped in 9.1s") must equal the sum of the
SKIPPED lines, so output without -ra, or cut short, fails too rather than passing unread.

Exit status: 0 all skips allowed; 1 a skip is not allowed, or the output cannot be checked;
2 usage error (missing file, bad regex).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

DEFAULT_ALLOW = Path(__file__).resolve().parents[1] / "tests" / "python" / "allowed_skips.txt"
ANSI = re.compile(r"\x1b\[[0-9;]*m")
SUMMARY_HEADER = re.compile(r"^=+ short test summary info =+$")
SKIPPED = re.compile(r"^SKIPPED \[(?P<count>\d+)\] (?P<where>\S+?): (?P<reason>.*)$")
FINAL = re.compile(r"^=*\s*(?P<counts>(?:\d+ \w+(?:, )?)+) in [\d.]+s\b")
OPT_OUT = re.compile(r"^opt-out: (?P<var>[A-Za-z_]\w*)=(?P<value>\S+)")


def read_allow_list(path: Path) -> list[re.Pattern]:
    patterns = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        try:
            patterns.append(re.compile(text))
        except re.error as err:
            raise SystemExit(f"check-skips: {path}:{number}: bad regex {text!r}: {err}") from None
    return patterns


def check(output: str, allow: list[re.Pattern], env: dict[str, str]) -> tuple[list[str], list[str]]:
    """(allowed SKIPPED lines, problems) for one pytest output."""
    lines = [ANSI.sub("", line).rstrip() for line in output.splitlines()]
    headers = [i for i, line in enumerate(lines) if SUMMARY_HEADER.match(line)]
    summary = lines[headers[-1] + 1 :] if headers else []
    allowed, problems, listed = [], [], 0
    for line in summary:
        match = SKIPPED.match(line)
        if not match:
            continue
        listed += int(match.group("count"))
        reason = match.group("reason")
        if not any(pattern.match(reason) for pattern in allow):
            problems.append(f"not allowed: {line}")
            continue
        opt_out = OPT_OUT.match(reason)
        if opt_out and env.get(opt_out.group("var")) != opt_out.group("value"):
            problems.append(
                f"claims an opt-out but {opt_out.group('var')} is not {opt_out.group('value')!r} here: {line}"
            )
            continue
        allowed.append(line)
    finals = [m for m in map(FINAL.match, lines) if m]
    if not finals:
        problems.append("no pytest final line ('N passed, M skipped in Xs'): output cut short?")
    else:
        counts = dict((word, int(n)) for n, word in re.findall(r"(\d+) (\w+)", finals[-1].group("counts")))
        skipped = counts.get("skipped", 0)
        if skipped != listed:
            problems.append(
                f"pytest reports {skipped} skipped but its summary lists {listed}: run pytest with -ra"
            )
    return allowed, problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", type=Path, help="a file holding what `pytest -ra` printed")
    parser.add_argument("--allow", type=Path, default=DEFAULT_ALLOW, help="allow-list of skip reasons")
    args = parser.parse_args(argv)
    try:
        allow = read_allow_list(args.allow)
        output = args.output.read_text(errors="replace")
    except OSError as err:
        print(f"check-skips: {err}", file=sys.stderr)
        return 2
    except SystemExit as err:
        print(err, file=sys.stderr)
        return 2
    allowed, problems = check(output, allow, dict(os.environ))
    for line in allowed:
        print(f"check-skips: allowed by {args.allow.name}: {line}")
    if problems:
        print(f"check-skips: FAILED (allow-list {args.allow}):", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        print(
            "check-skips: a condition CI must meet is a test failure, not a skip; an optional "
            "check skips with a reason the allow-list names (an opt-out variable, a GPU)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
