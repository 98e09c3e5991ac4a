#!/usr/bin/env bash
# The main job end to end on the embedded default (SQLite, no server): README's first command.
# Arguments go to `custody demo` (e.g. --script p2sh-p2wsh, --dir DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-venv.sh
exec .venv/bin/custody demo "$@"
