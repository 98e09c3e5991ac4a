#!/usr/bin/env bash
# The test command (README): set up .venv, run the gates (scripts/lint.sh), make sure a node
# binary exists, run pytest.
# Arguments go to pytest: scripts/test.sh tests/test_rpc.py -x (CUSTODY_TEST_WORKERS=0 for one process)
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
scripts/install-bench-tools.sh >/dev/null

# Every core (CUSTODY_TEST_WORKERS overrides; 0 runs in this process), a whole test file to a
# worker so a module's fixtures are built once, and a short temporary root: GnuPG's agent
# socket lives under a test's directory, and a Unix socket's path holds at most 107 bytes.
basetemp=$(mktemp -d /tmp/ct.XXXXXX)
status=0
.venv/bin/pytest -n "${CUSTODY_TEST_WORKERS:-auto}" --dist loadfile --basetemp "$basetemp" "$@" || status=$?
if [[ $status -eq 0 ]]; then
    rm -rf "$basetemp"  # kept after a failure, for its logs and stores
fi
if [[ $status -eq 5 ]]; then
    # pytest's "no tests collected": a suite that ran nothing must not look green.
    echo "test.sh: pytest collected no tests; failing" >&2
    exit 1
fi
exit "$status"
