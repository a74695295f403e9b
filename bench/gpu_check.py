"""One prepared GPU run (bench/gpu_check.sh calls this): six steps, each time-boxed, each
reported even when an earlier or later one fails, one JSON (``$OUT/gpu_check.json``, rewritten
after every step) and a table on stdout. At most 8 minutes on one GPU.

  1 build    build csrc/ for this GPU's arch (setup.py build_ext --inplace): build time, and the
             kernel dispatch's answer and reasons for model.kernels auto / ours / torch
  2 tests    pytest -m gpu tests/test_kernels.py -x: the kernels' GPU parity tests
  3 kernels  bench/gpu_bench.py kernels: norms GB/s vs HBM peak, attention TFLOP/s vs SDPA (as
             the model calls it, and forced flash), forward and forward+backward, max difference;
             the megatron_llm/kernels/measured.py entries the figures support
  4 model    bench/gpu_bench.py model: a ~1.3B Llama step at tp=1, ours vs torch: ms/step, MFU,
             peak memory, top kernels
  5 pretrain bash launch/pretrain.sh configs/gpt_125m.yaml on the default data (built if
             missing, as `make pretrain` does): 10 steps, eval and a save at step 5, stop, resume
             to 10: tokens/s, MFU, loss falling, the optimizer and the accumulation dtype
  6 multi    with 2+ GPUs: tp=2 and dp=2 over NCCL against one GPU (fp32, 6 steps): max
             relative loss difference (skipped on one GPU)

--dry-run: the same steps on the CPU with tiny shapes and a tiny corpus (gloo ranks for step 6),
so that nothing in the GPU run fails for a reason a CPU could have shown. Exit status: 0 when no
step failed (skipped steps say why), else 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 480.0  # the whole run on a GPU
# Per-step time boxes, seconds, on a GPU; a dry run on a shared CPU gets DRY_FACTOR times more.
TIMEOUTS = {"build": 110, "tests": 90, "kernels": 60, "model": 60, "pretrain": 150, "multi": 150}
DRY_FACTOR = 4.0


@dataclasses.dataclass
class Check:
    out: Path
    dry: bool
    python: str
    deadline: float
    env: dict[str, str]

    @property
    def work(self) -> Path:
        return self.out / "work"

    def run(self, name: str, cmd: list[str], timeout: float, **env: str) -> dict[str, Any]:
        """Run cmd time-boxed; its output goes to OUT/<name>.log. {rc, seconds, tail}."""
        log = self.out / f"{name}.log"
        start = time.monotonic()
        with log.open("w") as f:
            proc = subprocess.Popen(
                cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env={**self.env, **env},
                start_new_session=True,  # a time-out ends the whole tree (launcher and ranks)
            )  # fmt: skip
            try:
                rc = proc.wait(timeout=max(1.0, timeout))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                rc = 124
        text = log.read_text(errors="replace")
        return dict(
            rc=rc, seconds=round(time.monotonic() - start, 1), tail=text[-1500:], log=str(log)
        )


def python_json(check: Check, code: str) -> Any:
    out = subprocess.run(
        [check.python, "-c", code], cwd=ROOT, env=check.env, capture_output=True, text=True
    )
    if out.returncode != 0:
        raise RuntimeError(f"{code[:60]}...: {out.stderr.strip()[-400:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def step_build(check: Check, timeout: float) -> dict[str, Any]:
    env = {}
    if not check.dry:
        major, minor = python_json(
            check, "import json, torch; print(json.dumps(torch.cuda.get_device_capability()))"
        )
        env["MEGATRON_LLM_CUDA_ARCHS"] = f"{major}{minor}"
    build = check.run(
        "1_build", [check.python, "setup.py", "build_ext", "--inplace"], timeout, **env
    )
    dispatch = python_json(
        check,
        "import json; from megatron_llm import kernels; "
        "print(json.dumps({m: kernels.status(m) for m in ('auto', 'ours', 'torch')}))",
    )
    built = dispatch["ours"].startswith("cuda")
    ok = build["rc"] == 0 and (built or check.dry)
    return dict(
        status="ok" if ok else "failed", build=build, build_s=build["seconds"], dispatch=dispatch,
        summary=f"build {build['seconds']} s; auto -> {dispatch['auto'][:70]}",
    )  # fmt: skip


def step_tests(check: Check, timeout: float) -> dict[str, Any]:
    cmd = [check.python, "-m", "pytest", "-m", "gpu", "tests/test_kernels.py", "-x", "-q"]
    res = check.run("2_tests", [*cmd, "-p", "no:cacheprovider"], timeout)
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error)", res["tail"])}
    return dict(
        status="ok" if res["rc"] == 0 else "failed", run=res, counts=counts,
        summary=", ".join(f"{n} {k}" for k, n in counts.items()) or "no summary",
    )  # fmt: skip


def bench_step(check: Check, what: str, timeout: float) -> tuple[dict[str, Any], Any]:
    out = check.out / f"{what}.json"
    cmd = [check.python, "bench/gpu_bench.py", what, "--json", str(out)]
    res = check.run(
        f"{3 if what == 'kernels' else 4}_{what}", cmd + (["--dry-run"] * check.dry), timeout
    )
    data = json.loads(out.read_text()) if res["rc"] == 0 and out.exists() else None
    return res, data


def ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None else f"{b / a:.2f}x"


def step_kernels(check: Check, timeout: float) -> dict[str, Any]:
    res, data = bench_step(check, "kernels", timeout)
    if data is None:
        return dict(status="failed", run=res, summary=f"rc {res['rc']}")
    speed = [
        f"{r.get('op', 'attn')} {r['shape']}: "
        + ratio(r["ms"]["ours"]["fwd+bwd"], r["ms"]["torch"]["fwd+bwd"])
        for r in data["rows"]
    ]
    summary = "ours vs torch fwd+bwd: " + "; ".join(speed[:3])
    if data["ours_unavailable"]:
        summary = f"torch only (ours: {data['ours_unavailable'][:50]})"
    return dict(status="ok", run=res, result=data, summary=summary)


def step_model(check: Check, timeout: float) -> dict[str, Any]:
    res, data = bench_step(check, "model", timeout)
    if data is None:
        return dict(status="failed", run=res, summary=f"rc {res['rc']}")
    parts = []
    for r in data["runs"]:
        if "skipped" in r:
            parts.append(f"{r['kernels']}: skipped")
            continue
        mfu = "-" if r["mfu"] is None else f"{r['mfu']:.1%}"
        mem = "-" if r["peak_memory_gb"] is None else f"{r['peak_memory_gb']:.1f} GB"
        parts.append(f"{r['kernels']}: {r['ms']:.0f} ms/step, MFU {mfu}, {mem}")
    return dict(status="ok", run=res, result=data, summary="; ".join(parts))


sys.path.insert(0, str(ROOT))
from bench.gpu_runs import step_multi, step_pretrain  # noqa: E402

STEPS: list[tuple[str, Callable[[Check, float], dict[str, Any]]]] = [
    ("build", step_build),
    ("tests", step_tests),
    ("kernels", step_kernels),
    ("model", step_model),
    ("pretrain", step_pretrain),
    ("multi", step_multi),
]


def table(results: dict[str, dict[str, Any]]) -> str:
    lines = [f"{'step':10s} {'status':8s} {'seconds':>7s}  figures", "-" * 100]
    for i, (name, _) in enumerate(STEPS, 1):
        r = results.get(name, {})
        lines.append(
            f"{i} {name:8s} {r.get('status', '-'):8s} {r.get('seconds', 0):7.1f}  "
            f"{r.get('summary', '')}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu_check"))
    parser.add_argument("--steps", default="1,2,3,4,5,6", help="which steps, e.g. 1,3")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S, help="whole run, GPU")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("MEGATRON_LLM_KERNELS", None)  # each step says which kernels it runs
    env["PYTHON"] = sys.executable  # launch/pretrain.sh's interpreter: this environment's
    factor = DRY_FACTOR if args.dry_run else 1.0
    check = Check(
        out=args.out.resolve(), dry=args.dry_run, python=sys.executable,
        deadline=time.monotonic() + args.budget_s * factor, env=env,
    )  # fmt: skip
    wanted = {int(s) for s in args.steps.split(",")}
    results: dict[str, dict[str, Any]] = {}
    report = check.out / "gpu_check.json"
    for i, (name, fn) in enumerate(STEPS, 1):
        left = check.deadline - time.monotonic()
        start = time.monotonic()
        if i not in wanted:
            result: dict[str, Any] = dict(status="skipped", summary="not asked for (--steps)")
        elif left < 10:
            result = dict(status="skipped", summary="out of time (the 8-minute budget is spent)")
        else:
            try:
                result = fn(check, min(TIMEOUTS[name] * factor, left))
            except Exception as e:  # one step's failure must not cost the others' reports
                result = dict(status="failed", summary=f"{type(e).__name__}: {e}"[:200])
        if result.get("run", {}).get("rc") == 124:
            result["status"] = "timeout"
        result["seconds"] = round(time.monotonic() - start, 1)
        results[name] = result
        report.write_text(json.dumps(dict(dry_run=args.dry_run, steps=results), indent=1))
        print(
            f"[gpu_check] step {i} {name}: {result['status']} {result.get('summary', '')}",
            flush=True,
        )
    print(table(results))
    print(f"[gpu_check] results in {report}")
    return 1 if any(r["status"] in ("failed", "timeout") for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
