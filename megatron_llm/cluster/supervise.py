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

If we die without a chance to act (``kill -9``, the OOM killer), nothing of the job may live
on: the chain is us -> deepspeed runner (its own session) -> deepspeed launch -> ranks.
The runner gets PR_SET_PDEATHSIG=SIGKILL (it dies with us; set in the child before exec, and
our Popen runs on the main thread, whose exit is what the kernel watches). Each rank, which
knows our pid and start time from MEGATRON_LLM_LAUNCHER, sets PR_SET_PDEATHSIG=SIGKILL for its
own parent (deepspeed launch) and polls our pid twice a second; when we are gone it SIGKILLs
its whole process group (the runner's session: runner, launch and every rank of the node) at
once, so no rank is asked by DeepSpeed's launch to stop "gracefully" (SIGTERM, which our ranks
answer with a checkpoint). Nothing is saved.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from types import FrameType

import psutil

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
RANK_MARK = "--local_rank="
LAUNCHER_ENV = "MEGATRON_LLM_LAUNCHER"  # "PID:CREATE_TIME" of the process the user started
_PR_SET_PDEATHSIG = 1
_LIBC: ctypes.CDLL | None = None


def created(pid: int) -> float | None:
    """The process's start time (psutil's create_time), or None if there is no such pid (or
    only its zombie: killed, not yet reaped by its parent)."""
    try:
        p = psutil.Process(pid)
        return None if p.status() == psutil.STATUS_ZOMBIE else p.create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None


def _libc() -> ctypes.CDLL | None:
    global _LIBC
    if _LIBC is None and sys.platform.startswith("linux"):
        _LIBC = ctypes.CDLL(None, use_errno=True)
    return _LIBC


def die_with_parent(parent: int) -> None:
    """SIGKILL this process when its parent thread ends (Linux); exit now if it already has."""
    libc = _libc()
    if libc is None:
        return
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return  # not fatal: the launcher watch below still ends the rank
    if os.getppid() != parent:  # the parent died before the prctl took effect
        os._exit(1)


def watch_launcher(poll_s: float = 0.5) -> None:
    """In a rank started by our Supervisor: end this node's whole job, without a checkpoint,
    once the launcher the user started is gone. A no-op for ranks started any other way."""
    mark = os.environ.get(LAUNCHER_ENV)
    if not mark:
        return
    pid_text, _, created_text = mark.partition(":")
    pid, when = int(pid_text), float(created_text)
    die_with_parent(os.getppid())

    def watch() -> None:
        while created(pid) == when:
            time.sleep(poll_s)
        print(
            f"error ({socket.gethostname()} pid {os.getpid()}): the launcher this job was "
            f"started from (pid {pid}) is gone; stopping every rank of this node now, "
            "without a checkpoint",
            file=sys.stderr,
            flush=True,
        )
        if os.getpgid(0) == os.getsid(0):  # our own session (start_new_session): all of it
            os.killpg(0, signal.SIGKILL)
        os._exit(1)

    threading.Thread(target=watch, name="launcher-watch", daemon=True).start()


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
        me = os.getpid()
        _libc()  # loaded here: the child between fork and exec should only make calls

        def in_child() -> None:
            signal.signal(signal.SIGUSR1, signal.SIG_IGN)
            die_with_parent(me)

        env = {**self.env, LAUNCHER_ENV: f"{me}:{created(me)!r}"}
        child = subprocess.Popen(self.cmd, env=env, start_new_session=True, preexec_fn=in_child)
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
