#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 60), one after another, starting from the
# committed seeds in fuzz/seeds/<target>/. New inputs go to fuzz/corpus/<target>/ (not
# committed), crashes to fuzz/artifacts/<target>/. Prints each target's executions and
# exits non-zero if any target crashed, leaked, timed out or failed to build.
#
#   fuzz/run.sh [SECONDS]
#
# Environment: FUZZ_TOOLCHAIN (default nightly), FUZZ_TARGETS (default: every target),
# FUZZ_MAX_LEN (default 65536).
set -euo pipefail

secs="${1:-60}"
toolchain="${FUZZ_TOOLCHAIN:-nightly}"
max_len="${FUZZ_MAX_LEN:-65536}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"

if ! [[ "$secs" =~ ^[0-9]+$ ]] || [ "$secs" -lt 1 ]; then
    echo "usage: $0 [SECONDS]" >&2
    exit 2
fi
if ! cargo "+$toolchain" fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

read -r -a targets <<<"${FUZZ_TARGETS:-$(cargo "+$toolchain" fuzz list | tr '\n' ' ')}"

echo "== building ${targets[*]}"
cargo "+$toolchain" fuzz build
# Run the binaries just built (not `cargo fuzz run`, which would rebuild before each
# target), so every target runs against the same build of the sources.
host=$(rustc "+$toolchain" -vV | sed -n 's/^host: //p')
bin_dir="target/$host/release"
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_odr_violation=0}"

mkdir -p logs
failed=()
summary=()
for t in "${targets[@]}"; do
    corpus="corpus/$t"
    mkdir -p "$corpus" "artifacts/$t"
    log="logs/$t.log"
    echo "== $t: ${secs}s (log: fuzz/$log)"
    start=$(date +%s)
    status=0
    # The first directory receives new inputs; the seeds are only read.
    "$bin_dir/$t" "$corpus" "seeds/$t" \
        -artifact_prefix="artifacts/$t/" \
        -max_total_time="$secs" \
        -rss_limit_mb=2048 \
        -max_len="$max_len" \
        -timeout=25 \
        -print_final_stats=1 \
        >"$log" 2>&1 || status=$?
    took=$(($(date +%s) - start))
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    units=$(find "$corpus" -type f | wc -l)
    line="$t: ${execs:-?} executions in ${took}s, corpus ${units} inputs"
    if [ "$status" -ne 0 ]; then
        line="$line, FAILED (exit $status)"
        failed+=("$t")
        grep -E '^(==[0-9]+==ERROR|SUMMARY|thread .* panicked)|panicked at|Test unit written to|artifact_prefix' "$log" | head -n 20 || true
        tail -n 40 "$log"
    fi
    echo "$line"
    summary+=("$line")
done

echo "== summary"
printf '%s\n' "${summary[@]}"
if [ "${#failed[@]}" -ne 0 ]; then
    echo "crashed: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
    exit 1
fi
