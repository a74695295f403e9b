"""Data faults (issue 14, data side): every one fails loudly, with one line, before any work,
and leaves nothing half-written. Real processes, real kill -9, real compressed files, a real
full file system."""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import sentencepiece
import zstandard

from data_tools import preprocess, shards_cli
from megatron_llm.checkpoint.__main__ import write_weights_only
from megatron_llm.config import load_config
from megatron_llm.data.config import DataConfig
from megatron_llm.data.dataset import build_datasets
from megatron_llm.data.indexed import IndexedShard, ShardWriter
from megatron_llm.data.manifest import manifest_path
from megatron_llm.data.tokenizer import Tokenizer
from megatron_llm.eval import __main__ as eval_cli
from megatron_llm.model import GPT
from tests.data_fixtures import Corpus, Shard, output_manifest

REPO = Path(__file__).resolve().parents[1]
PREPROCESS = [sys.executable, str(REPO / "data_tools/preprocess.py")]


def docs_of(prefixes: list[str]) -> list[list[int]]:
    out = []
    for prefix in prefixes:
        shard = IndexedShard(prefix)
        out.extend(shard[i].tolist() for i in range(len(shard)))
    return out


def errors(stderr: str) -> list[str]:
    """The error lines, after checking there is no traceback (progress bars are not errors)."""
    assert "Traceback" not in stderr, stderr
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*tmp-*"))


def datasets(prefix: str, tokenizer: Tokenizer, **kw: object) -> None:
    cfg = DataConfig(prefixes=[prefix], split="100,0,0", **kw)  # type: ignore[arg-type]
    build_datasets(
        cfg, seq_length=16, seed=1, train_samples=4, valid_samples=0, tokenizer=tokenizer
    )


def copy_shard(src: str, dst: Path) -> str:
    for ext in (".bin", ".idx"):
        shutil.copy(f"{src}{ext}", f"{dst}{ext}")
    return str(dst)


# --- 3: a worker killed (the OOM killer) ---------------------------------------------------


def workers_of(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in children.read_text().split()] if children.exists() else []


def test_a_killed_worker_stops_the_run_at_once_and_a_rerun_resumes(
    tmp_path: Path, email_corpus: Corpus, bpe_model: Path
) -> None:
    corpus = tmp_path / "big.jsonl"
    corpus.write_bytes(email_corpus.jsonl.read_bytes() * 8)
    out = tmp_path / "out"
    cmd = [*PREPROCESS, "--input", str(corpus), "--tokenizer", str(bpe_model)]
    cmd += ["--output-prefix", str(out), "--workers", "2", "--shard-size", "100K"]
    manifest = manifest_path(tmp_path / "out_text_document")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if manifest.exists() and workers_of(proc.pid):  # a shard done, the pool running
            break
        time.sleep(0.005)
    victims = workers_of(proc.pid)
    assert victims and proc.poll() is None, "the run ended before a worker could be killed"
    os.kill(victims[0], signal.SIGKILL)
    killed = time.monotonic()
    try:
        # multiprocessing.Pool replaced the worker and waited for its task forever.
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    took = time.monotonic() - killed
    assert proc.returncode == 1, err
    lines = errors(err)
    assert len(lines) == 1 and f"worker pid {victims[0]} died (killed by SIGKILL" in lines[0], err
    assert took < 30, f"{took:.1f} s from the kill to the exit"
    assert leftovers(tmp_path) == []
    at_kill = output_manifest(tmp_path / "out_text_document")
    assert at_kill["complete"] is False and at_kill["shards"]
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "resumed after" in rerun.stdout
    resumed = output_manifest(tmp_path / "out_text_document")
    assert resumed["shards"][: len(at_kill["shards"])] == at_kill["shards"]
    tok = Tokenizer(bpe_model)
    expected = [tok.encode(d) + [tok.eod] for d in email_corpus.docs] * 8
    assert docs_of([s["prefix"] for s in resumed["shards"]]) == expected


# --- 4: truncated or corrupt compressed input ----------------------------------------------


def zst_frames(data: bytes, frames: int) -> bytes:
    step = -(-len(data) // frames)
    c = zstandard.ZstdCompressor(write_checksum=True)
    return b"".join(c.compress(data[i : i + step]) for i in range(0, len(data), step))


def flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]


@pytest.mark.parametrize(
    "name, make, offset",
    [
        # (file name, compressed bytes from the corpus, compressed offset the error names)
        # (a cut: all of the file decoded, the end is missing; a flip: the 64 KiB step holding
        # it is where the decodable part ends)
        ("cut.jsonl.gz", lambda raw: gzip.compress(raw)[:-100], None),
        ("flipped.jsonl.gz", lambda raw: flip(gzip.compress(raw), 80_000), 1 << 16),
        ("cut.jsonl.zst", lambda raw: zst_frames(raw, 2)[:-300], None),
        ("flipped.jsonl.zst", lambda raw: flip(zst_frames(raw, 1), 80_000), 1 << 16),
    ],
)
def test_corrupt_compressed_input_fails_naming_the_file_and_offset(
    tmp_path: Path,
    email_corpus: Corpus,
    bpe_model: Path,
    capsys: pytest.CaptureFixture[str],
    name: str,
    make: object,
    offset: int | None,
) -> None:
    raw = email_corpus.jsonl.read_bytes()
    src = tmp_path / name
    src.write_bytes(make(raw))  # type: ignore[operator]
    size = src.stat().st_size
    argv = ["--input", str(src), "--tokenizer", str(bpe_model), "--workers", "1"]
    assert preprocess.main([*argv, "--output-prefix", str(tmp_path / "o")]) == 1
    err = errors(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith(f"error: {src}: "), err
    at = int(err[0].split("at compressed byte ")[1].split()[0])
    assert at == (offset if offset is not None else size), err
    assert f"of {size}" in err[0] and "no output written" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # nothing written
    # --on-error skip keeps the documents before the damage and says what was lost.
    skip = preprocess.main([*argv, "--output-prefix", str(tmp_path / "s"), "--on-error", "skip"])
    assert skip == 0
    err = capsys.readouterr().err
    assert f"LOST INPUT: {src}: " in err and f"lost {size - at} compressed bytes" in err
    manifest = output_manifest(tmp_path / "s_text_document")
    lost = manifest["lost_input"][0]
    assert lost["lost_bytes"] == size - at and lost["text_dropped"] > 0
    assert raw[: lost["text_kept"]].endswith(b"\n")
    kept = docs_of([str(tmp_path / "s_text_document")])
    tok = Tokenizer(bpe_model)
    assert kept == [tok.encode(d) + [tok.eod] for d in email_corpus.docs[: len(kept)]]
    assert len(kept) < len(email_corpus.docs)


# --- 5: shard readers check before work -----------------------------------------------------


def test_readers_refuse_a_corrupt_idx_or_bin_at_start(
    tmp_path: Path, email_shard: Shard, bpe_model: Path
) -> None:
    tok = Tokenizer(bpe_model)
    # Our shard with its manifest (sha256 listed), copied whole.
    copy = copy_shard(email_shard.prefix, tmp_path / "email_text_document")
    manifest_path(copy).parent.mkdir()
    shutil.copy(manifest_path(email_shard.prefix), manifest_path(copy))
    datasets(copy, tok)  # sound: passes, and stamps the .bin's verified hash
    idx = Path(f"{copy}.idx").read_bytes()
    cases = {
        # a flipped pointer: megatron-core reads it and serves wrong tokens
        "idx pointer": (
            ".idx",
            flip(idx, len(idx) - 8 * 40),
            r"\.idx: sequence \d+ starts at byte",
        ),
        # a flipped length byte in the .bin's middle: same size, only the sha256 tells
        "bin byte": (".bin", None, r"\.bin: sha256 .* lists"),
        "bin cut": (".bin", b"", r"\.bin: \d+ bytes, but .* describes"),
    }
    original = Path(f"{copy}.bin").read_bytes()
    for what, (ext, data, pattern) in cases.items():
        if ext == ".bin":
            data = flip(original, len(original) // 2) if data is None else original[:-64]
        Path(f"{copy}{ext}").write_bytes(data)
        with pytest.raises(ValueError, match=r"^data\.prefixes\[0\]: .*" + pattern) as e:
            datasets(copy, tok)
        assert "\n" not in str(e.value), what
        datasets(copy, tok, verify=False)  # the opt-out: megatron-core takes it as it is
        Path(f"{copy}{ext}").write_bytes(idx if ext == ".idx" else original)
    # A shard without a manifest: the structure is still checked.
    bare = copy_shard(email_shard.prefix, tmp_path / "bare_text_document")
    with open(f"{bare}.bin", "r+b") as f:
        f.truncate(len(original) - 2)
    with pytest.raises(ValueError, match=r"bare_text_document\.bin: .* the \.bin is truncated"):
        datasets(bare, tok)


def test_eval_checks_its_shards_before_scoring(
    tmp_path: Path, email_shard: Shard, bpe_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    overrides = ["model.style=gpt2", "model.num_layers=1", "model.hidden_size=32"]
    overrides += ["model.num_heads=2", "model.seq_length=16", f"data.tokenizer={bpe_model}"]
    cfg = load_config(None, overrides)
    root = tmp_path / "ckpt"
    write_weights_only(root, dict(GPT(cfg.model, 512).state_dict()), cfg.to_dict())
    copy = copy_shard(email_shard.prefix, tmp_path / "email_text_document")
    manifest_path(copy).parent.mkdir()
    shutil.copy(manifest_path(email_shard.prefix), manifest_path(copy))
    original = Path(f"{copy}.bin").read_bytes()
    Path(f"{copy}.bin").write_bytes(flip(original, len(original) // 2))
    argv = [str(root), "--data-prefix", copy, "--max-samples", "4", "--json"]
    assert eval_cli.main(argv) == 2  # it scored the corrupt tokens with exit 0
    err = errors(capsys.readouterr().err)
    assert len(err) == 1 and re.search(r"email_text_document\.bin: sha256 .* lists", err[0]), err
    assert eval_cli.main([*argv, "--no-verify-data"]) == 0
    # Ids past the model's 512 rows (another tokenizer's shard) are refused before scoring.
    prefix = str(tmp_path / "wide_text_document")
    writer = ShardWriter(prefix, np.uint16)
    writer.add(np.arange(100, 600, dtype=np.uint16), np.array([500]))
    writer.commit()
    capsys.readouterr()
    assert eval_cli.main([str(root), "--data-prefix", prefix, "--json"]) == 2
    assert "largest token id 599, but the model of" in capsys.readouterr().err


# --- 6: token ids outside the vocabulary -----------------------------------------------------


def test_ids_past_the_vocabulary_are_refused_at_start(tmp_path: Path, bpe_model: Path) -> None:
    tok = Tokenizer(bpe_model)
    # What Megatron-LM's SentencePieceTokenizer writes: EOD = vocab + 2 after every document.
    eod = tok.vocab_size + 2
    prefix = str(tmp_path / "megatron_text_document")
    writer = ShardWriter(prefix, np.uint16)
    docs = [tok.encode("x = 1\n" * (i + 1)) + [eod] for i in range(40)]
    writer.add(np.concatenate(docs).astype(np.uint16), np.array([len(d) for d in docs]))
    writer.commit()
    message = f"largest token id {eod}, but {bpe_model} has {tok.vocab_size} ids"
    with pytest.raises(ValueError, match=rf"megatron_text_document: {message}"):
        datasets(prefix, tok)
    # No manifest: the scan is remembered as JSON (never a pickle) and used again.
    stamps = list((Path(prefix) / "cache" / "shard_checks").glob("*.json"))
    assert len(stamps) == 1
    learned = json.loads(stamps[0].read_text())["learned"]
    assert learned["max_token_id"] == eod
    stamps[0].write_text(stamps[0].read_text().replace(f": {eod}", ": 7"))
    datasets(prefix, tok)  # the stamp (here planted) is what decides: it was read
    Path(prefix, "cache").joinpath("shard_checks", stamps[0].name).unlink()
    os.utime(f"{prefix}.bin", ns=(1, 1))
    with pytest.raises(ValueError, match=message):
        datasets(prefix, tok)


def test_preprocess_records_the_largest_id(email_shard: Shard, bpe_model: Path) -> None:
    manifest = output_manifest(email_shard.prefix)
    tokens = np.fromfile(f"{email_shard.prefix}.bin", np.uint16)
    assert manifest["max_token_id"] == manifest["shards"][0]["max_token_id"] == int(tokens.max())


# --- 7: --shard-size outputs are traceable to their tokenizer ------------------------------


def test_numbered_shards_refuse_another_tokenizer(
    tmp_path: Path, email_corpus: Corpus, bpe_model: Path
) -> None:
    argv = ["--input", str(email_corpus.jsonl), "--tokenizer", str(bpe_model), "--workers", "1"]
    out = tmp_path / "o"
    assert preprocess.main([*argv, "--output-prefix", str(out), "--shard-size", "60K"]) == 0
    shard = str(tmp_path / "o_text_document_00001")
    datasets(shard, Tokenizer(bpe_model))
    # Megatron-LM's tools/merge_datasets.py takes every file of the folder for a shard prefix.
    files = [p for p in tmp_path.iterdir() if p.is_file()]
    assert files and {p.suffix for p in files} == {".bin", ".idx"}
    lines = [line for d in email_corpus.docs for line in d.split("\n") if line.strip()]
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=str(tmp_path / "other"),
        vocab_size=400,
        byte_fallback=True,
        minloglevel=2,
    )
    other = Tokenizer(tmp_path / "other.model")
    manifest = manifest_path(tmp_path / "o_text_document")
    with pytest.raises(ValueError, match=rf"made with a different tokenizer .* in {manifest}"):
        datasets(shard, other)
    # A numbered shard its manifest does not list (another run's leftover) is refused too.
    copy_shard(shard, tmp_path / "o_text_document_00077")
    with pytest.raises(ValueError, match=r"o_text_document_00077: not listed in"):
        datasets(str(tmp_path / "o_text_document_00077"), Tokenizer(bpe_model))


# --- 8: shards_cli verify checks the files its manifest vouches for -----------------------


def test_verify_checks_the_copy_and_reports_incomplete_outputs(
    tmp_path: Path,
    email_corpus: Corpus,
    bpe_model: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    made = tmp_path / "made"
    made.mkdir()
    argv = ["--input", str(email_corpus.jsonl), "--tokenizer", str(bpe_model), "--workers", "1"]
    argv += ["--output-prefix", "o", "--shard-size", "60K"]
    monkeypatch.chdir(made)  # a relative prefix, as people type it
    assert preprocess.main(argv) == 0
    copy = tmp_path / "copy"
    shutil.copytree(made, copy)
    monkeypatch.chdir(made)  # verify the copy from the original's folder
    with open(copy / "o_text_document_00002.bin", "r+b") as f:
        f.truncate(1000)
    capsys.readouterr()
    assert shards_cli.main(["verify", str(copy / "o_text_document")]) == 1
    out = capsys.readouterr().out
    assert f"BAD {copy}/o_text_document_00002.bin: 1000 bytes" in out
    assert shards_cli.main(["verify", "o_text_document"]) == 0  # the original is sound
    # An interrupted run: the manifest lists some shards and says it is not complete.
    manifest = json.loads(manifest_path(made / "o_text_document").read_text())
    manifest["complete"], manifest["shards"] = False, manifest["shards"][:3]
    manifest_path(made / "o_text_document").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert shards_cli.main(["verify", "o_text_document"]) == 1
    out = capsys.readouterr().out
    assert out.startswith("INCOMPLETE o_text_document: ") and "3 shard(s) listed" in out
    assert shards_cli.main(["verify", "o_text_document_00004"]) == 1
    assert "o_text_document_00004: not listed in" in capsys.readouterr().out


# --- 9: a full disk in preprocess --------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path):
    folder = tmp_path / f"tmpfs-{uuid.uuid4().hex[:6]}"
    folder.mkdir()
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(folder)], capture_output=True
    )
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mount.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_a_full_disk_fails_with_one_line_and_keeps_the_previous_output(
    small_disk: Path,
    small_corpus: Corpus,
    email_corpus: Corpus,
    bpe_model: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = small_disk / "o"
    argv = ["--tokenizer", str(bpe_model), "--output-prefix", str(out), "--workers", "1"]
    assert preprocess.main(["--input", str(small_corpus.jsonl), *argv]) == 0
    before = {p: p.read_bytes() for p in small_disk.rglob("*") if p.is_file()}
    # What a run killed while writing its manifest leaves (0 bytes): the next run removes it.
    (small_disk / "manifests" / ".o_text_document.manifest.json.tmp-99-x").write_bytes(b"")
    capsys.readouterr()
    # The email corpus needs ~370 kB of tokens: the 160 kB file system fills up.
    assert preprocess.main(["--input", str(email_corpus.jsonl), *argv]) == 1
    err = errors(capsys.readouterr().err)
    assert len(err) == 1, err
    assert err[0].startswith(f"error: {small_disk}/o_text_document.tmp-") and "ENOSPC" in err[0]
    assert {p: p.read_bytes() for p in small_disk.rglob("*") if p.is_file()} == before
    assert leftovers(small_disk) == []
    # A read-only file system: the same, with its errno.
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    assert preprocess.main(["--input", str(email_corpus.jsonl), *argv]) == 1
    err = errors(capsys.readouterr().err)
    assert len(err) == 1 and "EROFS" in err[0] and str(small_disk) in err[0], err
    assert {p: p.read_bytes() for p in small_disk.rglob("*") if p.is_file()} == before
