#!/usr/bin/env bash
# Set up (once) and run the tests: lint, then pytest. Extra arguments go to pytest.
# The default run skips tests marked slow; with CI=true (CI's 90 minutes leave room) they run too,
# in the same pytest invocation, so its closing line counts every test.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$(bash "$root/scripts/env.sh")"
cd "$root"
"$venv/bin/ruff" check .
if [ "${CI:-}" = "true" ]; then
  exec "$venv/bin/python" -m pytest -m "slow or not slow" "$@"
fi
exec "$venv/bin/python" -m pytest "$@"
