"""Which data a run trains and validates on: Megatron shards (pretraining) or a jsonl of
prompt/response records (fine-tuning, ``data.prompt_response_jsonl``)."""

from __future__ import annotations

from megatron_llm.data.config import DataConfig
from megatron_llm.data.dataset import build_datasets
from megatron_llm.data.sampler import SizedTokenDataset
from megatron_llm.data.sft import split_datasets
from megatron_llm.data.tokenizer import Tokenizer


def train_and_valid(
    cfg: DataConfig,
    tokenizer: Tokenizer,
    *,
    seq_length: int,
    seed: int,
    train_samples: int,
    valid_samples: int,
) -> tuple[SizedTokenDataset, SizedTokenDataset | None]:
    """The train set (at least ``train_samples`` samples of shards; a jsonl's records as they
    are) and the validation set, or None when the split leaves it empty."""
    if cfg.prompt_response_jsonl:
        return split_datasets(
            cfg.prompt_response_jsonl,
            tokenizer,
            seq_length,
            mask_prompt=cfg.mask_prompt,
            split=cfg.split,
        )
    return build_datasets(
        cfg,
        seq_length=seq_length,
        seed=seed,
        train_samples=train_samples,
        valid_samples=valid_samples,
        tokenizer=tokenizer,
    )
