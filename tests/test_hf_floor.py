"""The Hugging Face tests again on the oldest transformers setup.py allows (issue 15).

Installs that version into a throwaway venv layered over this one (its own transformers,
tokenizers and huggingface_hub; torch and the rest from here) and runs tests/test_hf.py and
tests/test_hf_tokenizer.py there. It downloads from the package index, so it runs only when
asked: MEGATRON_LLM_TEST_TRANSFORMERS_FLOOR=1 pytest tests/test_hf_floor.py (or =4.57.1 for
another version in the range). The newest transformers is the one in this venv, which the
ordinary suite tests.
"""

from __future__ import annotations

import os
import re
import site
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLAG = "MEGATRON_LLM_TEST_TRANSFORMERS_FLOOR"


def floor_version() -> str:
    """The lower bound of transformers in setup.py, the one place that states the range."""
    found = re.search(r'"transformers>=([0-9.]+),', (ROOT / "setup.py").read_text())
    assert found, "setup.py states no transformers>=X lower bound"
    return found.group(1)


@pytest.mark.skipif(not os.environ.get(FLAG), reason=f"set {FLAG}=1 (downloads packages)")
def test_hf_interop_on_the_oldest_supported_transformers(tmp_path: Path) -> None:
    floor = floor_version() if os.environ[FLAG] == "1" else os.environ[FLAG]
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, f"transformers=={floor}"], check=True)
    # Everything else (torch, sentencepiece, deepspeed, pytest, this package) from this venv,
    # after the throwaway's own packages on sys.path.
    (site_dir,) = venv.glob("lib/python*/site-packages")
    paths = [*site.getsitepackages(), str(ROOT)]
    (site_dir / "zz_parent_venv.pth").write_text("\n".join(paths) + "\n")
    version = subprocess.run(
        [str(python), "-c", "import transformers; print(transformers.__version__)"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    assert version in (floor, f"{floor}.0"), version
    tests = ["tests/test_hf.py", "tests/test_hf_tokenizer.py"]
    result = subprocess.run(
        [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
