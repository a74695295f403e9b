"""From a micro-batch of samples to the model's inputs and labels, for every run.

A sample is ``seq_length + 1`` token ids; the model reads the first ``seq_length`` and predicts
the last ``seq_length``. Positions that must not be predicted (a fine-tuning prompt, padding:
see data/sft.py) are stored as ``-(id + 1)`` and get the label ``IGNORE``. Pretraining samples
hold no negative ids, so for them this is the usual shift by one.

Document masking (``data.reset_attention_mask``, ``data.reset_position_ids``): a sample packs
several documents, each ended by the EOD token. As Megatron-LM's
``get_ltor_masks_and_position_ids`` does, the EOD token belongs to the document it ends (it
still sees that document; the next document starts after it), and both rules read the
model's inputs (the first ``seq_length`` ids). ``document_ids`` turns the inputs into
``segments`` (batch, seq): the number of EOD tokens before each position, so a query attends
only to keys of its own segment; and ``positions`` (batch, seq): each token's index within its
document, for learned or rotary position embeddings. The model takes them as keyword
arguments; a pipeline carries them beside the hidden states (parallel/pipeline.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import torch

from megatron_llm.data.config import DataConfig
from megatron_llm.model.gpt import IGNORE

__all__ = [
    "IGNORE",
    "DocumentMasking",
    "document_fields",
    "document_ids",
    "document_masking",
    "inputs_and_labels",
    "input_label_pairs",
    "model_inputs",
]


@dataclasses.dataclass(frozen=True)
class DocumentMasking:
    """Which document rules a run applies, and the EOD id that ends a document."""

    eod: int
    reset_attention_mask: bool = False  # packed documents do not attend to each other
    reset_position_ids: bool = False  # positions restart at 0 after each EOD

    @property
    def fields(self) -> tuple[str, ...]:
        """The model keyword arguments these rules produce, in the order a pipeline carries
        them after the hidden states."""
        return ("segments",) * self.reset_attention_mask + ("positions",) * self.reset_position_ids


def document_masking(data_cfg: DataConfig, eod: int) -> DocumentMasking | None:
    """The run's rules from its ``data`` section (None when neither is on)."""
    mask, positions = data_cfg.reset_attention_mask, data_cfg.reset_position_ids
    if not (mask or positions):
        return None
    return DocumentMasking(eod=eod, reset_attention_mask=mask, reset_position_ids=positions)


def document_fields(data_cfg: DataConfig) -> tuple[str, ...]:
    """The document ids a run's batches carry (DocumentMasking.fields), without the EOD id."""
    masking = document_masking(data_cfg, eod=-1)
    return () if masking is None else masking.fields


def document_ids(inputs: torch.Tensor, masking: DocumentMasking) -> dict[str, torch.Tensor]:
    """inputs (batch, seq) -> {"segments": (batch, seq), "positions": (batch, seq)} (those the
    rules ask for), int64, on inputs' device. Position j opens a new document when the token
    before it is an EOD: the EOD itself stays in the document it ends."""
    is_eod = inputs == masking.eod
    ends_before = torch.zeros_like(is_eod)
    ends_before[:, 1:] = is_eod[:, :-1]  # an EOD at j - 1 opens a document at j
    ids: dict[str, torch.Tensor] = {}
    if masking.reset_attention_mask:
        ids["segments"] = ends_before.long().cumsum(1)  # (batch, seq)
    if masking.reset_position_ids:
        index = torch.arange(inputs.shape[1], device=inputs.device).expand_as(inputs)
        starts = torch.where(ends_before, index, torch.zeros_like(index)).cummax(1).values
        ids["positions"] = index - starts  # (batch, seq)
    return ids


def inputs_and_labels(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch, seq + 1) samples -> inputs (batch, seq), labels (batch, seq), on tokens' device."""
    masked = tokens < 0
    ids = torch.where(masked, -tokens - 1, tokens)
    labels = ids[:, 1:].masked_fill(masked[:, 1:], IGNORE)
    return ids[:, :-1], labels


def model_inputs(
    tokens: torch.Tensor, masking: DocumentMasking | None = None
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(batch, seq + 1) samples -> (inputs, labels, document keyword arguments) for
    ``model(inputs, labels, **kwargs)``, all on tokens' device."""
    inputs, labels = inputs_and_labels(tokens)
    return inputs, labels, {} if masking is None else document_ids(inputs, masking)


def input_label_pairs(
    batches: Iterator[torch.Tensor], masking: DocumentMasking | None = None
) -> Iterator[tuple[torch.Tensor | tuple[torch.Tensor, ...], torch.Tensor]]:
    """(inputs, labels) micro-batches, as DeepSpeed's pipeline engine reads them (it moves them
    to its device itself); with document rules the inputs are the tuple (inputs, *ids) in the
    order of ``masking.fields``, which the first stage receives whole."""
    for tokens in batches:  # (micro_batch, seq + 1)
        inputs, labels, ids = model_inputs(tokens, masking)
        yield ((inputs, *ids.values()) if ids else inputs), labels
