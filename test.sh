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

echo "== stress smoke (flux-stress against fluxd, bounded)"
cargo build -p flux-stress
stress_bin="$(cd "$target_dir" && pwd)/debug/flux-stress"
timeout 60 "$stress_bin" run --spawn fluxd --fluxd-bin "$FLUXD_BIN" --qos 1 --rate 1000 --duration-secs 2 \
    --warmup-secs 0.5 --fail-on-loss --quiet --json /dev/null
timeout 60 "$stress_bin" run --spawn fluxd --fluxd-bin "$FLUXD_BIN" --scenario fanout --subscribers 10 --max \
    --messages 20000 --duration-secs 2 --warmup-secs 0 --quiet --json /dev/null
timeout 60 "$stress_bin" idle --spawn fluxd --fluxd-bin "$FLUXD_BIN" --connections 500 --quiet --json /dev/null
