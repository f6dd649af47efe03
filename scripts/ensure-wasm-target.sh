#!/usr/bin/env bash
# Makes sure the wasm32-wasip2 Rust target (needed to build flow packages) is
# installed. Idempotent: does nothing when it already is.
set -euo pipefail

target=wasm32-wasip2
if rustup target list --installed | grep -qx "$target"; then
    exit 0
fi
echo "installing Rust target $target" >&2
rustup target add "$target"
