#!/usr/bin/env bash
# Run every cargo-fuzz target in fuzz/ for a bounded time; fail on any crash, panic, leak
# or timeout. Usage: scripts/fuzz.sh [SECONDS_PER_TARGET] (default 20; FUZZ_SECONDS too).
#
# Needs a nightly toolchain for the sanitizer-coverage flags. With rustup's nightly absent,
# it runs the stable compiler with RUSTC_BOOTSTRAP=1 (which accepts the same -Z flags).
# Targets are built once, without AddressSanitizer (the decoders are safe Rust; what the
# fuzzers look for is a panic, an overflow, a hang or an unbounded allocation), in release
# mode with debug assertions and overflow checks on.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-${FUZZ_SECONDS:-20}}"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi
if rustup run nightly rustc --version >/dev/null 2>&1; then
    fuzz=(cargo +nightly fuzz)
else
    echo "no nightly toolchain: using the stable compiler with RUSTC_BOOTSTRAP=1"
    export RUSTC_BOOTSTRAP=1
    fuzz=(cargo fuzz)
fi

cd fuzz
build=(-O -a -s none)
"${fuzz[@]}" build "${build[@]}"
targets=$("${fuzz[@]}" list)
failed=()
for t in $targets; do
    mkdir -p "corpus/$t"
    # The run's findings go to a scratch copy: only the committed seeds stay in the tree.
    work=$(mktemp -d)
    cp -r "corpus/$t/." "$work/"
    echo "fuzzing $t for ${secs} s"
    # -rss_limit_mb: a decoder that allocates without bound fails; -timeout: one that spins.
    if ! "${fuzz[@]}" run "${build[@]}" "$t" "$work" -- \
        -max_total_time="$secs" -max_len=65536 -rss_limit_mb=1024 -malloc_limit_mb=512 \
        -timeout=10 -print_final_stats=1 2>"$work.log"; then
        echo "FUZZ TARGET $t FAILED:" >&2
        tail -60 "$work.log" >&2
        failed+=("$t")
    else
        grep -E '^stat::number_of_executed_units|^Done' "$work.log" || true
    fi
    rm -rf "$work" "$work.log"
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzzing found crashes in: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
    exit 1
fi
echo "fuzzing: every target ran ${secs} s without a crash"
