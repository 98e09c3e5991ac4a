#!/usr/bin/env bash
# Make sure GnuPG is available: custody signs (and encrypts) notification mail with it
# through python-gnupg, and tests/test_notify.py checks those mails with it.
#
# Idempotent: does nothing when gpg, gpg-agent and gpgconf are there; otherwise installs
# Debian's gnupg with apt-get. Prints gpg's version line on stdout. Exits non-zero, saying
# why, when it cannot.
set -euo pipefail

have_gnupg() {
    command -v gpg >/dev/null 2>&1 && command -v gpg-agent >/dev/null 2>&1 && command -v gpgconf >/dev/null 2>&1
}

if have_gnupg; then
    gpg --version | head -n 1
    exit 0
fi

if [[ "$(id -u)" -eq 0 ]]; then
    sudo=()
elif command -v sudo >/dev/null 2>&1; then
    sudo=(sudo)
else
    echo "install-gnupg: GnuPG is missing and this user cannot install packages" \
        "(not root, no sudo): apt-get install -y gnupg" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-gnupg: GnuPG is missing and there is no apt-get here: install GnuPG 2.2 or newer" \
        "(gpg, gpg-agent, gpgconf)" >&2
    exit 1
fi

echo "install-gnupg: installing gnupg with apt-get" >&2
if ! { "${sudo[@]}" apt-get update -q && \
        DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q gnupg; } >&2; then
    echo "install-gnupg: apt-get could not install gnupg (see above)" >&2
    exit 1
fi
if ! have_gnupg; then
    echo "install-gnupg: gnupg was installed but gpg, gpg-agent or gpgconf is missing" >&2
    exit 1
fi
gpg --version | head -n 1
