"""Checks every rank runs at start, so a misconfigured job fails in seconds with a clear message.

Each rank reports its host, code hash, library versions, visible GPUs and NCCL variables; the
reports are gathered over a gloo group (no GPU needed) and every rank draws the same
conclusions: the same code everywhere (a hash of the package's Python files and the launch
scripts, so a stale checkout on one node is named), the same torch and DeepSpeed, one GPU per
local rank, and a world size that fits the config. Rank 0 prints a short picture of the job,
including every NCCL_* / TORCH_NCCL_* variable (and which hosts differ).
"""

from __future__ import annotations

import datetime
import hashlib
import os
import socket
from collections import defaultdict
from functools import cache
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_llm.parallel.config import ParallelConfig

ROOT = Path(__file__).resolve().parents[2]


class EnvironmentCheckError(RuntimeError):
    """The job cannot run as started; the message says why and what to change."""


@cache
def code_hash() -> str:
    """sha256 (12 hex digits) of the package's .py files and launch/ scripts, by path."""
    files = sorted((ROOT / "megatron_llm").rglob("*.py")) + sorted((ROOT / "launch").rglob("*"))
    h = hashlib.sha256()
    for path in files:
        if path.is_file() and "__pycache__" not in path.parts:
            h.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def git_commit() -> str | None:
    head = ROOT / ".git" / "HEAD"
    try:
        ref = head.read_text().strip()
        if ref.startswith("ref: "):
            return (ROOT / ".git" / ref[5:]).read_text().strip()[:10]
        return ref[:10]
    except OSError:
        return None


def nccl_vars(env: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ) if env is None else env
    return {k: v for k, v in sorted(env.items()) if k.startswith(("NCCL_", "TORCH_NCCL_"))}


def local_report() -> dict[str, Any]:
    import deepspeed

    return {
        "rank": dist.get_rank(),
        "host": socket.gethostname(),
        "local_rank": int(os.environ.get("LOCAL_RANK", "0")),
        "code": code_hash(),
        "git": git_commit(),
        "versions": f"torch {torch.__version__}, deepspeed {deepspeed.__version__}",
        "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "nccl": nccl_vars(),
    }


def _ranges(ranks: list[int]) -> str:
    out, start = [], None
    for i, r in enumerate(sorted(ranks)):
        if start is None:
            start = r
        if i + 1 == len(ranks) or sorted(ranks)[i + 1] != r + 1:
            out.append(str(start) if start == r else f"{start}-{r}")
            start = None
    return ",".join(out)


def _by(reports: list[dict[str, Any]], field: str) -> dict[Any, list[dict[str, Any]]]:
    groups: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for r in reports:
        value = r[field]
        groups[tuple(value.items()) if isinstance(value, dict) else value].append(r)
    return groups


def _where(reports: list[dict[str, Any]]) -> str:
    hosts = sorted({r["host"] for r in reports})
    shown = ", ".join(hosts[:4]) + (f" and {len(hosts) - 4} more" if len(hosts) > 4 else "")
    return f"ranks {_ranges([r['rank'] for r in reports])} on {shown}"


def problems(reports: list[dict[str, Any]], parallel: ParallelConfig) -> list[str]:
    """Everything wrong with the job, one sentence each (empty: all fine)."""
    found = []
    code = _by(reports, "code")
    if len(code) > 1:
        parts = [f"{h} ({_where(rs)})" for h, rs in code.items()]
        found.append(
            f"the code differs between ranks: {'; '.join(parts)}; put the same checkout on "
            "every node (python -m megatron_llm.cluster code-hash prints a node's hash)"
        )
    versions = _by(reports, "versions")
    if len(versions) > 1:
        parts = [f"{v} ({_where(rs)})" for v, rs in versions.items()]
        found.append(f"library versions differ between ranks: {'; '.join(parts)}")
    with_gpu = [r for r in reports if r["gpus"]]
    if with_gpu and len(with_gpu) < len(reports):
        without = [r for r in reports if not r["gpus"]]
        found.append(f"some ranks see no GPU ({_where(without)}) while others do")
    for r in with_gpu:
        if r["local_rank"] >= r["gpus"]:
            found.append(
                f"rank {r['rank']} on {r['host']} has LOCAL_RANK {r['local_rank']} but sees only "
                f"{r['gpus']} GPU(s) (CUDA_VISIBLE_DEVICES={r['visible']}): start one rank per "
                "GPU, and do not bind one GPU per task (srun --gpus-per-task) here"
            )
    try:
        parallel.resolve_dp(len(reports))
    except ValueError as e:
        found.append(str(e))
    return found


def summary(reports: list[dict[str, Any]]) -> str:
    hosts = _by(reports, "host")
    r0 = reports[0]
    gpus = "none: CPU ranks over gloo" if not r0["gpus"] else f"{r0['gpus']} per host"
    shown = [f"{h} ({_ranges([r['rank'] for r in rs])})" for h, rs in list(hosts.items())[:8]]
    lines = [
        f"[env] {len(reports)} ranks on {len(hosts)} host(s): "
        + ", ".join(shown)
        + (" ..." if len(hosts) > 8 else ""),
        f"[env] code {r0['code']}"
        + (f" (git {r0['git']})" if r0["git"] else "")
        + f" on every rank; {r0['versions']}; GPUs visible: {gpus}",
    ]
    nccl = _by(reports, "nccl")
    for values, rs in nccl.items():
        where = "" if len(nccl) == 1 else f" ({_where(rs)})"
        shown = " ".join(f"{k}={v}" for k, v in values) or "none set"
        lines.append(f"[env] NCCL variables{where}: {shown}")
    return "\n".join(lines)


def check_environment(parallel: ParallelConfig) -> list[dict[str, Any]]:
    """Gather every rank's report; on problems raise EnvironmentCheckError, the same everywhere."""
    timeout = datetime.timedelta(minutes=parallel.timeout_minutes)
    group = (
        dist.new_group(backend="gloo", timeout=timeout) if dist.get_backend() != "gloo" else None
    )
    reports: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(reports, local_report(), group=group)
    found = problems(reports, parallel)
    if found:
        raise EnvironmentCheckError("environment check failed:\n  - " + "\n  - ".join(found))
    if dist.get_rank() == 0:
        print(summary(reports), flush=True)
    return reports
