#!/usr/bin/env bash
# Make sure a regtest node binary is available for custody's integration tests.
#
# Idempotent. Uses $BITCOIND when it names an executable bitcoind; otherwise installs
# Debian's litecoind (Litecoin Core 0.21: Bitcoin Core 0.21's script and RPC rules) when
# it is missing. Exits non-zero, saying why, when it cannot.
set -euo pipefail

if [[ -n "${BITCOIND:-}" ]]; then
    if [[ -f "$BITCOIND" && -x "$BITCOIND" ]]; then
        echo "install-node: using BITCOIND=$BITCOIND" >&2
        exit 0
    fi
    echo "install-node: BITCOIND=$BITCOIND is not an executable file" >&2
    exit 1
fi

if command -v litecoind >/dev/null 2>&1; then
    exit 0
fi

"$(dirname "$0")/apt-install.sh" install-node "set BITCOIND to a bitcoind binary" litecoind
if ! command -v litecoind >/dev/null 2>&1; then
    echo "install-node: litecoind was installed but is not on PATH" >&2
    exit 1
fi
