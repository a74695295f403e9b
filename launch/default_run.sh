#!/usr/bin/env bash
# The embedded default run, end to end, with nothing to download:
#   1. a corpus of Python's own standard library (jsonl, one document per source file)
#   2. a sentencepiece BPE tokenizer trained on it
#   3. Megatron-format .bin/.idx shards made by data_tools/preprocess.py
#   4. `deepspeed launch/pretrain.sh configs/default.yaml` on 2 CPU data-parallel ranks
# Steps 1-3 reuse what already exists. Paths are relative to the current directory
# (data/default/, runs/default/). Extra arguments are config overrides, e.g. train.steps=50.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
DATA=data/default
CORPUS_BYTES="${CORPUS_BYTES:-8000000}"

mkdir -p "$DATA"
if [[ ! -f $DATA/stdlib.jsonl ]]; then
  "$PY" "$REPO/data_tools/make_corpus.py" --output "$DATA/stdlib.jsonl" --max-bytes "$CORPUS_BYTES"
else
  echo "reusing $DATA/stdlib.jsonl"
fi
"$PY" "$REPO/data_tools/train_tokenizer.py" --input "$DATA/stdlib.jsonl" --vocab-size 4096 \
  --output-prefix "$DATA/tokenizer"
"$PY" "$REPO/data_tools/preprocess.py" --input "$DATA/stdlib.jsonl" \
  --tokenizer "$DATA/tokenizer.model" --output-prefix "$DATA/stdlib" --workers "$(nproc)"
# MASTER_PORT, if set, picks the rendezvous port (default 29500) so runs side by side agree.
exec deepspeed ${MASTER_PORT:+--master_port "$MASTER_PORT"} "$REPO/launch/pretrain.sh" "$REPO/configs/default.yaml" "$@"
