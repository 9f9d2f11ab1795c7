#!/usr/bin/env bash
# Create a CI leg's venv in the repository root (once) with its pinned CPU stack, and install the
# package (editable). Reinstalls only when the leg's requirements or setup.py change.
#   bash tools/bootstrap.sh          .venv/    Python 3.11, megatron-core 0.16.1 (requirements-ci.txt)
#   bash tools/bootstrap.sh py312    .venv312/ Python 3.12, megatron-core 0.19.x (requirements-ci-py312.txt);
#                                    its Python: $PYTHON312, else python3.12, else pyenv's 3.12
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
case "${1:-py311}" in
  py311) venv="$root/.venv"; requirements="$root/requirements-ci.txt"; python=python3 ;;
  py312)
    venv="$root/.venv312"; requirements="$root/requirements-ci-py312.txt"
    # pyenv's python3.12 shim refuses to run without a selected version: call the interpreter itself.
    python=""
    for candidate in "${PYTHON312:-}" python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12; do
      if [ -n "$candidate" ] && "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
        python="$candidate"; break
      fi
    done
    if [ -z "$python" ]; then
      echo "bootstrap py312: no Python 3.12 found (set PYTHON312 to one)" >&2
      exit 3
    fi ;;
  *) echo "usage: bash tools/bootstrap.sh [py311|py312]" >&2; exit 2 ;;
esac
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
stamp="$venv/.requirements-ci.sha"
wanted="$(sha256sum "$requirements" "$root/requirements-nodeps.txt" "$root/setup.py" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$wanted" ]; then
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$requirements"
  "$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps -r "$root/requirements-nodeps.txt"
  "$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps -e "$root"
  echo "$wanted" > "$stamp"
fi
