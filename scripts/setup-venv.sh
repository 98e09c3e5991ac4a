#!/usr/bin/env bash
# Create or update .venv with custody installed (with the test extras when given "test").
# On a fresh Debian machine it installs python3 and python3-venv first.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "$(id -u)" -eq 0 ]]; then sudo=(); else sudo=(sudo); fi
if ! command -v python3 >/dev/null 2>&1 || ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
    echo "setup-venv: installing python3 and python3-venv with apt-get" >&2
    "${sudo[@]}" apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q python3 python3-venv >&2
fi
if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "setup-venv: custody needs Python 3.11 or newer (Debian 12 has it)" >&2
    exit 1
fi
if [[ ! -x .venv/bin/python ]]; then
    python3 -m venv .venv
fi
extras=""
if [[ "${1:-}" == "test" ]]; then extras="[test]"; fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extras}"
