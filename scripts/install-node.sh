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

if [[ "$(id -u)" -eq 0 ]]; then
    sudo=()
elif command -v sudo >/dev/null 2>&1; then
    sudo=(sudo)
else
    echo "install-node: litecoind is missing and this user cannot install packages" \
        "(not root, no sudo): apt-get install -y litecoind, or set BITCOIND to a bitcoind" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-node: litecoind is missing and there is no apt-get here:" \
        "install Litecoin Core 0.21, or set BITCOIND to a bitcoind binary" >&2
    exit 1
fi

echo "install-node: installing litecoind with apt-get" >&2
if ! { "${sudo[@]}" apt-get update -q && \
        DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q litecoind; } >&2; then
    echo "install-node: apt-get could not install litecoind (see above);" \
        "set BITCOIND to a bitcoind binary instead" >&2
    exit 1
fi
if ! command -v litecoind >/dev/null 2>&1; then
    echo "install-node: litecoind was installed but is not on PATH" >&2
    exit 1
fi
