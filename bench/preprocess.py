"""Benchmark data_tools/preprocess.py on real text, stock tokenizers, against Megatron-LM's tool.

    python bench/preprocess.py                              # 60 MB of real text, 2 workers
    MEGATRON_LM=/path/to/Megatron-LM MEGATRON_LM_PYTHON=/path/to/its/python \\
        python bench/preprocess.py --size-mb 60 --workers 2 # ... and the ratio to its tool
    python bench/preprocess.py --generated                  # also the 1 GB generated corpus run

Prints figures; asserts nothing. Steps:
  1. writes a corpus of --size-mb MB of real, varied text as JSONL: the .py, .md, .rst and .txt
     files of the installed packages (site-packages: code, docs, license texts, changelogs), one
     document per file, in a fixed shuffled order;
  2. trains four tokenizers on a held-out text (Python's standard library), one of each kind:
       ours        data_tools/train_tokenizer.py (sentencepiece BPE, no dummy prefix);
       llama-sp    sentencepiece BPE with Llama's options (identity normalizer, dummy prefix,
                   byte fallback, digits split);
       gpt2-bpe    a byte-level BPE tokenizer.json with GPT-2's pre-tokenizer (tokenizers);
       llama3-bpe  a byte-level BPE tokenizer.json with Llama 3's regex (tokenizers);
  3. for each: preprocess.py at --workers N, wall time and CPU time (user + system of the whole
     process tree, startup included), and the encoding it used (split_encode's cut, or
     "documents" when it encodes whole documents);
  4. with MEGATRON_LM (a Megatron-LM tree, tag core_r0.11.0) and MEGATRON_LM_PYTHON (a python
     that runs its tools/preprocess_data.py): its tool on the same file at the same --workers
     (GPTSentencePieceTokenizer for the sentencepiece models, HuggingFaceTokenizer for the
     tokenizer.json files), whether both wrote the same bytes, and ours / its tool by wall time
     and by CPU time. On a machine shared with other work, wall-time ratios swing with its load;
     CPU-time ratios stay put.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import sentencepiece

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from megatron_llm.data.hf_tokenizer import CL100K_REGEX  # noqa: E402

STDLIB = Path(sysconfig.get_paths()["stdlib"])
SITE = Path(sysconfig.get_paths()["purelib"])
SUFFIXES = (".py", ".md", ".rst", ".txt")
KINDS = ("ours", "llama-sp", "gpt2-bpe", "llama3-bpe")


def real_documents(limit_bytes: int) -> list[str]:
    """Text files of the installed packages, one document each, in a fixed shuffled order."""
    paths = [p for p in SITE.rglob("*") if p.suffix in SUFFIXES and p.is_file()]
    random.Random(0).shuffle(paths)
    docs, size = [], 0
    for path in paths:
        if path.stat().st_size > 4_000_000:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        docs.append(text)
        size += len(text.encode())
        if size >= limit_bytes:
            break
    return docs


def write_jsonl(path: Path, docs: list[str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}) + "\n")
    os.replace(tmp, path)


def training_lines() -> list[str]:
    docs = [p.read_text(encoding="utf-8") for p in sorted(STDLIB.glob("*.py"))]
    return [line for doc in docs for line in doc.split("\n") if line.strip()]


def make_tokenizers(folder: Path, vocab: int) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = {kind: folder / kind for kind in KINDS}
    lines = training_lines()
    if not (folder / "ours.model").is_file():
        train = folder / "train.jsonl"
        write_jsonl(train, [p.read_text(encoding="utf-8") for p in sorted(STDLIB.glob("*.py"))])
        cmd = [sys.executable, str(REPO / "data_tools/train_tokenizer.py"), "--input", str(train)]
        cmd += ["--output-prefix", str(folder / "ours"), "--vocab-size", str(vocab)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    out["ours"] = folder / "ours.model"
    if not (folder / "llama-sp.model").is_file():
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_prefix=str(folder / "llama-sp"),
            vocab_size=vocab,
            model_type="bpe",
            byte_fallback=True,
            normalization_rule_name="identity",
            add_dummy_prefix=True,
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            minloglevel=2,
        )
    out["llama-sp"] = folder / "llama-sp.model"
    for kind, regex in (("gpt2-bpe", None), ("llama3-bpe", CL100K_REGEX)):
        if not (out[kind] / "tokenizer.json").is_file():
            byte_level_bpe(out[kind], lines, regex, vocab)
    return out


def byte_level_bpe(folder: Path, lines: list[str], regex: str | None, vocab: int) -> None:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=regex is None)
    if regex is None:
        tok.pre_tokenizer = byte_level
    else:
        split = pre_tokenizers.Split(Regex(regex), behavior="isolated")
        tok.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    # What transformers' AutoTokenizer (Megatron-LM's HuggingFaceTokenizer) needs for its eod.
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def timed(cmd: list[str], cwd: Path | None = None) -> tuple[float, float]:
    """Wall and CPU seconds of a command and every process it waited for."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # wait4's rusage is this child's and its waited-for descendants' (the worker pools).
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status):
        err = proc.stderr.read().decode(errors="replace")[-2000:] if proc.stderr else ""
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err}")
    return wall, usage.ru_utime + usage.ru_stime


def ours(corpus: Path, tokenizer: Path, out: Path, workers: int) -> tuple[float, float, dict]:
    summary = out.with_name(out.name + ".summary.json")
    cmd = [sys.executable, str(REPO / "data_tools/preprocess.py"), "--input", str(corpus)]
    cmd += ["--tokenizer", str(tokenizer), "--output-prefix", str(out), "--workers", str(workers)]
    wall, cpu = timed([*cmd, "--force", "--summary-json", str(summary)])
    manifest = out.parent / "manifests" / f"{out.name}_text_document.manifest.json"
    return wall, cpu, {**json.loads(summary.read_text()), **json.loads(manifest.read_text())}


def theirs(
    tree: Path, python: str, corpus: Path, tokenizer: Path, out: Path, workers: int
) -> tuple[float, float]:
    kind = "HuggingFaceTokenizer" if tokenizer.is_dir() else "GPTSentencePieceTokenizer"
    cmd = [python, "tools/preprocess_data.py", "--input", str(corpus), "--output-prefix", str(out)]
    cmd += ["--tokenizer-type", kind, "--tokenizer-model", str(tokenizer), "--append-eod"]
    return timed([*cmd, "--workers", str(workers), "--log-interval", "1000000"], cwd=tree)


def same_output(a: Path, b: Path) -> bool:
    files = [
        (Path(f"{a}_text_document{e}"), Path(f"{b}_text_document{e}")) for e in (".bin", ".idx")
    ]
    return all(x.read_bytes() == y.read_bytes() for x, y in files)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mb", type=int, default=60, help="real text (default 60)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--dir", type=Path, default=Path("/tmp/megatron_llm_bench"))
    p.add_argument("--megatron-lm", type=Path, default=os.environ.get("MEGATRON_LM"))
    p.add_argument(
        "--megatron-python", default=os.environ.get("MEGATRON_LM_PYTHON", sys.executable)
    )
    p.add_argument("--generated", action="store_true", help="also bench/preprocess_generated.py")
    args = p.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    corpus = args.dir / f"real_{args.size_mb}mb.jsonl"
    if not corpus.is_file():
        write_jsonl(corpus, real_documents(args.size_mb * 1_000_000))
    mb = corpus.stat().st_size / 1e6
    docs = sum(1 for _ in corpus.open("rb"))
    print(f"corpus {corpus}: {mb:.1f} MB, {docs} documents (site-packages text files)")
    tokenizers = make_tokenizers(args.dir / "tokenizers", args.vocab_size)
    rows = []
    for kind in args.kinds:
        out = args.dir / f"ours_{kind}"
        wall, cpu, info = ours(corpus, tokenizers[kind], out, args.workers)
        row = f"| {kind} | {info['encoding']} | {mb / wall:.2f} | {mb / cpu:.2f} |"
        if args.megatron_lm:
            base = args.dir / f"theirs_{kind}"
            t_wall, t_cpu = theirs(
                args.megatron_lm, args.megatron_python, corpus, tokenizers[kind], base, args.workers
            )
            same = "yes" if same_output(out, base) else "NO"
            row += f" {mb / t_wall:.2f} | {mb / t_cpu:.2f} | {same} | "
            row += f"{t_wall / wall:.2f} | {t_cpu / cpu:.2f} |"
        rows.append(row)
        print(row, flush=True)
    head = "| tokenizer | encoding | ours MB/s | ours MB/CPU-s |"
    if args.megatron_lm:
        head += " Megatron MB/s | Megatron MB/CPU-s | same bytes | ratio (wall) | ratio (CPU) |"
    print(f"\n{mb:.0f} MB of real text, --workers {args.workers}\n{head}")
    print("|" + "---|" * (head.count("|") - 1))
    print("\n".join(rows))
    if args.generated:
        generated = [sys.executable, str(REPO / "bench/preprocess_generated.py")]
        return subprocess.run(generated, check=False).returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
