"""No file the project loads runs code from it (issue 22).

A pickle payload whose ``__reduce__`` runs ``touch MARKER`` (what an attacker who can write a
checkpoint folder, a shared cache dir or a downloaded HF folder would plant) goes into every file
kind the project loads, with the checkpoint manifest's sizes and sha256 updated to match (the
manifest guards against corruption, not against whoever writes the folder). The real loaders run
(resume through the training loop, eval loading, import-hf, dataset build, tokenizers); each
load is refused with an error naming the file, and no marker ever appears. A source scan keeps
unsafe loader calls from coming back.
"""

from __future__ import annotations

import ast
import io as bytes_io
import json
import logging
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from megatron_llm.checkpoint import io
from megatron_llm.hashing import file_sha256
from tests.checkpoint_runs import overrides
from tests.data_fixtures import Shard
from tests.distributed import run_on_ranks

ROOT = Path(__file__).resolve().parent.parent


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def pickled(marker: Path) -> bytes:
    return pickle.dumps({"weights": Payload(marker)})


def torch_file(marker: Path) -> bytes:
    # torch.save's zip format, pickle inside: what a real torch file looks like.
    buffer = bytes_io.BytesIO()
    torch.save({"weights": Payload(marker)}, buffer)
    return buffer.getvalue()


def yaml_payload(marker: Path) -> bytes:
    return f'!!python/object/apply:os.system ["touch {marker}"]\n'.encode()


def npy_payload(marker: Path) -> bytes:
    buffer = bytes_io.BytesIO()
    np.save(buffer, np.array([Payload(marker)], dtype=object), allow_pickle=True)
    return buffer.getvalue()


def object_array_file(marker: Path) -> bytes:
    # numpy arrays are allowed in random-state files (older checkpoints hold one): an object
    # array would carry the payload in its items.
    buffer = bytes_io.BytesIO()
    torch.save({"numpy": np.array([Payload(marker)], dtype=object)}, buffer)
    return buffer.getvalue()


def plant(folder: Path, name: str, data: bytes) -> None:
    """Replace a checkpoint file and make the manifest vouch for it, as an attacker would."""
    (folder / name).write_bytes(data)
    manifest_path = folder / "manifest.json"
    if name == "manifest.json":
        return
    manifest = json.loads(manifest_path.read_text())
    manifest["files"][name] = {"bytes": len(data), "sha256": file_sha256(folder / name)}
    manifest_path.write_text(json.dumps(manifest))


def planted_copy(source: Path, root: Path, name: str, data: bytes) -> Path:
    folder = root / source.name
    shutil.copytree(source, folder)
    (root / "latest").write_text(source.name + "\n")
    plant(folder, name, data)
    return folder


# Each checkpoint file kind: the file, the payload an attacker would put there, and a word of
# the refusal.
CHECKPOINT_PAYLOADS = {
    "weights": ("model-00000.pt", torch_file, "refused"),
    "optimizer": ("optim-00000.pt", pickled, "refused"),
    "rng": ("rng-00000.pt", torch_file, "refused"),
    "rng-object-array": ("rng-00000.pt", object_array_file, "refused"),
    "config": ("config.yaml", yaml_payload, "unreadable"),
    "run-state": ("run_state.json", pickled, "unreadable"),
    "manifest": ("manifest.json", pickled, "not valid JSON"),
}


def _legacy_rng(state: dict[str, Any]) -> dict[str, Any]:
    # What checkpoints before the plain-data format held: python's and numpy's own objects.
    py, npy = state["python"], state["numpy"]
    return {
        "python": (py["version"], tuple(py["internal"].tolist()), py["gauss_next"]),
        "numpy": (
            "MT19937",
            npy["keys"].numpy().astype(np.uint32),
            npy["pos"],
            npy["has_gauss"],
            npy["cached_gaussian"],
        ),
        "torch": state["torch"],
        "cuda": None,
        **({"tp_fork": state["tp_fork"]} if "tp_fork" in state else {}),
    }


def train_run(argv: list[str]) -> dict[str, Any]:
    """The real training loop on this rank; its summary."""
    from megatron_llm.config import load_config
    from megatron_llm.parallel.groups import build_context
    from megatron_llm.training.loop import train

    cfg = load_config(None, argv)
    return train(cfg, build_context(cfg.parallel))


def _resume_planted(work: str, prefix: str, tokenizer: str) -> dict[str, Any]:
    """On one gloo rank: train and save, then resume the real loop from planted copies."""
    root = Path(work)
    dropout = ["model.dropout=0.1", "model.attention_dropout=0.1"]

    def args(run: str, *extra: str) -> list[str]:
        return overrides(str(root / run), prefix, tokenizer, *dropout, *extra)

    saved = Path(train_run(args("saved", "train.steps=2"))["checkpoint"])
    refusals: dict[str, str] = {}
    for kind, (name, make, _) in CHECKPOINT_PAYLOADS.items():
        folder = planted_copy(saved, root / f"planted-{kind}", name, make(root / f"marker-{kind}"))
        try:
            train_run(args(f"run-{kind}", "train.steps=3", f"checkpoint.resume={folder}"))
            refusals[kind] = "loaded"
        except io.CheckpointError as e:
            refusals[kind] = str(e)
    # `latest` is only ever a name: a payload there is ignored and the newest folder resumes.
    latest_root = root / "planted-latest"
    shutil.copytree(saved, latest_root / saved.name)
    (latest_root / "latest").write_bytes(pickled(root / "marker-latest"))
    from_latest = train_run(args("run-latest", "train.steps=3", f"checkpoint.dir={latest_root}"))
    # A checkpoint from before the plain-data rng format resumes bitwise, nothing unpickled.
    state = torch.load(saved / "rng-00000.pt", weights_only=True)
    buffer = bytes_io.BytesIO()
    torch.save(_legacy_rng(state), buffer)
    legacy = planted_copy(saved, root / "legacy", "rng-00000.pt", buffer.getvalue())
    resume = ["train.steps=4", "checkpoint.save_at_end=false"]
    original = train_run(args("run-original", *resume, f"checkpoint.resume={saved}"))
    from_legacy = train_run(args("run-legacy", *resume, f"checkpoint.resume={legacy}"))
    return {
        "refusals": refusals,
        "latest_first_step": from_latest["first_step"],
        "original": original["losses"],
        "legacy": from_legacy["losses"],
    }


def test_planted_checkpoint_files_are_refused_on_resume(
    tmp_path: Path, email_shard: Shard, bpe_model: Path
) -> None:
    (result,) = run_on_ranks(1, _resume_planted, str(tmp_path), email_shard.prefix, str(bpe_model))
    refusals = result["refusals"]
    for kind, (name, _, word) in CHECKPOINT_PAYLOADS.items():
        assert name in refusals[kind] and word in refusals[kind], (kind, refusals[kind])
    assert result["latest_first_step"] == 3  # resumed from global_step2 despite `latest`
    assert result["legacy"] == result["original"] and len(result["original"]) == 2
    assert not list(tmp_path.glob("marker-*"))


def _leaves(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [leaf for v in value.values() for leaf in _leaves(v)]
    if isinstance(value, list | tuple):
        return [leaf for v in value for leaf in _leaves(v)]
    return [value]


def _draws(model: torch.nn.Module) -> list[Any]:
    import random

    with model.tp_rng.fork():
        fork = torch.rand(3).tolist()
    cuda = torch.rand(3, device="cuda").tolist() if torch.cuda.is_available() else None
    return [random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist(), fork, cuda]


def test_random_states_are_plain_data_and_restore_every_stream(tmp_path: Path) -> None:
    import random

    from megatron_llm.checkpoint import rng
    from megatron_llm.parallel.random import TensorParallelRNG

    model = torch.nn.Linear(2, 2)
    model.tp_rng = TensorParallelRNG(11)
    torch.save(rng.capture(model), tmp_path / "rng.pt")
    expected = _draws(model)
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    model.tp_rng = TensorParallelRNG(12)
    state = io.load_tensors(tmp_path / "rng.pt")  # weights_only=True, nothing allowlisted
    plain = (torch.Tensor, int, float, str, type(None))
    assert all(isinstance(leaf, plain) for leaf in _leaves(state))
    rng.restore(model, state)
    assert _draws(model) == expected


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_random_states_hold_only_this_ranks_cuda_generator() -> None:
    from megatron_llm.checkpoint import rng

    # Issue 21 item 7: a rank resumed on a node that sees fewer GPUs must still load it.
    state = rng.capture(torch.nn.Linear(2, 2))
    assert isinstance(state["cuda"], torch.Tensor)
    assert torch.equal(state["cuda"], torch.cuda.get_rng_state(torch.cuda.current_device()))


@pytest.fixture()
def weights_only_checkpoint(tmp_path: Path, bpe_model: Path) -> Path:
    from megatron_llm.checkpoint.__main__ import write_weights_only
    from megatron_llm.config import load_config
    from megatron_llm.model import GPT

    cfg = load_config(None, ["model.num_layers=1", "model.hidden_size=32", "model.num_heads=2"])
    model = GPT(cfg.model, 512)
    return write_weights_only(tmp_path / "ckpt", dict(model.state_dict()), cfg.to_dict())


@pytest.mark.parametrize("kind", ["weights", "config", "manifest"])
def test_eval_loading_refuses_planted_files(
    tmp_path: Path, weights_only_checkpoint: Path, kind: str
) -> None:
    from megatron_llm.eval.loading import load_model

    name, make, word = CHECKPOINT_PAYLOADS[kind]
    marker = tmp_path / "marker"
    folder = planted_copy(weights_only_checkpoint, tmp_path / "planted", name, make(marker))
    with pytest.raises(io.CheckpointError, match=word) as refused:
        load_model(str(folder))
    assert name in str(refused.value)
    assert not marker.exists()


def test_dataset_index_cache_payload_is_refused_and_rebuilt(
    tmp_path: Path, email_shard: Shard, bpe_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from megatron_llm.data.config import DataConfig
    from megatron_llm.data.dataset import build_datasets
    from megatron_llm.data.tokenizer import Tokenizer

    def train_items() -> list[list[int]]:
        cfg = DataConfig(prefixes=[email_shard.prefix])
        cfg.cache_dir = str(tmp_path / "cache")
        train, _ = build_datasets(
            cfg,
            seq_length=16,
            seed=3,
            train_samples=8,
            valid_samples=0,
            tokenizer=Tokenizer(bpe_model),
        )
        return [train[i].tolist() for i in range(len(train))]

    expected = train_items()
    marker = tmp_path / "marker"
    planted = sorted((tmp_path / "cache").glob("*-shuffle_index.npy"))
    assert planted
    for path in planted:  # a shared cache dir: anyone may have written these
        path.write_bytes(npy_payload(marker))
    stamps = sorted((tmp_path / "cache").glob("shard_checks/*.json"))  # what checks learned
    assert stamps
    for path in stamps:
        path.write_bytes(pickled(marker))
    with caplog.at_level(logging.WARNING):
        assert train_items() == expected
    assert "Python objects" in caplog.text and "rebuilding" in caplog.text
    assert not marker.exists()
    for path in planted:
        np.load(path, allow_pickle=False)  # rebuilt as plain integers


def test_shard_manifest_payload_is_refused(
    tmp_path: Path, email_shard: Shard, bpe_model: Path
) -> None:
    from megatron_llm.data.config import DataConfig
    from megatron_llm.data.dataset import build_datasets
    from megatron_llm.data.tokenizer import Tokenizer

    source = Path(email_shard.prefix)
    prefix = tmp_path / source.name
    for suffix in (".bin", ".idx"):
        shutil.copyfile(f"{source}{suffix}", f"{prefix}{suffix}")
    marker = tmp_path / "marker"
    # Both places a shard's manifest is looked for: beside it, and under manifests/.
    (tmp_path / "manifests").mkdir()
    for path in (
        Path(f"{prefix}.manifest.json"),
        tmp_path / f"manifests/{prefix.name}.manifest.json",
    ):
        path.write_bytes(pickled(marker))
    cfg = DataConfig(prefixes=[str(prefix)])
    cfg.cache_dir = str(tmp_path / "cache")
    with pytest.raises(ValueError, match="manifest.json") as refused:
        build_datasets(
            cfg,
            seq_length=16,
            seed=3,
            train_samples=8,
            valid_samples=0,
            tokenizer=Tokenizer(bpe_model),
        )
    assert "JSON" in str(refused.value)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["tokenizer.model", "tokenizer.json"])
def test_tokenizer_file_payload_is_refused(tmp_path: Path, name: str) -> None:
    from megatron_llm.data.tokenizer import Tokenizer, TokenizerError

    marker = tmp_path / "marker"
    path = tmp_path / name
    path.write_bytes(pickled(marker))
    with pytest.raises(TokenizerError, match=name):
        Tokenizer(path)
    assert not marker.exists()


def test_import_hf_refuses_pickled_weights(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import transformers

    from megatron_llm.checkpoint.__main__ import main as checkpoint_cli

    hf_dir = tmp_path / "hf"
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
    config.save_pretrained(hf_dir)
    marker = tmp_path / "marker"
    (hf_dir / "pytorch_model.bin").write_bytes(torch_file(marker))
    assert checkpoint_cli(["import-hf", str(hf_dir), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "pytorch_model.bin" in err and "safetensors" in err, err
    assert not marker.exists() and not (tmp_path / "out").exists()


UNPICKLERS = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}
UNPICKLING = {"load", "loads", "Unpickler", "open"}
# PyYAML's names that build arbitrary Python objects (yaml.load itself is checked per call).
UNSAFE_YAML = {"unsafe_load", "unsafe_load_all", "full_load", "full_load_all", "Loader"}
UNSAFE_YAML |= {"FullLoader", "UnsafeLoader", "FullConstructor", "UnsafeConstructor"}


def _dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def _keyword(node: ast.Call, name: str) -> Any:
    for kw in node.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else "<expr>"
    return None


def _unsafe_call(node: ast.Call) -> str | None:
    name = _dotted(node.func)
    if name.endswith("torch.load") and _keyword(node, "weights_only") is not True:
        return "torch.load without weights_only=True"
    if name in ("np.load", "numpy.load") and _keyword(node, "allow_pickle") not in (None, False):
        return "np.load with allow_pickle"
    if name in ("yaml.load", "yaml.load_all"):
        loader = [ast.unparse(kw.value) for kw in node.keywords if kw.arg == "Loader"]
        loader += [ast.unparse(arg) for arg in node.args[1:2]]
        if not (loader and loader[0].endswith("SafeLoader")):
            return f"{name} without SafeLoader"
    if _keyword(node, "weights_only") is False or _keyword(node, "allow_pickle") is True:
        return f"{name} with weights_only=False or allow_pickle=True"
    return None


def _unsafe_name(node: ast.AST) -> str | None:
    if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNPICKLERS:
        names = {a.name for a in node.names} & UNPICKLING
        return f"from {node.module} import {', '.join(sorted(names))}" if names else None
    if not isinstance(node, ast.Attribute):
        return None
    root, _, leaf = _dotted(node).partition(".")
    if root in UNPICKLERS and leaf in UNPICKLING:
        return f"{root}.{leaf} unpickles"
    if root == "yaml" and leaf in UNSAFE_YAML:
        return f"yaml.{leaf} builds arbitrary objects"
    return None


def unsafe_loads(source: str) -> list[str]:
    """Every use in ``source`` of a loader that could run code from a file."""
    found = []
    for node in ast.walk(ast.parse(source)):
        why = _unsafe_call(node) if isinstance(node, ast.Call) else _unsafe_name(node)
        if why:
            found.append(f"line {node.lineno}: {why}")
    return found


def test_no_loader_in_the_source_unpickles() -> None:
    offenders = []
    for folder in ("megatron_llm", "data_tools", "launch", "bench"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            offenders += [f"{rel}: {hit}" for hit in unsafe_loads(path.read_text())]
    assert not offenders, "loaders that could run code from a file:\n" + "\n".join(offenders)


def test_the_source_scan_catches_each_pattern() -> None:
    bad = [
        "torch.load(p)",
        "torch.load(p, weights_only=False)",
        "np.load(p, allow_pickle=True)",
        "numpy.load(p, allow_pickle=flag)",
        "pickle.load(f)",
        "pickle.loads(b)",
        "yaml.load(text)",
        "yaml.load(text, Loader=yaml.FullLoader)",
        "yaml.unsafe_load(text)",
        "parse = yaml.unsafe_load",
        "yaml.load(text, yaml.Loader)",
        "from pickle import loads",
        "transformers.AutoModel.from_pretrained(d, weights_only=False)",
    ]
    for line in bad:
        assert unsafe_loads(line), line
    good = [
        "torch.load(p, weights_only=True)",
        "np.load(p)",
        "np.load(p, allow_pickle=False, mmap_mode='r')",
        "yaml.safe_load(text)",
        "yaml.load(text, Loader=yaml.SafeLoader)",
        "json.loads(text)",
    ]
    for line in good:
        assert not unsafe_loads(line), line
