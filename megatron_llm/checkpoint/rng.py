"""A rank's random streams as plain data, so that a checkpoint's ``rng-<rank>.pt`` loads with
``torch.load(weights_only=True)`` and can never run code (format ``megatron_llm-rng`` v1).

``rng-<rank>.pt`` is ``torch.save`` of a dict holding only tensors, numbers, strings and None:

    format     "megatron_llm-rng"
    version    1
    python     {"version": int, "internal": int64 tensor (625,), "gauss_next": float | None}:
               ``random.getstate()``
    numpy      {"keys": int64 tensor (624,), "pos": int, "has_gauss": int,
               "cached_gaussian": float}: ``np.random.get_state()`` (MT19937)
    torch      uint8 tensor: ``torch.get_rng_state()``
    cuda       uint8 tensor: the generator of this rank's own device (the current one), or
               None without CUDA. Only its own: a resumed rank on a node that sees fewer GPUs
               must still load it.
    tp_fork    {"torch": uint8 tensor, "cuda": uint8 tensor | None}: the model's
               ``TensorParallelRNG`` (absent when the model has none)

Checkpoints written before this format saved ``{"python": random.getstate(), "numpy":
np.random.get_state(), "torch": ..., "cuda": [every visible GPU's state], "tp_fork": ...}``:
tuples, numbers, tensors and one numpy array. They load with ``weights_only=True`` once numpy's
array classes are allowed (:data:`LEGACY_GLOBALS`: they rebuild data and call nothing), and
:func:`from_legacy` turns them into this format, so they resume bitwise with nothing unpickled.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from torch import nn

FORMAT = "megatron_llm-rng"
VERSION = 1


# What np.random.get_state()'s uint32 array pickles as: numpy 2 names, plus numpy 1's module.
LEGACY_GLOBALS: list[Any] = [
    np.ndarray,
    np.dtype,
    type(np.dtype(np.uint32)),
    np._core.multiarray._reconstruct,
    (np._core.multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
]


class RngFormatError(ValueError):
    """A random-state dict that is not this format; the message names what is wrong."""


def capture(model: nn.Module) -> dict[str, Any]:
    """Every random stream this rank draws from, as plain data."""
    tp_rng = getattr(model, "tp_rng", None)
    return _plain(
        random.getstate(),
        np.random.get_state(legacy=True),
        torch.get_rng_state(),
        # The current device is this rank's own (set once per rank before any collective).
        torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        tp_rng.state_dict() if tp_rng is not None else None,
    )


def _plain(
    python: tuple, numpy: tuple, cpu: torch.Tensor, cuda: torch.Tensor | None, tp_fork: Any
) -> dict[str, Any]:
    py_version, internal, gauss_next = python
    _, keys, pos, has_gauss, cached_gaussian = numpy  # ("MT19937", uint32 (624,), ...)
    state: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "python": {
            "version": py_version,
            "internal": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
        "numpy": {
            "keys": torch.from_numpy(np.asarray(keys).astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": cpu,
        "cuda": cuda,
    }
    if tp_fork is not None:
        state["tp_fork"] = tp_fork
    return state


def restore(model: nn.Module, state: dict[str, Any]) -> None:
    """Put every stream back where :func:`capture` found it; checks the whole dict first."""
    check(state)
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["internal"].tolist()), py["gauss_next"]))
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, npy["pos"], npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tp_rng = getattr(model, "tp_rng", None)
    if tp_rng is not None and "tp_fork" in state:
        tp_rng.load_state_dict(state["tp_fork"])


def check(state: Any) -> dict[str, Any]:
    """``state`` if it is a complete dict of this format and version, else RngFormatError."""
    _expect(isinstance(state, dict), "not a dict")
    found = (state.get("format"), state.get("version"))
    _expect(found == (FORMAT, VERSION), f"format {found}, expected ({FORMAT!r}, {VERSION})")
    py, npy = state.get("python"), state.get("numpy")
    _expect(isinstance(py, dict) and _is(py.get("internal"), torch.int64, 625), "python.internal")
    _expect(isinstance(npy, dict) and _is(npy.get("keys"), torch.int64, 624), "numpy.keys")
    for key in ("pos", "has_gauss"):
        _expect(isinstance(npy.get(key), int), f"numpy.{key}")
    _expect(_is(state.get("torch"), torch.uint8), "torch")
    _expect(state.get("cuda") is None or _is(state["cuda"], torch.uint8), "cuda")
    fork = state.get("tp_fork", {"torch": torch.empty(0, dtype=torch.uint8)})
    _expect(isinstance(fork, dict) and _is(fork.get("torch"), torch.uint8), "tp_fork.torch")
    return state


def _is(value: Any, dtype: torch.dtype, numel: int | None = None) -> bool:
    return (
        isinstance(value, torch.Tensor)
        and value.dtype == dtype
        and (numel is None or value.numel() == numel)
    )


def _expect(ok: bool, what: str) -> None:
    if not ok:
        raise RngFormatError(f"not a {FORMAT} v{VERSION} random state ({what} is wrong)")


def is_legacy(state: Any) -> bool:
    return isinstance(state, dict) and "format" not in state and "python" in state


def from_legacy(old: dict[str, Any], rank: int) -> dict[str, Any]:
    """A random-state dict of checkpoints before this format, as this format.

    Those saved every visible GPU's generator; the rank's own was device ``rank % count``
    (one rank per GPU, ranks numbered node by node), which is the one kept.
    """
    try:
        cuda = old.get("cuda")
        own = cuda[rank % len(cuda)] if cuda else None
        state = _plain(old["python"], old["numpy"], old["torch"], own, old.get("tp_fork"))
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise RngFormatError(f"not a random state of an older checkpoint ({e!r})") from None
    return check(state)
