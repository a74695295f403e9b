"""The csrc/ kernels against their baselines, measured in the same run (needs a CUDA GPU).

    python bench/kernels.py                     # norms, attention, 1.3B Llama step
    python bench/kernels.py --only norms --json bench_kernels.json

norms      LayerNorm / RMSNorm forward and forward+backward, 16384 rows, bf16 (--dtype), hidden
           1024..16384: GB/s (bytes the op must move: x and y forward; x, dy and dx backward)
           as a fraction of HBM peak, and time against F.layer_norm / F.rms_norm and against
           torch.compile of the same. Targets: >= 80% of peak; faster than both.
attention  causal attention forward+backward, head_dim 128, seq 2048/4096/8192, 16k tokens per
           batch: TFLOP/s (flash-attention's count: 3.5 x 2 x 2 x b x h x s^2 x d / 2) against
           scaled_dot_product_attention on the flash backend. Target: >= 0.9x.
model      one training step of a 1.3B Llama (bf16 weights, AdamW) with our kernels and with
           MEGATRON_LLM_KERNELS=torch: tokens/s and MFU (PaLM's 6N + 12 L d s FLOPs per token).

Without CUDA it says so and exits 0; without the built extension it says why and exits 1.
Figures are medians of timed repetitions (CUDA events) after warm-up; nothing here asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.timing import forward_backward, time_ms  # noqa: E402
from megatron_llm import kernels  # noqa: E402
from megatron_llm.kernels import fused  # noqa: E402

# Peaks by device name (substring, first match): HBM TB/s and dense bf16 TFLOP/s.
PEAKS = [
    ("H200", 4.8, 989.0),
    ("H100 PCIe", 2.0, 756.0),
    ("H100", 3.35, 989.0),
    ("A100-SXM4-80GB", 2.039, 312.0),
    ("A100 80GB PCIe", 1.935, 312.0),
    ("A100", 1.555, 312.0),
]


def forward_only(op: Callable, *inputs: torch.Tensor) -> Callable[[], object]:
    return lambda: op(*inputs)


def bench_norms(args: argparse.Namespace, hbm_tbs: float) -> list[dict]:
    dtype = getattr(torch, args.dtype)
    rows, eps, results = args.rows, 1e-5, []
    for norm in ("layernorm", "rmsnorm"):
        for hidden in (1024, 2048, 4096, 8192, 16384):
            x = torch.randn(rows, hidden, device="cuda", dtype=dtype)
            w = torch.randn(hidden, device="cuda", dtype=dtype)
            b = torch.randn(hidden, device="cuda", dtype=dtype)
            if norm == "layernorm":
                ops = {
                    "ours": lambda x, w, b: kernels.layer_norm(x, w, b, eps, "ours"),
                    "torch": lambda x, w, b, h=hidden: F.layer_norm(x, (h,), w, b, eps),
                }
                inputs = (x, w, b)
            else:
                ops = {
                    "ours": lambda x, w: kernels.rms_norm(x, w, eps, "ours"),
                    "torch": lambda x, w, h=hidden: F.rms_norm(x, (h,), w, eps),
                }
                inputs = (x, w)
            ops["compile"] = torch.compile(ops["torch"], dynamic=False)
            size = x.numel() * x.element_size()
            for mode, moved in (("fwd", 2 * size), ("fwd+bwd", 5 * size)):
                run = forward_only if mode == "fwd" else forward_backward
                ms = {name: time_ms(run(op, *inputs), warmup=5) for name, op in ops.items()}
                gbs = moved / ms["ours"] / 1e6
                results.append(
                    dict(
                        bench="norm", op=norm, hidden=hidden, rows=rows, dtype=args.dtype,
                        mode=mode, ms=ms, gb_s=gbs, hbm_fraction=gbs / (hbm_tbs * 1e3),
                        vs_torch=ms["torch"] / ms["ours"], vs_compile=ms["compile"] / ms["ours"],
                    )
                )  # fmt: skip
                r = results[-1]
                print(
                    f"{norm:9s} h={hidden:5d} {mode:7s} {ms['ours']:8.3f} ms {gbs:7.0f} GB/s "
                    f"({r['hbm_fraction']:4.0%} of HBM)  {r['vs_torch']:4.2f}x torch  "
                    f"{r['vs_compile']:4.2f}x compile"
                )
    return results


def bench_attention(args: argparse.Namespace) -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dtype = torch.bfloat16 if args.dtype == "float32" else getattr(torch, args.dtype)
    heads, head_dim, results = 16, 128, []
    for seq in (2048, 4096, 8192):
        batch = max(1, 16384 // seq)
        q, k, v = (
            torch.randn(batch, heads, seq, head_dim, device="cuda", dtype=dtype) for _ in range(3)
        )

        def flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        ours = lambda q, k, v: kernels.causal_attention(q, k, v, 0.0, "ours")  # noqa: E731
        ours_ms = time_ms(forward_backward(ours, q, k, v), warmup=5)
        flash_ms = time_ms(forward_backward(flash, q, k, v), warmup=5)
        flops = 3.5 * 4 * batch * heads * seq**2 * head_dim / 2
        results.append(
            dict(
                bench="attention", seq=seq, batch=batch, heads=heads, head_dim=head_dim,
                ms=dict(ours=ours_ms, flash=flash_ms), tflops=flops / ours_ms / 1e9,
                flash_tflops=flops / flash_ms / 1e9, vs_flash=flash_ms / ours_ms,
            )
        )  # fmt: skip
        r = results[-1]
        print(
            f"attention s={seq:5d} b={batch:2d} fwd+bwd {ours_ms:8.2f} ms {r['tflops']:6.1f} "
            f"TFLOP/s  flash {r['flash_tflops']:6.1f} TFLOP/s  {r['vs_flash']:4.2f}x flash"
        )
    return results


def bench_model(args: argparse.Namespace, peak_tflops: float) -> list[dict]:
    from megatron_llm.model import GPT, ModelConfig

    cfg = ModelConfig(
        style="llama", num_layers=24, hidden_size=2048, num_heads=16, num_kv_heads=16,
        ffn_hidden_size=5504, seq_length=2048, vocab_size=32000,
    )  # fmt: skip
    torch.manual_seed(0)
    model = GPT(cfg, 32000).cuda().bfloat16()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    n = model.num_parameters()
    flops_per_token = 6 * n + 12 * cfg.num_layers * cfg.hidden_size * cfg.seq_length
    tokens = torch.randint(0, 32000, (args.model_batch, cfg.seq_length + 1), device="cuda")

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(tokens[:, :-1], tokens[:, 1:]).backward()
        optimizer.step()

    results = []
    for name, env in (("ours", "ours"), ("torch", "torch")):
        os.environ[kernels.ENV] = env  # read on every call
        ms = time_ms(step, warmup=3, reps=10)
        tokens_s = args.model_batch * cfg.seq_length / ms * 1e3
        mfu = tokens_s * flops_per_token / (peak_tflops * 1e12)
        results.append(
            dict(bench="model", kernels=name, params=n, ms=ms, tokens_s=tokens_s, mfu=mfu)
        )
        print(
            f"llama 1.3B ({n / 1e9:.2f}B) kernels={name:5s} {tokens_s:8.0f} tokens/s  MFU {mfu:.1%}"
        )
    os.environ.pop(kernels.ENV)
    print(f"llama 1.3B: ours / torch = {results[1]['ms'] / results[0]['ms']:.2f}x")
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["norms", "attention", "model"], action="append")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--rows", type=int, default=16384, help="norm rows (tokens)")
    parser.add_argument("--model-batch", type=int, default=4, help="sequences per model step")
    parser.add_argument("--hbm-tbs", type=float, help="HBM peak in TB/s (default: by GPU name)")
    parser.add_argument("--peak-tflops", type=float, help="bf16 dense peak (default: by name)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    if not torch.cuda.is_available():
        print("bench/kernels.py: CUDA is not available; these benchmarks need a GPU. Nothing run.")
        return 0
    if kernels.backend("ours") != "cuda":
        print(f"bench/kernels.py: our kernels cannot run: {kernels.backend_reason('ours')}")
        return 1
    name = torch.cuda.get_device_name()
    known = next(((hbm, tf) for key, hbm, tf in PEAKS if key in name), (None, None))
    hbm_tbs = args.hbm_tbs or known[0]
    peak_tflops = args.peak_tflops or known[1]
    if hbm_tbs is None or peak_tflops is None:
        print(f"bench/kernels.py: unknown GPU {name!r}; pass --hbm-tbs and --peak-tflops")
        return 1
    print(f"{name}: HBM {hbm_tbs} TB/s, bf16 {peak_tflops} TFLOP/s; extension {fused.ext.__file__}")

    only = set(args.only or ["norms", "attention", "model"])
    results = []
    if "norms" in only:
        results += bench_norms(args, hbm_tbs)
    if "attention" in only:
        results += bench_attention(args)
    if "model" in only:
        results += bench_model(args, peak_tflops)
    if args.json:
        args.json.write_text(json.dumps(dict(device=name, results=results), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
