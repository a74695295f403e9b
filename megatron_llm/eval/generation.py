"""Batched autoregressive sampling with a KV cache.

Prompts of different lengths share one batch with no padding ever reaching the model: decoding
starts at the end of the shortest prompt, and at each position a row still inside its prompt
keeps its prompt token instead of the sampled one (as Meta's Llama reference ``generate``
does). Every position the model sees holds a real token of that row, so positions and the
causal mask are the same for every row, with or without the cache, and the result of a row
does not depend on the other prompts in the batch (up to float rounding).
"""

from __future__ import annotations

import dataclasses

import torch

from megatron_llm.model.gpt import GPT, KVCache


@dataclasses.dataclass(kw_only=True)
class Sampling:
    greedy: bool = False  # argmax; ignores the fields below
    temperature: float = 1.0  # logits are divided by this; 0 means greedy
    top_k: int = 0  # keep the k most likely tokens; 0 keeps all
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches p

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}: must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k}: must be >= 0 (0 = no top-k filter)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1] (1 = no nucleus filter)")


def next_tokens(
    logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None
) -> torch.Tensor:
    """logits: (batch, vocab) -> (batch,) token ids."""
    if sampling.greedy or sampling.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / sampling.temperature
    if sampling.top_k:
        k = min(sampling.top_k, logits.shape[-1])
        kth = logits.topk(k, dim=-1).values[:, -1:]  # (batch, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens before it already reach top_p (the first always stays).
        drop = probs.cumsum(dim=-1) - probs >= sampling.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    # Sampled on the CPU so a seed gives the same tokens on every device.
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


@torch.no_grad()
def generate(
    model: GPT,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    eod: int,
    sampling: Sampling,
    seed: int = 0,
    vocab_size: int | None = None,
    use_cache: bool = True,
) -> list[list[int]]:
    """The new tokens of each prompt, ending before the first eod (not included).

    vocab_size: the tokenizer's size; logits of the padding rows beyond it are never sampled.
    A row stops at eod, after max_new_tokens, or at the model's seq_length.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (use [eod] for an empty prompt)")
    limit = model.cfg.seq_length
    longest = max(len(p) for p in prompts)
    if longest >= limit:
        raise ValueError(
            f"a prompt of {longest} tokens leaves no room to generate within "
            f"model.seq_length={limit}"
        )
    device = next(model.parameters()).device
    batch = len(prompts)
    total = min(limit, longest + max_new_tokens)
    tokens = torch.zeros((batch, total), dtype=torch.long, device=device)
    in_prompt = torch.zeros((batch, total), dtype=torch.bool, device=device)
    for row, p in enumerate(prompts):
        tokens[row, : len(p)] = torch.tensor(p[:total], dtype=torch.long)
        in_prompt[row, : len(p)] = True
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    done = lengths + max_new_tokens <= lengths  # max_new_tokens == 0: nothing to do
    generator = torch.Generator().manual_seed(seed)
    cache = KVCache(len(model.blocks)) if use_cache else None
    fed = 0  # positions already in the cache
    cur = start = int(lengths.min())
    for cur in range(start, total):
        if cache is not None:
            logits = model(tokens[:, fed:cur], cache=cache)[:, -1]  # (batch, vocab)
            fed = cur
        else:
            logits = model(tokens[:, :cur])[:, -1]
        if vocab_size is not None:
            logits[:, vocab_size:] = float("-inf")
        chosen = next_tokens(logits, sampling, generator)
        chosen = torch.where(in_prompt[:, cur], tokens[:, cur], chosen)
        tokens[:, cur] = chosen  # rows already done go on, unread, to keep the batch whole
        new = ~in_prompt[:, cur]
        done |= new & ((chosen == eod) | (cur + 1 >= lengths + max_new_tokens))
        if bool(done.all()):
            break
    out = []
    for row, n in enumerate(lengths.tolist()):
        ids = tokens[row, n : min(cur + 1, n + max_new_tokens)].tolist()
        out.append(ids[: ids.index(eod)] if eod in ids else ids)
    return out
