"""Heartbeats: when a rank dies, every other rank exits non-zero soon, naming it.

A dead peer shows up differently per backend: gloo raises at once with "Connection closed by
peer", NCCL waits in the collective until ``parallel.timeout_minutes``. Neither names the rank.
So each rank runs a thread that, every ``interval`` seconds, over its own client of the
rendezvous store (the TCPStore at MASTER_ADDR:MASTER_PORT that rank 0 serves):

- increments ``beat/<rank>``;
- reads the counter of the next rank in a ring (``(rank + 1) % world``: one read per rank, so
  the store's load grows with the world size, not its square). If it has not moved for
  ``timeout`` seconds (``interval * 3`` once any rank has reported a failed collective), this
  rank posts the verdict "rank R on host H (pid P): no heartbeat for N s";
- reads the verdict key; once it is set, prints it and exits with status 1.

If the store itself is gone, rank 0 (which serves it) died or its host is unreachable: the
thread says so and exits 1. A rank that fails on its own posts "rank R ... failed: error" so
the others stop at once. Store keys live under ``megatron_llm/watchdog/``.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
import threading
import time

import psutil
import torch.distributed as dist

PREFIX = "megatron_llm/watchdog"
EXIT_CODE = 1


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class Watchdog:
    def __init__(self, rank: int, world: int, timeout: float, interval: float | None = None):
        self.rank, self.world, self.timeout = rank, world, timeout
        self.interval = interval or (2.0 if world <= 256 else 5.0)
        self.host = socket.gethostname()
        self.addr = os.environ["MASTER_ADDR"]
        self.port = int(os.environ["MASTER_PORT"])
        self.store = dist.TCPStore(
            self.addr,
            self.port,
            is_master=False,
            timeout=datetime.timedelta(seconds=30),
            wait_for_workers=False,
        )
        self.me = f"rank {rank} on host {self.host} (pid {os.getpid()})"
        self.store.set(self._key("who", rank), self.me)
        self._stop = threading.Event()
        self._quiet = threading.Event()  # the main thread is handling a failure itself
        self._who0 = "rank 0"
        self.thread = threading.Thread(target=self._run, name="megatron_llm-watchdog", daemon=True)

    def _key(self, *parts: object) -> str:
        return "/".join([PREFIX, *map(str, parts)])

    def describe(self, rank: int) -> str:
        key = self._key("who", rank)
        return self.store.get(key).decode() if self.store.check([key]) else f"rank {rank}"

    def _silent(self, rank: int, seconds: float) -> str:
        who = self.describe(rank)
        # "rank R on host H (pid P)": on our own host we can tell a dead process from a hung one.
        host, pid = who.split(" on host ")[-1].split(" (pid ")[0], who.rpartition("pid ")[2][:-1]
        if host == self.host and pid.isdigit():
            try:
                alive = psutil.Process(int(pid)).status() != psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                alive = False
            except psutil.Error:  # another user's process: cannot tell
                alive = None
            if alive is False:
                return f"{who}: the process is gone (no heartbeat for {seconds:.0f} s)"
            if alive:
                return f"{who}: alive but no heartbeat for {seconds:.0f} s: it hangs"
        return f"{who}: no heartbeat for {seconds:.0f} s: it died, hangs or its host is down"

    def start(self) -> Watchdog:
        if self.timeout > 0:
            self.thread.start()
        return self

    def stop(self) -> None:
        """Before a clean exit: this rank is done, and no longer watches anyone."""
        self._stop.set()
        if self.thread.is_alive():
            self.thread.join()
        try:
            self.store.set(self._key("done", self.rank), "1")
        except (RuntimeError, OSError):
            pass  # the store may be gone already; nobody then needs to know

    def post(self, verdict: str) -> str:
        """Post a verdict unless one exists; returns the one that stands."""
        key = self._key("dead")
        return self.store.compare_set(key, "", verdict).decode() or verdict

    def verdict(self) -> str | None:
        key = self._key("dead")
        return self.store.get(key).decode() if self.store.check([key]) else None

    def _exit(self, text: str) -> None:
        _say(f"[watchdog] rank {self.rank} exits: {text}")
        os._exit(EXIT_CODE)

    def _run(self) -> None:
        watched = (self.rank + 1) % self.world
        beat = self._key("beat", watched)
        last_value, last_change = -1, time.monotonic()
        while not self._stop.wait(self.interval):
            try:
                if self.rank != 0 and self._who0 == "rank 0":
                    self._who0 = self.describe(0)
                self.store.add(self._key("beat", self.rank), 1)
                found = self.verdict()
                if found and not self._quiet.is_set():
                    self._exit(found)
                if self.world == 1 or self.store.check([self._key("done", watched)]):
                    continue
                value, now = self.store.add(beat, 0), time.monotonic()
                if value != last_value:
                    last_value, last_change = value, now
                    continue
                fast = self.store.check([self._key("suspect")])
                limit = max(3 * self.interval, 5.0) if fast else self.timeout
                if now - last_change > limit:
                    found = self.post(self._silent(watched, now - last_change))
                    if not self._quiet.is_set():
                        self._exit(found)
            except (RuntimeError, OSError) as e:  # the store (served by rank 0) is gone
                if self._stop.is_set():
                    return
                self._exit(
                    f"lost the rendezvous store at {self.addr}:{self.port}, which "
                    f"{self._who0} serves: rank 0 died or its host is unreachable ({e})"
                )

    def explain_failure(self, error: BaseException) -> str | None:
        """Called by the main thread when training raised: whose fault was it?

        Tells every watcher to use the short limit, then waits a few heartbeats for a verdict
        about another rank. None means nobody else is known dead: the error is this rank's own
        (the caller then posts it with :meth:`post`).
        """
        self._quiet.set()
        try:
            self.store.set(self._key("suspect"), "1")
            deadline = time.monotonic() + max(3 * self.interval, 5.0) + 3 * self.interval
            while time.monotonic() < deadline:
                found = self.verdict()
                if found:
                    return found
                time.sleep(0.5)
        except (RuntimeError, OSError) as e:
            return (
                f"lost the rendezvous store at {self.addr}:{self.port}, which {self._who0} "
                f"serves: rank 0 died or its host is unreachable ({e})"
            )
        return None
