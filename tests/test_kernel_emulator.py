"""The CUDA kernels of csrc/ themselves, run on the CPU by the emulator (csrc/emulator/, built and
wrapped by tests/kernel_emulator.py), so that CI checks the kernels' code and not only a double
of it:

- parity of every kernel with its PyTorch reference, forward and all gradients, through the
  autograd Functions of megatron_llm.kernels.fused, over dtypes and odd shapes;
- no races: each result is the same, bit for bit, whatever order the threads run in;
- nothing read or written out of bounds and every output element written (the emulated
  extension's NaN guards);
- a model with the kernels matches the plain-PyTorch model;
- and the emulator's own checks, each shown to catch the fault it is for (csrc/emulator/
  faults.cu), since a passing verdict from a checker that cannot fail would mean nothing.

Speed and the GPU's own floating point are for the GPU tier of tests/test_kernels.py and
bench/kernels.py.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from megatron_llm import kernels
from megatron_llm.kernels import fused, reference
from megatron_llm.model import GPT, ModelConfig
from tests import kernel_checks
from tests.kernel_emulator import (
    CSRC,
    CXX,
    SCHEDULES,
    EmulatedExtension,
    GuardError,
    _Guarded,
    rewrite_for_emulator,
)

pytestmark = pytest.mark.skipif(shutil.which(CXX) is None, reason=f"needs a C++ compiler ({CXX})")

NORM_TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=1e-2, rtol=1e-2),
    torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
}


@pytest.fixture(scope="module")
def emulator() -> EmulatedExtension:
    # One multiprocessor: the norm backward then has few blocks, each looping over several rows.
    return EmulatedExtension(num_sms=1)


@pytest.fixture
def emulated(emulator, monkeypatch):
    """megatron_llm.kernels' fused path on CPU tensors, running the emulated kernels."""
    monkeypatch.setattr(fused, "ext", emulator)
    monkeypatch.setattr(kernels, "_is_cuda", lambda t: True)
    monkeypatch.setenv(kernels.ENV, "ours")  # ours wherever it fits: nothing is measured on CPU
    emulator.calls.clear()
    emulator.schedule = SCHEDULES[0]
    yield emulator
    emulator.schedule = SCHEDULES[0]


# ------------------------------------------------------------------------------------------------
# the emulator catches what it is for


def test_the_emulator_shows_a_missing_barrier(emulated):
    x = torch.arange(256.0)
    reversed_blocks = x.view(4, 64).flip(1).reshape(-1)
    results = {}
    for schedule in SCHEDULES:
        emulated.schedule = schedule
        assert torch.equal(emulated.fault("no_race", x, 256), reversed_blocks)
        results[schedule] = emulated.fault("race", x, 256)
    # Without the barrier, a thread reads its mirror's slot before (in order, threads 0-31;
    # reversed, 32-63) the mirror wrote it: poisoned shared memory, NaN.
    for out in results.values():
        assert out.isnan().any()
    in_order, reverse = results[(0, False)], results[(1, False)]
    assert in_order[:32].isnan().all() and not in_order[32:64].isnan().any()
    assert reverse[32:64].isnan().all() and not reverse[:32].isnan().any()


def test_the_emulator_shows_a_reduction_that_reuses_scratch_too_soon(emulated):
    # Two block sums through one scratch array, without the barrier that keeps a fast warp from
    # overwriting it before the slow ones have read the first sum: right while the warps run in
    # step, wrong once they run apart.
    x = torch.arange(128.0)
    want = torch.full((128,), x.sum().item() + (x * x).sum().item())
    for schedule in SCHEDULES:
        emulated.schedule = schedule
        assert torch.equal(emulated.fault("two_sums", x, 128), want), schedule
        got = emulated.fault("two_sums_racy", x, 128)
        assert torch.equal(got, want) != schedule[1], schedule


@pytest.mark.parametrize(
    "fault,numel,error,message",
    [
        ("divergent_shuffle", 32, RuntimeError, "__shfl_xor_sync with mask 0xffffffff names lanes"),
        ("divergent_barrier", 64, RuntimeError, "wait at different __syncthreads calls"),
        ("barrier_after_return", 48, RuntimeError, r"waits at __syncthreads after thread \(48"),
        ("write_past_end", 100, GuardError, "wrote outside the buffer"),
        ("too_many_threads", 256, RuntimeError, "invalid configuration argument"),
        ("partial_warp_mma", 16, RuntimeError, "mma.m16n8k16.f16 needs all 32 lanes"),
    ],
)
def test_the_emulator_reports_a_fault(emulator, fault, numel, error, message):
    with pytest.raises(error, match=message):
        emulator.fault(fault, torch.ones(numel), numel)


@pytest.mark.parametrize("bf16", [False, True])
def test_the_emulated_tensor_core_op_multiplies(emulator, bf16):
    # csrc/probes.cu loads fragments by the layouts of csrc/mma.cuh; the emulated mma.sync
    # assembles the matrices by its own copy of them. The GPU tier runs the same check.
    kernel_checks.check_mma(emulator, "cpu", bf16)


def test_the_emulated_ldmatrix_hands_out_the_documented_fragments(emulator):
    kernel_checks.check_ldmatrix(emulator, "cpu")


def test_unwritten_output_is_reported():
    buf = _Guarded((4,), torch.float32)
    buf.view[:3] = 1.0
    with pytest.raises(GuardError, match="1 of 4 elements are NaN"):
        buf.check("out", written=True)
    buf.view[3] = 1.0
    buf.check("out", written=True)


def test_launch_rewrite_keeps_lines_and_template_arguments():
    src = (
        "  __shared__ __align__(16) T k_tile[kTileK][D + kPad];\n"
        "x;\nfoo<T, N><<<grid,\n  256, 0, s>>>(a, b);\nbar<<<1, 32>>>();\n"
    )
    out = rewrite_for_emulator(src, "k.cu")
    assert out.startswith('#line 1 "csrc/k.cu"\n')
    body = out.split("\n", 1)[1]
    assert body.count("\n") == src.count("\n")
    launch = "::emu::Launch(grid,\n  256, 0, s)"
    assert launch + "([&](auto&&... emu_args_) { foo<T, N>(emu_args_...); }, a, b);" in body
    assert "{ bar(emu_args_...); });" in body
    shared = "  static __align__(16) T k_tile[kTileK][D + kPad];"
    assert body.startswith(shared + " ::emu::shared_region(k_tile, sizeof k_tile);\n")


@pytest.mark.parametrize("path", sorted([*CSRC.glob("*.cu"), *CSRC.glob("*.cuh")]), ids=str)
def test_every_shared_array_of_csrc_is_known_to_the_emulator(path):
    # Only arrays the rewrite registers are poisoned before each block (csrc/emulator/emu.h).
    declared = path.read_text().count("__shared__")
    rewritten = rewrite_for_emulator(path.read_text(), path.name)
    assert rewritten.count("::emu::shared_region(") == declared


# ------------------------------------------------------------------------------------------------
# norms


NORM_SHAPES = [(1, 64), (7, 100), (37, 1000), (5, 4096), (2, 16384), (1, 32768)]


@pytest.mark.parametrize("dtype", list(NORM_TOL))
@pytest.mark.parametrize("rows,hidden", NORM_SHAPES)
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_norm_kernels_match_the_reference(emulated, dtype, rows, hidden, norm):
    torch.manual_seed(0)
    x = (torch.randn(rows, hidden) * 3 + 1).to(dtype)
    w, b = torch.randn(hidden), torch.randn(hidden)
    kernel_checks.check_norm(norm, x, w, b, NORM_TOL[dtype], sum_tol=1e-4)
    assert emulated.calls == [f"{norm}_forward", f"{norm}_backward"]


@pytest.mark.parametrize("rows,hidden", [(37, 1000), (3, 16384)])
def test_norm_kernels_do_not_depend_on_thread_order(emulated, rows, hidden):
    torch.manual_seed(0)
    x = torch.randn(rows, hidden, dtype=torch.bfloat16)
    dy = torch.randn(rows, hidden, dtype=torch.bfloat16)
    w, b = torch.randn(hidden), torch.randn(hidden)

    def run():
        y, mean, rstd = emulated.layernorm_forward(x, w, b, 1e-5)
        ry, r_rstd = emulated.rmsnorm_forward(x, w, 1e-5)
        return [
            y,
            mean,
            rstd,
            *emulated.layernorm_backward(dy, x, w, mean, rstd, True),
            ry,
            *emulated.rmsnorm_backward(dy, x, w, r_rstd),
        ]

    first = run()
    for schedule in SCHEDULES[1:]:
        emulated.schedule = schedule
        for a, b_ in zip(first, run()):
            assert torch.equal(a, b_), schedule


def test_norm_layernorm_without_bias(emulated):
    x = torch.randn(9, 300)
    w = torch.randn(300)
    ours = kernel_checks.grads(lambda x, w: kernels.layer_norm(x, w, None, 1e-5), x, w)
    ref = kernel_checks.grads(lambda x, w: reference.layer_norm(x, w, None, 1e-5), x, w)
    torch.testing.assert_close(ours[0], ref[0], **NORM_TOL[torch.float32])
    torch.testing.assert_close(ours[1][0], ref[1][0], **NORM_TOL[torch.float32])
    torch.testing.assert_close(ours[1][1], ref[1][1], atol=1e-4, rtol=1e-4)


def test_norm_launcher_refuses_what_it_cannot_do(emulator):
    message = r"csrc/norm.cuh:\d+: hidden=32769: must be in \[1, 32768\]"
    with pytest.raises(RuntimeError, match=message):
        emulator.rmsnorm_forward(torch.randn(1, 32769), torch.randn(32769), 1e-5)


# ------------------------------------------------------------------------------------------------
# attention

ATTENTION_CASES = [
    # dtype, head_dim, heads, kv_heads, batch, seq
    (torch.float16, 64, 4, 4, 2, 1),
    (torch.bfloat16, 64, 4, 2, 1, 17),
    (torch.float16, 128, 4, 1, 1, 65),
    (torch.bfloat16, 128, 2, 2, 1, 130),
    (torch.float16, 64, 6, 2, 1, 100),
    (torch.bfloat16, 64, 2, 1, 1, 257),
]


@pytest.mark.parametrize("dtype,head_dim,heads,kv_heads,batch,seq", ATTENTION_CASES)
def test_attention_kernels_match_the_reference(
    emulated, dtype, head_dim, heads, kv_heads, batch, seq
):
    torch.manual_seed(0)
    q = torch.randn(batch, heads, seq, head_dim).to(dtype)
    k = torch.randn(batch, kv_heads, seq, head_dim).to(dtype)
    v = torch.randn(batch, kv_heads, seq, head_dim).to(dtype)
    kernel_checks.check_attention(q, k, v)  # the GPU tier's check, on the emulated kernels
    assert emulated.calls == ["attention_forward", "attention_backward"]


def test_attention_saves_the_log_sum_exp_and_does_not_depend_on_thread_order(emulated):
    torch.manual_seed(0)
    q = torch.randn(1, 4, 70, 64, dtype=torch.bfloat16)
    k, v = (torch.randn(1, 2, 70, 64, dtype=torch.bfloat16) for _ in range(2))
    out, lse = emulated.attention_forward(q, k, v)
    s = (q.float() @ k.float().repeat_interleave(2, 1).transpose(-1, -2)) / 8.0
    s = s.masked_fill(torch.ones(70, 70, dtype=torch.bool).triu(1), -torch.inf)
    torch.testing.assert_close(lse, s.logsumexp(-1), atol=1e-4, rtol=1e-5)
    dout = torch.randn_like(out)
    first = [out, lse, *emulated.attention_backward(dout, q, k, v, out, lse)]
    for schedule in SCHEDULES[1:]:
        emulated.schedule = schedule
        again_out, again_lse = emulated.attention_forward(q, k, v)
        again = [again_out, again_lse, *emulated.attention_backward(dout, q, k, v, out, lse)]
        for a, b in zip(first, again):
            assert torch.equal(a, b), schedule


def test_attention_launcher_refuses_what_it_cannot_do(emulator):
    q = torch.randn(1, 3, 8, 64, dtype=torch.float16)
    k = torch.randn(1, 2, 8, 64, dtype=torch.float16)
    with pytest.raises(RuntimeError, match=r"csrc/attention.cu:\d+: .*heads must be a multiple"):
        emulator.attention_forward(q, k, k)
    q = torch.randn(1, 2, 8, 96, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="head_dim must be 64 or 128"):
        emulator.attention_forward(q, q, q)


# ------------------------------------------------------------------------------------------------
# the model


# the block modes of ring attention and packed documents (AttentionMode), against
# megatron_llm/kernels/attention.py block_attention

MODE_CASES = [
    # dtype, head_dim, heads, kv_heads, seq, seq_k, q_offset, k_offset, causal, segments
    (torch.bfloat16, 64, 4, 2, 40, 90, 100, 30, True, False),  # keys partly in the past
    (torch.float16, 64, 2, 1, 70, 33, 0, 0, False, False),  # full (non-causal) block
    (torch.bfloat16, 64, 4, 2, 40, 90, 0, 50, True, False),  # keys all in the future
    (torch.float16, 128, 2, 2, 65, 65, 0, 0, True, True),  # packed documents
    (torch.bfloat16, 64, 4, 1, 50, 80, 60, 20, True, True),  # both: a ring step of documents
]


@pytest.mark.parametrize(
    "dtype,head_dim,heads,kv_heads,seq,seq_k,q_offset,k_offset,causal,segments", MODE_CASES
)
def test_attention_modes_match_block_attention(
    emulator, dtype, head_dim, heads, kv_heads, seq, seq_k, q_offset, k_offset, causal, segments
):
    torch.manual_seed(0)
    kernel_checks.check_attention_mode(
        emulator,
        "cpu",
        dtype,
        (2, heads, kv_heads, seq, seq_k, head_dim),
        q_offset,
        k_offset,
        causal,
        segments,
    )


def test_attention_mode_does_not_depend_on_thread_order(emulator):
    torch.manual_seed(0)
    q = torch.randn(1, 2, 40, 64, dtype=torch.bfloat16)
    k, v = (torch.randn(1, 1, 70, 64, dtype=torch.bfloat16) for _ in range(2))
    ids = torch.randint(0, 3, (1, 110)).sort(-1).values.int()
    args = (30, 0, True, ids[:, 30:70], ids[:, :70])
    first = None
    for schedule in SCHEDULES:
        emulator.schedule = schedule
        out, lse = emulator.attention_forward_mode(q, k, v, *args)
        dout = torch.ones_like(out)
        got = [out, lse, *emulator.attention_backward_mode(dout, q, k, v, out, lse, *args)]
        first = first or got
        for a, b in zip(first, got):
            assert torch.equal(a, b), schedule
    emulator.schedule = SCHEDULES[0]


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_model_with_emulated_kernels_and_documents_matches_the_plain_model(emulated, style):
    # Packed documents reach the kernels' segment mode, never the plain causal kernel.
    from megatron_llm.data.batch import DocumentMasking, model_inputs

    torch.manual_seed(0)
    cfg = dict(num_layers=1, hidden_size=128, num_heads=2, num_kv_heads=1, seq_length=32)
    ours = GPT(ModelConfig(style=style, **cfg), 256).bfloat16()
    plain = GPT(ModelConfig(style=style, kernels="torch", **cfg), 256).bfloat16()
    plain.load_state_dict(ours.state_dict())
    samples = torch.randint(1, 256, (2, 33)).masked_fill(torch.rand(2, 33) < 0.15, 0)
    masking = DocumentMasking(eod=0, reset_attention_mask=True, reset_position_ids=True)
    inputs, labels, ids = model_inputs(samples, masking)

    def loss_and_grads(model):
        model.zero_grad()
        loss = model(inputs, labels, **ids)
        loss.backward()
        return loss.detach(), {n: p.grad.float() for n, p in model.named_parameters()}

    loss, g = loss_and_grads(ours)
    assert "attention_forward_mode" in emulated.calls and "attention_forward" not in emulated.calls
    plain_loss, plain_g = loss_and_grads(plain)
    torch.testing.assert_close(loss, plain_loss, atol=2e-2, rtol=2e-2)
    for name in g:
        torch.testing.assert_close(g[name], plain_g[name], atol=5e-2, rtol=5e-2, msg=name)


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_model_with_emulated_kernels_matches_the_plain_model(emulated, style):
    torch.manual_seed(0)
    cfg = dict(num_layers=2, hidden_size=128, num_heads=2, num_kv_heads=1, seq_length=32)
    ours = GPT(ModelConfig(style=style, **cfg), 256).bfloat16()
    plain = GPT(ModelConfig(style=style, kernels="torch", **cfg), 256).bfloat16()
    plain.load_state_dict(ours.state_dict())
    tokens = torch.randint(0, 256, (2, 32))

    def loss_and_grads(model):
        model.zero_grad()
        loss = model(tokens, tokens)
        loss.backward()
        return loss.detach(), {n: p.grad.float() for n, p in model.named_parameters()}

    loss, g = loss_and_grads(ours)
    norm = "layernorm" if style == "gpt2" else "rmsnorm"
    for op in ["attention_forward", "attention_backward", f"{norm}_forward", f"{norm}_backward"]:
        assert op in emulated.calls, op
    emulated.calls.clear()
    plain_loss, plain_g = loss_and_grads(plain)
    assert emulated.calls == []
    torch.testing.assert_close(loss, plain_loss, atol=2e-2, rtol=2e-2)
    for name in g:
        torch.testing.assert_close(g[name], plain_g[name], atol=5e-2, rtol=5e-2, msg=name)
