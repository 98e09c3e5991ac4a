#!/usr/bin/env bash
# Make sure Debian's chromium is available: the approval console's tests (tests/test_console.py)
# drive it through Playwright with a virtual WebAuthn authenticator. Playwright never downloads
# a browser of its own here: the tests give it this binary (executable_path).
#
# Idempotent: does nothing when chromium is there; otherwise installs Debian's chromium with
# apt-get. Prints the binary's path on stdout. Exits non-zero, saying why, when it cannot.
set -euo pipefail

find_chromium() {
    command -v chromium 2>/dev/null || command -v chromium-browser 2>/dev/null || true
}

path=$(find_chromium)
if [[ -z "$path" ]]; then
    "$(dirname "$0")/apt-install.sh" install-chromium "" chromium
    path=$(find_chromium)
fi
if [[ -z "$path" ]]; then
    echo "install-chromium: chromium was installed but no chromium binary is on PATH" >&2
    exit 1
fi
echo "$path"
