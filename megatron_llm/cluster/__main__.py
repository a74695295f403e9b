"""Command-line helpers for cluster jobs.

python -m megatron_llm.cluster hostnames 'gpu[001-004,010],cpu07'
    one host per line (scontrol show hostnames where it exists, else our own parser)
python -m megatron_llm.cluster slurm --hostfile PATH [CONFIG] [overrides ...]
    inside a Slurm allocation: writes a DeepSpeed hostfile and prints shell `export` lines
    (MASTER_ADDR, MASTER_PORT, NNODES, RANKS_PER_NODE, NODES) for the batch script to eval;
    a summary goes to stderr. Without GPUs, the config's tp x pp x dp ranks are split over
    the nodes.
python -m megatron_llm.cluster code-hash
    the hash every rank compares at start (the same checkout gives the same hash)
"""

from __future__ import annotations

import argparse
import shlex
import sys

from megatron_llm.cluster import slurm


def _cpu_ranks(argv: list[str]) -> int:
    from megatron_llm.launch import ranks_needed

    return ranks_needed(argv)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_llm.cluster",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("hostnames", help="expand a Slurm node list")
    p.add_argument("nodelist")
    p.add_argument("--no-scontrol", action="store_true", help="our parser even if scontrol exists")
    p = sub.add_parser("slurm", help="hostfile and rendezvous variables for this allocation")
    p.add_argument("--hostfile", required=True, help="where to write the DeepSpeed hostfile")
    p.add_argument("run_args", nargs=argparse.REMAINDER, help="CONFIG and overrides (CPU only)")
    sub.add_parser("code-hash", help="the code hash the start-up check compares")
    args = parser.parse_args(argv)

    if args.command == "code-hash":
        from megatron_llm.cluster.checks import code_hash

        print(code_hash())
        return 0
    try:
        if args.command == "hostnames":
            print("\n".join(slurm.hostnames(args.nodelist, use_scontrol=not args.no_scontrol)))
            return 0
        import os

        job = slurm.job_from_env(os.environ, cpu_ranks=_cpu_ranks(args.run_args))
    except ValueError as e:  # SlurmError, ConfigError
        print(f"error: {e}", file=sys.stderr)
        return 2
    path = slurm.write_hostfile(args.hostfile, job.hosts, job.ranks_per_node)
    exports = {
        "MASTER_ADDR": job.master_addr,
        "MASTER_PORT": str(job.master_port),
        "NNODES": str(len(job.hosts)),
        "RANKS_PER_NODE": str(job.ranks_per_node),
        "NODES": " ".join(job.hosts),
    }
    for name, value in exports.items():
        print(f"export {name}={shlex.quote(value)}")
    shown = " ".join(job.hosts[:8]) + (" ..." if len(job.hosts) > 8 else "")
    print(
        f"[slurm] job {job.job_id or '?'}: {len(job.hosts)} node(s) ({shown}), "
        f"{job.ranks_per_node} rank(s) per node ({job.ranks_per_node_from}), world "
        f"{job.world_size}; master {job.master_addr}:{job.master_port}; hostfile {path}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
