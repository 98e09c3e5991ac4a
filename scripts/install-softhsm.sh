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

"$(dirname "$0")/apt-install.sh" install-softhsm "set CUSTODY_TEST_PKCS11_MODULE to a libsofthsm2.so" softhsm2
if ! command -v softhsm2-util >/dev/null 2>&1 || ! module="$(find_module)"; then
    echo "install-softhsm: softhsm2 was installed but softhsm2-util or libsofthsm2.so is missing" >&2
    exit 1
fi
echo "$module"
