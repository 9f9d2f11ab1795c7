#!/usr/bin/env bash
# The main job on the embedded default, on CPU: sets up .venv once, then trains with SymNoise on 2 ranks.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bash "$root/tools/bootstrap.sh"
exec "$root/.venv/bin/torchrun" --standalone --nproc-per-node 2 "$root/tools/smoke_symnoise.py" "$@"
