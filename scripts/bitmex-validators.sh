#!/usr/bin/env bash
# Run BitMEX's own validators on files custody writes, beside our checker. Fetches nothing.
#
# You bring their code yourself, kept outside this repository (it is never copied into it):
#   1. a checkout of the public repository BitMEX/proof-of-reserves-liabilities, at BITMEX_POR_DIR;
#   2. a Python with its requirements.txt installed (requests, PyYAML), at BITMEX_PYTHON, e.g.
#        python3 -m venv /tmp/bitmex-venv && /tmp/bitmex-venv/bin/pip install -r "$BITMEX_POR_DIR/requirements.txt"
# Then:
#   BITMEX_POR_DIR=/tmp/bitmex-por BITMEX_PYTHON=/tmp/bitmex-venv/bin/python scripts/bitmex-validators.sh
#
# What runs: validate_liabilities.py on trees our generator wrote, for every account, by
# account nonce and by the nonce of the height (tests/test_liabilities_format.py); and
# validate_reserves.py against a regtest node of the test's own, on proofs of reserves at a
# past height for each script type (tests/test_proof_of_reserves_regtest.py). Their output
# is printed (-s). Without the two variables those tests skip (liabilities) or run without
# BitMEX's validator (reserves). Arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

: "${BITMEX_POR_DIR:?set BITMEX_POR_DIR to a checkout of BitMEX/proof-of-reserves-liabilities (see this script)}"
: "${BITMEX_PYTHON:?set BITMEX_PYTHON to a python with their requirements.txt installed (see this script)}"
for f in validate_liabilities.py validate_reserves.py; do
    if [[ ! -f "$BITMEX_POR_DIR/$f" ]]; then
        echo "bitmex-validators.sh: $BITMEX_POR_DIR/$f is missing: is it their checkout?" >&2
        exit 2
    fi
done
if ! "$BITMEX_PYTHON" -c 'import requests, yaml' 2>/dev/null; then
    echo "bitmex-validators.sh: $BITMEX_PYTHON lacks requests or PyYAML: install their requirements.txt" >&2
    exit 2
fi
scripts/setup-venv.sh test
scripts/install-node.sh
export BITMEX_POR_DIR BITMEX_PYTHON
exec .venv/bin/pytest -s -p no:cacheprovider tests/test_liabilities_format.py tests/test_proof_of_reserves_regtest.py "$@"
