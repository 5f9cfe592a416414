#!/usr/bin/env bash
# Builds fluxd, runs the Rust workspace tests (unit, proptest, loopback suites in cli/tests), then
# the Python loopback suite (tests/python) against the freshly built binary.
#
# BROKER=mosquitto runs both loopback suites against Mosquitto instead (to debug the tests).
# CARGO_TARGET_DIR is honoured; FLUXD_BIN defaults to the binary this script builds.
set -euo pipefail
cd "$(dirname "$0")"

target_dir="${CARGO_TARGET_DIR:-target}"

echo "== cargo build --bin fluxd"
cargo build --bin fluxd

echo "== cargo test --workspace"
cargo test --workspace

echo "== python suite"
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r tests/python/requirements.txt
export FLUXD_BIN="${FLUXD_BIN:-$(cd "$target_dir" && pwd)/debug/fluxd}"
.venv/bin/python -m pytest -q tests/python
