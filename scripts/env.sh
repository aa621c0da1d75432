#!/usr/bin/env bash
# Make sure the virtual environment for this checkout exists and prints its path.
# The environment lives outside the clone, keyed by a hash of pyproject.toml, so CI runs and
# fresh clones reuse it; a fresh machine builds it (torch with its CUDA libraries: ~5 GB, ~2 min).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-python3}"
"$py" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
  || { echo "unitscope needs Python >= 3.10 (set PYTHON=...)" >&2; exit 1; }
key="$(sha256sum "$root/pyproject.toml" | cut -c1-16)"
venv="${UNITSCOPE_VENV:-$HOME/.cache/unitscope/env-$key}"
if [ ! -f "$venv/.complete" ]; then
  echo "setting up $venv (once per pyproject.toml)" >&2
  rm -rf "$venv"
  "$py" -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip "setuptools>=77" wheel >&2
  "$venv/bin/pip" install -q -e "$root[test]" >&2
  touch "$venv/.complete"
  # keep the disk bounded: drop all but the two newest environments of older pyproject.toml files
  if [ -z "${UNITSCOPE_VENV:-}" ]; then
    ls -dt "$HOME"/.cache/unitscope/env-*/ 2>/dev/null | tail -n +3 | xargs -r rm -rf
  fi
fi
# point the editable install at this checkout (another clone may have used the same venv)
"$venv/bin/pip" install -q --no-deps --no-build-isolation -e "$root" >/dev/null 2>&1 \
  || "$venv/bin/pip" install -q --no-deps -e "$root" >&2
echo "$venv"
