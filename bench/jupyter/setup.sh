#!/usr/bin/env bash
# Creates the throwaway venv bench/.venv with ipykernel + jupyter_client (the Jupyter peer).
# Usage: bench/jupyter/setup.sh [PYTHON]   (default: the real interpreter behind `python3`,
# pyenv shims resolved, so the kernel runs on the same Python as Capsule's workers).
# Exit status 0 when the venv is usable; otherwise the reason is printed on stderr.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="$here/../.venv"
py="${1:-$(python3 -I -S -c 'import sys; print(sys.executable)')}"
if [[ -x "$venv/bin/python" ]] && "$venv/bin/python" -c 'import ipykernel, jupyter_client' 2>/dev/null; then
    echo "jupyter venv ready: $venv" >&2
    exit 0
fi
rm -rf "$venv"
if ! "$py" -m venv "$venv" >&2; then
    echo "cannot create a venv with $py -m venv" >&2
    exit 1
fi
if ! "$venv/bin/python" -m pip install --disable-pip-version-check -q ipykernel jupyter_client >&2; then
    echo "pip install ipykernel jupyter_client failed (no network or no package index?)" >&2
    exit 1
fi
"$venv/bin/python" -m ipykernel install --prefix "$venv" --name python3 >/dev/null 2>&1 || true
echo "jupyter venv ready: $venv" >&2
