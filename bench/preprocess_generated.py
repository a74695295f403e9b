"""Benchmark data_tools/preprocess.py against raw sentencepiece and a Megatron-style baseline.

    python bench/preprocess_generated.py                 # a 1 GB corpus in /tmp/megatron_llm_bench
    python bench/preprocess_generated.py --size-mb 100   # smaller

(bench/preprocess.py measures real text with stock tokenizers against Megatron-LM's own tool.)

Prints figures; asserts nothing. Steps:
  1. writes a synthetic corpus of --size-mb MB of JSONL (Python's standard library sources and
     docs, each repetition varied by renaming identifiers and shuffling document order);
  2. trains (or reuses) a sentencepiece BPE tokenizer with data_tools/train_tokenizer.py;
  3. runs preprocess.py over the whole corpus with 1 and with 2 workers: MB/s, tokens/s and the
     peak RSS of the preprocess process tree;
  4. on a --sample-mb prefix of the corpus, the same text for all three:
     - preprocess.py at --workers N,
     - raw ``SentencePieceProcessor.encode`` of the documents already in memory, N processes
       (the ceiling: no reading, parsing or writing),
     - a baseline doing what Megatron-LM's tools/preprocess_data.py does per document: a pool
       of N workers each json-parsing one line and encoding one document, the parent calling
       ``IndexedDatasetBuilder.add_document`` once per document;
     and prints ours / raw (target >= 0.8) and ours / baseline (target >= 2), from wall time
     and from CPU time (user + system of every process involved, startup included for ours):
     on a machine shared with other work the wall-time ratios swing with its load, and favour
     whichever side runs more processes; CPU-time ratios stay put.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import re
import resource
import subprocess
import sys
import sysconfig
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import sentencepiece

REPO = Path(__file__).resolve().parent.parent
STDLIB = Path(sysconfig.get_paths()["stdlib"])
IDENT = re.compile(r"\b([a-z]{4,})\b")


def source_documents() -> list[str]:
    docs = []
    for path in sorted(STDLIB.rglob("*")):
        if path.suffix not in (".py", ".txt", ".rst") or "site-packages" in path.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            docs.append(text)
    return docs


def _vary(word: str, suffix: str) -> str:
    return word + suffix if zlib.crc32(word.encode()) % 7 == 0 else word


def write_corpus(path: Path, size_mb: int) -> None:
    if path.is_file() and path.stat().st_size >= size_mb * 1e6:
        print(f"reusing corpus {path} ({path.stat().st_size / 1e6:.0f} MB)")
        return
    docs = source_documents()
    rng = random.Random(0)
    tmp = path.with_name(path.name + ".tmp")
    written, rep = 0, 0
    with tmp.open("w", encoding="utf-8") as f:
        while written < size_mb * 1e6:
            order = list(range(len(docs)))
            rng.shuffle(order)
            suffix = f"_{rep}"
            for i in order:
                # Rename some identifiers so that repetitions are not byte-identical text.
                text = IDENT.sub(lambda m, s=suffix: _vary(m.group(1), s), docs[i])
                line = json.dumps({"text": text}) + "\n"
                f.write(line)
                written += len(line.encode())
                if written >= size_mb * 1e6:
                    break
            rep += 1
    os.replace(tmp, path)
    print(f"wrote corpus {path} ({written / 1e6:.0f} MB)")


def prefix_file(src: Path, dst: Path, size_mb: int) -> None:
    if dst.is_file():
        return
    with src.open("rb") as fin, dst.open("wb") as fout:
        for line in fin:
            fout.write(line)
            if fout.tell() >= size_mb * 1e6:
                break


def run_preprocess(corpus: Path, model: Path, out: Path, workers: int) -> dict:
    summary = out.with_name(out.name + ".summary.json")
    cmd = [sys.executable, str(REPO / "data_tools/preprocess.py"), "--input", str(corpus)]
    cmd += ["--tokenizer", str(model), "--output-prefix", str(out), "--workers", str(workers)]
    cmd += ["--force", "--summary-json", str(summary)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    # wait4's rusage is this child's alone: the largest RSS among it and its waited-for pool
    # workers (Linux keeps the maximum, not the sum, of a process tree).
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed with exit status {proc.returncode}")
    wall = time.perf_counter() - start
    result = json.loads(summary.read_text())
    result["wall"] = wall
    result["cpu"] = usage.ru_utime + usage.ru_stime
    result["peak_rss_mb"] = usage.ru_maxrss / 1024
    for p in out.parent.glob(out.name + "_*"):
        p.unlink()
    return result


_sp: sentencepiece.SentencePieceProcessor | None = None


def _init(model: str) -> None:
    global _sp
    _sp = sentencepiece.SentencePieceProcessor(model_file=model)


def _raw(docs: list[str]) -> int:
    assert _sp is not None
    # One thread per process: sentencepiece's default (-1) starts a thread per hardware core,
    # which would give "1 worker" every core of the machine.
    return sum(len(ids) for ids in _sp.encode(docs, num_threads=1))


def _cpu_seconds() -> float:
    """CPU time of this process and of its children that have been waited for."""
    own, children = (
        resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def raw_encode(docs: list[str], model: Path, workers: int) -> tuple[float, int, float]:
    """Seconds, tokens and CPU seconds to encode docs (in memory) with N processes, whole
    documents."""
    parts = [docs[i::workers] for i in range(workers)]
    cpu = _cpu_seconds()
    with multiprocessing.Pool(workers, initializer=_init, initargs=(str(model),)) as pool:
        pool.map(_raw, [["warm up"]] * workers)
        start = time.perf_counter()
        tokens = sum(pool.map(_raw, parts))
        seconds = time.perf_counter() - start
    return seconds, tokens, _cpu_seconds() - cpu


def _megatron_encode(line: str) -> tuple[list[int], int]:
    # What Megatron-LM's Encoder.encode does for one line: parse, tokenize one document, EOD.
    assert _sp is not None
    text = json.loads(line)["text"]
    return _sp.encode(text) + [_sp.piece_to_id("</s>")], len(line)


def megatron_baseline(corpus: Path, model: Path, out: Path, workers: int) -> tuple[float, float]:
    """Seconds and CPU seconds of the Megatron-style run."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    cpu = _cpu_seconds()
    with multiprocessing.Pool(workers, initializer=_init, initargs=(str(model),)) as pool:
        start = time.perf_counter()
        builder = IndexedDatasetBuilder(f"{out}.bin", dtype=np.uint16)
        with corpus.open(encoding="utf-8") as fin:
            for ids, _ in pool.imap(_megatron_encode, fin, 32):
                builder.add_document(np.array(ids, dtype=np.uint16), [len(ids)])
        builder.finalize(f"{out}.idx")
        seconds = time.perf_counter() - start
    cpu = _cpu_seconds() - cpu
    for ext in (".bin", ".idx"):
        Path(f"{out}{ext}").unlink()
    return seconds, cpu


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mb", type=int, default=1024, help="corpus size (default 1024)")
    p.add_argument("--sample-mb", type=int, default=100, help="text for the ratios (default 100)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--dir", type=Path, default=Path("/tmp/megatron_llm_bench"))
    p.add_argument("--vocab-size", type=int, default=8192)
    args = p.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    corpus = args.dir / f"corpus_{args.size_mb}mb.jsonl"
    write_corpus(corpus, args.size_mb)
    sample = args.dir / f"sample_{args.sample_mb}mb_of_{args.size_mb}.jsonl"
    prefix_file(corpus, sample, min(args.sample_mb, args.size_mb))
    tok = args.dir / f"tok{args.vocab_size}"
    cmd = [sys.executable, str(REPO / "data_tools/train_tokenizer.py"), "--input", str(sample)]
    cmd += ["--output-prefix", str(tok), "--vocab-size", str(args.vocab_size)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    model = Path(f"{tok}.model")
    out = args.dir / "out"
    rows = []
    print(f"\n== preprocess.py on the whole corpus ({corpus.stat().st_size / 1e6:.0f} MB)")
    for w in args.workers:
        r = run_preprocess(corpus, model, out, w)
        tokens = sum(o["tokens"] for o in r["outputs"])
        rows.append((w, r["bytes"] / 1e6 / r["seconds"], tokens / r["seconds"], r["peak_rss_mb"]))
        print(
            f"workers={w}: {r['seconds']:.1f}s ({r['wall']:.1f}s wall), "
            f"{rows[-1][1]:.2f} MB/s, {rows[-1][2]:,.0f} tokens/s, "
            f"peak RSS {r['peak_rss_mb']:.0f} MB"
        )
    docs = [json.loads(line)["text"] for line in sample.open(encoding="utf-8")]
    mb = sample.stat().st_size / 1e6
    print(f"\n== the same {mb:.0f} MB sample ({len(docs)} documents) three ways")
    for w in args.workers:
        ours = run_preprocess(sample, model, out, w)
        raw_s, raw_tokens, raw_cpu = raw_encode(docs, model, w)
        base_s, base_cpu = megatron_baseline(sample, model, args.dir / "baseline", w)
        print(
            f"workers={w}: ours {mb / ours['seconds']:.2f} MB/s | raw encode "
            f"{mb / raw_s:.2f} MB/s ({raw_tokens / raw_s:,.0f} tokens/s) | Megatron-style "
            f"{mb / base_s:.2f} MB/s || ours/raw = {raw_s / ours['seconds']:.2f} (target >= "
            f"0.8), ours/baseline = {base_s / ours['seconds']:.2f} (target >= 2)\n"
            f"  per CPU second: ours {mb / ours['cpu']:.2f} MB | raw {mb / raw_cpu:.2f} MB | "
            f"Megatron-style {mb / base_cpu:.2f} MB || ours/raw = {raw_cpu / ours['cpu']:.2f}, "
            f"ours/baseline = {base_cpu / ours['cpu']:.2f}"
        )
    print("\n| workers | MB/s | tokens/s | peak RSS (MB) |\n|---|---|---|---|")
    for w, mbs, tps, rss in rows:
        print(f"| {w} | {mbs:.2f} | {tps:,.0f} | {rss:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
