#!/usr/bin/env bash
# One command for the whole BENCH-001 table:
#   bench/run.sh [--quick]
# 1. builds capsule-bench (release);
# 2. makes the Jupyter venv (bench/.venv, gitignored) and runs bench/jupyter/driver.py — if the
#    venv cannot be made (no network / package index), the report says the column is missing
#    and why;
# 3. runs capsule-bench with the Jupyter JSON merged in;
# 4. writes bench/out/report.md (and bench/out/capsule.json, bench/out/jupyter.json).
# A benchmark, not a test: it never fails on a time. Takes a few minutes on a 2-vCPU VM.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
quick=()
[[ "${1:-}" == "--quick" ]] && quick=(--quick)
out="$root/bench/out"
mkdir -p "$out"
t0=$(date +%s)

echo "== building capsule-bench (release)" >&2
cargo build --release -p capsule-bench >&2
bin="$root/target/release/capsule-bench"

jupyter_args=()
echo "== Jupyter peer" >&2
if setup_err=$("$root/bench/jupyter/setup.sh" 2>&1); then
    if "$root/bench/.venv/bin/python" "$root/bench/jupyter/driver.py" "${quick[@]}" \
        --out "$out/jupyter.json" 2> "$out/jupyter.stderr"; then
        jupyter_args=(--jupyter "$out/jupyter.json")
    else
        why="driver failed: $(grep -v 'running over TCP without encryption' "$out/jupyter.stderr" | tail -n 3 | tr '\n' ' ')"
        echo "$why" >&2
        jupyter_args=(--jupyter-missing "$why")
    fi
else
    why="venv with ipykernel + jupyter_client could not be created: $(echo "$setup_err" | tail -n 3 | tr '\n' ' ')"
    echo "$why" >&2
    jupyter_args=(--jupyter-missing "$why")
fi

echo "== capsule-bench" >&2
"$bin" "${quick[@]}" "${jupyter_args[@]}" --out "$out/report.md" --json-out "$out/capsule.json" >/dev/null
echo "== done in $(( $(date +%s) - t0 )) s: $out/report.md" >&2
cat "$out/report.md"
