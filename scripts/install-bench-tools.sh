#!/usr/bin/env bash
# Make sure the benchmarks' tools are available: wrk, the load generator (in C) that
# benchmarks/bench_api.py drives custody serve with, so that the clients' own cost stays out of
# the server's latencies; tests/test_bench_wrk.py checks that the requests it sends are accepted.
#
# Idempotent: does nothing when wrk is there; otherwise installs Debian's wrk with apt-get.
# Prints wrk's path on stdout. Exits non-zero, saying why, when it cannot.
set -euo pipefail

path=$(command -v wrk || true)
if [[ -z "$path" ]]; then
    "$(dirname "$0")/apt-install.sh" install-bench-tools "" wrk
    path=$(command -v wrk || true)
fi
if [[ -z "$path" ]]; then
    echo "install-bench-tools: wrk was installed but no wrk binary is on PATH" >&2
    exit 1
fi
echo "$path"
