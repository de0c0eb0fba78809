#!/usr/bin/env bash
# Checks the unit files with `systemd-analyze verify`. The units name the installed binary
# (/usr/local/bin/pdsno); this script points them at a given binary instead, so the check
# runs on a build machine too.
#   deploy/systemd/verify.sh [PATH_TO_PDSNO]   (default: target/debug/pdsno)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
bin="$(realpath "${1:-$here/../../target/debug/pdsno}")"
if ! command -v systemd-analyze >/dev/null; then
  echo "systemd-analyze not found: skipped"
  exit 0
fi
[ -x "$bin" ] || { echo "no pdsno binary at $bin" >&2; exit 1; }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
for unit in "$here"/*.service; do
  sed "s#/usr/local/bin/pdsno#$bin#g" "$unit" >"$work/$(basename "$unit")"
done
# `verify` prints problems on stderr and exits non-zero on errors; treat any output as failure
# so that warnings (unknown keys, bad values) do not slip through.
out="$(cd "$work" && systemd-analyze verify ./*.service 2>&1 || echo "exit status $?")"
if [ -n "$out" ]; then
  echo "$out" >&2
  exit 1
fi
echo "systemd units OK: $(cd "$work" && ls ./*.service | xargs -n1 basename | tr '\n' ' ')"
