#!/usr/bin/env bash
# Property-based fuzzing of the REST API with schemathesis, against the
# OpenAPI document a real node serves (/api/v1/openapi.json).
#
# Installs schemathesis (pinned) into a venv under $HOME/.cache/braid on
# first use, builds `braid` and the ping package, starts a node on a
# temporary data directory with one package, two vnodes and one flow so
# that paths hit real data, then checks every operation for
#   - no 5xx answer (not_a_server_error), and
#   - answers that match the document (response_schema_conformance),
# with a bounded budget. Exits non-zero on any finding; the node's log and
# schemathesis's JUnit report are kept in the printed directory then.
#
# Knobs (environment):
#   BRAID_FUZZ_MAX_EXAMPLES  examples per operation and phase (default 25)
#   BRAID_FUZZ_MAX_TIME      time budget of the schemathesis run in s (default 180)
#   BRAID_FUZZ_SEED          seed, for reproducing a run (default: fixed)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

SCHEMATHESIS_VERSION=4.32.5
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/braid/target}"
WASM_TARGET_DIR="${BRAID_WASM_TARGET_DIR:-$HOME/.cache/braid/wasm-target}"
VENV="$HOME/.cache/braid/schemathesis-$SCHEMATHESIS_VERSION"
MAX_EXAMPLES="${BRAID_FUZZ_MAX_EXAMPLES:-25}"
MAX_TIME="${BRAID_FUZZ_MAX_TIME:-180}"
SEED="${BRAID_FUZZ_SEED:-20261125}"
PASSWORD="fuzz-admin-password-0123"

echo "==> fuzz: schemathesis $SCHEMATHESIS_VERSION" >&2
if ! "$VENV/bin/st" --version 2>/dev/null | grep -qF "$SCHEMATHESIS_VERSION"; then
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check \
        "schemathesis==$SCHEMATHESIS_VERSION"
fi

echo "==> fuzz: build braid and the ping package" >&2
bash scripts/ensure-wasm-target.sh
cargo build -p braid-cli
BRAID="$CARGO_TARGET_DIR/debug/braid"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/braid-fuzz.XXXXXX")"
DATA="$WORK/node"
CARGO_TARGET_DIR="$WASM_TARGET_DIR" "$BRAID" package build examples-flows/ping -o "$WORK/ping.wasm"

NODE_PID=""
finish() {
    local rc=$?
    if [[ -n "$NODE_PID" ]]; then
        kill "$NODE_PID" 2>/dev/null || true
        wait "$NODE_PID" 2>/dev/null || true
    fi
    if [[ $rc -eq 0 ]]; then
        rm -rf "$WORK"
    else
        echo "fuzz: failed (exit $rc); node log, report and data kept in $WORK" >&2
    fi
    exit $rc
}
trap finish EXIT

echo "==> fuzz: start a node in $DATA" >&2
mkdir -p "$DATA"
# Only the settings given here: no BRAID_* from the caller's environment.
env $(env | sed -n 's/^\(BRAID_[A-Za-z0-9_]*\)=.*/-u \1/p') \
    BRAID_ADMIN_PASSWORD="$PASSWORD" \
    "$BRAID" node start --data-dir "$DATA" --rest-addr 127.0.0.1:0 \
    >"$WORK/node.log" 2>&1 </dev/null &
NODE_PID=$!
for _ in $(seq 600); do
    [[ -s "$DATA/rest.url" ]] && break
    kill -0 "$NODE_PID" 2>/dev/null || { echo "fuzz: the node exited:" >&2; tail -30 "$WORK/node.log" >&2; exit 1; }
    sleep 0.1
done
URL="$(cat "$DATA/rest.url")"
CA="$DATA/tls/ca.pem"
api() { # METHOD PATH [curl args...]
    local method=$1 path=$2
    shift 2
    curl -sS --fail-with-body --retry 20 --retry-connrefused --retry-delay 0 \
        --cacert "$CA" -u "admin:$PASSWORD" -X "$method" "$URL$path" "$@"
}
json_field() { python3 -c "import json,sys; print(json.load(sys.stdin)[sys.argv[1]])" "$1"; }

CHECKSUM="$(api POST /api/v1/package -H 'content-type: application/octet-stream' \
    --data-binary "@$WORK/ping.wasm" | json_field checksum)"
vnode() {
    api POST /api/v1/virtualnode -H 'content-type: application/json' \
        -d "{\"x500Name\": \"$1\", \"packageChecksum\": \"$CHECKSUM\"}" | json_field holdingId
}
ALICE="$(vnode 'O=Alice, L=London, C=GB')"
vnode 'O=Bob, L=New York, C=US' >/dev/null
api POST "/api/v1/flow/$ALICE" -H 'content-type: application/json' \
    -d '{"clientRequestId": "fuzz-1", "flowName": "ping", "requestBody": {"counterparty": "O=Bob, L=New York, C=US", "n": 1, "delayMs": 0}}' \
    >/dev/null
echo "fuzz: node at $URL, package $CHECKSUM, vnode $ALICE" >&2

# Paths name the real vnode and package (other path parameters are
# generated); the vnode's event stream never ends, so it is left out. No
# stateful phase: following links from GET /api/v1/user it would change
# admin's password or take its roles, and every later request would be
# refused.
cat >"$WORK/schemathesis.toml" <<EOF
[parameters]
"path.holding" = "$ALICE"
"path.checksum" = "$CHECKSUM"
EOF

echo "==> fuzz: schemathesis (max $MAX_EXAMPLES examples per operation, ${MAX_TIME}s, seed $SEED)" >&2
"$VENV/bin/st" --config-file "$WORK/schemathesis.toml" --no-color run "$URL/api/v1/openapi.json" \
    --auth "admin:$PASSWORD" \
    --tls-verify "$CA" \
    --checks not_a_server_error,response_schema_conformance \
    --exclude-operation-id vnode_events \
    --max-examples "$MAX_EXAMPLES" \
    --phases examples,coverage,fuzzing \
    --max-time "$MAX_TIME" \
    --request-timeout 20 \
    --seed "$SEED" \
    --report junit --report-dir "$WORK/report"

# The node must have survived the run.
kill -0 "$NODE_PID" 2>/dev/null || { echo "fuzz: the node died during the run" >&2; exit 1; }
api GET /api/v1/health >/dev/null
echo "fuzz: no findings" >&2
