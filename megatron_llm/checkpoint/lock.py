"""One run per checkpoint dir: a lock file that names its holder and shows it is alive.

``<checkpoint.dir>/.lock`` is JSON: ``host``, ``boot_id``, ``pid``, ``pid_start`` (the process's
start time as psutil reports it, so a reused pid is not taken for the holder), ``started``
(ISO time) and ``run_id``. Rank 0 takes it before the run writes anything and refreshes its
mtime every ``stale_after_s / 6`` seconds (the heartbeat) until the run ends; a clean exit
removes it.

Taking it is atomic on a local disk and on NFS alike: the holder's record is written to a
private file, then ``os.link``-ed to ``.lock``, which fails if ``.lock`` exists (no reliance on
local pids, and no O_EXCL semantics to trust on old NFS). A second run refuses with one line
naming the holder. A lock whose holder is gone is taken over with a warning: on the holder's own
host (same boot) when its pid is no longer that process; from any host when its heartbeat is
older than ``stale_after_s`` (mtimes come from the file server; keep node clocks in sync).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_llm.cluster.supervise import created

LOCK_NAME = ".lock"


class LockHeld(RuntimeError):
    """Another live run holds the checkpoint dir; the message names it."""


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _me(run_id: str) -> dict[str, Any]:
    return {
        "host": socket.gethostname(),
        "boot_id": _boot_id(),
        "pid": os.getpid(),
        "pid_start": created(os.getpid()),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "run_id": run_id,
    }


def _read(path: Path) -> tuple[dict[str, Any], float] | None:
    """(holder record, seconds since its heartbeat), or None if there is no lock."""
    try:
        age = time.time() - path.stat().st_mtime
        return json.loads(path.read_text()), age
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError):
        # Half-written by a holder killed between link and write cannot happen (the record is
        # written before the link); anything else unreadable is judged by its heartbeat alone.
        try:
            return {}, time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return None


def why_stale(holder: dict[str, Any], age: float, stale_after_s: float) -> str | None:
    """Why the holder is gone (a reason to take the lock over), or None if it may be alive."""
    # On the holder's own host a gone pid settles it at once; otherwise the heartbeat decides.
    same_machine = holder.get("host") == socket.gethostname()
    if same_machine and holder.get("boot_id") and holder.get("boot_id") != _boot_id():
        return "its host has rebooted since"
    if same_machine and holder.get("boot_id") == _boot_id() and "pid" in holder:
        start = created(int(holder["pid"]))
        if start is None:
            return f"pid {holder['pid']} is not running"
        if start != holder.get("pid_start"):
            return f"pid {holder['pid']} is now another process"
    if age > stale_after_s:
        return f"no heartbeat for {age:.0f} s (more than {stale_after_s:.0f} s)"
    return None


def describe(holder: dict[str, Any], age: float) -> str:
    if not holder:
        return f"an unreadable lock (last heartbeat {age:.0f} s ago)"
    return (
        f"a run on host {holder.get('host')} (pid {holder.get('pid')}, started "
        f"{holder.get('started')}, last heartbeat {age:.0f} s ago)"
    )


@dataclass
class DirLock:
    """The lock on one checkpoint dir, held by this process until :meth:`release`."""

    path: Path
    run_id: str
    stale_after_s: float
    _stop: threading.Event
    _thread: threading.Thread | None = None
    lost: str | None = None

    @classmethod
    def acquire(cls, folder: str | Path, *, stale_after_s: float = 60.0) -> DirLock:
        """Take ``folder``'s lock or raise :class:`LockHeld`; warns when taking over."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / LOCK_NAME
        run_id = uuid.uuid4().hex
        mine = folder / f"{LOCK_NAME}.{run_id}"
        mine.write_text(json.dumps(_me(run_id)) + "\n")
        try:
            for _ in range(3):  # a takeover raced by another starter: look again
                try:
                    os.link(mine, path)
                    break
                except FileExistsError:
                    pass
                found = _read(path)
                if found is None:
                    continue
                holder, age = found
                reason = why_stale(holder, age, stale_after_s)
                if reason is None:
                    raise LockHeld(
                        f"checkpoint dir {folder} is in use by {describe(holder, age)}; stop "
                        f"that run or choose another checkpoint.dir (lock: {path})"
                    )
                _take_over(path, folder, holder, run_id)
                _warn(f"{path}: taking over the lock of {describe(holder, age)}: {reason}")
            else:
                raise LockHeld(f"{path}: could not take the lock (other runs keep taking it)")
        finally:
            mine.unlink(missing_ok=True)
        lock = cls(path, run_id, stale_after_s, threading.Event())
        lock._thread = threading.Thread(target=lock._beat, name="ckpt-lock", daemon=True)
        lock._thread.start()
        return lock

    def holds(self) -> bool:
        found = _read(self.path)
        return found is not None and found[0].get("run_id") == self.run_id

    def _beat(self) -> None:
        every = max(self.stale_after_s / 6, 0.5)
        while not self._stop.wait(every):
            if not self.holds():
                self.lost = f"{self.path}: this run's lock was taken over or removed"
                _warn(self.lost)
                return
            with contextlib.suppress(OSError):  # a transient NFS error: beat again later
                os.utime(self.path)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.holds():
            self.path.unlink(missing_ok=True)


def _take_over(path: Path, folder: Path, holder: dict[str, Any], run_id: str) -> None:
    """Move the stale lock aside; if it turns out not to be the one judged stale (another
    starter replaced it meanwhile), put it back. The next os.link decides who holds it."""
    aside = folder / f"{LOCK_NAME}.stale-{run_id}"
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    try:
        moved = json.loads(aside.read_text())
    except (OSError, json.JSONDecodeError):
        moved = {}
    if moved.get("run_id") != holder.get("run_id"):
        with contextlib.suppress(FileExistsError):
            os.link(aside, path)
    aside.unlink(missing_ok=True)
