#!/usr/bin/env bash
# The test command (README): set up .venv, run the gates (scripts/lint.sh), make sure a node
# binary exists, run pytest.
# Arguments go to pytest: scripts/test.sh tests/test_rpc.py -x
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup-venv.sh test
# The gates first (ruff, complexity, mypy --strict over library and CLI, import-linter):
# a gate that fails fails the run before a test starts.
scripts/lint.sh
scripts/install-node.sh
scripts/install-softhsm.sh >/dev/null
scripts/install-gnupg.sh
scripts/install-chromium.sh >/dev/null

status=0
.venv/bin/pytest "$@" || status=$?
if [[ $status -eq 5 ]]; then
    # pytest's "no tests collected": a suite that ran nothing must not look green.
    echo "test.sh: pytest collected no tests; failing" >&2
    exit 1
fi
exit "$status"
