#!/usr/bin/env bash
# Install what wisp's build, tests and demo need on a fresh Debian 12 machine (as root).
set -euo pipefail
need=()
for p in fuse3 iproute2 util-linux procps gcc make git sqlite3 perl tar coreutils bc python3 sshfs openssh-server openssh-client curl xz-utils; do
    dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
    echo "installing: ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need[@]}" >/dev/null
fi
[ -e /dev/fuse ] || modprobe fuse || { echo "error: /dev/fuse is missing and the fuse module cannot be loaded" >&2; exit 1; }
# Third-party sources (scripts/sources.txt), downloaded once from the Debian mirror apt uses
# here and checked against their pinned sha256.
SRC_DIR=${WISP_SOURCES:-/var/cache/wisp-sources}
mkdir -p "$SRC_DIR"
mirror=$(grep -hoE '^(URIs:|deb) +https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/* 2>/dev/null | grep -oE 'https?://[^ ]+' | head -n1 || true)
grep -vE '^\s*(#|$)' "$(dirname "$0")/sources.txt" | while read -r file path sum; do
    if [ -f "$SRC_DIR/$file" ] && echo "$sum  $SRC_DIR/$file" | sha256sum -c --quiet - 2>/dev/null; then
        continue
    fi
    [ -n "$mirror" ] || { echo "error: no Debian mirror in apt's sources to fetch $file from" >&2; exit 1; }
    command -v curl >/dev/null || { apt-get install -y -qq curl >/dev/null; }
    echo "downloading $file"
    curl -fsSL --retry 3 -o "$SRC_DIR/$file.part" "${mirror%/}/$path"
    echo "$sum  $SRC_DIR/$file.part" | sha256sum -c --quiet - || { echo "error: $file does not match its sha256 in scripts/sources.txt" >&2; rm -f "$SRC_DIR/$file.part"; exit 1; }
    mv "$SRC_DIR/$file.part" "$SRC_DIR/$file"
done
command -v cargo >/dev/null || { echo "error: cargo not found; install Rust (rustup) first" >&2; exit 1; }
