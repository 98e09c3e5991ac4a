#!/usr/bin/env bash
# The gates (CONTRIBUTING.md): ruff lint (complexity included), ruff format, sizes, mypy --strict
# over the library and the CLI, import-linter's contracts. Runs them all, then fails when
# any failed. scripts/test.sh calls it before the tests; it expects .venv (setup-venv.sh test).
set -uo pipefail
cd "$(dirname "$0")/.."

code=(custody cli tests benchmarks)
failed=()

gate() {
    local name=$1
    shift
    echo "lint: $name: $*" >&2
    if ! "$@"; then
        failed+=("$name")
    fi
}

# Lint, import order and the complexity gate (C901: no function above cyclomatic 15).
gate "ruff check" .venv/bin/ruff check "${code[@]}"
gate "ruff format" .venv/bin/ruff format --check "${code[@]}"
# An exception to the complexity gate says why it remains.
gate "complexity exceptions give a reason" bash -c \
    '! grep -rnE "noqa: C901(\$| *[^ -])" --include="*.py" "$@"' _ "${code[@]}"
# No module over 600 lines, no function over 60, without a reason at its module's top.
gate "sizes" .venv/bin/python scripts/check_sizes.py custody cli
gate "mypy --strict" .venv/bin/mypy
gate "import-linter" .venv/bin/lint-imports

if ((${#failed[@]})); then
    echo "lint: failed: $(IFS=,; echo "${failed[*]}")" >&2
    exit 1
fi
echo "lint: every gate passed" >&2
