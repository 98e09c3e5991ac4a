#!/usr/bin/env bash
# apt-install.sh NAME HINT PACKAGE...: install Debian packages for the script NAME, as root
# or through sudo, saying why (and HINT, what else would do) when it cannot.
set -euo pipefail
name=$1
hint=$2
shift 2

if [[ "$(id -u)" -eq 0 ]]; then
    sudo=()
elif command -v sudo >/dev/null 2>&1; then
    sudo=(sudo)
else
    echo "$name: $* missing and this user cannot install packages (not root, no sudo):" \
        "apt-get install -y $*${hint:+, or $hint}" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "$name: $* missing and there is no apt-get here${hint:+: $hint}" >&2
    exit 1
fi
echo "$name: installing $* with apt-get" >&2
if ! { "${sudo[@]}" apt-get update -q && \
        DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q "$@"; } >&2; then
    echo "$name: apt-get could not install $* (see above)${hint:+; $hint}" >&2
    exit 1
fi
