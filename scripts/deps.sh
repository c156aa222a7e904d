#!/usr/bin/env bash
# Install what wisp's build, tests and demo need on a fresh Debian 12 machine (as root).
set -euo pipefail
need=()
for p in fuse3 iproute2 util-linux procps gcc make git sqlite3 perl tar coreutils bc python3 sshfs openssh-server openssh-client; do
    dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
    echo "installing: ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need[@]}" >/dev/null
fi
[ -e /dev/fuse ] || modprobe fuse || { echo "error: /dev/fuse is missing and the fuse module cannot be loaded" >&2; exit 1; }
command -v cargo >/dev/null || { echo "error: cargo not found; install Rust (rustup) first" >&2; exit 1; }
