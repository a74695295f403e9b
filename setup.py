"""Install megatron_llm: ``pip install -e .`` (add ``[test]`` for the test tools).

The fused CUDA kernels in csrc/ are optional. They build only when torch with CUDA is importable
at build time (use ``pip install --no-build-isolation -e .`` on a GPU machine) and nvcc is found;
otherwise, or if their build fails, installation goes on and the PyTorch fallbacks are used.
"""

from __future__ import annotations

import os
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent


def cuda_extensions() -> tuple[list, dict]:
    sources = sorted(str(p) for p in (ROOT / "csrc").glob("*.cu"))
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
    if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        print("megatron_llm: torch has no CUDA here; skipping the CUDA kernels")
        return [], {}
    if cpp_extension.CUDA_HOME is None:
        print("megatron_llm: nvcc not found (CUDA_HOME unset); skipping the CUDA kernels")
        return [], {}
    bindings = sorted(str(p) for p in (ROOT / "csrc").glob("*.cpp"))
    ext = cpp_extension.CUDAExtension("megatron_llm_kernels", bindings + sources)
    return [ext], {"build_ext": cpp_extension.BuildExtension}


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
    ],
    extras_require={
        # transformers: the Hugging Face export/import round trip and tokenizer.json tests.
        "test": ["pytest>=8", "ruff>=0.6", "transformers>=4.45"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
