#!/usr/bin/env bash
# A braid cluster on one machine: a Kafka-API broker (scripts/kafka.sh), a
# PostgreSQL server (scripts/postgres.sh), two flow workers and two REST
# workers, each its own `braid node start` process, on loopback.
#
#   scripts/cluster.sh up      start everything (idempotent); prints the
#                              REST workers' URLs and the admin password
#   scripts/cluster.sh status  which workers run
#   scripts/cluster.sh down    stop the workers (SIGTERM) and the broker;
#                              the database and the broker's records stay
#
# Where: ${BRAID_CLUSTER_DIR:-${BRAID_CACHE:-$HOME/.cache/braid}/cluster}
# (one data directory and log per worker). The binary is $BRAID_BIN, else
# target/release/braid, built when missing. Clients reach a REST worker
# with `braid --url URL --ca DIR/rest-N/tls/ca.pem ...` (user admin, the
# password printed). See docs/cluster.md.
set -euo pipefail

die() {
    echo "cluster.sh: $*" >&2
    exit 1
}

cmd="${1:-}"
case "$cmd" in
up | down | status) ;;
*) die "usage: $0 up|down|status" ;;
esac

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
dir="${BRAID_CLUSTER_DIR:-${BRAID_CACHE:-$HOME/.cache/braid}/cluster}"
workers=(flow-1 flow-2 rest-1 rest-2)
mkdir -p "$dir"

running() {
    [[ -f "$dir/$1/pid" ]] && kill -0 "$(cat "$dir/$1/pid")" 2>/dev/null
}

case "$cmd" in
status)
    for w in "${workers[@]}"; do
        if running "$w"; then
            echo "$w: running (pid $(cat "$dir/$w/pid"))$( [[ -f "$dir/$w/rest.url" ]] && echo ", $(cat "$dir/$w/rest.url")")"
        else
            echo "$w: stopped"
        fi
    done
    exit 0
    ;;
down)
    for w in "${workers[@]}"; do
        if running "$w"; then
            kill -TERM "$(cat "$dir/$w/pid")"
        fi
    done
    for w in "${workers[@]}"; do
        for _ in $(seq 1 100); do
            running "$w" || break
            sleep 0.1
        done
        rm -f "$dir/$w/pid"
    done
    "$here/kafka.sh" down
    exit 0
    ;;
esac

bin="${BRAID_BIN:-$root/target/release/braid}"
if [[ ! -x "$bin" ]]; then
    echo "cluster.sh: building braid (cargo build --release)" >&2
    (cd "$root" && cargo build --release -p braid-cli >&2)
fi
kafka="$("$here/kafka.sh" up | tail -n 1)"
pg="$("$here/postgres.sh" up | tail -n 1)"
db="${pg%/*}/braid_cluster"
if ! psql "$pg" -tAc "SELECT 1 FROM pg_database WHERE datname = 'braid_cluster'" | grep -q 1; then
    psql "$pg" -qc "CREATE DATABASE braid_cluster" >&2
fi
if [[ ! -s "$dir/admin-password" ]]; then
    (umask 077 && head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$dir/admin-password")
fi
password="$(cat "$dir/admin-password")"

start() {
    local w="$1" roles="$2"
    local d="$dir/$w"
    mkdir -p "$d"
    if running "$w"; then
        return 0
    fi
    rm -f "$d/rest.url"
    BRAID_ADMIN_PASSWORD="$password" nohup "$bin" node start --data-dir "$d" \
        --roles "$roles" --store "$db" --bus "$kafka" --rest-addr 127.0.0.1:0 \
        >>"$d/braid.log" 2>&1 </dev/null &
    echo $! >"$d/pid"
}

start flow-1 flow
start flow-2 flow
start rest-1 rest
start rest-2 rest
for w in rest-1 rest-2; do
    for _ in $(seq 1 600); do
        [[ -s "$dir/$w/rest.url" ]] && break
        running "$w" || die "$w exited; see $dir/$w/braid.log"
        sleep 0.1
    done
    [[ -s "$dir/$w/rest.url" ]] || die "$w did not start within 60 s; see $dir/$w/braid.log"
done
for w in flow-1 flow-2; do
    running "$w" || die "$w exited; see $dir/$w/braid.log"
done
echo "bus:      $kafka"
echo "store:    ${db%%:*}://...@${db#*@}"
echo "admin:    admin / $password"
for w in rest-1 rest-2; do
    echo "$w:   $(cat "$dir/$w/rest.url")  (CA: $dir/$w/tls/ca.pem)"
done
