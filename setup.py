"""Install megatron_llm: ``pip install -e .`` (add ``[test]`` for the test tools).

The fused CUDA kernels in csrc/ are optional. They build only when torch with CUDA is importable
at build time (use ``pip install --no-build-isolation -e .`` on a GPU machine) and nvcc is found;
otherwise, or if their build fails, installation goes on and the PyTorch fallbacks are used
(pip shows why with -v). MEGATRON_LLM_CUDA_ARCHS picks the GPUs to build for (default "80;90").
See csrc/README.md.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent


# MEGATRON_LLM_CUDA_ARCHS: compute capabilities to build for, e.g. "80;90" or "sm_80,sm_90".
DEFAULT_CUDA_ARCHS = "80;90"


def cuda_arch_flags() -> list[str]:
    raw = os.environ.get("MEGATRON_LLM_CUDA_ARCHS") or DEFAULT_CUDA_ARCHS
    archs = [a.lower().removeprefix("sm_").replace(".", "") for a in re.split(r"[;,\s]+", raw)]
    archs = [a for a in archs if a]
    if not archs or not all(a.isdigit() and len(a) in (2, 3) for a in archs):
        raise ValueError(
            f"MEGATRON_LLM_CUDA_ARCHS={raw!r}: expected compute capabilities such as '80;90' "
            "or 'sm_80,sm_90'"
        )
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    # PTX of the newest arch too, so that later GPUs can JIT-compile the kernels.
    newest = max(archs, key=int)
    return flags + [f"-gencode=arch=compute_{newest},code=compute_{newest}"]


def cuda_extensions() -> tuple[list, dict]:
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cu"))
    if not sources:
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print(
            "megatron_llm: torch not importable at build time; skipping the CUDA kernels "
            "(install with --no-build-isolation to build them)"
        )
        return [], {}
    if torch.version.cuda is None:
        print(f"megatron_llm: torch {torch.__version__} has no CUDA; skipping the CUDA kernels")
        return [], {}
    if cpp_extension.CUDA_HOME is None:
        print("megatron_llm: nvcc not found (set CUDA_HOME); skipping the CUDA kernels")
        return [], {}
    try:
        arch_flags = cuda_arch_flags()
    except ValueError as err:
        print(f"megatron_llm: {err}; skipping the CUDA kernels")
        return [], {}
    bindings = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))
    ext = cpp_extension.CUDAExtension(
        "megatron_llm_kernels",
        bindings + sources,
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", *arch_flags]},
    )

    class BuildExtensionOrSkip(cpp_extension.BuildExtension):
        """A failed kernel build leaves the package installed without them, and says why."""

        def run(self) -> None:
            try:
                super().run()
            except Exception as err:  # any build failure: reported, never fatal
                print(
                    "megatron_llm: WARNING: building the CUDA kernels failed "
                    f"({type(err).__name__}: {err}); installing without them, the PyTorch "
                    "fallbacks will run. The compiler output above says why; csrc/README.md "
                    "lists what the build needs."
                )
                self.extensions = []  # so that nothing lists the missing library as an output

    return [ext], {"build_ext": BuildExtensionOrSkip}


ext_modules, cmdclass = cuda_extensions()

setup(
    name="megatron_llm",
    version="0.1.0",
    description="Distributed pretraining of GPT-style language models on DeepSpeed",
    long_description=(ROOT / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_llm", "megatron_llm.*", "data_tools"]),
    install_requires=[
        # The CPU wheel on these machines is 2.13.0; a GPU cluster brings its own CUDA build.
        "torch>=2.5,<2.14",
        "numpy>=1.24",
        "sentencepiece>=0.2",
        "deepspeed>=0.16,<0.20",
        # megatron-core's dataset and parallel-layer APIs move between minor versions.
        "megatron-core>=0.16,<0.17",
        "pyyaml>=6",
        "tqdm>=4.60",
        # .jsonl.zst / .txt.zst corpora in data_tools/preprocess.py.
        "zstandard>=0.22",
        # Metrics curves (logging.tensorboard, on by default).
        "tensorboard>=2.14",
    ],
    extras_require={
        # transformers: the Hugging Face export/import round trip and tokenizer.json tests.
        # mpi4py + mpich: the mpiexec launch test (mpich's wheel brings mpiexec into the venv).
        "test": [
            "pytest>=8",
            "ruff>=0.6",
            # 4.56: from_pretrained(..., dtype=) (4.45-4.55 raise TypeError); tested on 4.56.0
            # (tests/test_hf_floor.py) and 5.24.
            "transformers>=4.56,<6",
            "mpi4py>=4",
            "mpich>=4",
            "matplotlib>=3.7",
        ],
        # python -m megatron_llm.plot
        "plot": ["matplotlib>=3.7"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
