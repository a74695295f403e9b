"""The ``data`` section: which token shards a run reads and how it splits them."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(kw_only=True)
class DataConfig:
    # Shard prefixes (path without .bin/.idx). Several prefixes are blended by weight.
    prefixes: list[str] = dataclasses.field(default_factory=list)
    weights: list[float] | None = None  # blend weights, one per prefix; null = by size
    tokenizer: str = (
        ""  # the shards' tokenizer: sentencepiece .model, or tokenizer.json (or its folder)
    )
    split: str = "98,2,0"  # train,valid,test proportions of documents, Megatron style
    cache_dir: str | None = None  # where sample indices are cached; null = beside the shards
    # Check every shard before training (structure, manifest sha256 and tokenizer, token ids
    # inside the vocabulary: megatron_llm/data/shard_checks.py); false skips all of it.
    verify: bool = True
    # Fine-tuning instead of shards: a jsonl of {"prompt": ..., "response": ...} records.
    prompt_response_jsonl: str | None = None
    mask_prompt: bool = True  # with prompt_response_jsonl: no loss on the prompt's tokens
    # Packed documents (data/batch.py): a token attends only within its own document, the EOD
    # token that ends a document belonging to it (Megatron-LM's --reset-attention-mask).
    reset_attention_mask: bool = False
    # Positions restart at 0 after each EOD token (Megatron-LM's --reset-position-ids).
    reset_position_ids: bool = False

    def __post_init__(self) -> None:
        if self.weights is not None:
            if len(self.weights) != len(self.prefixes):
                raise ValueError(
                    f"data.weights has {len(self.weights)} entries but data.prefixes has "
                    f"{len(self.prefixes)}; give one weight per prefix or null"
                )
            if any(w < 0 for w in self.weights) or sum(self.weights) <= 0:
                raise ValueError(f"data.weights={self.weights}: must be >= 0 with a positive sum")
        parts = self.split.split(",")
        try:
            numbers = [float(p) for p in parts]
        except ValueError:
            numbers = []
        if len(numbers) != 3 or any(n < 0 for n in numbers) or sum(numbers) <= 0:
            raise ValueError(
                f"data.split={self.split!r}: expected three non-negative numbers "
                "'train,valid,test', e.g. '98,2,0'"
            )
