#!/usr/bin/env bash
# Regenerate man/custody.1 from the click commands (a test fails when it is stale).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m custody_cli.helptext > man/custody.1
