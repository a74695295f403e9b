"""Published measurements the planner is calibrated and tested against (never our own runs).

Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters Using
Megatron-LM" (SC21, arXiv 2104.04473): GPT models, sequence 2048, vocabulary 51,200, mixed
precision, activation recomputation, A100-80GB on DGX A100 nodes (8 GPUs, 8 x 200 Gb/s HDR).
  Table 1: layouts and achieved TFLOP/s per GPU (counting the recomputed forward).
  Table 2: ZeRO-3 without model parallelism against tensor + pipeline parallelism (PTD-P).
Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models"
(arXiv 2205.05198), Table 3: the 22B / 175B / 530B / 1T layouts of their activation memory
study (sequence 2048).
Rajbhandari et al. 2019, "ZeRO: Memory Optimizations Toward Training Trillion Parameter
Models" (arXiv 1910.02054), Figure 1: 7.5B parameters on 64 GPUs, mixed-precision Adam (K=12).
"""

from __future__ import annotations

import dataclasses

from megatron_llm.model.config import ModelConfig

SEQ, VOCAB = 2048, 51200


@dataclasses.dataclass(frozen=True)
class Published:
    name: str
    heads: int
    hidden: int
    layers: int
    tp: int
    pp: int
    gpus: int
    batch: int
    micro: int | None  # None: not published
    tflops: float | None  # achieved per GPU, None: not a throughput row
    zero: int = 0  # 3: DeepSpeed ZeRO-3 without model parallelism

    @property
    def dp(self) -> int:
        return self.gpus // (self.tp * self.pp)

    def model(self, dropout: float = 0.1) -> ModelConfig:
        """A GPT-style ModelConfig of this shape (learned positions, tied embeddings, biases)."""
        return ModelConfig(
            style="gpt2",
            num_layers=self.layers,
            hidden_size=self.hidden,
            num_heads=self.heads,
            seq_length=SEQ,
            vocab_size=VOCAB,
            dropout=dropout,
            attention_dropout=dropout,
        )


def _row(name: str, a: int, h: int, L: int, t: int, p: int, n: int, batch: int, tf: float):
    return Published(name, a, h, L, t, p, n, batch, None, tf)


# Narayanan et al. 2021, Table 1 (weak scaling, 1.7B to 1T).
NARAYANAN_TABLE_1 = [
    _row("1.7B", 24, 2304, 24, 1, 1, 32, 512, 137),
    _row("3.6B", 32, 3072, 30, 2, 1, 64, 512, 138),
    _row("7.5B", 32, 4096, 36, 4, 1, 128, 512, 142),
    _row("18.4B", 48, 6144, 40, 8, 1, 256, 1024, 135),
    _row("39.1B", 64, 8192, 48, 8, 2, 512, 1536, 138),
    _row("76.1B", 80, 10240, 60, 8, 4, 1024, 1792, 140),
    _row("145.6B", 96, 12288, 80, 8, 8, 1536, 2304, 148),
    _row("310.1B", 128, 16384, 96, 8, 16, 1920, 2160, 155),
    _row("529.6B", 128, 20480, 105, 8, 35, 2520, 2520, 163),
    _row("1008.0B", 160, 25600, 128, 8, 64, 3072, 3072, 163),
]


# Narayanan et al. 2021, Table 2 (section 5.2): ZeRO-3 (no model parallelism) and PTD-P.
def _zero3_vs_ptdp(name: str, a: int, h: int, L: int, pp: int, rows: list) -> list[Published]:
    out = []
    for scheme, gpus, batch, micro, tflops in rows:
        tp, p = (1, 1) if scheme == "ZeRO-3" else (8, pp)
        zero = 3 if scheme == "ZeRO-3" else 0
        out.append(Published(f"{name} {scheme}", a, h, L, tp, p, gpus, batch, micro, tflops, zero))
    return out


NARAYANAN_TABLE_2 = _zero3_vs_ptdp(
    "175B", 96, 12288, 96, 12,
    [("ZeRO-3", 384, 1536, 4, 144), ("ZeRO-3", 768, 1536, 2, 88), ("ZeRO-3", 1536, 1536, 1, 44),
     ("PTD-P", 384, 1536, 1, 153), ("PTD-P", 768, 1536, 1, 149), ("PTD-P", 1536, 1536, 1, 141)],
) + _zero3_vs_ptdp(
    "530B", 128, 20480, 105, 35,
    [("ZeRO-3", 640, 2560, 4, 138), ("ZeRO-3", 1280, 2560, 2, 98), ("ZeRO-3", 2560, 2560, 1, 48),
     ("PTD-P", 560, 2240, 1, 171), ("PTD-P", 1120, 2240, 1, 167), ("PTD-P", 2240, 2240, 1, 159)],
)  # fmt: skip

# Korthikanti et al. 2022, Table 3.
KORTHIKANTI_TABLE_3 = [
    Published("22B", 64, 6144, 48, 8, 1, 8, 4, 4, None),
    Published("175B", 96, 12288, 96, 8, 8, 64, 64, 1, None),
    Published("530B", 128, 20480, 105, 8, 35, 280, 280, 1, None),
    Published("1T", 160, 25600, 128, 8, 64, 512, 512, 1, None),
]

# Rajbhandari et al. 2019, Figure 1: GB per device for ZeRO stages 0-3.
ZERO_PAPER = {"params": 7.5e9, "gpus": 64, "gb": (120.0, 31.4, 16.6, 1.9)}
