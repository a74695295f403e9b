"""Per-step metrics on the logging rank: the console, <logging.dir>/metrics.jsonl (one JSON
record per step) and TensorBoard event files in <logging.dir>/tensorboard."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from megatron_llm.atomic import write_atomic


class MetricsLog:
    def __init__(
        self, run_dir: str, enabled: bool, resume_step: int = 0, tensorboard: bool = False
    ) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Atomic: a run killed here must not lose the history of the run it resumes.
            write_atomic(self.path, self._history(resume_step))
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step drops events a crashed run wrote after the step resumed from.
                self.tb = SummaryWriter(
                    str(Path(run_dir) / "tensorboard"), purge_step=resume_step + 1
                )
        self._last_time = time.perf_counter()
        self._tokens_since = 0

    def _history(self, resume_step: int) -> str:
        # A fresh run starts a fresh file; a resumed one keeps the records up to the step it
        # resumes from and drops those a crashed run wrote after its last checkpoint.
        if not resume_step or not self.path.exists():
            return ""
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= resume_step:
                    kept.append(line + "\n")
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a line cut short by the crash
        return "".join(kept)

    def count_tokens(self, tokens: int) -> None:
        self._tokens_since += tokens

    def throughput(self) -> float:
        """Tokens/s since the previous call (over the whole job, not per rank)."""
        now = time.perf_counter()
        rate = self._tokens_since / max(now - self._last_time, 1e-9)
        self._last_time, self._tokens_since = now, 0
        return rate

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float) and math.isfinite(value):
                    self.tb.add_scalar(f"train/{key}", value, record["step"])
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()

    def print_step(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        parts = [f"step {record['step']:>6}", f"loss {record['loss']:.4f}"]
        if "lr" in record:
            parts.append(f"lr {record['lr']:.3e}")
        if record.get("grad_norm") is not None:
            parts.append(f"grad_norm {record['grad_norm']:.3f}")
        if "tokens_per_s" in record:
            parts.append(f"tokens/s {record['tokens_per_s']:,.0f}")
        if "tflops_per_device" in record:
            parts.append(f"TFLOP/s/dev {record['tflops_per_device']:.3g}")
        if "mfu" in record:
            parts.append(f"MFU {100 * record['mfu']:.1f}%")
        if "peak_memory_gb" in record:
            parts.append(f"mem {record['peak_memory_gb']:.2f} GB")
        if "skipped_steps" in record:
            parts.append(f"skipped {record['skipped_steps']}")
        if "val_loss" in record:
            parts.append(
                f"val_loss {record['val_loss']:.4f} val_ppl {math.exp(record['val_loss']):.2f}"
            )
        print(" | ".join(parts), flush=True)
