#!/usr/bin/env bash
# Makes sure the Debian packages the native build needs are installed:
# OpenSSL's headers (rdkafka's `ssl` feature: TLS and SASL/SCRAM to Kafka),
# zlib's (compressed Kafka batches), and make/gcc/perl/pkg-config for the
# bundled librdkafka build. Idempotent: installs only what is missing.
set -euo pipefail

need=()
for pkg in libssl-dev zlib1g-dev pkg-config make gcc perl; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        need+=("$pkg")
    fi
done
if [[ ${#need[@]} -eq 0 ]]; then
    exit 0
fi
echo "installing build dependencies: ${need[*]}" >&2
sudo=()
if [[ $(id -u) -ne 0 ]]; then
    sudo=(sudo)
fi
"${sudo[@]}" apt-get update
DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y --no-install-recommends "${need[@]}"
