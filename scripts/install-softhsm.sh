#!/usr/bin/env bash
# Make sure SoftHSM2 (a PKCS#11 token in software) is available for custody's token tests.
#
# Idempotent: does nothing when softhsm2-util and the module are there; otherwise installs
# Debian's softhsm2 with apt-get. Prints the module's path on stdout. Exits non-zero,
# saying why, when it cannot. tests/test_pkcs11.py finds the module the same way
# (CUSTODY_TEST_PKCS11_MODULE, else the Debian paths below).
set -euo pipefail

find_module() {
    local candidate
    for candidate in "${CUSTODY_TEST_PKCS11_MODULE:-}" \
        /usr/lib/softhsm/libsofthsm2.so \
        "/usr/lib/$(uname -m)-linux-gnu/softhsm/libsofthsm2.so"; do
        if [[ -n "$candidate" && -f "$candidate" ]]; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

if command -v softhsm2-util >/dev/null 2>&1 && module="$(find_module)"; then
    echo "$module"
    exit 0
fi

if [[ "$(id -u)" -eq 0 ]]; then
    sudo=()
elif command -v sudo >/dev/null 2>&1; then
    sudo=(sudo)
else
    echo "install-softhsm: softhsm2 is missing and this user cannot install packages" \
        "(not root, no sudo): apt-get install -y softhsm2" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-softhsm: softhsm2 is missing and there is no apt-get here: install SoftHSM 2" \
        "and set CUSTODY_TEST_PKCS11_MODULE to its libsofthsm2.so" >&2
    exit 1
fi

echo "install-softhsm: installing softhsm2 with apt-get" >&2
if ! { "${sudo[@]}" apt-get update -q && \
        DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q softhsm2; } >&2; then
    echo "install-softhsm: apt-get could not install softhsm2 (see above)" >&2
    exit 1
fi
if ! command -v softhsm2-util >/dev/null 2>&1 || ! module="$(find_module)"; then
    echo "install-softhsm: softhsm2 was installed but softhsm2-util or libsofthsm2.so is missing" >&2
    exit 1
fi
echo "$module"
