"""The checkpoint format, its atomic save, and finding a checkpoint to resume from.

Layout of ``checkpoint.dir`` (format ``megatron_llm-checkpoint``, version 2; version 1 loads)::

    latest                    text: the tag of the newest complete checkpoint. Replaced
                              atomically, and only after that checkpoint is in place.
    global_step<N>/           one complete checkpoint; renamed into place only when whole
        manifest.json         format, version, step, the layout it was saved at, the tensor
                              index, and {file: {bytes, algorithm, digest}} for every other
                              file (algorithm: hashing.CHUNKED; older saves {bytes, sha256})
        run_state.json        step, consumed_samples, tokens_seen, train_samples (the sample
                              count the dataset indices were built for), engine counters,
                              loss scaler (fp16), and the tokenizer's sha256
        config.yaml           the resolved run config
        model-<rank>.pt       {name: 1-d fp32 tensor}: the elements of that parameter this rank
                              wrote (its shard of it: see shards.py), in torch.save's zip format
        optim-<rank>.pt       {name: {"exp_avg": ..., "exp_avg_sq": ...}}, the same elements
        rng-<rank>.pt         that rank's random streams (restored at the same layout only)
    .tmp-global_step<N>-*/    a save in progress, or one killed mid-way: never read, and
                              removed by the next save

The tensor index, ``{name: {"shape", "pieces": [{file, at, offset, size}]}}``: each piece is a
box of the single-device tensor (global ``offset`` and ``size`` per dimension) stored as
elements ``at`` .. ``at + prod(size)`` of ``file[name]`` (and of the optim file's, for the
moments). The pieces of a tensor tile it exactly once, so a checkpoint loads at any (tp, pp, dp,
zero) and each rank reads only the boxes it needs. Version 1 (``{name: {file, shape}}``, whole
tensors) reads as one piece per tensor. Every file is written under the temporary folder,
fsynced, and the folder is renamed into place; a process killed at any moment leaves the
previous checkpoint and ``latest`` as they were.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pickle
import shutil
import time
import warnings
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

import torch
import yaml

from megatron_llm import hashing
from megatron_llm.atomic import fsync_dir, os_error_in, write_atomic, write_failed
from megatron_llm.checkpoint import rng, shards
from megatron_llm.checkpoint.errors import CheckpointError
from megatron_llm.hashing import CHUNKED, PLAIN, ChunkedSha256, file_digest

FORMAT = "megatron_llm-checkpoint"
VERSION = 2
READABLE = (1, 2)  # versions this code loads
TAG_PREFIX = "global_step"
TMP_PREFIX = ".tmp-"


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step}"


def step_of(path: Path) -> int | None:
    name = path.name
    if not name.startswith(TAG_PREFIX) or not name[len(TAG_PREFIX) :].isdigit():
        return None
    return int(name[len(TAG_PREFIX) :])


class _Hashing:
    """A binary file that checksums the bytes on their way to it: one pass, no read-back.

    The digest is :data:`hashing.CHUNKED`: a large buffer's chunks are hashed on the pool's
    threads while this one writes it (hashlib and the write both release the GIL), so a file
    costs about max(write, sha256 / threads), not write + sha256.
    """

    PARALLEL_BYTES = 1 << 20  # smaller writes (zip headers) are hashed inline

    def __init__(self, f: IO[bytes], pool: ThreadPoolExecutor) -> None:
        self._f = f
        self._pool = pool
        self.digest = ChunkedSha256()

    @property
    def size(self) -> int:
        return self.digest.size

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        jobs = self.digest.jobs(view)
        if len(view) < self.PARALLEL_BYTES:
            for job in jobs:
                job()
            return self._f.write(view)
        hashed = [self._pool.submit(job) for job in jobs]
        try:
            return self._f.write(view)
        finally:
            for h in hashed:  # before the next buffer (chunks in order) and its reuse
                h.result()

    def flush(self) -> None:
        self._f.flush()


class FolderWriter:
    """Writes the files of a checkpoint folder, each fsynced, and their manifest entries.

    Each file's digest (:data:`hashing.CHUNKED`) is computed from the bytes on their way to
    the file (:class:`_Hashing`), so the checksum costs no second read of the file. Call
    :meth:`entries` (or :meth:`close`) when done.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._entries: dict[str, dict[str, Any]] = {}
        self._pool = ThreadPoolExecutor(hashing.threads(), thread_name_prefix="sha256")

    @contextlib.contextmanager
    def _file(self, name: str) -> Iterator[_Hashing]:
        path = self.folder / name
        try:
            with open(path, "wb") as f:
                out = _Hashing(f, self._pool)
                yield out
                f.flush()
                os.fsync(f.fileno())
            self._entries[name] = {
                "bytes": out.size,
                "algorithm": CHUNKED,
                "digest": out.digest.hexdigest(),
            }
        except Exception as e:  # a full disk: one line naming the file and the errno
            err = os_error_in(e)
            if err is None:
                raise
            raise write_failed(path, err) from e

    def tensors(self, name: str, obj: Any) -> None:
        with self._file(name) as f:
            torch.save(obj, f)

    def text(self, name: str, text: str) -> None:
        with self._file(name) as f:
            f.write(text.encode("utf-8"))

    def close(self) -> None:
        self._pool.shutdown()

    def entries(self) -> dict[str, dict[str, Any]]:
        """{file: {bytes, algorithm, digest}} of everything written; the writer is done."""
        self._pool.shutdown()
        return dict(self._entries)


def new_tmp_dir(root: Path, step: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f"{TMP_PREFIX}{TAG_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)  # saves killed mid-way; never loadable
    tmp = root / f"{TMP_PREFIX}{tag_for(step)}-{os.getpid()}-{time.time_ns()}"
    tmp.mkdir()
    return tmp


def finish(
    tmp: Path,
    root: Path,
    *,
    step: int,
    layout: dict[str, int],
    optimizer: bool,
    tensors: dict[str, Any],
    files: dict[str, Any],
) -> Path:
    """Write the manifest of a complete temporary folder, then :func:`publish` it."""
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "step": step,
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "layout": layout,
        "optimizer": optimizer,
        "tensors": dict(sorted(tensors.items())),
        "files": dict(sorted(files.items())),
    }
    with open(tmp / "manifest.json", "w") as f:
        f.write(json.dumps(manifest, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return publish(tmp, root, step)


def publish(tmp: Path, root: Path, step: int) -> Path:
    """Rename a complete temporary folder into place, then move ``latest`` to it."""
    fsync_dir(tmp)
    final = root / tag_for(step)
    if final.exists():  # a fresh run re-saving a step an earlier run also saved
        old = root / f"{TMP_PREFIX}old-{final.name}-{time.time_ns()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(root)
    write_atomic(root / "latest", final.name + "\n")
    return final


def prune(root: Path, *, keep_last: int, keep_every: int) -> list[Path]:
    """Delete checkpoints outside the last ``keep_last`` and the multiples of ``keep_every``."""
    if keep_last <= 0:
        return []
    steps = sorted((s, p) for p in root.iterdir() if (s := step_of(p)) is not None)
    latest = read_latest(root)
    kept = {s for s, _ in steps[-keep_last:]}
    removed = []
    for s, path in steps:
        if s in kept or (keep_every and s % keep_every == 0) or path.name == latest:
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def read_latest(root: Path) -> str | None:
    """The tag ``latest`` names, or None. Only a name: a folder is trusted by its manifest."""
    try:
        tag = (root / "latest").read_text(encoding="utf-8").strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except UnicodeDecodeError:
        tag = "<binary>"
    if tag and step_of(Path(tag)) is None:
        warnings.warn(
            f"{root / 'latest'}: not a checkpoint tag ({tag[:40]!r}); ignored", stacklevel=2
        )
        return None
    return tag or None


@dataclasses.dataclass
class Checkpoint:
    """A saved checkpoint folder, opened for reading."""

    path: Path
    manifest: dict[str, Any]

    @classmethod
    def open(cls, path: str | Path) -> Checkpoint:
        path = Path(path)
        manifest_path = path / "manifest.json"
        try:
            manifest = json.loads(manifest_path.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{manifest_path}: missing; not a complete checkpoint") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{manifest_path}: not valid JSON ({e})") from None
        if not isinstance(manifest, dict):
            raise CheckpointError(f"{manifest_path}: not a checkpoint manifest (not an object)")
        if manifest.get("format") != FORMAT or manifest.get("version") not in READABLE:
            raise CheckpointError(
                f"{manifest_path}: format {manifest.get('format')!r} version "
                f"{manifest.get('version')!r}; expected {FORMAT!r} version "
                + " or ".join(map(str, READABLE))
            )
        return cls(path, manifest)

    @property
    def step(self) -> int:
        return int(self.manifest["step"])

    @property
    def layout(self) -> dict[str, int]:
        return self.manifest["layout"]

    @property
    def has_optimizer(self) -> bool:
        return bool(self.manifest.get("optimizer", False))

    def run_state(self) -> dict[str, Any]:
        return self._text("run_state.json", json.loads, (json.JSONDecodeError,))

    def config(self) -> dict[str, Any]:
        # safe_load builds plain data only: a python/object tag is an error, never a call.
        return self._text("config.yaml", yaml.safe_load, (yaml.YAMLError,))

    def _text(self, name: str, parse: Any, errors: tuple[type[Exception], ...]) -> dict[str, Any]:
        path = self.path / name
        try:
            value = parse(path.read_text(encoding="utf-8"))
        except (*errors, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: unreadable ({_first_line(e)}); refused") from None
        if not isinstance(value, dict):
            raise CheckpointError(f"{path}: expected a mapping, found {type(value).__name__}")
        return value

    def problems(self, *, checksums: bool, files: list[str] | None = None) -> list[str]:
        """What is wrong with the folder ([] if nothing): missing files, sizes, checksums."""
        found = []
        for name in files if files is not None else sorted(self.manifest["files"]):
            entry = self.manifest["files"][name]
            path = self.path / name
            if not path.is_file():
                found.append(f"{path}: missing")
            elif path.stat().st_size != entry["bytes"]:
                found.append(
                    f"{path}: {path.stat().st_size} bytes, the manifest says {entry['bytes']} "
                    "(truncated or overwritten)"
                )
            elif checksums and (wrong := _digest_problem(path, entry)):
                found.append(wrong)
        return found

    def tensors(self, *, optimizer: bool) -> StoredState:
        """{name: {"param", and with optimizer "exp_avg", "exp_avg_sq"}}: each tensor read on
        access from the memory-mapped files (whole by ``[kind]``, a box by ``.stored(kind)``)."""
        return StoredState(self, optimizer)

    def weights(self) -> dict[str, torch.Tensor]:
        """Every weight whole (tools: export, generate); a run reads boxes instead."""
        return {name: stored.whole() for name, stored in self.tensors(optimizer=False).params()}

    def rng(self, rank: int) -> dict[str, Any] | None:
        """That rank's random streams (format in rng.py), or None if none were saved."""
        name = f"rng-{rank:05d}.pt"
        if name not in self.manifest["files"]:
            return None
        path = self.path / name
        # Older checkpoints saved numpy's state as an array: numpy's array classes (data only,
        # never a call) are the one addition to what weights_only=True accepts.
        state = load_tensors(path, allow=rng.LEGACY_GLOBALS)
        try:
            return rng.from_legacy(state, rank) if rng.is_legacy(state) else rng.check(state)
        except rng.RngFormatError as e:
            raise CheckpointError(f"{path}: {e}") from None


class StoredState(Mapping[str, "StoredEntry"]):
    """A checkpoint's tensors by name, read lazily (see :meth:`Checkpoint.tensors`)."""

    def __init__(self, ckpt: Checkpoint, optimizer: bool) -> None:
        self.path, self.optimizer = ckpt.path, optimizer
        self.version = int(ckpt.manifest["version"])
        self._index = ckpt.manifest["tensors"]
        self._files: dict[str, Any] = {}

    def __getitem__(self, name: str) -> StoredEntry:
        if name not in self._index:
            raise KeyError(name)
        return StoredEntry(self, name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def params(self) -> Iterator[tuple[str, shards.Stored]]:
        return ((name, self.stored(name, "param")) for name in self._index)

    def stored(self, name: str, kind: str) -> shards.Stored:
        entry = self._index[name]
        if self.version == 1:  # whole tensors, one file each
            shape = tuple(entry["shape"])
            pieces = shards.whole_pieces(entry["file"], shape)
        else:
            shape, pieces = tuple(entry["shape"]), entry["pieces"]
        return shards.Stored(name, shape, pieces, lambda f, n: self._flat(f, n, kind))

    def _flat(self, model_file: str, name: str, kind: str) -> torch.Tensor:
        file = model_file if kind == "param" else model_file.replace("model-", "optim-", 1)
        if file not in self._files:
            self._files[file] = load_tensors(self.path / file, mmap=True)
        value = self._files[file][name]
        return value if kind == "param" else value[kind]


class StoredEntry(Mapping[str, torch.Tensor]):
    """One parameter's stored tensors: ``[kind]`` reads it whole, ``stored(kind)`` by boxes."""

    def __init__(self, state: StoredState, name: str) -> None:
        self._state, self.name = state, name
        self._kinds = ("param", "exp_avg", "exp_avg_sq") if state.optimizer else ("param",)

    def stored(self, kind: str) -> shards.Stored:
        return self._state.stored(self.name, kind)

    def __getitem__(self, kind: str) -> torch.Tensor:
        if kind not in self._kinds:
            raise KeyError(kind)
        return self.stored(kind).whole()

    def __iter__(self) -> Iterator[str]:
        return iter(self._kinds)

    def __len__(self) -> int:
        return len(self._kinds)


def load_tensors(path: Path, *, mmap: bool = False, allow: list[Any] | None = None) -> Any:
    """A torch file holding only tensors and plain containers; never runs code from it.

    ``weights_only=True`` refuses any other pickled object (a class, a function call) before
    it is built; the refusal names the file. ``allow``: data-only classes to accept as well.
    """
    try:
        with torch.serialization.safe_globals(allow or []):
            return torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: holds pickled Python objects, not only tensors ({_refused_global(e)}); "
            "refused: loading it could run code from the file"
        ) from None
    except RuntimeError:  # not torch.save's zip format (mmap needs it), or damaged
        raise CheckpointError(
            f"{path}: not a tensor file in torch.save's zip format (as this project writes); "
            "refused"
        ) from None


def _digest_problem(path: Path, entry: dict[str, Any]) -> str | None:
    """Why a file's digest disagrees with its manifest entry, or None. The entry's
    ``algorithm`` decides how to hash: {"bytes", "algorithm", "digest"}; entries written
    before the chunked digest ({"bytes", "sha256"}) are plain sha256."""
    algorithm = entry.get("algorithm", PLAIN)
    expected = entry.get("digest") if "algorithm" in entry else entry.get("sha256")
    try:
        found = file_digest(path, algorithm)
    except ValueError as e:
        return str(e)
    if found != expected:
        return f"{path}: sha256 differs from the manifest (corrupted) [{algorithm}]"
    return None


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _refused_global(e: pickle.UnpicklingError) -> str:
    # torch's message is a page long; the line naming what the file asked for is the useful one.
    lines = [line.strip() for line in str(e).splitlines()]
    found = [line for line in lines if "GLOBAL" in line or "Unsupported" in line]
    return (found or ["not loadable with weights_only=True"])[0]


def candidates(root: str | Path) -> list[Path]:
    """Checkpoint folders to try for a resume, best first: ``latest``, then newest by step."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = sorted(
        (p for p in root.iterdir() if p.is_dir() and step_of(p) is not None),
        key=lambda p: step_of(p) or 0,
        reverse=True,
    )
    latest = read_latest(root)
    first = [p for p in found if p.name == latest]
    return first + [p for p in found if p.name != latest]


def resolve(path: str | Path, step: int | None = None) -> Checkpoint:
    """The checkpoint a command-line argument names: a checkpoint folder, or a checkpoint dir
    (its ``latest``, else its newest folder; or ``global_step<step>`` when a step is given)."""
    p = Path(path)
    if step is not None:
        p = p / tag_for(step)
    elif not (p / "manifest.json").exists():
        latest = read_latest(p)
        found = [c for c in candidates(p) if c.name == latest] or candidates(p)
        if not found:
            raise CheckpointError(f"{path}: no checkpoint folder there")
        p = found[0]
    return Checkpoint.open(p)


NO_VERIFY_FLAG = "--no-verify-checkpoint"
NO_VERIFY_HELP = (
    "skip checking the checkpoint's files against its manifest's sizes and sha256 before use "
    "(the check reads every byte once: about as long as loading)"
)


def verified(path: str | Path, step: int | None = None, *, verify: bool = True) -> Checkpoint:
    """:func:`resolve`, then (unless ``verify`` is False) every file's size and sha256 checked
    against the manifest, as a resume does: a corrupt checkpoint is refused before any work."""
    ckpt = resolve(path, step)
    if verify and (problems := ckpt.problems(checksums=True)):
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CheckpointError(
            f"checkpoint {ckpt.path} failed verification: {problems[0]}{more}; use another "
            f"checkpoint or restore this one ({NO_VERIFY_FLAG} reads it anyway)"
        )
    return ckpt


def describe(ckpt: Checkpoint) -> dict[str, Any]:
    """One line of ``list``: step, tokens, layout, size."""
    run = ckpt.run_state()
    return {
        "tag": ckpt.path.name,
        "step": ckpt.step,
        "tokens_seen": run.get("tokens_seen"),
        "consumed_samples": run.get("consumed_samples"),
        "layout": ckpt.layout,
        "optimizer": ckpt.has_optimizer,
        "bytes": sum(f["bytes"] for f in ckpt.manifest["files"].values()),
        "saved_at": ckpt.manifest.get("saved_at"),
    }
