#!/usr/bin/env bash
# Makes sure a Kafka-API broker binary is available for the cluster-mode
# tests and `scripts/cluster.sh`: tansu (Apache-2.0, a Kafka-compatible broker
# written in Rust, from crates.io), built once per machine into
# $BRAID_CACHE/tansu (about 8 minutes on 2 cores) and reused after. Prints the
# binary's path. Idempotent. Production users run Apache Kafka or Redpanda
# (docs/cluster.md); tansu is only what installs from the registries here.
# Features: dynostore (memory:// storage) and libsql (sqlite:// storage in a
# file, which survives a broker restart; tansu creates its schema itself).
set -euo pipefail

cache="${BRAID_CACHE:-$HOME/.cache/braid}"
version="${TANSU_VERSION:-0.6.0}"
root="$cache/tansu-$version"
bin="$root/bin/tansu"

if [[ -x "$bin" ]]; then
    echo "$bin"
    exit 0
fi
mkdir -p "$cache"
# One build at a time per machine (tests may ask concurrently).
exec 9>"$cache/tansu.lock"
flock 9
if [[ ! -x "$bin" ]]; then
    echo "building tansu $version into $root (once per machine, ~8 min)" >&2
    CARGO_TARGET_DIR="$cache/tansu-target" \
        cargo install tansu --version "$version" --locked --features dynostore,libsql \
        --root "$root" >&2
    rm -rf "$cache/tansu-target"
fi
echo "$bin"
