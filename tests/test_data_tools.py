"""Corpus-scale preprocess (shards, resume, giant documents), the MMIDIDX reader both ways,
and the shards CLI (inspect, verify, merge)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from data_tools import preprocess, shards_cli
from megatron_llm.data.indexed import IndexedShard, ShardWriter, verify
from megatron_llm.data.manifest import manifest_path
from megatron_llm.data.tokenizer import Tokenizer
from tests.data_fixtures import Corpus, Shard, output_manifest

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

REPO = Path(__file__).resolve().parents[1]


def docs_of(prefixes: list[str | Path]) -> list[list[int]]:
    out = []
    for prefix in prefixes:
        shard = IndexedShard(prefix)
        out.extend(shard[i].tolist() for i in range(len(shard)))
    return out


def sharded(tmp: Path, corpus: Path, model: Path, *extra: str) -> dict:
    argv = ["--input", str(corpus), "--tokenizer", str(model), "--output-prefix", str(tmp / "o")]
    assert preprocess.main([*argv, "--shard-size", "60K", "--workers", "1", *extra]) == 0
    return output_manifest(tmp / "o_text_document")


def files_state(paths: list[Path]) -> list[tuple[int, int]]:
    return [(p.stat().st_ino, p.stat().st_mtime_ns) for p in paths]


# --- shards and resume ---------------------------------------------------------------------


def test_shards_split_by_input_position_and_equal_one_shard(
    tmp_path: Path, email_corpus: Corpus, email_shard: Shard, bpe_model: Path
) -> None:
    manifest = sharded(tmp_path, email_corpus.jsonl, bpe_model)
    prefixes = [s["prefix"] for s in manifest["shards"]]
    assert len(prefixes) >= 4 and manifest["complete"] is True
    assert prefixes[0].endswith("o_text_document_00000")
    assert docs_of(prefixes) == docs_of([email_shard.prefix])
    assert manifest["documents"] == len(email_corpus.docs)
    assert sum(s["documents"] for s in manifest["shards"]) == len(email_corpus.docs)
    # Every shard but the last covers at least --shard-size bytes of input, ending on a line.
    lines = email_corpus.jsonl.read_bytes().splitlines(keepends=True)
    previous = 0
    for shard in manifest["shards"]:
        end = shard["end"]["offset"]
        covered = len(b"".join(lines[: shard["end"]["line"] - 1]))
        assert covered == end and (end - previous >= 60_000 or shard is manifest["shards"][-1])
        previous = end
    # megatron-core reads each shard with the same tokens.
    for prefix in prefixes[:2]:
        ours = IndexedShard(prefix)
        theirs = IndexedDataset(prefix)
        assert [theirs[i].tolist() for i in range(len(theirs))] == docs_of([prefix])
        assert len(ours) == len(theirs)


def test_rerun_after_a_crash_keeps_complete_shards_and_resumes(
    tmp_path: Path, email_corpus: Corpus, bpe_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "straight").mkdir()
    straight = sharded(tmp_path / "straight", email_corpus.jsonl, bpe_model)
    expected = docs_of([s["prefix"] for s in straight["shards"]])
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    manifest = sharded(crashed, email_corpus.jsonl, bpe_model)
    # What a run killed after shard 2 leaves: the manifest lists shards 0-1 and is incomplete,
    # shard 2 was renamed into place but never listed, shard 3 is a temporary file.
    manifest["shards"], manifest["complete"] = manifest["shards"][:2], False
    manifest_path(crashed / "o_text_document").write_text(json.dumps(manifest))
    for path in crashed.glob("o_text_document_0000[3-9].*"):
        path.unlink()
    (crashed / "o_text_document_00003.tmp-99999.bin").write_bytes(b"partial")
    kept = [crashed / f"o_text_document_0000{i}{e}" for i in (0, 1) for e in (".bin", ".idx")]
    before = files_state(kept)
    capsys.readouterr()
    resumed = sharded(crashed, email_corpus.jsonl, bpe_model)
    out = capsys.readouterr().out
    assert "resumed after 2 complete shard(s)" in out
    assert files_state(kept) == before  # the complete shards were not rewritten
    assert docs_of([s["prefix"] for s in resumed["shards"]]) == expected
    assert [s["end"] for s in resumed["shards"]] == [s["end"] for s in straight["shards"]]
    assert resumed["complete"] and not list(crashed.glob("*.tmp-*"))
    # A shard whose file changed after it was listed is redone, with those after it.
    with open(crashed / "o_text_document_00002.bin", "ab") as f:
        f.write(b"\0\0")
    again = sharded(crashed, email_corpus.jsonl, bpe_model)
    assert docs_of([s["prefix"] for s in again["shards"]]) == expected


def test_killed_process_resumes_to_the_same_shards(
    tmp_path: Path, email_corpus: Corpus, bpe_model: Path
) -> None:
    corpus = tmp_path / "big.jsonl"
    corpus.write_bytes(email_corpus.jsonl.read_bytes() * 6)
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "data_tools/preprocess.py"), "--input", str(corpus)]
    cmd += ["--tokenizer", str(bpe_model), "--output-prefix", str(out), "--workers", "1"]
    cmd += ["--shard-size", "100K"]
    manifest_file = manifest_path(tmp_path / "out_text_document")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not manifest_file.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    at_kill = output_manifest(tmp_path / "out_text_document")
    assert at_kill["complete"] is False, "the run ended before it could be killed"
    assert subprocess.run(cmd, capture_output=True, timeout=300).returncode == 0
    resumed = output_manifest(tmp_path / "out_text_document")
    assert resumed["complete"] and resumed["shards"][: len(at_kill["shards"])] == at_kill["shards"]
    tok = Tokenizer(bpe_model)
    expected = [tok.encode(d) + [tok.eod] for d in email_corpus.docs] * 6
    assert docs_of([s["prefix"] for s in resumed["shards"]]) == expected


def test_giant_and_invalid_documents_are_counted_without_stopping(
    tmp_path: Path, bpe_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "mixed.jsonl"
    giant = json.dumps({"text": "x = 1\n" * 2000})  # 12 kB, over --max-doc-bytes 4K
    src.write_bytes(
        b"\n".join(
            [
                json.dumps({"text": "a = 1\n"}).encode(),
                giant.encode(),
                b'{"text": "caf\xe9"}',
                json.dumps({"text": "b = 2\n"}).encode(),
            ]
        )
        + b"\n"
    )
    argv = ["--input", str(src), "--tokenizer", str(bpe_model), "--output-prefix"]
    assert preprocess.main([*argv, str(tmp_path / "o"), "--max-doc-bytes", "4K"]) == 0
    err = capsys.readouterr().err
    assert f"{src}:2: document of {len(giant) + 1} bytes, over --max-doc-bytes=4000" in err
    assert f"{src}:3: invalid UTF-8" in err
    manifest = output_manifest(tmp_path / "o_text_document")
    assert manifest["skipped"] == {"giant document": 1, "invalid UTF-8": 1}
    tok = Tokenizer(bpe_model)
    assert docs_of([tmp_path / "o_text_document"]) == [
        tok.encode(t) + [tok.eod] for t in ("a = 1\n", "b = 2\n")
    ]
    text = tmp_path / "t.txt"
    text.write_text("short\n" + "y" * 5000 + "\n" + "end\n")
    assert (
        preprocess.main(
            ["--input", str(text), "--tokenizer", str(bpe_model), "--output-prefix"]
            + [str(tmp_path / "t"), "--max-doc-bytes", "4K", "--summary-json", "-"]
        )
        == 0
    )
    out = capsys.readouterr().out
    summary = json.loads(out[out.index("{") :])
    assert summary["outputs"][0]["skipped"] == {"giant document": 1}
    assert summary["tokens_per_s"] > 0 and summary["mb_per_s"] > 0
    assert docs_of([tmp_path / "t_text_document"]) == [
        tok.encode(t) + [tok.eod] for t in ("short", "end")
    ]


# --- the MMIDIDX format, both ways ----------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_our_reader_and_megatron_core_agree_both_ways(tmp_path: Path, dtype: type) -> None:
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 60000, size=int(n), dtype=np.int64) for n in rng.integers(1, 300, 40)]
    theirs = tmp_path / "theirs"
    builder = IndexedDatasetBuilder(f"{theirs}.bin", dtype=dtype)
    for doc in docs:
        builder.add_document(doc.astype(dtype), [len(doc)])
    builder.finalize(f"{theirs}.idx")
    ours = tmp_path / "ours"
    writer = ShardWriter(ours, dtype)
    writer.add(np.concatenate(docs[:25]), np.array([len(d) for d in docs[:25]]))
    writer.add(np.concatenate(docs[25:]), np.array([len(d) for d in docs[25:]]))
    writer.commit()
    assert Path(f"{ours}.idx").read_bytes() == Path(f"{theirs}.idx").read_bytes()
    assert Path(f"{ours}.bin").read_bytes() == Path(f"{theirs}.bin").read_bytes()
    expected = [d.tolist() for d in docs]
    assert docs_of([theirs]) == expected  # our reader, their writer
    read_back = IndexedDataset(str(ours))  # their reader, our writer
    assert [read_back[i].tolist() for i in range(len(read_back))] == expected
    assert IndexedShard(ours).index.dtype == np.dtype(dtype)
    assert verify(theirs) == [] and verify(ours, vocab_size=60000) == []


# --- inspect / verify / merge ---------------------------------------------------------------


def copy_shard(src: str, dst: Path) -> Path:
    for ext in (".bin", ".idx"):
        Path(f"{dst}{ext}").write_bytes(Path(f"{src}{ext}").read_bytes())
    return dst


def test_verify_names_the_file_and_what_is_wrong(
    tmp_path: Path, email_shard: Shard, capsys: pytest.CaptureFixture[str]
) -> None:
    good = copy_shard(email_shard.prefix, tmp_path / "good")
    assert shards_cli.main(["verify", str(good)]) == 0
    assert verify(good, vocab_size=512) == []

    def broken(name: str, ext: str, change) -> Path:  # noqa: ANN001
        p = copy_shard(email_shard.prefix, tmp_path / name)
        data = bytearray(Path(f"{p}{ext}").read_bytes())
        Path(f"{p}{ext}").write_bytes(bytes(change(data)))
        return p

    cases = {
        broken(
            "short_bin", ".bin", lambda d: d[:-10]
        ): r"short_bin\.bin: .* the \.bin is truncated",
        broken("long_bin", ".bin", lambda d: d + b"xx"): r"long_bin\.bin: .*longer than its index",
        broken("short_idx", ".idx", lambda d: d[:-8]): r"short_idx\.idx: .*truncated or corrupt",
        broken("magic", ".idx", lambda d: b"XX" + d[2:]): r"magic\.idx: bad magic",
        broken(
            "version", ".idx", lambda d: d[:9] + b"\x02" + d[10:]
        ): r"version\.idx: index version 2",
        broken(
            "dtype", ".idx", lambda d: d[:17] + b"\x63" + d[18:]
        ): r"dtype\.idx: unknown dtype code 99",
        broken("pointer", ".idx", lambda d: d[: -8 * 31] + b"\x07" + d[-8 * 31 + 1 :]): (
            r"pointer\.idx: sequence \d+ starts at byte"
        ),
        broken(
            "token", ".bin", lambda d: b"\xff\xff" + d[2:]
        ): r"token\.bin: token 0 is 65535, outside",
    }
    for prefix, pattern in cases.items():
        problems = verify(prefix, vocab_size=512)
        assert problems and any(re.search(pattern, p) for p in problems), problems
    capsys.readouterr()
    cmd = [sys.executable, str(REPO / "data_tools/shards_cli.py"), "verify", str(good)]
    proc = subprocess.run([*cmd, str(tmp_path / "short_bin")], capture_output=True, text=True)
    assert proc.returncode == 1 and "ok  " in proc.stdout and "BAD " in proc.stdout


def test_inspect_and_merge(
    tmp_path: Path,
    email_corpus: Corpus,
    email_shard: Shard,
    small_shard: Shard,
    bpe_model: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    sharded(tmp_path, email_corpus.jsonl, bpe_model)
    capsys.readouterr()
    argv = ["inspect", str(tmp_path / "o_text_document"), "--json", "--decode", "3"]
    assert shards_cli.main([*argv, "--tokenizer", str(bpe_model)]) == 0
    info = json.loads(capsys.readouterr().out)
    expected = docs_of([email_shard.prefix])
    assert info["documents"] == len(expected) and info["dtype"] == ["uint16"]
    assert info["tokens"] == sum(map(len, expected))
    assert sum(c for _, _, c in info["histogram"]) == len(expected)
    assert info["decoded"] == email_corpus.docs[3]  # the EOS id decodes to nothing
    assert shards_cli.main(["inspect", email_shard.prefix]) == 0
    assert "document length (tokens)" in capsys.readouterr().out
    merged = tmp_path / "merged"
    argv = ["merge", str(tmp_path / "o_text_document"), small_shard.prefix, "--output", str(merged)]
    assert shards_cli.main(argv) == 0
    assert docs_of([merged]) == expected + docs_of([small_shard.prefix])
    assert verify(merged, vocab_size=512) == []
    manifest = output_manifest(merged)
    assert manifest["tokenizer_sha256"] == Tokenizer(bpe_model).sha256
    merged_theirs = IndexedDataset(str(merged))
    assert len(merged_theirs) == len(expected) + len(docs_of([small_shard.prefix]))
