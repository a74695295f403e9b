"""Where our CUDA kernels were measured faster than torch's fused path: the dispatch's evidence.

With ``model.kernels: auto`` (the default) an op runs our kernel only when this table holds a
measurement for its (op, dtype, shape class, GPU architecture) that shows ours faster than what
it replaces: ``F.layer_norm`` / ``F.rms_norm`` for the norms, ``F.scaled_dot_product_attention``
(flash / cuDNN) for attention. Everything else runs torch's path. ``MEGATRON_LLM_KERNELS=ours``
or ``model.kernels: ours`` uses ours wherever it fits, measured or not.

The figures come from ``bench/gpu_check.sh`` (step 3, forward + backward, milliseconds); it
prints the entries to paste here, and the README's "GPU" section lists them. Nothing has been
measured on a GPU yet, so the table is empty and torch's path is the default everywhere.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Measurement:
    ours_ms: float  # forward + backward, our kernel
    torch_ms: float  # the same, torch's fused path
    device: str  # torch.cuda.get_device_name() of the run
    source: str  # the command and date that measured it


# (op, dtype, shape class, "sm_XY") -> Measurement; op: "layer_norm", "rms_norm", "attention".
MEASURED: dict[tuple[str, str, str, str], Measurement] = {}

_NORM_BUCKETS = (1024, 4096, 8192, 32768)
_SEQ_BUCKETS = (2048, 4096, 8192)


def norm_class(hidden: int) -> str:
    """The shape class of a norm over ``hidden`` features: the smallest bucket that holds it."""
    bucket = next((b for b in _NORM_BUCKETS if hidden <= b), None)
    return f"hidden<={bucket}" if bucket else f"hidden>{_NORM_BUCKETS[-1]}"


def attention_class(head_dim: int, heads: int, kv_heads: int, seq: int) -> str:
    """The shape class of causal attention: head_dim, grouped-query or not, sequence bucket."""
    bucket = next((b for b in _SEQ_BUCKETS if seq <= b), None)
    length = f"seq<={bucket}" if bucket else f"seq>{_SEQ_BUCKETS[-1]}"
    return f"head_dim={head_dim},{'gqa' if kv_heads != heads else 'mha'},{length}"


def arch(capability: tuple[int, int]) -> str:
    return f"sm_{capability[0]}{capability[1]}"


def dtype_name(dtype: object) -> str:
    return str(dtype).removeprefix("torch.")


def ours_is_faster(op: str, dtype: object, shape: str, capability: tuple[int, int]) -> bool:
    """True when a measurement shows our kernel faster for this op, dtype, shape and GPU."""
    m = MEASURED.get((op, dtype_name(dtype), shape, arch(capability)))
    return m is not None and m.ours_ms < m.torch_ms


def faster_classes(capability: tuple[int, int]) -> list[str]:
    """'op dtype shape' of every class where ours is faster on this architecture."""
    return [
        f"{op} {dtype} {shape}"
        for (op, dtype, shape, a), m in sorted(MEASURED.items())
        if a == arch(capability) and m.ours_ms < m.torch_ms
    ]
