#!/usr/bin/env bash
# Set up (once) and run the tests: lint, then pytest. Extra arguments go to pytest.
# With CI=true, slow tests also run when the default run left enough of CI's time budget.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$(bash "$root/scripts/env.sh")"
cd "$root"
start=$(date +%s)
"$venv/bin/ruff" check .
"$venv/bin/python" -m pytest "$@"
if [ "${CI:-}" = "true" ] && [ $(( $(date +%s) - start )) -lt 1800 ]; then
  "$venv/bin/python" -m pytest -m slow "$@" || rc=$?
  # exit 5 means no test is marked slow yet: that is fine here, the default run above ran tests
  if [ "${rc:-0}" != 0 ] && [ "${rc:-0}" != 5 ]; then exit "$rc"; fi
fi
