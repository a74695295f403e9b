"""Our preprocessing against Megatron-LM's own tools, in a Megatron-LM tree (tag core_r0.11.0).

    MEGATRON_LM=/path/to/Megatron-LM  PYTHON tests/megatron_lm_check.py WORKDIR MODEL...

PYTHON: an interpreter that runs Megatron-LM's tools (torch numpy sentencepiece six regex
packaging pyyaml einops nltk requests pytest) and has this repository's requirements (numpy,
sentencepiece, tqdm). MODEL: sentencepiece models. For each model and each tokenizer type of
data_tools/megatron_tokenizers.py, checks:

  1. Megatron-LM's test of its tool, tests/unit_tests/data/test_preprocess_data.py
     (do_test_preprocess_data: build, merge with its tools/merge_datasets.py, decode and compare
     every document), with data_tools/megatron_preprocess_data.py in place of its tool;
  2. its tool and ours write byte-identical .bin/.idx on the same inputs (that test's inputs and
     odd ones: "", whitespace, special tokens written in the text, non-ASCII, long lines);
  3. a folder of our shards (--shard-size: several shards, manifests/ beside them) merges with
     its tools/merge_datasets.py into the documents of one shard of ours.

Prints one line per check and exits 1 if any failed. tests/test_megatron_interop.py runs it
when MEGATRON_LM is set (and MEGATRON_LM_PYTHON, if not this interpreter).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TREE = Path(os.environ["MEGATRON_LM"]).resolve()
sys.path[:1] = [str(TREE), str(REPO)]  # its tests/ package, not ours

import numpy as np  # noqa: E402
from megatron.core.datasets.indexed_dataset import IndexedDataset  # noqa: E402
from tools import merge_datasets  # noqa: E402
from tools import preprocess_data as theirs  # noqa: E402

import tests.unit_tests.data.test_preprocess_data as upstream  # noqa: E402
from data_tools import megatron_preprocess_data as ours  # noqa: E402
from data_tools import preprocess  # noqa: E402
from data_tools.megatron_tokenizers import TYPES  # noqa: E402

ODD = [
    "",
    "\n",
    "   ",
    "\t\n \n",
    "<s> literal </s> and <pad> <unk> <CLS><SEP><EOD><MASK><PAD><BOS><EOS> specials",
    "<EOD>",
    "x<s>",
    "café naïve 東京 😀 \u2581 \u00a0",
    "def f(x):\n    return {'a': [1, 2]}  # comment\n\n\n",
    "word " * 2000,
]


def run_quietly(main: object, argv: list[str]) -> None:
    sys.argv = [sys.argv[0], *argv]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        main()  # type: ignore[operator]


def flags(model: Path, kind: str) -> list[str]:
    return ["--tokenizer-type", kind, "--tokenizer-model", str(model), "--append-eod"] + [
        "--workers",
        "2",
        "--log-interval",
        "1000",
    ]


def upstream_test(model: Path, kind: str, work: Path) -> None:
    upstream.build_main = ours.main  # our tool in its place; everything else is its own
    with contextlib.redirect_stdout(io.StringIO()):
        upstream.do_test_preprocess_data(str(work), extra_args=flags(model, kind))


def same_bytes(model: Path, kind: str, work: Path) -> None:
    raws = work / "raws"
    raws.mkdir()
    upstream.dummy_jsonl(str(raws))
    (raws / "odd.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in ODD))
    for name in sorted(os.listdir(raws)):
        for tool, main in (("theirs", theirs.main), ("ours", ours.main)):
            (work / tool).mkdir(exist_ok=True)
            out = ["--output-prefix", str(work / tool / Path(name).stem)]
            run_quietly(main, ["--input", str(raws / name), *out, *flags(model, kind)])
        for ext in (".bin", ".idx"):
            file = f"{Path(name).stem}_text_document{ext}"
            a, b = (work / tool / file for tool in ("theirs", "ours"))
            assert a.read_bytes() == b.read_bytes(), f"{file}: ours differs from Megatron-LM's"


def merge_our_shards(model: Path, kind: str, work: Path) -> None:
    corpus = work / "corpus.jsonl"
    lines = [json.dumps({"text": f"document {i}: " + "word " * (i % 50)}) for i in range(400)]
    corpus.write_text("\n".join(lines) + "\n")
    sharded, whole = work / "sharded", work / "whole"
    for folder, extra in ((sharded, ["--shard-size", "4K"]), (whole, [])):
        folder.mkdir()
        argv = ["--input", str(corpus), "--tokenizer", str(model), "--tokenizer-type", kind]
        assert preprocess.main([*argv, "--output-prefix", str(folder / "c"), *extra]) == 0
    assert len(list(sharded.glob("*.idx"))) > 3 and (sharded / "manifests").is_dir()
    run_quietly(merge_datasets.main, ["--input", str(sharded), "--output-prefix", str(work / "m")])
    merged, one = IndexedDataset(str(work / "m")), IndexedDataset(str(whole / "c_text_document"))
    assert len(merged) == len(one) == 400
    assert all(np.array_equal(merged[i], one[i]) for i in range(len(one)))


def main() -> int:
    work, models = Path(sys.argv[1]), [Path(m) for m in sys.argv[2:]]
    failed = 0
    for model in models:
        for kind in TYPES:
            for check in (upstream_test, same_bytes, merge_our_shards):
                where = Path(tempfile.mkdtemp(prefix=f"{check.__name__}-", dir=work))
                try:
                    check(model, kind, where)
                    print(f"ok    {check.__name__} {kind} {model.name}")
                except (AssertionError, Exception, SystemExit) as e:  # report every check
                    failed += 1
                    print(f"FAIL  {check.__name__} {kind} {model.name}: {type(e).__name__} {e}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
