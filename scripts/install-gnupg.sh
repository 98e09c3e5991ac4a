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

"$(dirname "$0")/apt-install.sh" install-gnupg "" gnupg
if ! have_gnupg; then
    echo "install-gnupg: gnupg was installed but gpg, gpg-agent or gpgconf is missing" >&2
    exit 1
fi
gpg --version | head -n 1
