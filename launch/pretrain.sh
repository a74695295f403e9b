#!/usr/bin/env bash
"true" '''\'
# Start a pretraining run:
#
#   deepspeed launch/pretrain.sh [CONFIG.yaml] [section.field=value ...]
#   bash launch/pretrain.sh [CONFIG.yaml] [section.field=value ...]
#   bash launch/pretrain.sh --hostfile FILE [--node_rank N] --master_port PORT CONFIG ...
#       (one node of a multi-node job: run it on every node; launch/slurm/pretrain.sbatch does)
#   mpiexec -n N bash launch/pretrain.sh CONFIG ...     (ranks from mpi4py)
#
# Under bash it stays the launcher's parent: SIGTERM, SIGUSR1 or Ctrl-C make every rank save a
# checkpoint after its current step and exit 0 (a second one stops at once).
# This file is both a bash script and a Python program, because the deepspeed launcher runs
# its script argument with `python -u`. Bash runs the lines up to the `exec` below and hands
# over to Python; Python reads those lines as one string and skips them. Set PYTHON to choose
# the interpreter (default: python3 on PATH). What happens next is in megatron_llm/launch.py.
# (Not a .py file on purpose: keep formatters away from the first lines.)
exec "${PYTHON:-python3}" -u "$0" "$@"
'''
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_llm.launch import main  # noqa: E402

sys.exit(main(sys.argv[1:], script=os.path.abspath(__file__)))
