#!/usr/bin/env bash
# Runs every check CI runs: formatting, clippy (host and flow packages), the
# build of the `braid` binary, then every test of the workspace, including
# the end-to-end suite in tests/ that starts real `braid` nodes, and last a
# bounded schemathesis run against a node's OpenAPI document
# (scripts/fuzz-api.sh) and a bounded cargo-fuzz run of every decoder of
# bytes a peer can send (scripts/fuzz.sh).
#
# Extra arguments go to `cargo test`, e.g.
#   scripts/test.sh -p braid-e2e -- --nocapture
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Outside the repo so that clean checkouts and CI share a build cache.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/braid/target}"
# The wasm builds (clippy here, `braid package build` in the e2e tests) use
# their own target dir: the e2e tests build packages while `cargo test` may
# still hold the lock on the host's target dir.
export BRAID_WASM_TARGET_DIR="${BRAID_WASM_TARGET_DIR:-$HOME/.cache/braid/wasm-target}"

bash scripts/ensure-wasm-target.sh
bash scripts/ensure-build-deps.sh
# The Kafka-API broker the cluster-mode tests start (built once per machine,
# ~8 min cold): built in the background while the checks and the build below
# run, and waited for before the tests, so that no test waits on it under a
# timeout.
TANSU_LOG="$(mktemp "${TMPDIR:-/tmp}/braid-tansu.XXXXXX")"
bash scripts/ensure-tansu.sh >"$TANSU_LOG" 2>&1 &
TANSU_PID=$!

echo "==> host: fmt and clippy" >&2
cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings

echo "==> sdk: fmt and clippy" >&2
(cd sdk && cargo fmt --check && CARGO_TARGET_DIR="$BRAID_WASM_TARGET_DIR" \
    cargo clippy --all-targets --target wasm32-wasip2 -- -D warnings)
(cd sdk/macros && cargo fmt --check && CARGO_TARGET_DIR="$BRAID_WASM_TARGET_DIR" \
    cargo clippy --all-targets -- -D warnings)

if [[ -f examples-flows/Cargo.toml ]]; then
    echo "==> examples-flows (and sdk): fmt and clippy" >&2
    (
        cd examples-flows
        cargo fmt --all --check
        CARGO_TARGET_DIR="$BRAID_WASM_TARGET_DIR" \
            cargo clippy --workspace --all-targets --target wasm32-wasip2 -- -D warnings
    )
fi

echo "==> build braid" >&2
cargo build -p braid-cli

echo "==> the broker for the tests (scripts/ensure-tansu.sh)" >&2
if ! wait "$TANSU_PID"; then
    cat "$TANSU_LOG" >&2
    echo "test.sh: building the Kafka-API broker failed (log above)" >&2
    exit 1
fi
rm -f "$TANSU_LOG"

echo "==> tests" >&2
TEST_LOG="$(mktemp "${TMPDIR:-/tmp}/braid-test.XXXXXX")"
trap 'rm -f "$TEST_LOG"' EXIT
cargo test --workspace "$@" 2>&1 | tee "$TEST_LOG"

echo "==> REST API fuzz (schemathesis, ~3 min)" >&2
bash scripts/fuzz-api.sh

echo "==> peer-input fuzz (cargo fuzz, 15 s per target)" >&2
(cd host/fuzz && cargo fmt --check)
bash scripts/fuzz.sh 15

# One closing line with the totals of every cargo test binary above, so the
# run's last line says how many tests ran (the fuzz run prints its own).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed;/) p += $i; if ($(i+1) ~ /^failed;/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$TEST_LOG"
