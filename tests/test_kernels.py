"""megatron_llm.kernels: which path runs, and that every path gives the PyTorch reference's answer.

CPU tier (a Python double, not the CUDA code): the fallback is what runs here and matches the
plain-PyTorch model; the environment variable and model.kernels force it; the dispatch and the
autograd Functions of fused.py are exercised against FakeExtension, a PyTorch double of
csrc/bindings.cpp's contract written after the kernels' algorithm (saved statistics,
log-sum-exp, delta, group sums). It checks the dispatch, the autograd wiring and the formulas as
we wrote them down again in Python; it never runs a line of the .cu files, so a bug in the CUDA
code passes here. The .cu code itself runs on CPU in the emulator tier
(tests/test_kernel_emulator.py, with tests/kernel_checks.py) and on a GPU in the GPU tier.
GPU tier (marked gpu, skipped without CUDA and the built extension): parity of every kernel with
the reference, forward and all gradients, over dtypes and shapes.
The kernels' own code also runs on CPU, in an emulator: tests/test_kernel_emulator.py.
"""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

from megatron_llm import kernels
from megatron_llm.kernels import fused, measured, reference
from megatron_llm.kernels.attention import block_attention, block_attention_backward
from megatron_llm.model import GPT, ModelConfig
from tests import kernel_checks
from tests.kernel_checks import grads


def acc(t: torch.Tensor) -> torch.Tensor:
    """The accumulation dtype: fp32 as in the kernels; float64 stays (formula checks)."""
    return t if t.dtype == torch.float64 else t.float()


class FakeExtension:
    """A Python double of csrc/bindings.cpp's functions (fp32 math), recording each call.
    Not the CUDA code: tests/test_kernel_emulator.py runs that."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def layernorm_forward(self, x, weight, bias, eps):
        self.calls.append("layernorm_forward")
        xf = acc(x)
        mean = xf.mean(-1)
        rstd = torch.rsqrt(xf.var(-1, unbiased=False) + eps)
        y = (xf - mean[:, None]) * rstd[:, None] * acc(weight)
        if bias is not None:
            y = y + acc(bias)
        return y.to(x.dtype), mean, rstd

    def layernorm_backward(self, dy, x, weight, mean, rstd, has_bias):
        self.calls.append("layernorm_backward")
        xhat = (acc(x) - mean[:, None]) * rstd[:, None]
        g = acc(dy) * acc(weight)
        dx = rstd[:, None] * (
            g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True)
        )
        dbias = acc(dy).sum(0) if has_bias else torch.empty(0)
        return dx.to(x.dtype), (acc(dy) * xhat).sum(0), dbias

    def rmsnorm_forward(self, x, weight, eps):
        self.calls.append("rmsnorm_forward")
        rstd = torch.rsqrt(acc(x).pow(2).mean(-1) + eps)
        return (acc(x) * rstd[:, None] * acc(weight)).to(x.dtype), rstd

    def rmsnorm_backward(self, dy, x, weight, rstd):
        self.calls.append("rmsnorm_backward")
        xhat = acc(x) * rstd[:, None]
        g = acc(dy) * acc(weight)
        dx = rstd[:, None] * (g - xhat * (g * xhat).mean(-1, keepdim=True))
        return dx.to(x.dtype), (acc(dy) * xhat).sum(0)

    @staticmethod
    def _scores(q, k):
        # (batch, heads, seq, seq) scaled causal scores, kv heads repeated over their group
        group = q.shape[1] // k.shape[1]
        s = acc(q) @ acc(k).repeat_interleave(group, 1).transpose(-1, -2)
        s = s * q.shape[-1] ** -0.5
        seq = q.shape[2]
        return s.masked_fill(torch.ones(seq, seq, dtype=torch.bool).triu(1), float("-inf"))

    def attention_forward(self, q, k, v):
        self.calls.append("attention_forward")
        s = self._scores(q, k)
        lse = s.logsumexp(-1)  # (batch, heads, seq)
        p = (s - lse[..., None]).exp()
        group = q.shape[1] // k.shape[1]
        return (p @ acc(v).repeat_interleave(group, 1)).to(q.dtype), lse

    def attention_backward(self, dout, q, k, v, out, lse):
        self.calls.append("attention_backward")
        group = q.shape[1] // k.shape[1]
        p = (self._scores(q, k) - lse[..., None]).exp()  # recomputed from the log-sum-exp
        do = acc(dout)
        dv = p.transpose(-1, -2) @ do  # (batch, heads, seq, head_dim)
        dp = do @ acc(v).repeat_interleave(group, 1).transpose(-1, -2)
        delta = (do * acc(out)).sum(-1, keepdim=True)
        ds = p * (dp - delta) * q.shape[-1] ** -0.5
        dq = ds @ acc(k).repeat_interleave(group, 1)
        dk = ds.transpose(-1, -2) @ acc(q)

        def group_sum(t: torch.Tensor) -> torch.Tensor:
            # (batch, heads, seq, d) -> (batch, kv_heads, seq, d): each kv head sums its group
            return t.unflatten(1, (k.shape[1], group)).sum(2)

        return dq.to(q.dtype), group_sum(dk).to(k.dtype), group_sum(dv).to(v.dtype)


class FakeModeExtension(FakeExtension):
    """FakeExtension with the block modes (AttentionMode), by block_attention."""

    def attention_forward_mode(self, q, k, v, q_offset, k_offset, causal, qs=None, ks=None):
        self.calls.append("attention_forward_mode")
        kw = dict(q_start=q_offset, k_start=k_offset, causal=causal, q_segments=qs, k_segments=ks)
        out, lse = block_attention(acc(q), acc(k), acc(v), **kw)
        return out.to(q.dtype), lse

    def attention_backward_mode(
        self, dout, q, k, v, out, lse, q_offset, k_offset, causal, qs=None, ks=None
    ):
        self.calls.append("attention_backward_mode")
        kw = dict(q_start=q_offset, k_start=k_offset, causal=causal, q_segments=qs, k_segments=ks)
        grads = block_attention_backward(acc(dout), acc(q), acc(k), acc(v), acc(out), lse, **kw)
        return tuple(g.to(t.dtype) for g, t in zip(grads, (q, k, v)))


@pytest.fixture
def fake_ext(monkeypatch):
    """The fused path on CPU: a FakeExtension, CPU tensors taken for CUDA ones, and ours chosen
    wherever it fits (MEGATRON_LLM_KERNELS=ours: nothing is measured on CPU)."""
    ext = FakeExtension()
    monkeypatch.setattr(fused, "ext", ext)
    monkeypatch.setattr(kernels, "_is_cuda", lambda t: True)
    monkeypatch.setenv(kernels.ENV, "ours")
    return ext


# ------------------------------------------------------------------------------------------------
# CPU: which path runs


@pytest.mark.parametrize("with_mode", [True, False])
def test_packed_documents_take_the_segment_mode_or_torch_never_the_plain_kernel(
    monkeypatch, with_mode
):
    # An extension built before the segment mode has no attention_forward_mode: torch's path.
    ext = FakeModeExtension() if with_mode else FakeExtension()
    monkeypatch.setattr(fused, "ext", ext)
    monkeypatch.setattr(kernels, "_is_cuda", lambda t: True)
    monkeypatch.setenv(kernels.ENV, "ours")
    torch.manual_seed(0)
    q = torch.randn(2, 4, 64, 64, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 2, 64, 64, dtype=torch.float64) for _ in range(2))
    segments = torch.randint(0, 4, (2, 64)).sort(-1).values
    q16, k16, v16 = (t.detach().half() for t in (q, k, v))
    y = kernels.causal_attention(q16.requires_grad_(), k16, v16, 0.0, "ours", segments=segments)
    y.sum().backward()
    want = reference.causal_attention(q16.float(), k16.float(), v16.float(), 0.0, segments)
    torch.testing.assert_close(y.float(), want, atol=2e-3, rtol=2e-3)
    calls = ["attention_forward_mode", "attention_backward_mode"] if with_mode else []
    assert ext.calls == calls


def test_backend_reports_the_fallback_and_why(monkeypatch):
    monkeypatch.delenv(kernels.ENV, raising=False)
    if fused.ext is None:
        assert kernels.backend() == "torch"
        assert "megatron_llm_kernels not built" in kernels.backend_reason()
        assert fused.IMPORT_ERROR in kernels.backend_reason()
    monkeypatch.setenv(kernels.ENV, "torch")
    assert kernels.backend() == "torch"
    assert kernels.backend_reason().startswith("torch's path forced (MEGATRON_LLM_KERNELS=torch")
    monkeypatch.setenv(kernels.ENV, "cuda-please")
    with pytest.raises(ValueError, match="MEGATRON_LLM_KERNELS='cuda-please'"):
        kernels.backend()


def test_cpu_tensors_never_reach_the_extension(monkeypatch):
    ext = FakeExtension()
    monkeypatch.setattr(fused, "ext", ext)
    monkeypatch.delenv(kernels.ENV, raising=False)
    x, w, b = torch.randn(3, 64), torch.randn(64), torch.randn(64)
    torch.testing.assert_close(kernels.layer_norm(x, w, b, 1e-5), F.layer_norm(x, (64,), w, b))
    torch.testing.assert_close(kernels.rms_norm(x, w, 1e-5), F.rms_norm(x, (64,), w, 1e-5))
    q = torch.randn(1, 2, 5, 64, dtype=torch.bfloat16)
    kernels.causal_attention(q, q, q)
    assert ext.calls == []
    if not torch.cuda.is_available():
        assert kernels.backend() == "torch"


def test_the_fused_path_is_taken_when_it_fits(fake_ext):
    x, w = torch.randn(3, 64), torch.randn(64)
    q = torch.randn(1, 4, 5, 64, dtype=torch.bfloat16)
    kernels.layer_norm(x, w, w, 1e-5)
    kernels.rms_norm(x, w, 1e-5)
    kernels.causal_attention(q, q[:, :2], q[:, :2])
    assert fake_ext.calls == ["layernorm_forward", "rmsnorm_forward", "attention_forward"]


@pytest.mark.parametrize("forced", ["env", "impl"])
def test_forced_fallback(fake_ext, monkeypatch, forced):
    impl = "torch" if forced == "impl" else "auto"
    if forced == "env":
        monkeypatch.setenv(kernels.ENV, "torch")
    x, w = torch.randn(2, 64), torch.randn(64)
    q = torch.randn(1, 4, 5, 64, dtype=torch.bfloat16)
    kernels.layer_norm(x, w, w, 1e-5, impl)
    kernels.rms_norm(x, w, 1e-5, impl)
    kernels.causal_attention(q, q[:, :2], q[:, :2], 0.0, impl)
    assert fake_ext.calls == []


def bf16(*shape: int) -> torch.Tensor:
    return torch.randn(shape, dtype=torch.bfloat16)


UNSUPPORTED = {
    "dropout": lambda: kernels.causal_attention(*[bf16(1, 2, 5, 64)] * 3, 0.1),
    "head_dim_96": lambda: kernels.causal_attention(*[bf16(1, 2, 5, 96)] * 3),
    "fp32_attention": lambda: kernels.causal_attention(*[torch.randn(1, 2, 5, 64)] * 3),
    "kv_length": lambda: kernels.causal_attention(bf16(1, 2, 5, 64), *[bf16(1, 2, 3, 64)] * 2),
    "hidden_32769": lambda: kernels.rms_norm(torch.randn(1, 32769), torch.ones(32769), 1e-5),
    "float64_norm": lambda: kernels.rms_norm(torch.randn(2, 8).double(), torch.ones(8), 1e-5),
    "empty": lambda: kernels.layer_norm(torch.randn(0, 64), torch.ones(64), None, 1e-5),
}


def test_attention_before_sm80_falls_back(fake_ext, monkeypatch):
    q = bf16(1, 2, 5, 64)
    monkeypatch.setattr(kernels, "_capability", lambda t: (7, 5))  # a T4: no bf16 mma.sync
    kernels.causal_attention(q, q, q)
    monkeypatch.setattr(kernels, "_capability", lambda t: (8, 0))
    assert fake_ext.calls == []
    kernels.causal_attention(q, q, q)
    assert fake_ext.calls == ["attention_forward"]


def test_attention_inputs_are_made_16_byte_aligned():
    base = torch.randn(2 * 3 * 64 + 1, dtype=torch.bfloat16)
    view = base[1:].view(2, 3, 64)  # contiguous, but 2 bytes past an aligned address
    assert view.data_ptr() % 16 != 0
    aligned = fused._aligned(view)
    assert aligned.data_ptr() % 16 == 0 and torch.equal(aligned, view)
    fine = base[:-1].view(2, 3, 64)
    assert fused._aligned(fine).data_ptr() == fine.data_ptr()  # no copy when it is not needed


@pytest.mark.parametrize("case", list(UNSUPPORTED))
def test_unsupported_inputs_fall_back(fake_ext, case):
    UNSUPPORTED[case]()
    assert fake_ext.calls == []


def test_impl_is_validated():
    with pytest.raises(ValueError, match="impl='cuda'"):
        kernels.rms_norm(torch.randn(2, 8), torch.ones(8), 1e-5, "cuda")


def _measurement(ours_ms: float, torch_ms: float) -> measured.Measurement:
    return measured.Measurement(ours_ms, torch_ms, "NVIDIA H200", "test")


def test_auto_runs_ours_only_where_measured_faster(fake_ext, monkeypatch):
    monkeypatch.delenv(kernels.ENV)  # auto, the default
    x, w = torch.randn(3, 64), torch.randn(64)
    q = torch.randn(1, 4, 5, 64, dtype=torch.bfloat16)
    kernels.layer_norm(x, w, w, 1e-5)
    kernels.rms_norm(x, w, 1e-5)
    kernels.causal_attention(q, q[:, :2], q[:, :2])
    assert fake_ext.calls == []  # nothing measured: torch's path everywhere
    # CPU tensors pretend to be an sm_90 GPU here (kernels._capability).
    monkeypatch.setattr(
        measured,
        "MEASURED",
        {
            ("rms_norm", "float32", "hidden<=1024", "sm_90"): _measurement(1.0, 2.0),
            ("layer_norm", "float32", "hidden<=1024", "sm_90"): _measurement(3.0, 2.0),
            ("attention", "bfloat16", "head_dim=64,mha,seq<=2048", "sm_90"): _measurement(1, 2),
        },
    )
    kernels.layer_norm(x, w, w, 1e-5)  # measured slower
    kernels.rms_norm(x, w, 1e-5)  # measured faster
    kernels.rms_norm(torch.randn(3, 2048), torch.randn(2048), 1e-5)  # another shape class
    kernels.rms_norm(x.bfloat16(), w, 1e-5)  # another dtype
    kernels.causal_attention(q, q[:, :2], q[:, :2])  # gqa: not the measured mha class
    kernels.causal_attention(q, q, q)
    assert fake_ext.calls == ["rmsnorm_forward", "attention_forward"]
    fake_ext.calls.clear()
    kernels.rms_norm(x, w, 1e-5, "torch")  # the model's torch wins over a measurement
    assert fake_ext.calls == []


def test_ours_and_torch_precedence(monkeypatch):
    monkeypatch.delenv(kernels.ENV, raising=False)
    assert [kernels._mode(i) for i in ("auto", "ours", "torch")] == ["auto", "ours", "torch"]
    monkeypatch.setenv(kernels.ENV, "ours")
    assert [kernels._mode(i) for i in ("auto", "ours", "torch")] == ["ours", "ours", "torch"]
    monkeypatch.setenv(kernels.ENV, "torch")
    assert [kernels._mode(i) for i in ("auto", "ours", "torch")] == ["torch"] * 3


def test_backend_reason_says_why_torch_runs(monkeypatch):
    unmeasured = kernels.reason_for("auto", True, (9, 0))
    assert "no measurement shows our kernels faster on sm_90" in unmeasured
    assert "MEGATRON_LLM_KERNELS=ours" in unmeasured
    assert kernels.reason_for("ours", True, (9, 0)) == ""
    assert kernels.reason_for("ours", True, None) == "no CUDA device"
    assert "not built" in kernels.reason_for("ours", False, (9, 0))
    assert "forced" in kernels.reason_for("torch", True, (9, 0))
    entry = ("attention", "bfloat16", "head_dim=128,gqa,seq<=4096", "sm_90")
    monkeypatch.setattr(measured, "MEASURED", {entry: _measurement(1.0, 2.0)})
    assert kernels.reason_for("auto", True, (9, 0)) == ""
    assert "on sm_80" in kernels.reason_for("auto", True, (8, 0))  # measured on another arch
    assert measured.faster_classes((9, 0)) == ["attention bfloat16 head_dim=128,gqa,seq<=4096"]


def test_shape_classes():
    assert measured.norm_class(768) == "hidden<=1024"
    assert measured.norm_class(2048) == "hidden<=4096"
    assert measured.norm_class(40000) == "hidden>32768"
    assert measured.attention_class(64, 32, 8, 4096) == "head_dim=64,gqa,seq<=4096"
    assert measured.attention_class(128, 12, 12, 2048) == "head_dim=128,mha,seq<=2048"


# ------------------------------------------------------------------------------------------------
# CPU: the fused path's plumbing and the kernels' formulas, through FakeExtension


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(4, 64), (2, 3, 1000), (1, 1, 96)])
@pytest.mark.parametrize("bias", [True, False])
def test_fused_layer_norm_matches_reference(fake_ext, dtype, shape, bias):
    torch.manual_seed(0)
    hidden = shape[-1]
    x = torch.randn(shape).to(dtype)
    w, b = torch.randn(hidden), torch.randn(hidden) if bias else None
    inputs = (x, w) + ((b,) if bias else ())

    def run(fn):
        return grads(lambda x, w, *b: fn(x, w, b[0] if b else None, 1e-5), *inputs)

    out, g = run(kernels.layer_norm)
    ref_out, ref_g = run(reference.layer_norm)
    assert fake_ext.calls == ["layernorm_forward", "layernorm_backward"]
    assert out.dtype == dtype and g[0].dtype == dtype and g[1].dtype == torch.float32
    tol = {} if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out, ref_out, **tol)
    for got, want in zip(g, ref_g):
        torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(4, 64), (2, 3, 1000)])
def test_fused_rms_norm_matches_reference(fake_ext, dtype, shape):
    torch.manual_seed(0)
    x, w = torch.randn(shape).to(dtype), torch.randn(shape[-1])
    out, g = grads(lambda x, w: kernels.rms_norm(x, w, 1e-6), x, w)
    ref_out, ref_g = grads(lambda x, w: reference.rms_norm(x, w, 1e-6), x, w)
    assert fake_ext.calls == ["rmsnorm_forward", "rmsnorm_backward"]
    tol = {} if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out, ref_out, **tol)
    for got, want in zip(g, ref_g):
        torch.testing.assert_close(got, want, **tol)


def test_fused_norm_weight_gradient_keeps_the_weight_dtype(fake_ext):
    x, w = torch.randn(3, 64, dtype=torch.bfloat16), torch.ones(64, dtype=torch.bfloat16)
    _, (_, dw, db) = grads(lambda x, w, b: kernels.layer_norm(x, w, b, 1e-5), x, w, w)
    assert dw.dtype == db.dtype == torch.bfloat16


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("seq", [1, 7, 33])
def test_fused_attention_matches_reference(fake_ext, heads, kv_heads, seq):
    torch.manual_seed(0)
    q = torch.randn(2, heads, seq, 64)
    k, v = torch.randn(2, kv_heads, seq, 64), torch.randn(2, kv_heads, seq, 64)
    bf16 = [t.bfloat16() for t in (q, k, v)]
    out, g = grads(kernels.causal_attention, *bf16)
    assert fake_ext.calls == ["attention_forward", "attention_backward"]
    ref_out, ref_g = grads(reference.causal_attention, q, k, v)  # fp32
    torch.testing.assert_close(out.float(), ref_out, atol=3e-2, rtol=3e-2)
    for got, want in zip(g, ref_g):
        assert got.dtype == torch.bfloat16 and got.shape == want.shape
        torch.testing.assert_close(got.float(), want, atol=5e-2, rtol=5e-2)


def test_kernel_formulas_match_autograd_in_float64():
    # The algorithm of the .cu files (saved mean/rstd, log-sum-exp, delta, group sums), in
    # float64 so that only a wrong formula can fail.
    torch.manual_seed(0)
    ext = FakeExtension()
    x, w, b = torch.randn(5, 40).double(), torch.randn(40).double(), torch.randn(40).double()
    dy = torch.randn(5, 40).double()
    y, mean, rstd = ext.layernorm_forward(x, w, b, 1e-5)
    torch.testing.assert_close(y, F.layer_norm(x, (40,), w, b, 1e-5))
    ref = torch.func.vjp(lambda x, w, b: F.layer_norm(x, (40,), w, b, 1e-5), x, w, b)[1](dy)
    for got, want in zip(ext.layernorm_backward(dy, x, w, mean.double(), rstd.double(), True), ref):
        torch.testing.assert_close(got.double(), want)
    y, rstd = ext.rmsnorm_forward(x, w, 1e-5)
    ref = torch.func.vjp(lambda x, w: F.rms_norm(x, (40,), w, 1e-5), x, w)[1](dy)
    for got, want in zip(ext.rmsnorm_backward(dy, x, w, rstd.double()), ref):
        torch.testing.assert_close(got.double(), want)

    q, dout = torch.randn(2, 6, 9, 16).double(), torch.randn(2, 6, 9, 16).double()
    k, v = torch.randn(2, 2, 9, 16).double(), torch.randn(2, 2, 9, 16).double()  # 3 heads/group

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    out, vjp = torch.func.vjp(sdpa, q, k, v)
    got_out, lse = ext.attention_forward(q, k, v)
    torch.testing.assert_close(got_out, out)
    for got, want in zip(ext.attention_backward(dout, q, k, v, out, lse), vjp(dout)):
        torch.testing.assert_close(got, want)


# ------------------------------------------------------------------------------------------------
# CPU: the model


def tiny(style: str, **kw) -> ModelConfig:
    return ModelConfig(style=style, num_layers=2, hidden_size=128, num_heads=2, seq_length=32, **kw)


def loss_and_grads(model: GPT, tokens: torch.Tensor) -> tuple[torch.Tensor, dict]:
    model.zero_grad()
    loss = model(tokens, tokens)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_model_on_cpu_is_the_plain_pytorch_model(monkeypatch, style):
    torch.manual_seed(0)
    model = GPT(tiny(style, num_kv_heads=1), 256)
    tokens = torch.randint(0, 256, (2, 32))
    loss, g = loss_and_grads(model, tokens)
    # The same model with the plain PyTorch ops in place of megatron_llm.kernels.
    plain = types.SimpleNamespace(
        layer_norm=lambda x, w, b, eps, impl: F.layer_norm(x, x.shape[-1:], w, b, eps),
        rms_norm=lambda x, w, eps, impl: F.rms_norm(x, x.shape[-1:], w, eps),
        causal_attention=lambda q, k, v, p, impl, segments: (
            F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True, enable_gqa=True)
            if segments is None
            else None
        ),
    )
    monkeypatch.setattr("megatron_llm.model.gpt.kernels", plain)
    plain_loss, plain_g = loss_and_grads(model, tokens)
    torch.testing.assert_close(loss, plain_loss)
    for name in g:
        torch.testing.assert_close(g[name], plain_g[name], msg=name)


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_model_config_flag_forces_the_fallback(fake_ext, style):
    torch.manual_seed(0)
    tokens = torch.randint(0, 256, (2, 32))
    fused_model = GPT(tiny(style, num_kv_heads=1), 256).bfloat16()
    loss, g = loss_and_grads(fused_model, tokens)
    norm = "layernorm" if style == "gpt2" else "rmsnorm"
    assert {
        f"{norm}_forward",
        f"{norm}_backward",
        "attention_forward",
        "attention_backward",
    } == set(fake_ext.calls)
    fake_ext.calls.clear()
    torch_model = GPT(tiny(style, num_kv_heads=1, kernels="torch"), 256).bfloat16()
    torch_model.load_state_dict(fused_model.state_dict())
    torch_loss, torch_g = loss_and_grads(torch_model, tokens)
    assert fake_ext.calls == []
    torch.testing.assert_close(loss, torch_loss, atol=2e-2, rtol=2e-2)
    for name in g:
        torch.testing.assert_close(g[name], torch_g[name], atol=5e-2, rtol=5e-2, msg=name)


def test_model_kernels_flag_is_validated():
    with pytest.raises(ValueError, match="model.kernels='cuda'"):
        ModelConfig(kernels="cuda")


# ------------------------------------------------------------------------------------------------
# GPU: parity of the CUDA kernels with the reference

gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or fused.ext is None,
    reason=f"needs CUDA and the built extension ({kernels.backend_reason() or 'ok'})",
)
NORM_TOL = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=1e-2, rtol=1e-2),
    torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
}


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", list(NORM_TOL))
@pytest.mark.parametrize(
    "rows,hidden",
    [
        (1, 64),
        (7, 100),
        (64, 1000),
        (33, 1024),
        (16, 4096),
        (8, 8192),
        (5, 16384),
        (3, 32768),
        (4099, 768),
    ],
)
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_gpu_norm_parity(dtype, rows, hidden, norm):
    torch.manual_seed(0)
    x = (torch.randn(rows, hidden, device="cuda") * 3 + 1).to(dtype)
    w = torch.randn(hidden, device="cuda")
    b = torch.randn(hidden, device="cuda")
    kernel_checks.check_norm(norm, x, w, b, NORM_TOL[dtype], sum_tol=1e-3)


@pytest.mark.gpu
@gpu
def test_gpu_norm_uses_the_kernel_and_is_deterministic():
    x = torch.randn(4096, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(1024, device="cuda", requires_grad=True)
    y = kernels.rms_norm(x, w, 1e-5, "ours")
    assert "RMSNormFunction" in type(y.grad_fn).__name__
    first = torch.autograd.grad(y, (x, w), torch.ones_like(y))
    second = torch.autograd.grad(kernels.rms_norm(x, w, 1e-5, "ours"), (x, w), torch.ones_like(y))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2), (4, 1)])
@pytest.mark.parametrize("batch,seq", [(2, 1), (2, 17), (2, 64), (1, 257), (1, 1000), (1, 4097)])
def test_gpu_attention_parity(dtype, head_dim, heads, kv_heads, batch, seq):
    torch.manual_seed(0)
    q = torch.randn(batch, heads, seq, head_dim, device="cuda", dtype=dtype)
    k = torch.randn(batch, kv_heads, seq, head_dim, device="cuda", dtype=dtype)
    v = torch.randn(batch, kv_heads, seq, head_dim, device="cuda", dtype=dtype)
    kernel_checks.check_attention(q, k, v)


@pytest.mark.gpu
@gpu
def test_gpu_attention_saves_the_log_sum_exp_and_is_deterministic():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 300, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    assert (
        "CausalAttentionFunction"
        in type(kernels.causal_attention(q.requires_grad_(), k, v, 0.0, "ours").grad_fn).__name__
    )
    q = q.detach()
    out, lse = fused.ext.attention_forward(q, k, v)
    s = (q.float() @ k.float().transpose(-1, -2)) / 8.0
    s = s.masked_fill(torch.ones(300, 300, device="cuda", dtype=torch.bool).triu(1), -torch.inf)
    torch.testing.assert_close(lse, s.logsumexp(-1), atol=1e-3, rtol=1e-4)
    dout = torch.randn_like(out)
    first = fused.ext.attention_backward(dout, q, k, v, out, lse)
    second = fused.ext.attention_backward(dout, q, k, v, out, lse)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "sizes,q_offset,k_offset,causal,segments",
    [
        ((2, 8, 2, 300, 700, 128), 1000, 400, True, False),  # a ring step, keys partly past
        ((2, 4, 4, 257, 130, 64), 0, 0, False, False),  # a full block
        ((1, 4, 1, 128, 256, 64), 0, 512, True, False),  # keys all in the future
        ((2, 8, 2, 1000, 1000, 128), 0, 0, True, True),  # packed documents
        ((2, 4, 2, 300, 500, 64), 600, 100, True, True),  # a ring step of packed documents
    ],
)
def test_gpu_attention_modes_match_block_attention(
    dtype, sizes, q_offset, k_offset, causal, segments
):
    # The csrc AttentionMode (ring attention blocks, packed documents) on the GPU, as the
    # emulator tier checks it on the CPU.
    torch.manual_seed(0)
    kernel_checks.check_attention_mode(
        fused.ext, "cuda", dtype, sizes, q_offset, k_offset, causal, segments
    )


@pytest.mark.gpu
@gpu
def test_gpu_packed_documents_use_the_segment_mode():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 256, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    segments = torch.randint(0, 5, (2, 256), device="cuda").sort(-1).values
    q.requires_grad_()
    y = kernels.causal_attention(q, k, v, 0.0, "ours", segments=segments)
    assert "SegmentAttentionFunction" in type(y.grad_fn).__name__
    want = reference.causal_attention(q.float(), k.float(), v.float(), 0.0, segments)
    assert (y.float() - want).abs().max().item() < 4e-2


@pytest.mark.gpu
@gpu
def test_gpu_tensor_core_layouts_are_the_emulators():
    # The hardware's mma.sync and ldmatrix against the layouts the kernels (and the CPU
    # emulator, tests/test_kernel_emulator.py) assume. If this fails, so will the attention
    # parity, and the emulator's model in csrc/emulator/emu.h is wrong too.
    kernel_checks.check_mma(fused.ext, "cuda", bf16=False)
    kernel_checks.check_mma(fused.ext, "cuda", bf16=True)
    kernel_checks.check_ldmatrix(fused.ext, "cuda")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_gpu_model_with_and_without_kernels(style):
    torch.manual_seed(0)
    cfg = dict(num_layers=2, hidden_size=256, num_heads=4, num_kv_heads=2, seq_length=128)
    ours = GPT(ModelConfig(style=style, kernels="ours", **cfg), 512).cuda().bfloat16()
    plain = GPT(ModelConfig(style=style, kernels="torch", **cfg), 512).cuda().bfloat16()
    plain.load_state_dict(ours.state_dict())
    tokens = torch.randint(0, 512, (4, 128), device="cuda")
    loss, g = loss_and_grads(ours, tokens)
    plain_loss, plain_g = loss_and_grads(plain, tokens)
    torch.testing.assert_close(loss, plain_loss, atol=2e-2, rtol=2e-2)
    for name in g:
        torch.testing.assert_close(g[name], plain_g[name], atol=5e-2, rtol=5e-2, msg=name)
