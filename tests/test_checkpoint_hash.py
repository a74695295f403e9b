"""The checkpoint checksum: sha256 over 4 MiB chunks, taken while writing, checked on verify.

The digest is compared with an independent computation (hashlib over the file's chunks read
back); corruption in the first, a middle and the last (partial) chunk and a truncation are each
refused in one line naming the file; checkpoints whose manifest says plain ``sha256`` (format 1
and format 2 saves from before the chunked digest) still verify, because the entry's algorithm
decides.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from megatron_llm.checkpoint import io
from megatron_llm.checkpoint.__main__ import main as checkpoint_cli
from megatron_llm.hashing import CHUNK, CHUNKED, ChunkedSha256, file_sha256

V1 = Path(__file__).parent / "fixtures/checkpoint_v1/global_step2"


def reference_digest(data: bytes) -> str:
    """Independent of hashing.py: sha256 of the chunks' sha256 digests, in order."""
    parts = [hashlib.sha256(data[i : i + CHUNK]).digest() for i in range(0, len(data), CHUNK)]
    return hashlib.sha256(b"".join(parts)).hexdigest()


def save_folder(root: Path) -> Path:
    """A published checkpoint folder written by FolderWriter: 2 chunks + a partial one,
    with tensor writes that cross chunk boundaries."""
    tmp = io.new_tmp_dir(root, 1)
    writer = io.FolderWriter(tmp)
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(1_500_000, generator=g), "b": torch.randn(1_100_000, generator=g)}
    tensors["c"] = torch.ones(7)
    writer.tensors("model-00000.pt", tensors)
    writer.text("run_state.json", '{"step": 1}\n')
    return io.finish(
        tmp,
        root,
        step=1,
        layout={"tp": 1, "pp": 1, "dp": 1, "zero": 0},
        optimizer=False,
        tensors={},
        files=writer.entries(),
    )


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, 2 * CHUNK + 12345])
def test_the_streamed_digest_equals_hashlib_over_the_chunks(size: int) -> None:
    data = random.Random(size).randbytes(size)
    stream, at, rng = ChunkedSha256(), 0, random.Random(1)
    while at < size:  # buffers of random sizes, so chunk boundaries fall inside them
        n = rng.choice([1, 1000, CHUNK // 3, CHUNK + 7])
        for job in stream.jobs(memoryview(data)[at : at + n]):
            job()
        at += n
    assert stream.size == size
    assert stream.hexdigest() == reference_digest(data)


def test_the_manifest_digest_is_the_chunked_sha256_of_the_file(tmp_path: Path) -> None:
    folder = save_folder(tmp_path)
    entries = io.Checkpoint.open(folder).manifest["files"]
    data = (folder / "model-00000.pt").read_bytes()
    assert 2 * CHUNK < len(data) < 3 * CHUNK
    for name, entry in entries.items():
        data = (folder / name).read_bytes()
        assert entry == {"bytes": len(data), "algorithm": CHUNKED, "digest": reference_digest(data)}
    io.verified(folder)


@pytest.mark.parametrize("where", ["first", "middle", "last partial", "truncated"])
def test_a_corrupt_chunk_or_truncation_is_refused_in_one_line(
    tmp_path: Path, where: str, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = save_folder(tmp_path)
    path = folder / "model-00000.pt"
    data = bytearray(path.read_bytes())
    if where == "truncated":
        data = data[:-1]
    else:
        at = {"first": 100, "middle": CHUNK + CHUNK // 2, "last partial": len(data) - 30}[where]
        data[at] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(io.CheckpointError) as e:
        io.verified(folder)
    assert len(str(e.value).splitlines()) == 1 and str(path) in str(e.value)
    assert checkpoint_cli(["verify", str(folder)]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith(f"FAIL {path}:"), out
    io.verified(folder, verify=False)  # the escape hatch still opens it


def plain_entries(folder: Path) -> None:
    """Rewrite a manifest's file entries as a save before the chunked digest wrote them."""
    manifest = json.loads((folder / "manifest.json").read_text())
    for name, entry in manifest["files"].items():
        manifest["files"][name] = {"bytes": entry["bytes"], "sha256": file_sha256(folder / name)}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_plain_sha256_checkpoints_still_verify_and_still_catch_corruption(tmp_path: Path) -> None:
    io.verified(V1)  # format 1, written by the code of 4e31cd6
    v1 = shutil.copytree(V1, tmp_path / "v1" / V1.name)
    data = bytearray((v1 / "model-00000.pt").read_bytes())
    data[len(data) // 2] ^= 0x01
    (v1 / "model-00000.pt").write_bytes(bytes(data))
    with pytest.raises(io.CheckpointError, match="model-00000.pt: sha256 differs"):
        io.verified(v1)
    folder = save_folder(tmp_path / "v2")  # format 2 with plain sha256 entries
    plain_entries(folder)
    io.verified(folder)


def test_an_unknown_algorithm_is_refused_naming_it(tmp_path: Path) -> None:
    folder = save_folder(tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["run_state.json"]["algorithm"] = "sha256-chunked-1GiB"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(io.CheckpointError, match="unknown checksum algorithm 'sha256-chunked-1GiB"):
        io.verified(folder)


class Sink:
    """A file whose write returns at once: the hash threads are surely still running then."""

    def write(self, data: memoryview) -> int:
        return len(data)


def test_each_buffer_is_hashed_before_its_write_returns() -> None:
    """torch.save may reuse a buffer once write() returns: the hash must be done by then."""
    data = random.Random(0).randbytes(3 * CHUNK + 5)
    buffer = bytearray(data)
    with ThreadPoolExecutor(2) as pool:
        out = io._Hashing(Sink(), pool)  # type: ignore[arg-type]
        out.write(buffer)
        buffer[:] = bytes(len(buffer))  # reused at once
        assert out.digest.hexdigest() == reference_digest(data)
