"""What a Slurm allocation says about the job: nodes, master address and port, GPUs per node.

``launch/slurm/pretrain.sbatch`` calls ``python -m megatron_llm.cluster slurm`` inside the
allocation, which uses :func:`job_from_env` and writes a DeepSpeed hostfile with
:func:`write_hostfile`. The node list comes from ``scontrol show hostnames`` when that command
exists, else from :func:`expand_nodelist`, which reads Slurm's compressed host list syntax.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path

from megatron_llm.atomic import write_atomic

# Ports 10000-29999: below Linux's ephemeral range (32768+), so a rendezvous port derived from
# the job id does not collide with ports the kernel hands out.
PORT_BASE, PORT_SPAN = 10000, 20000


class SlurmError(ValueError):
    pass


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets: 'a[1,2],b' -> ['a[1,2]', 'b']."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise SlurmError(f"node list {text!r}: nested '[' at position {i}")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise SlurmError(f"node list {text!r}: ']' without '[' at position {i}")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise SlurmError(f"node list {text!r}: '[' is never closed")
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _expand_range(spec: str, whole: str) -> list[str]:
    """'001-004,010' -> ['001', '002', '003', '004', '010'] (the width of the first number)."""
    out = []
    for item in spec.split(","):
        item = item.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if not m:
            raise SlurmError(f"node list {whole!r}: bad range {item!r} in [{spec}]")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise SlurmError(f"node list {whole!r}: range {item!r} runs backwards")
        out += [str(n).zfill(len(lo)) for n in range(int(lo), int(hi) + 1)]
    return out


def _expand_one(name: str, whole: str) -> list[str]:
    # 'rack[1-2]-n[01-02]' -> every combination, the last bracket fastest (Slurm's order).
    m = re.match(r"([^\[]*)\[([^\]]*)\](.*)", name)
    if not m:
        if "]" in name:
            raise SlurmError(f"node list {whole!r}: ']' without '[' in {name!r}")
        return [name]
    prefix, spec, rest = m.groups()
    tails = _expand_one(rest, whole)
    return [prefix + number + tail for number in _expand_range(spec, whole) for tail in tails]


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compressed host list, expanded in order: 'gpu[001-002,010],cpu07' ->
    ['gpu001', 'gpu002', 'gpu010', 'cpu07']. Raises SlurmError naming the bad part."""
    hosts: list[str] = []
    for part in _split_top_level(nodelist.strip()):
        hosts += _expand_one(part, nodelist)
    return hosts


def hostnames(nodelist: str, use_scontrol: bool = True) -> list[str]:
    """The job's hosts: ``scontrol show hostnames`` where it exists, else expand_nodelist."""
    if use_scontrol and shutil.which("scontrol"):
        proc = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True
        )
        if proc.returncode == 0 and proc.stdout.split():
            return proc.stdout.split()
    return expand_nodelist(nodelist)


def _count_gpus(value: str) -> int | None:
    # SLURM_GPUS_PER_NODE: "4", "a100:4", "gpu:a100:4"; several types: "a100:2,v100:2".
    total = 0
    for part in value.split(","):
        m = re.search(r"(\d+)(?:\(.*\))?$", part.strip())
        if not m:
            return None
        total += int(m.group(1))
    return total


def gpus_per_node(env: Mapping[str, str]) -> tuple[int, str]:
    """(GPUs on each node, where that number came from); 0 when no GPU is found."""
    if env.get("SLURM_GPUS_ON_NODE", "").isdigit():
        return int(env["SLURM_GPUS_ON_NODE"]), "SLURM_GPUS_ON_NODE"
    if env.get("SLURM_GPUS_PER_NODE"):
        n = _count_gpus(env["SLURM_GPUS_PER_NODE"])
        if n is not None:
            return n, "SLURM_GPUS_PER_NODE"
    for name in ("SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "CUDA_VISIBLE_DEVICES"):
        ids = [i for i in env.get(name, "").split(",") if i.strip() and i.strip() != "-1"]
        if ids:
            return len(ids), name
    if shutil.which("nvidia-smi"):
        proc = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
        n = sum(line.startswith("GPU ") for line in proc.stdout.splitlines())
        if proc.returncode == 0 and n:
            return n, "nvidia-smi -L"
    return 0, "no GPU found"


def master_port(env: Mapping[str, str]) -> int:
    """MASTER_PORT if set, else a port derived from the job id (the same on every node)."""
    if env.get("MASTER_PORT"):
        return int(env["MASTER_PORT"])
    job = env.get("SLURM_JOB_ID", "0")
    return PORT_BASE + int(job) % PORT_SPAN if job.isdigit() else 29500


@dataclasses.dataclass(frozen=True)
class SlurmJob:
    job_id: str
    hosts: list[str]  # in Slurm's order; hosts[0] is the master
    master_addr: str
    master_port: int
    ranks_per_node: int
    ranks_per_node_from: str  # where ranks_per_node came from, for the log

    @property
    def world_size(self) -> int:
        return len(self.hosts) * self.ranks_per_node


def job_from_env(env: Mapping[str, str], cpu_ranks: int | None = None) -> SlurmJob:
    """The job as this allocation describes it.

    ranks_per_node: RANKS_PER_NODE if set, else the GPUs per node, else (no GPU) cpu_ranks
    spread evenly over the nodes.
    """
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise SlurmError(
            "SLURM_JOB_NODELIST is not set: run inside an allocation (sbatch, salloc), or set "
            "it yourself, e.g. SLURM_JOB_NODELIST=node[01-02]"
        )
    hosts = hostnames(nodelist)
    if env.get("RANKS_PER_NODE"):
        per_node, source = int(env["RANKS_PER_NODE"]), "RANKS_PER_NODE"
    else:
        per_node, source = gpus_per_node(env)
        if per_node == 0:
            if not cpu_ranks:
                raise SlurmError("no GPU found and no RANKS_PER_NODE set: how many ranks per node?")
            if cpu_ranks % len(hosts):
                raise SlurmError(
                    f"no GPU found: the config's {cpu_ranks} CPU ranks do not split evenly over "
                    f"{len(hosts)} nodes; set RANKS_PER_NODE"
                )
            per_node, source = cpu_ranks // len(hosts), f"no GPU: {cpu_ranks} CPU ranks in config"
    return SlurmJob(
        job_id=env.get("SLURM_JOB_ID", ""),
        hosts=hosts,
        master_addr=env.get("MASTER_ADDR") or hosts[0],
        master_port=master_port(env),
        ranks_per_node=per_node,
        ranks_per_node_from=source,
    )


def write_hostfile(path: str | Path, hosts: list[str], slots: int) -> Path:
    """A DeepSpeed (MPI-style) hostfile: one 'host slots=N' line per node."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, "".join(f"{h} slots={slots}\n" for h in hosts))
    return path


def read_hostfile(path: str | Path) -> list[str]:
    hosts = []
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            hosts.append(line.split()[0])
    return hosts


def node_rank(hosts: list[str], env: Mapping[str, str] | None = None) -> int | None:
    """This node's index in the hostfile: by SLURMD_NODENAME, hostname, then SLURM_NODEID."""
    env = os.environ if env is None else env
    import socket

    names = [env.get("SLURMD_NODENAME", ""), socket.gethostname(), socket.getfqdn()]
    for name in names:
        for candidate in (name, name.split(".")[0]):
            if candidate and candidate in hosts:
                return hosts.index(candidate)
    if env.get("SLURM_NODEID", "").isdigit():
        return int(env["SLURM_NODEID"])
    return None
