"""Steps 3 and 4 of bench/gpu_check.sh (run there, or alone):

    python bench/gpu_bench.py kernels --json out.json   # our norms / attention vs torch's path
    python bench/gpu_bench.py model --json out.json     # one ~1.3B Llama step, ours vs torch

kernels  norms (LayerNorm, RMSNorm; bf16; hidden 768 and 2048, the shipped models'): ms, GB/s
         and fraction of HBM peak; attention (bf16, head_dim 64 and 128, GQA 4:1 and none, seq
         2048 / 4096, 16k tokens per batch): ms and TFLOP/s (flash-attention's count) of ours,
         of torch's SDPA as the model calls it, and of SDPA forced onto its flash backend;
         forward and forward+backward; the largest difference between ours and torch's
         output. Prints the megatron_llm/kernels/measured.py entries the figures support.
model    one training step (AdamW) of a ~1.3B Llama at tp=1 with model.kernels=ours and =torch:
         ms/step, tokens/s, MFU, peak memory, the top kernels in the profiler.

--dry-run: the same code on the CPU with tiny shapes (our kernels cannot run there: their rows
say why), so that the GPU run cannot fail on a typo. Nothing here asserts; figures are medians.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.timing import forward_backward, time_ms  # noqa: E402
from megatron_llm import kernels  # noqa: E402
from megatron_llm.kernels import measured, reference  # noqa: E402
from megatron_llm.training.health import device_peak_tflops  # noqa: E402

# HBM bandwidth, TB/s, by exact CUDA device name (vendor data sheets).
HBM_TBS = {
    "NVIDIA A100-SXM4-40GB": 1.555,
    "NVIDIA A100-PCIE-40GB": 1.555,
    "NVIDIA A100-SXM4-80GB": 2.039,
    "NVIDIA A100 80GB PCIe": 1.935,
    "NVIDIA H100 80GB HBM3": 3.35,
    "NVIDIA H100 PCIe": 2.0,
    "NVIDIA H100 NVL": 3.9,
    "NVIDIA H800": 3.35,
    "NVIDIA H200": 4.8,
    "NVIDIA H200 NVL": 4.8,
    "NVIDIA B200": 8.0,
}


def ours_available() -> str:
    """'' when our kernels can run here, else why not."""
    return kernels.backend_reason("ours")


def time_ops(
    ops: dict[str, Callable | None], inputs: tuple, device: torch.device, reps: int
) -> dict[str, dict[str, float | None]]:
    """{op name: {"fwd": ms, "fwd+bwd": ms}}; None where the op cannot run here."""
    out: dict[str, dict[str, float | None]] = {}
    for name, op in ops.items():
        if op is None:
            out[name] = {"fwd": None, "fwd+bwd": None}
            continue
        fwd = time_ms(lambda op=op: op(*inputs), device, reps)
        out[name] = {"fwd": fwd, "fwd+bwd": time_ms(forward_backward(op, *inputs), device, reps)}
    return out


def max_diff(a: Callable | None, b: Callable, inputs: tuple) -> float | None:
    if a is None:
        return None
    with torch.no_grad():
        return (a(*inputs).float() - b(*inputs).float()).abs().max().item()


def entry(op: str, shape: str, ms: dict, device_name: str, arch: str) -> str | None:
    ours, theirs = ms["ours"]["fwd+bwd"], ms["torch"]["fwd+bwd"]
    if ours is None or theirs is None:
        return None
    key = (op, "bfloat16", shape, arch)
    value = f'Measurement({ours:.4f}, {theirs:.4f}, "{device_name}", "bench/gpu_check.sh")'
    return f"    {key!r}: {value},"


def bench_norms(device: torch.device, dry: bool, why_not: str) -> list[dict[str, Any]]:
    rows, hiddens, reps = (64, (64,), 3) if dry else (16384, (768, 2048), 20)
    name, _ = device_peak_tflops()
    hbm = HBM_TBS.get(name)
    results = []
    for op in ("layer_norm", "rms_norm"):
        for hidden in hiddens:
            x = torch.randn(rows, hidden, device=device, dtype=torch.bfloat16)
            w = torch.randn(hidden, device=device, dtype=torch.bfloat16)
            if op == "layer_norm":
                ours = lambda x, w: kernels.layer_norm(x, w, w, 1e-5, "ours")  # noqa: E731
                theirs = lambda x, w: reference.layer_norm(x, w, w, 1e-5)  # noqa: E731
            else:
                ours = lambda x, w: kernels.rms_norm(x, w, 1e-5, "ours")  # noqa: E731
                theirs = lambda x, w: reference.rms_norm(x, w, 1e-5)  # noqa: E731
            ops = {"ours": None if why_not else ours, "torch": theirs}
            ms = time_ops(ops, (x, w), device, reps)
            size = x.numel() * x.element_size()
            gbs = None if why_not else 5 * size / ms["ours"]["fwd+bwd"] / 1e6
            results.append(
                dict(
                    bench="norm", op=op, dtype="bfloat16", rows=rows, hidden=hidden, ms=ms,
                    shape=measured.norm_class(hidden), ours_gb_s=gbs,
                    hbm_fraction=None if gbs is None or hbm is None else gbs / (hbm * 1e3),
                    max_diff=max_diff(ops["ours"], theirs, (x, w)),
                )
            )  # fmt: skip
    return results


ATTENTION = [(64, 12, 12, 2048), (64, 32, 8, 4096), (128, 16, 4, 2048), (128, 16, 4, 4096)]
ATTENTION_DRY = [(64, 4, 4, 64), (64, 4, 1, 64)]  # (head_dim, heads, kv_heads, seq)


def flash_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1]
        )


def bench_attention(device: torch.device, dry: bool, why_not: str) -> list[dict[str, Any]]:
    results = []
    for head_dim, heads, kv_heads, seq in ATTENTION_DRY if dry else ATTENTION:
        batch = 1 if dry else max(1, 16384 // seq)
        q = torch.randn(batch, heads, seq, head_dim, device=device, dtype=torch.bfloat16)
        k, v = (
            torch.randn(batch, kv_heads, seq, head_dim, device=device, dtype=torch.bfloat16)
            for _ in range(2)
        )
        ours = lambda q, k, v: kernels.causal_attention(q, k, v, 0.0, "ours")  # noqa: E731
        ops = {
            "ours": None if why_not else ours,
            "torch": reference.causal_attention,
            "flash": flash_sdpa if device.type == "cuda" else None,  # CUDA only
        }
        row: dict[str, Any] = dict(
            bench="attention", dtype="bfloat16", head_dim=head_dim, heads=heads,
            kv_heads=kv_heads, seq=seq, batch=batch,
            shape=measured.attention_class(head_dim, heads, kv_heads, seq),
        )  # fmt: skip
        try:
            row["ms"] = time_ops(ops, (q, k, v), device, 3 if dry else 10)
        except RuntimeError as e:  # e.g. the flash backend refusing a shape: say so, go on
            row["error"] = f"{type(e).__name__}: {e}"[:300]
            ops["flash"] = None
            row["ms"] = time_ops(ops, (q, k, v), device, 3 if dry else 10)
        fwd_flops = 4 * batch * heads * seq * seq * head_dim / 2  # causal: half the square
        row["tflops"] = {
            name: {
                mode: None if t is None else flops / t / 1e9
                for mode, t, flops in (
                    ("fwd", times["fwd"], fwd_flops),
                    ("fwd+bwd", times["fwd+bwd"], 3.5 * fwd_flops),
                )
            }
            for name, times in row["ms"].items()
        }
        row["max_diff"] = max_diff(ops["ours"], reference.causal_attention, (q, k, v))
        results.append(row)
    return results


def run_kernels(device: torch.device, dry: bool) -> dict[str, Any]:
    why_not = ours_available()
    name, _ = device_peak_tflops()
    arch = measured.arch(torch.cuda.get_device_capability()) if device.type == "cuda" else "cpu"
    rows = bench_norms(device, dry, why_not) + bench_attention(device, dry, why_not)
    entries = [
        e
        for r in rows
        if (e := entry(r.get("op", "attention"), r["shape"], r["ms"], name, arch)) is not None
    ]
    return dict(device=name, arch=arch, ours_unavailable=why_not, rows=rows, measured=entries)


def llama_config(dry: bool, impl: str) -> Any:
    from megatron_llm.model import ModelConfig

    if dry:
        shape = dict(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=1, seq_length=64)
        return ModelConfig(style="llama", ffn_hidden_size=128, kernels=impl, **shape)
    return ModelConfig(
        style="llama", num_layers=24, hidden_size=2048, num_heads=16, num_kv_heads=4,
        ffn_hidden_size=5504, seq_length=2048, kernels=impl,
    )  # fmt: skip


def top_kernels(step: Callable[[], None], device: torch.device, n: int = 8) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0.0), reverse=True)
    return [dict(name=e.key[:80], ms=getattr(e, key, 0.0) / 1e3) for e in events[:n]]


def model_step(device: torch.device, dry: bool, impl: str) -> dict[str, Any]:
    from megatron_llm.model import GPT
    from megatron_llm.model.shape import flops_per_token

    vocab, batch = (512, 2) if dry else (32000, 4)
    cfg = llama_config(dry, impl)
    torch.manual_seed(0)
    model = GPT(cfg, vocab).to(device=device, dtype=torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    tokens = torch.randint(0, vocab, (batch, cfg.seq_length + 1), device=device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(tokens[:, :-1], tokens[:, 1:]).backward()
        optimizer.step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    ms = time_ms(step, device, 3 if dry else 10)
    tokens_s = batch * cfg.seq_length / ms * 1e3
    _, peak = device_peak_tflops()
    tflops = tokens_s * flops_per_token(cfg, vocab) / 1e12
    out = dict(
        kernels=impl, parameters=model.num_parameters(), ms=ms, tokens_s=tokens_s,
        tflops=tflops, mfu=None if peak is None else tflops / peak,
        peak_memory_gb=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        top=top_kernels(step, device),
    )  # fmt: skip
    return out


def run_model(device: torch.device, dry: bool) -> dict[str, Any]:
    why_not = ours_available()
    runs = []
    for impl in ("torch", "ours"):
        if impl == "ours" and why_not:
            runs.append(dict(kernels="ours", skipped=why_not))
            continue
        runs.append(model_step(device, dry, impl))
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the previous model is gone: start the next one clean
    return dict(device=device_peak_tflops()[0], runs=runs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["kernels", "model"])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("bench/gpu_bench.py: no CUDA device; use --dry-run on a CPU", file=sys.stderr)
        return 1
    device = torch.device("cpu" if args.dry_run else "cuda")
    result = (run_kernels if args.what == "kernels" else run_model)(device, args.dry_run)
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
