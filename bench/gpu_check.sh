#!/usr/bin/env bash
# One prepared GPU run: build, GPU tests, kernel benchmarks, a 1.3B step, a pretraining run with
# save and resume, and tp=2 / dp=2 against one GPU; each step time-boxed, one JSON under $OUT
# (default ./gpu_check) and a table on stdout; at most 8 minutes on one GPU. See bench/gpu_check.py.
#
#   bash bench/gpu_check.sh              # on a GPU machine
#   bash bench/gpu_check.sh --dry-run    # the same steps on the CPU, tiny shapes (CI runs this)
#   bash bench/gpu_check.sh --steps 1,3  # some of them
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
    if [[ -x "$root/.venv/bin/python" ]]; then python="$root/.venv/bin/python"; else python=python3; fi
fi
# launch/pretrain.sh and the deepspeed launcher are found on PATH, from the same environment.
if [[ "$python" == */* ]]; then export PATH="$(dirname "$python"):$PATH"; fi
exec "$python" "$root/bench/gpu_check.py" "$@"
