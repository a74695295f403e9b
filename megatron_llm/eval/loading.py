"""A trained model for inference: checkpoint folder -> run config, GPT with its weights."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_llm.checkpoint import io
from megatron_llm.checkpoint.state import load_weights
from megatron_llm.config import RunConfig, from_dict
from megatron_llm.model import GPT


@dataclass
class LoadedModel:
    model: GPT  # in eval mode, fp32, on the requested device
    cfg: RunConfig  # the run config saved with the checkpoint
    path: str  # the checkpoint folder actually read
    step: int


def load_model(
    path: str, step: int | None = None, device: str = "cpu", *, verify: bool = True
) -> LoadedModel:
    """path: a checkpoint folder, or a checkpoint dir (its latest, or ``step``); its files are
    checked against the manifest's sha256 first unless ``verify`` is False."""
    ckpt = io.verified(path, step, verify=verify)
    cfg = from_dict(ckpt.config(), source=str(ckpt.path / "config.yaml"))
    weights = ckpt.weights()
    # The embedding rows are the padded vocabulary the run trained with.
    model = GPT(cfg.model, weights["embed.weight"].shape[0])
    load_weights(model, weights, str(ckpt.path))
    model.to(device=torch.device(device)).eval()
    return LoadedModel(model, cfg, str(ckpt.path), ckpt.step)
