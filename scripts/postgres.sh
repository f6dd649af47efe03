#!/usr/bin/env bash
# A real PostgreSQL server on loopback for the tests and for a cluster on one
# machine. Idempotent; safe to call from several processes at once.
#
#   scripts/postgres.sh up     start it (installing and initialising it once);
#                              prints its postgres:// URL on stdout
#   scripts/postgres.sh url    prints the URL of the running server
#   scripts/postgres.sh down   stops it (the data stays for the next `up`)
#
# The server is Debian's (`initdb`/`pg_ctl`); it is installed with apt-get
# only when they cannot be found. It listens on 127.0.0.1 only, on a free
# port chosen at the first start and reused after, with password
# (SCRAM) authentication for the superuser `braid`.
#
# With BRAID_PG_TLS_CERT and BRAID_PG_TLS_KEY (PEM files) when the server is
# initialised, it also speaks TLS with that certificate (ssl = on).
#
# Where: ${BRAID_PG_DIR}, by default ${BRAID_CACHE:-$HOME/.cache/braid}/pg.
# PostgreSQL refuses to run as root, so as root the server runs as the
# system user `braid-pg` (created once), and its default directory is
# /var/tmp/braid-pg instead (a root home directory is not readable by
# another user).
set -euo pipefail

die() {
    echo "postgres.sh: $*" >&2
    exit 1
}

cmd="${1:-}"
case "$cmd" in
up | down | url) ;;
*) die "usage: $0 up|down|url" ;;
esac

run_user=""
if [[ "$(id -u)" == 0 ]]; then
    run_user="braid-pg"
    dir="${BRAID_PG_DIR:-/var/tmp/braid-pg}"
else
    dir="${BRAID_PG_DIR:-${BRAID_CACHE:-$HOME/.cache/braid}/pg}"
fi
data="$dir/data"
log="$dir/server.log"

# Runs a PostgreSQL tool as the server's owner.
as_owner() {
    if [[ -n "$run_user" ]]; then
        runuser -u "$run_user" -- "$@"
    else
        "$@"
    fi
}

find_bin() {
    local d
    if command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
        bindir="$(dirname "$(command -v pg_ctl)")"
        return 0
    fi
    # Debian's packages keep the server tools off PATH.
    for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        if [[ -x "$d/initdb" && -x "$d/pg_ctl" ]]; then
            bindir="$d"
            return 0
        fi
    done
    return 1
}

url_of() {
    local port password
    port="$(cat "$dir/port")"
    password="$(cat "$dir/password")"
    echo "postgres://braid:${password}@127.0.0.1:${port}/postgres"
}

running() {
    [[ -f "$data/postmaster.pid" ]] && as_owner "$bindir/pg_ctl" -D "$data" status >/dev/null 2>&1
}

# A loopback port nothing listens on (a connect to it is refused).
free_port() {
    local p
    for _ in $(seq 1 200); do
        p=$((20000 + RANDOM % 40000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            echo "$p"
            return 0
        fi
    done
    die "found no free loopback port"
}

mkdir -p "$dir"
# One `up`/`down` at a time per directory.
exec 9>"$dir.lock"
flock 9

if ! find_bin; then
    [[ "$cmd" == up ]] || die "PostgreSQL is not installed (run '$0 up')"
    [[ "$(id -u)" == 0 ]] || die "PostgreSQL (initdb, pg_ctl) is not installed; install Debian's 'postgresql' package, or run this as root to have it installed"
    echo "postgres.sh: installing PostgreSQL (apt-get install postgresql)" >&2
    apt-get update >&2 || die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql >&2 ||
        die "apt-get install postgresql failed"
    find_bin || die "PostgreSQL was installed but initdb/pg_ctl are not found"
fi

case "$cmd" in
url)
    running || die "the server is not running (run '$0 up')"
    url_of
    exit 0
    ;;
down)
    if running; then
        as_owner "$bindir/pg_ctl" -D "$data" -m fast -w stop >&2
    fi
    exit 0
    ;;
esac

if [[ -n "$run_user" ]] && ! id -u "$run_user" >/dev/null 2>&1; then
    useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin "$run_user" ||
        id -u "$run_user" >/dev/null 2>&1 || die "could not create the user $run_user"
fi

if [[ ! -f "$data/PG_VERSION" ]]; then
    rm -rf "$data"
    mkdir -p "$data"
    # The password of the superuser, readable by whoever runs the tests.
    if [[ ! -s "$dir/password" ]]; then
        (umask 077 && head -c 18 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$dir/password")
    fi
    pwfile="$(mktemp)"
    cp "$dir/password" "$pwfile"
    if [[ -n "$run_user" ]]; then
        chown "$run_user" "$data" "$pwfile"
    fi
    chmod 700 "$data"
    if ! as_owner "$bindir/initdb" -D "$data" -U braid --pwfile="$pwfile" \
        --auth-host=scram-sha-256 --auth-local=scram-sha-256 -E UTF8 --locale=C.UTF-8 \
        >"$dir/initdb.log" 2>&1; then
        rm -f "$pwfile"
        cat "$dir/initdb.log" >&2
        rm -rf "$data"
        die "initdb failed"
    fi
    rm -f "$pwfile"
    cat >>"$data/postgresql.conf" <<'EOF'
# braid test server: loopback TCP only, no Unix socket.
listen_addresses = '127.0.0.1'
unix_socket_directories = ''
max_connections = 300
EOF
    if [[ -n "${BRAID_PG_TLS_CERT:-}" ]]; then
        [[ -n "${BRAID_PG_TLS_KEY:-}" ]] || die "BRAID_PG_TLS_CERT needs BRAID_PG_TLS_KEY"
        cp "$BRAID_PG_TLS_CERT" "$data/server.crt"
        cp "$BRAID_PG_TLS_KEY" "$data/server.key"
        chmod 600 "$data/server.key"
        [[ -z "$run_user" ]] || chown "$run_user" "$data/server.crt" "$data/server.key"
        echo "ssl = on" >>"$data/postgresql.conf"
    fi
fi

if running; then
    url_of
    exit 0
fi

touch "$log"
[[ -z "$run_user" ]] || chown "$run_user" "$log"
for attempt in 1 2 3 4 5; do
    if [[ ! -s "$dir/port" ]] || (exec 3<>"/dev/tcp/127.0.0.1/$(cat "$dir/port")") 2>/dev/null; then
        # No port yet, or something else took ours.
        free_port >"$dir/port"
    fi
    port="$(cat "$dir/port")"
    # 9>&-: the server must not inherit (and hold forever) the lock.
    if as_owner "$bindir/pg_ctl" -D "$data" -l "$log" -o "-p $port" -w -t 60 start >&2 9>&-; then
        url_of
        exit 0
    fi
    echo "postgres.sh: start on port $port failed (attempt $attempt); see $log" >&2
    rm -f "$dir/port"
done
tail -n 30 "$log" >&2 || true
die "PostgreSQL did not start; see $log"
