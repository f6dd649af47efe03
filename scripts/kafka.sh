#!/usr/bin/env bash
# A real Kafka-API broker (tansu, scripts/ensure-tansu.sh) on loopback for a
# braid cluster on one machine. Idempotent.
#
#   scripts/kafka.sh up     start it (building tansu once per machine);
#                           prints its kafka:// address on stdout
#   scripts/kafka.sh url    prints the address of the running broker
#   scripts/kafka.sh down   stops it (its records stay for the next `up`)
#
# It listens on 127.0.0.1 only, on a free port chosen at the first start and
# reused after, and stores its records in an SQLite file under
# ${BRAID_KAFKA_DIR:-${BRAID_CACHE:-$HOME/.cache/braid}/kafka}, so they
# survive a restart. The tests start their own brokers (braid-testkit).
# Production runs Apache Kafka or Redpanda instead (docs/architecture.md).
set -euo pipefail

die() {
    echo "kafka.sh: $*" >&2
    exit 1
}

cmd="${1:-}"
case "$cmd" in
up | down | url) ;;
*) die "usage: $0 up|down|url" ;;
esac

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
dir="${BRAID_KAFKA_DIR:-${BRAID_CACHE:-$HOME/.cache/braid}/kafka}"
mkdir -p "$dir"

running() {
    [[ -f "$dir/pid" ]] && kill -0 "$(cat "$dir/pid")" 2>/dev/null
}

url() {
    echo "kafka://127.0.0.1:$(cat "$dir/port")"
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

case "$cmd" in
url)
    running || die "no broker running (scripts/kafka.sh up)"
    url
    ;;
down)
    if running; then
        kill "$(cat "$dir/pid")"
        for _ in $(seq 100); do
            running || break
            sleep 0.1
        done
        running && kill -9 "$(cat "$dir/pid")"
    fi
    rm -f "$dir/pid"
    ;;
up)
    exec 9>"$dir/lock"
    flock 9
    if running; then
        url
        exit 0
    fi
    bin="$(bash "$here/ensure-tansu.sh")"
    [[ -f "$dir/port" ]] || free_port >"$dir/port"
    port="$(cat "$dir/port")"
    listener="tcp://127.0.0.1:$port"
    # tansu opens an SQLite URL's host as a file in its working directory.
    (cd "$dir" && exec env RUST_LOG=warn "$bin" broker --listener-url "$listener" \
        --advertised-listener-url "$listener" --storage-engine sqlite://tansu.db \
        </dev/null >>"$dir/broker.log" 2>&1 9>&- & echo $! >"$dir/pid")
    for _ in $(seq 300); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            url
            exit 0
        fi
        running || die "the broker exited; see $dir/broker.log"
        sleep 0.1
    done
    die "the broker did not listen on 127.0.0.1:$port within 30 s; see $dir/broker.log"
    ;;
esac
