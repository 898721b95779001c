#!/usr/bin/env bash
# The whole test suite (the README's test command; CI's .ci/run calls it):
# setup (idempotent), format and lint checks, Rust unit + black-box tests, Python tests
# (parity with the OpenCV + torchvision tutorial pipeline, workflows, containers, versions).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --no-demo
export LIBTORCH_USE_PYTORCH=1
export PATH="$PWD/.venv/bin:$PATH"
echo "==> cargo fmt --check"
cargo fmt --check
echo "==> cargo clippy"
cargo clippy --release --locked --all-targets -- -D warnings
echo "==> cargo test"
cargo test --release --locked
echo "==> pytest"
.venv/bin/python -m pytest tests/python -q -ra
