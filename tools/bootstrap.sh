#!/usr/bin/env bash
# Create .venv in the repository root (once) with the pinned CPU stack, and install the package.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
if [ ! -x "$root/.venv/bin/python" ]; then
  python3 -m venv "$root/.venv"
fi
stamp="$root/.venv/.requirements-ci.sha"
wanted="$(sha256sum "$root/requirements-ci.txt" "$root/requirements-nodeps.txt" "$root/setup.py" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$wanted" ]; then
  "$root/.venv/bin/pip" install --quiet --disable-pip-version-check -r "$root/requirements-ci.txt"
  "$root/.venv/bin/pip" install --quiet --disable-pip-version-check --no-deps -r "$root/requirements-nodeps.txt"
  "$root/.venv/bin/pip" install --quiet --disable-pip-version-check --no-deps -e "$root"
  echo "$wanted" > "$stamp"
fi
