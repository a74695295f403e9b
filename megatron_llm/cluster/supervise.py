"""Run the deepspeed launcher as a child and turn signals to us into a checkpoint-and-stop.

DeepSpeed's per-node launcher (deepspeed/launcher/launch.py) answers SIGTERM by terminating
every rank (SIGTERM, then SIGKILL after 30 s) and exiting 1, and SIGUSR1 kills it outright.
Neither lets the ranks save. So ``launch/pretrain.sh`` does not exec the launcher; it stays its
parent and:

- starts it in a new session, so a Ctrl-C or a signal to our process group reaches only us;
- starts it with SIGUSR1 ignored (inherited across exec): a SIGUSR1 that Slurm sends to every
  process of a job step then leaves the launchers alone, and each rank, which installs its own
  handler (megatron_llm/training/preemption.py), still gets it;
- on SIGTERM, SIGUSR1 or SIGINT sends SIGUSR1 to each rank process once that rank has its
  handler installed (read from /proc/PID/status), so a signal during start-up is not lost;
  the ranks finish the step, save a checkpoint and exit 0, and so do we;
- on a second such signal kills everything at once (no save) and exits 128 + signal;
- if the job fails, names the first of this node's ranks that ended (DeepSpeed's launcher
  prints the exit code next to the wrong rank's command line).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from types import FrameType

import psutil

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
RANK_MARK = "--local_rank="


def catches(pid: int, sig: int) -> bool:
    """Whether process pid has a handler installed for sig (Linux /proc; True elsewhere)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    except OSError:
        return True
    return True


def rank_processes(root: int) -> list[psutil.Process]:
    """The training ranks below root: processes the deepspeed launcher gave --local_rank=N."""
    try:
        children = psutil.Process(root).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    ranks = []
    for p in children:
        try:
            if any(a.startswith(RANK_MARK) for a in p.cmdline()):
                ranks.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return ranks


class Supervisor:
    def __init__(self, cmd: list[str], env: dict[str, str]) -> None:
        self.cmd, self.env = cmd, env
        self.stop_signal: str | None = None
        self.kill_signal: int | None = None
        self.signalled: set[int] = set()
        self.ranks: dict[int, str] = {}  # pid -> "rank R (pid P)", of ranks seen running
        self.first_gone: str | None = None

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.stop_signal is None:
            self.stop_signal = name
            print(
                f"[launch] {name} received: every rank saves a checkpoint after its current "
                f"step and exits (send {name} again to stop at once, without saving)",
                flush=True,
            )
        else:
            self.kill_signal = signum

    def _deliver(self, root: int) -> None:
        for p in rank_processes(root):
            if p.pid not in self.signalled and catches(p.pid, signal.SIGUSR1):
                try:
                    p.send_signal(signal.SIGUSR1)
                except psutil.NoSuchProcess:
                    continue
                self.signalled.add(p.pid)

    def _track(self, root: int) -> None:
        running = {p.pid: p for p in rank_processes(root)}
        for pid, p in running.items():
            if pid not in self.ranks:
                try:
                    self.ranks[pid] = f"rank {p.environ().get('RANK', '?')} (pid {pid})"
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    self.ranks[pid] = f"the rank with pid {pid}"
        gone = [pid for pid in self.ranks if pid not in running]
        if gone and self.first_gone is None and len(gone) < len(self.ranks):
            self.first_gone = self.ranks[gone[0]]

    def run(self) -> int:
        def ignore_usr1() -> None:
            signal.signal(signal.SIGUSR1, signal.SIG_IGN)

        child = subprocess.Popen(
            self.cmd, env=self.env, start_new_session=True, preexec_fn=ignore_usr1
        )
        previous = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        try:
            while child.poll() is None:
                if self.kill_signal is not None:
                    name = signal.Signals(self.kill_signal).name
                    print(f"[launch] second {name}: killing every rank now", flush=True)
                    try:
                        os.killpg(child.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass  # already gone
                    child.wait()
                    return 128 + self.kill_signal
                if self.stop_signal is not None:
                    self._deliver(child.pid)
                self._track(child.pid)
                time.sleep(0.2)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        code = child.returncode
        code = 128 - code if code < 0 else code
        if code and self.first_gone:
            print(
                f"[launch] the job failed (exit code {code}); the first rank on this node "
                f"({socket.gethostname()}) to end was {self.first_gone}",
                file=sys.stderr,
                flush=True,
            )
        return code
