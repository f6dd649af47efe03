#!/usr/bin/env bash
# Coverage-guided fuzzing (cargo-fuzz / libFuzzer) of every decoder of bytes
# a peer can send: the targets in host/fuzz/fuzz_targets (link packets,
# frames and handshake payloads; a link's receive path; session messages;
# gateway batches; network-map records).
#
# Usage: scripts/fuzz.sh [seconds-per-target] [target...]
#   seconds-per-target  libFuzzer's -max_total_time for each target (default 20)
#   target...           only these targets (default: all of them)
#
# Installs nightly (if missing) and cargo-fuzz (pinned, into
# $HOME/.cache/braid/cargo-fuzz) on first use. Corpora persist under
# $HOME/.cache/braid/fuzz-corpus/<target>, so repeated runs (CI with that
# directory cached) keep the coverage they found. Builds go to
# $HOME/.cache/braid/fuzz-target, not the workspace's target directory.
# Prints one summary line per target; exits non-zero if any target crashed,
# and prints the crashing input's path (reproduce it with
#   cargo +nightly fuzz run --fuzz-dir host/fuzz <target> <path>).
#
# Knobs (environment):
#   BRAID_FUZZ_SANITIZER  cargo-fuzz sanitizer (default none: the targets are
#                         safe Rust; "address" for ASan, about 2x slower)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

CARGO_FUZZ_VERSION=0.13.2
SECONDS_PER_TARGET="${1:-20}"
if [[ ! "$SECONDS_PER_TARGET" =~ ^[0-9]+$ ]] || [[ "$SECONDS_PER_TARGET" -eq 0 ]]; then
    echo "usage: $0 [seconds-per-target] [target...]" >&2
    exit 2
fi
shift $(( $# > 0 ? 1 : 0 ))

CACHE="$HOME/.cache/braid"
FUZZ_DIR="$ROOT/host/fuzz"
FUZZ_ROOT="$CACHE/cargo-fuzz"
CORPUS_ROOT="$CACHE/fuzz-corpus"
export CARGO_TARGET_DIR="$CACHE/fuzz-target"
export PATH="$FUZZ_ROOT/bin:$PATH"
SANITIZER="${BRAID_FUZZ_SANITIZER:-none}"
# Debug assertions on: integer overflow in a decoder is a finding.
BUILD_FLAGS=(--fuzz-dir "$FUZZ_DIR" --sanitizer "$SANITIZER" --debug-assertions)

if ! rustup toolchain list | grep -q '^nightly'; then
    echo "==> fuzz: installing the nightly toolchain" >&2
    rustup toolchain install nightly --profile minimal
fi
if [[ ! -x "$FUZZ_ROOT/bin/cargo-fuzz" ]]; then
    echo "==> fuzz: installing cargo-fuzz $CARGO_FUZZ_VERSION" >&2
    cargo +nightly install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked --root "$FUZZ_ROOT"
fi

if [[ $# -gt 0 ]]; then
    TARGETS=("$@")
else
    mapfile -t TARGETS < <(cargo +nightly fuzz list --fuzz-dir "$FUZZ_DIR")
fi

echo "==> fuzz: build ${TARGETS[*]}" >&2
build_start=$SECONDS
for target in "${TARGETS[@]}"; do
    cargo +nightly fuzz build "${BUILD_FLAGS[@]}" "$target"
done
echo "==> fuzz: built in $(( SECONDS - build_start )) s" >&2

LOGS="$(mktemp -d "${TMPDIR:-/tmp}/braid-fuzz.XXXXXX")"
summary=()
failed=0
for target in "${TARGETS[@]}"; do
    corpus="$CORPUS_ROOT/$target"
    mkdir -p "$corpus" "$FUZZ_DIR/artifacts/$target"
    log="$LOGS/$target.log"
    echo "==> fuzz: $target for ${SECONDS_PER_TARGET} s (corpus $corpus)" >&2
    set +e
    cargo +nightly fuzz run "${BUILD_FLAGS[@]}" "$target" "$corpus" -- \
        -max_total_time="$SECONDS_PER_TARGET" -timeout=10 -print_final_stats=1 \
        >"$log" 2>&1
    rc=$?
    set -e
    # libFuzzer's last status line ("#N DONE cov: .. ft: .. corp: ..") and
    # its final stats.
    runs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)"
    secs="$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "$log" | tail -n 1)"
    status="$(grep -E '^#[0-9]+' "$log" | tail -n 1 | grep -Eo 'cov: [0-9]+ ft: [0-9]+ corp: [0-9]+' || true)"
    if [[ $rc -eq 0 ]]; then
        rate="?"
        if [[ -n "$runs" && -n "$secs" && "$secs" -gt 0 ]]; then
            rate=$(( runs / secs ))
        fi
        summary+=("$target: ok, ${runs:-?} runs in ${secs:-?} s (${rate}/s), ${status:-no status}")
    else
        failed=1
        tail -n 60 "$log" >&2
        crash="$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -n 1)"
        summary+=("$target: FAILED (exit $rc) after ${runs:-?} runs; input: ${crash:-none written}; log: $log")
    fi
done

echo "==> fuzz: summary" >&2
printf '%s\n' "${summary[@]}"
if [[ $failed -ne 0 ]]; then
    echo "fuzz: a target failed; reproduce with: cargo +nightly fuzz run --fuzz-dir host/fuzz <target> <input>" >&2
    exit 1
fi
rm -rf "$LOGS"
