#!/usr/bin/env bash
# Set up (once) and run `unitscope demo`; arguments go to the demo (e.g. --quick, --out DIR).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$(bash "$root/scripts/env.sh")"
exec "$venv/bin/unitscope" demo "$@"
