"""The csrc/ kernels built for the CPU emulator (csrc/emulator/emu.h), behind the functions of
csrc/bindings.cpp, so that the CUDA kernels' own code runs in CI without a GPU.

`build()` rewrites every `kernel<<<grid, block, smem, stream>>>(args)` of csrc/ into a call of
emu::Launch, compiles the sources with g++ against the emulator's stand-in CUDA headers and
caches the library under build/emulator/ by the hash of its inputs. `EmulatedExtension` has the
signatures of the real extension (`megatron_llm_kernels`), takes CPU tensors, and:

- surrounds every buffer it hands a kernel with NaN guard zones, so a read out of bounds turns
  the output into NaN and a write out of bounds is reported;
- fills outputs with NaN first and reports any element a kernel left unwritten;
- runs in the thread order set by `schedule`, (order, warps_apart) as emu::set_schedule takes
  it, so a test can show a result does not depend on it (SCHEDULES: a set that would catch a
  missing barrier).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
EMULATOR = CSRC / "emulator"
CACHE = ROOT / "build" / "emulator"
CXX = os.environ.get("CXX", "g++")
# -fno-unswitch-loops: a loop split on a per-thread condition would put one __syncthreads of
# the source at two call sites, which the emulator's barrier check would take for two barriers.
CXXFLAGS = [
    "-std=c++20",
    "-O1",
    "-g",
    "-fPIC",
    "-Wall",
    "-Werror",
    "-Wno-unknown-pragmas",
    "-fno-unswitch-loops",
    "-fno-strict-aliasing",
]
DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
GUARD = 1024  # elements of NaN before and after every buffer
# (order, warps_apart), see emu::set_schedule: in order, reversed and shuffled; warps in step
# and apart.
Schedule = tuple[int, bool]
SCHEDULES: list[Schedule] = [(0, False), (1, False), (0, True), (1, True), (97, False), (97, True)]

_P, _I, _L, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
_SIGNATURES = {  # csrc/emulator/capi.cpp
    "mllm_emu_set_schedule": [ctypes.c_uint, ctypes.c_int],
    "mllm_emu_layernorm_forward": [_P] * 6 + [_L, _I, _F, _I],
    "mllm_emu_layernorm_backward": [_P] * 9 + [_I, _L, _I, _I],
    "mllm_emu_rmsnorm_forward": [_P] * 4 + [_L, _I, _F, _I],
    "mllm_emu_rmsnorm_backward": [_P] * 7 + [_I, _L, _I, _I],
    "mllm_emu_norm_backward_blocks": [_L, _I, _I],
    "mllm_emu_attention_forward": [_P] * 5 + [_I] * 6,
    "mllm_emu_attention_backward": [_P] * 10 + [_I] * 6,
    "mllm_emu_attention_forward_mode": [_P] * 5 + [_I] * 6 + [_I] * 4 + [_P] * 2,
    "mllm_emu_attention_backward_mode": [_P] * 10 + [_I] * 6 + [_I] * 4 + [_P] * 2,
    "mllm_emu_fault": [ctypes.c_char_p, _P, _P, _I],
    "mllm_emu_probe_mma": [_P, _P, _I],
    "mllm_emu_probe_ldmatrix": [_P, _P],
}


SHARED = re.compile(r"^(\s*)__shared__\s+([^;]*?)\b(\w+)((?:\[[^\]]*\])+)\s*;", re.MULTILINE)


def rewrite_for_emulator(text: str, name: str) -> str:
    """`k<T, N><<<cfg>>>(args)` -> `::emu::Launch(cfg)([&](auto&&... a) { k<T, N>(a...); }, args)`,
    and `__shared__ T a[N];` -> `static T a[N]; ::emu::shared_region(a, sizeof a);` (emu.h).
    Lines are kept, and a #line directive names the original file for errors and __FILE__."""
    text = SHARED.sub(r"\1static \2\3\4; ::emu::shared_region(\3, sizeof \3);", text)
    out = [f'#line 1 "csrc/{name}"\n']
    pos = 0
    while (open_at := text.find("<<<", pos)) >= 0:
        close_at = text.find(">>>", open_at)
        if close_at < 0 or text[close_at + 3] != "(":
            raise ValueError(f"csrc/{name}: a launch's '<<<' at {open_at} has no '>>>('")
        start = open_at
        if text[start - 1] == ">":  # template arguments
            depth = 0
            while True:
                start -= 1
                depth += {">": 1, "<": -1}.get(text[start], 0)
                if depth == 0:
                    break
        while start > 0 and (text[start - 1].isalnum() or text[start - 1] in "_:"):
            start -= 1
        kernel = text[start:open_at]
        config = text[open_at + 3 : close_at]
        no_args = text[close_at + 4 :].lstrip().startswith(")")
        out.append(text[pos:start])
        out.append(
            f"::emu::Launch({config})([&](auto&&... emu_args_) {{ {kernel}(emu_args_...); }}"
            + ("" if no_args else ", ")
        )
        pos = close_at + 4
    out.append(text[pos:])
    return "".join(out)


def _csrc() -> list[Path]:
    """The kernel sources of csrc/ the emulator compiles (bindings.cpp is torch's side)."""
    return sorted([*CSRC.glob("*.cu"), *CSRC.glob("*.cuh"), *CSRC.glob("*.h")])


def build() -> Path:
    """The emulator library for the current sources (built once, then taken from the cache)."""
    compiler = subprocess.run([CXX, "--version"], capture_output=True, text=True, check=True)
    digest = hashlib.sha256(compiler.stdout.encode() + " ".join(CXXFLAGS).encode())
    for path in [*_csrc(), *sorted(EMULATOR.iterdir())]:
        if path.is_file():
            digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    target = CACHE / digest.hexdigest()[:16]
    lib = target / "libmllm_emu.so"
    if lib.exists():
        return lib
    CACHE.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".tmp-", dir=CACHE))
    try:
        src = work / "src"
        src.mkdir()
        units = []
        for path in _csrc():
            text = rewrite_for_emulator(path.read_text(), path.name)
            out = src / (path.stem + ".cpp" if path.suffix == ".cu" else path.name)
            out.write_text(text)
            if path.suffix == ".cu":
                units.append(out)
        (src / "emulator").mkdir()
        faults = src / "emulator" / "faults.cpp"  # its "../mma.cuh" is the rewritten one
        faults_cu = (EMULATOR / "faults.cu").read_text()
        faults.write_text(rewrite_for_emulator(faults_cu, "emulator/faults.cu"))
        units += [faults, EMULATOR / "emu.cpp", EMULATOR / "capi.cpp"]
        procs = []
        for unit in units:
            obj = work / (unit.stem + ".o")
            cmd = [CXX, *CXXFLAGS, "-I", str(EMULATOR), "-c", str(unit), "-o", str(obj)]
            procs.append((unit, obj, subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)))
        errors = []
        for unit, _, proc in procs:
            _, err = proc.communicate()
            if proc.returncode:
                errors.append(f"{unit.name}:\n{err}")
        if errors:
            raise RuntimeError("building the kernel emulator failed:\n" + "\n".join(errors))
        subprocess.run(
            [CXX, "-shared", "-o", str(work / lib.name), *(str(o) for _, o, _ in procs)],
            check=True,
        )
        shutil.rmtree(src)
        try:
            work.rename(target)
        except OSError:  # another process built it meanwhile
            if not lib.exists():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return lib


class GuardError(AssertionError):
    """A kernel wrote outside its buffer or left part of its output unwritten."""


class _Guarded:
    """A buffer of `shape` with NaN guard zones on both sides; `.view` is what the kernel sees."""

    def __init__(self, shape, dtype: torch.dtype, data: torch.Tensor | None = None):
        numel = 1
        for n in shape:
            numel *= int(n)
        self.storage = torch.full((numel + 2 * GUARD,), float("nan"), dtype=dtype)
        self.view = self.storage[GUARD : GUARD + numel].view(*shape)
        if data is not None:
            self.view.copy_(data)

    @property
    def ptr(self) -> int:
        return self.view.data_ptr()

    def check(self, what: str, written: bool) -> None:
        head, tail = self.storage[:GUARD], self.storage[GUARD + self.view.numel() :]
        if not (head.isnan().all() and tail.isnan().all()):
            raise GuardError(f"{what}: a kernel wrote outside the buffer")
        if written and self.view.isnan().any():
            nan = int(self.view.isnan().sum())
            raise GuardError(
                f"{what}: {nan} of {self.view.numel()} elements are NaN: left unwritten, or "
                "computed from memory nothing wrote (a race, or a read out of bounds)"
            )


class _GuardedIds:
    """int32 ids (segment ids) between guard zones of a sentinel no id takes: a kernel reading
    past the ids reads the sentinel, which matches no real id; writing there is reported."""

    SENTINEL = -(2**31)

    def __init__(self, data: torch.Tensor):
        numel = data.numel()
        self.storage = torch.full((numel + 2 * GUARD,), self.SENTINEL, dtype=torch.int32)
        self.view = self.storage[GUARD : GUARD + numel].view(*data.shape)
        self.view.copy_(data)

    @property
    def ptr(self) -> int:
        return self.view.data_ptr()

    def check(self, what: str, written: bool) -> None:
        head, tail = self.storage[:GUARD], self.storage[GUARD + self.view.numel() :]
        if not ((head == self.SENTINEL).all() and (tail == self.SENTINEL).all()):
            raise GuardError(f"{what}: a kernel wrote outside the buffer")


class EmulatedExtension:
    """csrc/bindings.cpp's functions over CPU tensors, running the csrc/ kernels in the emulator.
    `num_sms` stands in for the device's multiprocessor count (it sets the norm backward's
    number of blocks); `calls` records the functions called, as the tests' FakeExtension."""

    def __init__(
        self, lib: Path | None = None, num_sms: int = 1, schedule: Schedule = SCHEDULES[0]
    ):
        self.lib = ctypes.CDLL(str(lib or build()))
        for fn, types in _SIGNATURES.items():
            getattr(self.lib, fn).argtypes = types
        self.lib.mllm_emu_error.restype = ctypes.c_char_p
        self.num_sms = num_sms
        self.schedule = schedule
        self.calls: list[str] = []

    @property
    def schedule(self) -> Schedule:
        return self._schedule

    @schedule.setter
    def schedule(self, value: Schedule) -> None:
        order, warps_apart = value
        self._schedule = (order, bool(warps_apart))
        self.lib.mllm_emu_set_schedule(order, int(bool(warps_apart)))

    # -- plumbing ----------------------------------------------------------------------------

    def _call(self, fn: str, *args) -> None:
        if getattr(self.lib, fn)(*args):
            raise RuntimeError(self.lib.mllm_emu_error().decode())

    @staticmethod
    def _input(t: torch.Tensor, name: str) -> _Guarded:
        if t.dtype not in DTYPES:
            raise TypeError(f"{name}: dtype {t.dtype} not supported; use fp32, fp16 or bf16")
        return _Guarded(t.shape, t.dtype, t)

    @staticmethod
    def _vector(t: torch.Tensor, name: str, hidden: int) -> _Guarded:
        if t.dim() != 1 or t.shape[0] != hidden:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected ({hidden},)")
        return _Guarded(t.shape, torch.float32, t.float())

    def _run(self, fn: str, args: list, outputs: dict[str, _Guarded], inputs: list[_Guarded]):
        self.calls.append(fn)
        self._call(f"mllm_emu_{fn}", *args)
        for name, buf in outputs.items():
            buf.check(f"{fn} {name}", written=not name.startswith("workspace"))
        for i, buf in enumerate(inputs):
            buf.check(f"{fn} input {i}", written=False)

    @staticmethod
    def _rows(x: torch.Tensor) -> tuple[int, int]:
        if x.dim() != 2:
            raise ValueError(f"x must be (rows, hidden), got {tuple(x.shape)}")
        return x.shape[0], x.shape[1]

    # -- the functions of csrc/bindings.cpp ---------------------------------------------------

    def layernorm_forward(self, x, weight, bias, eps):
        rows, hidden = self._rows(x)
        gx, gw = self._input(x, "x"), self._vector(weight, "weight", hidden)
        gb = None if bias is None else self._vector(bias, "bias", hidden)
        y = _Guarded(x.shape, x.dtype)
        mean, rstd = _Guarded((rows,), torch.float32), _Guarded((rows,), torch.float32)
        args = [gx.ptr, gw.ptr, gb.ptr if gb else None, y.ptr, mean.ptr, rstd.ptr]
        args += [rows, hidden, eps, DTYPES[x.dtype]]
        ins = [gx, gw] + ([gb] if gb else [])
        self._run("layernorm_forward", args, {"y": y, "mean": mean, "rstd": rstd}, ins)
        return y.view.clone(), mean.view.clone(), rstd.view.clone()

    def _backward_blocks(self, rows: int, hidden: int) -> int:
        fn = self.lib.mllm_emu_norm_backward_blocks
        return fn(rows, hidden, self.num_sms)

    def layernorm_backward(self, dy, x, weight, mean, rstd, has_bias):
        rows, hidden = self._rows(x)
        blocks = self._backward_blocks(rows, hidden)
        gdy, gx = self._input(dy, "dy"), self._input(x, "x")
        gw = self._vector(weight, "weight", hidden)
        gmean, grstd = self._input(mean, "mean"), self._input(rstd, "rstd")
        dx = _Guarded(x.shape, x.dtype)
        dweight = _Guarded((hidden,), torch.float32)
        dbias = _Guarded((hidden,), torch.float32) if has_bias else None
        workspace = _Guarded((2, blocks, hidden), torch.float32)
        args = [gdy.ptr, gx.ptr, gw.ptr, gmean.ptr, grstd.ptr, dx.ptr, dweight.ptr]
        args += [dbias.ptr if dbias else None, workspace.ptr, blocks, rows]
        args += [hidden, DTYPES[x.dtype]]
        outs = {"dx": dx, "dweight": dweight, "workspace": workspace}
        if dbias:
            outs["dbias"] = dbias
        self._run("layernorm_backward", args, outs, [gdy, gx, gw, gmean, grstd])
        return (
            dx.view.clone(),
            dweight.view.clone(),
            dbias.view.clone() if dbias else torch.empty(0),
        )

    def rmsnorm_forward(self, x, weight, eps):
        rows, hidden = self._rows(x)
        gx, gw = self._input(x, "x"), self._vector(weight, "weight", hidden)
        y, rstd = _Guarded(x.shape, x.dtype), _Guarded((rows,), torch.float32)
        args = [gx.ptr, gw.ptr, y.ptr, rstd.ptr, rows, hidden]
        args += [eps, DTYPES[x.dtype]]
        self._run("rmsnorm_forward", args, {"y": y, "rstd": rstd}, [gx, gw])
        return y.view.clone(), rstd.view.clone()

    def rmsnorm_backward(self, dy, x, weight, rstd):
        rows, hidden = self._rows(x)
        blocks = self._backward_blocks(rows, hidden)
        gdy, gx = self._input(dy, "dy"), self._input(x, "x")
        gw, grstd = self._vector(weight, "weight", hidden), self._input(rstd, "rstd")
        dx, dweight = _Guarded(x.shape, x.dtype), _Guarded((hidden,), torch.float32)
        workspace = _Guarded((blocks, hidden), torch.float32)
        args = [gdy.ptr, gx.ptr, gw.ptr, grstd.ptr, dx.ptr, dweight.ptr, workspace.ptr, blocks]
        args += [rows, hidden, DTYPES[x.dtype]]
        outs = {"dx": dx, "dweight": dweight, "workspace": workspace}
        self._run("rmsnorm_backward", args, outs, [gdy, gx, gw, grstd])
        return dx.view.clone(), dweight.view.clone()

    @staticmethod
    def _attention_shape(q, k, v) -> list[int]:
        if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
            raise ValueError(
                "q must be (batch, heads, seq, head_dim) and k, v (batch, kv_heads, seq, "
                f"head_dim); got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
            )
        batch, heads, seq, head_dim = q.shape
        return [batch, heads, k.shape[1], seq, head_dim]

    def attention_forward(self, q, k, v):
        sizes = self._attention_shape(q, k, v)
        gq, gk, gv = self._input(q, "q"), self._input(k, "k"), self._input(v, "v")
        out, lse = _Guarded(q.shape, q.dtype), _Guarded(q.shape[:3], torch.float32)
        args = [gq.ptr, gk.ptr, gv.ptr, out.ptr, lse.ptr, *sizes, DTYPES[q.dtype]]
        self._run("attention_forward", args, {"out": out, "lse": lse}, [gq, gk, gv])
        return out.view.clone(), lse.view.clone()

    def attention_backward(self, dout, q, k, v, out, lse):
        sizes = self._attention_shape(q, k, v)
        names = ["q", "k", "v", "out", "dout", "lse"]
        ins = [self._input(t, n) for t, n in zip([q, k, v, out, dout, lse], names)]
        dq, dk, dv = (_Guarded(t.shape, t.dtype) for t in (q, k, v))
        delta = _Guarded(q.shape[:3], torch.float32)
        args = [b.ptr for b in ins] + [dq.ptr, dk.ptr, dv.ptr, delta.ptr, *sizes, DTYPES[q.dtype]]
        outs = {"dq": dq, "dk": dk, "dv": dv, "delta": delta}
        self._run("attention_backward", args, outs, ins)
        return dq.view.clone(), dk.view.clone(), dv.view.clone()

    def _mode(self, q, k, q_offset, k_offset, causal, q_segments, k_segments):
        """The AttentionMode arguments (after the dtype tag) and the guarded segment ids."""
        if (q_segments is None) != (k_segments is None):
            raise ValueError("give both q_segments and k_segments, or neither")
        ids = []
        if q_segments is not None:
            for t, n, name in ((q_segments, q.shape[2], "q"), (k_segments, k.shape[2], "k")):
                if tuple(t.shape) != (q.shape[0], n):
                    raise ValueError(
                        f"{name}_segments {tuple(t.shape)}: expected {(q.shape[0], n)}"
                    )
            ids = [_GuardedIds(q_segments.int()), _GuardedIds(k_segments.int())]
        ptrs = [b.ptr for b in ids] or [None, None]
        return [k.shape[2], q_offset, k_offset, int(causal), *ptrs], ids

    def attention_forward_mode(
        self, q, k, v, q_offset, k_offset, causal, q_segments=None, k_segments=None
    ):
        sizes = self._attention_shape(q, k, v)
        mode, ids = self._mode(q, k, q_offset, k_offset, causal, q_segments, k_segments)
        gq, gk, gv = self._input(q, "q"), self._input(k, "k"), self._input(v, "v")
        out, lse = _Guarded(q.shape, q.dtype), _Guarded(q.shape[:3], torch.float32)
        args = [gq.ptr, gk.ptr, gv.ptr, out.ptr, lse.ptr, *sizes, DTYPES[q.dtype], *mode]
        outs = {"out": out, "lse": lse}
        self._run("attention_forward_mode", args, outs, [gq, gk, gv, *ids])
        return out.view.clone(), lse.view.clone()

    def attention_backward_mode(
        self, dout, q, k, v, out, lse, q_offset, k_offset, causal, q_segments=None, k_segments=None
    ):
        sizes = self._attention_shape(q, k, v)
        mode, ids = self._mode(q, k, q_offset, k_offset, causal, q_segments, k_segments)
        names = ["q", "k", "v", "out", "dout", "lse"]
        ins = [self._input(t, n) for t, n in zip([q, k, v, out, dout, lse], names)]
        dq, dk, dv = (_Guarded(t.shape, t.dtype) for t in (q, k, v))
        delta = _Guarded(q.shape[:3], torch.float32)
        args = [b.ptr for b in ins] + [dq.ptr, dk.ptr, dv.ptr, delta.ptr, *sizes, DTYPES[q.dtype]]
        outs = {"dq": dq, "dk": dk, "dv": dv, "delta": delta}
        self._run("attention_backward_mode", args + mode, outs, [*ins, *ids])
        return dq.view.clone(), dk.view.clone(), dv.view.clone()

    def probe_mma(self, x, bf16):
        if x.dtype != torch.float32 or x.numel() != 16 * 16 + 16 * 8:
            raise ValueError("probe_mma: in must be fp32 of 384 elements (A then B)")
        gx, out = _Guarded(x.shape, torch.float32, x), _Guarded((16, 8), torch.float32)
        dtype = DTYPES[torch.bfloat16 if bf16 else torch.float16]
        self._run("probe_mma", [gx.ptr, out.ptr, dtype], {"out": out}, [gx])
        return out.view.clone()

    def probe_ldmatrix(self, x):
        if x.dtype != torch.float32 or x.numel() != 256:
            raise ValueError("probe_ldmatrix: in must be fp32 of 256 elements")
        gx, out = _Guarded(x.shape, torch.float32, x), _Guarded((2, 32, 4, 2), torch.float32)
        self._run("probe_ldmatrix", [gx.ptr, out.ptr], {"out": out}, [gx])
        return out.view.clone()

    # -- the emulator's own tests (csrc/emulator/faults.cu) -----------------------------------

    def fault(self, name: str, x: torch.Tensor, out_numel: int) -> torch.Tensor:
        """Runs a deliberately faulty kernel of faults.cu over fp32 `x`; returns its output, NaN
        where the kernel wrote nothing. Raises GuardError for a write outside `out`."""
        gx = _Guarded(x.shape, torch.float32, x)
        out = _Guarded((out_numel,), torch.float32)
        self._call("mllm_emu_fault", name.encode(), gx.ptr, out.ptr, x.numel())
        out.check(f"fault kernel {name} out", written=False)
        return out.view.clone()
