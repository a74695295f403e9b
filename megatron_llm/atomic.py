"""The project's one atomic writer: a file is either its old self or wholly its new self.

Every output the project writes in place (checkpoint pointers, manifests, corpora, tokenizer
files, shard manifests, hostfiles, dataset index caches) goes through :func:`open_atomic` or
:func:`write_atomic`: the bytes go to a temporary ``.NAME.tmp-PID-*`` in the same folder, are
fsynced, and the temporary is renamed over ``NAME`` (then the folder is fsynced, so the rename
survives a power cut). On any failure - a full disk, a read-only file system, an exception in
the caller's code, Ctrl-C - the temporary is removed and ``NAME`` is left as it was.

A whole folder (an export) is built in :func:`staging_dir` and put in place by
:func:`publish_dir`.

A failing write raises :class:`WriteFailed` with one line naming the path and the errno, so a
CLI can print it as is and exit 1.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


class WriteFailed(RuntimeError):
    """An output that could not be written; the message is one line: path, errno, what to do."""


def write_failed(path: str | Path, err: OSError) -> WriteFailed:
    """The one-line error for an OSError met while writing ``path``."""
    code = errno.errorcode.get(err.errno or 0, "error")
    hint = {
        errno.ENOSPC: "free space or choose another folder",
        errno.EDQUOT: "free quota or choose another folder",
        errno.EROFS: "the file system is read-only; choose another folder",
        errno.EACCES: "fix the permissions or choose another folder",
        errno.EPERM: "fix the permissions or choose another folder",
    }.get(err.errno or 0, "check the folder")
    return WriteFailed(
        f"{path}: cannot write ({code}: {err.strerror or err}); {hint}; "
        "earlier outputs are left as they were"
    )


class _Foreign(Exception):  # noqa: N818 (internal carrier, never escapes)
    def __init__(self, err: OSError) -> None:
        self.err = err


def os_error_in(error: BaseException) -> OSError | None:
    """The OSError behind ``error`` (itself, or in its cause/context chain), else None.
    torch.save reports a full disk as RuntimeError("unexpected pos ...") raised while handling
    the OSError(ENOSPC) of the file's write."""
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        # safetensors (Rust) keeps only the text: "I/O error: No space left on device (os error 28)"
        code = re.search(r"\(os error (\d+)\)", str(e))
        if code:
            return OSError(int(code[1]), os.strerror(int(code[1])))
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def open_atomic(path: str | Path, mode: str = "wb", **kwargs: Any) -> Iterator[IO[Any]]:
    """``with open_atomic(p, "w") as f: f.write(...)``: ``p`` appears whole or not at all."""
    if mode not in ("w", "wb"):
        raise ValueError(f"open_atomic: mode {mode!r}; use 'w' or 'wb'")
    path = Path(path)
    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-{os.getpid()}-")
        with os.fdopen(fd, mode, **kwargs) as f:
            try:
                yield f
            except OSError as e:
                if e.filename not in (None, tmp):  # the caller's own reading failed: not ours
                    raise _Foreign(e) from e
                raise
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        fsync_dir(path.parent)
    except _Foreign as e:
        raise e.err from None
    except OSError as e:
        raise write_failed(path, e) from e
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def staging_dir(out: str | Path) -> Path:
    """An empty ``.NAME.tmp-PID-*`` folder beside ``out`` to build a whole output folder in,
    then :func:`publish_dir` it. Folders left by writers that died (their pid is gone) are
    removed first."""
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        for stale in out.parent.glob(f".{out.name}.tmp-*"):
            pid = stale.name[len(f".{out.name}.tmp-") :].split("-", 1)[0]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(stale, ignore_errors=True)
        return Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-{os.getpid()}-"))
    except OSError as e:
        raise write_failed(out, e) from e


@contextlib.contextmanager
def building_dir(out: str | Path) -> Iterator[Path]:
    """``with building_dir(out) as tmp:`` fill ``tmp``; ``out`` then appears whole, or on any
    failure not at all (the staging folder removed; a failed write is one WriteFailed line)."""
    tmp = staging_dir(out)
    try:
        yield tmp
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        cause = os_error_in(e)
        if cause is not None and not isinstance(e, WriteFailed):
            raise write_failed(out, cause) from e
        raise
    publish_dir(tmp, out)


def publish_dir(tmp: Path, out: str | Path) -> None:
    """Put a complete staging folder in place of ``out`` (replacing an older one)."""
    out = Path(out)
    try:
        fsync_dir(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
        fsync_dir(out.parent)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_failed(out, e) from e


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Replace ``path`` with ``data`` atomically (str is written as UTF-8)."""
    with open_atomic(path, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
