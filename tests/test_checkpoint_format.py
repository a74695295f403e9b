"""Sharded checkpoints (format 2): each rank writes only what it holds, any layout reads them
back, and format 1 checkpoints (whole tensors, written by the code before) still load."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from megatron_llm.checkpoint import io, shards
from tests.checkpoint_runs import overrides, run_all
from tests.data_fixtures import Shard
from tests.distributed import run_on_ranks

V1 = Path(__file__).parent / "fixtures/checkpoint_v1/global_step2"


def _args(run_dir: Path, shard: Shard, bpe_model: Path, *extra: str) -> list[str]:
    return overrides(str(run_dir), shard.prefix, str(bpe_model), *extra)


def _written(ckpt: io.Checkpoint) -> dict[str, int]:
    """{model file: elements its rank wrote}, from the manifest's pieces."""
    out: dict[str, int] = {}
    for entry in ckpt.manifest["tensors"].values():
        for piece in entry["pieces"]:
            out[piece["file"]] = out.get(piece["file"], 0) + math.prod(piece["size"])
    return out


def test_each_rank_writes_half_at_dp2_and_zero3_reshapes(
    tmp_path: Path, email_shard: Shard, bpe_model: Path
) -> None:
    """dp=2 with ZeRO 0, 1 and 3: the pieces tile every tensor once, each rank wrote half the
    elements (+- one tensor) and its files hold exactly its pieces; the ZeRO 1 and ZeRO 3
    checkpoints restore exactly at tp=2 (every weight and AdamW moment)."""
    common = ["train.steps=2", "checkpoint.save_interval=2", "train.micro_batch_size=2"]
    zeros = (0, 1, 3)
    runs = [
        ("train", _args(tmp_path / f"z{z}", email_shard, bpe_model, *common, "parallel.dp=2",
                        f"parallel.zero_stage={z}"))
        for z in zeros
    ]  # fmt: skip
    for z in (1, 3):  # ZeRO 1's partitions cut tensors mid-row: pieces of several boxes
        resume = [f"checkpoint.resume={tmp_path}/z{z}/checkpoints/global_step2", "parallel.tp=2"]
        args = _args(tmp_path / f"tp2-from-z{z}", email_shard, bpe_model, *common, *resume)
        runs.append(("restored", args))
    per_rank = run_on_ranks(2, run_all, runs)
    for z in zeros:
        ckpt = io.Checkpoint.open(tmp_path / f"z{z}/checkpoints/global_step2")
        assert ckpt.manifest["version"] == 2
        total = sum(math.prod(e["shape"]) for e in ckpt.manifest["tensors"].values())
        largest = max(math.prod(e["shape"]) for e in ckpt.manifest["tensors"].values())
        written = _written(ckpt)
        assert sum(written.values()) == total, (z, written, total)  # each element once
        for file, n in written.items():
            assert abs(n - total / 2) <= largest, (z, file, n, total, largest)
            on_disk = io.load_tensors(ckpt.path / file)
            assert sum(t.numel() for t in on_disk.values()) == n, (z, file)
        tensors = ckpt.tensors(optimizer=True)
        for name, entry in ckpt.manifest["tensors"].items():
            whole = tensors[name]["exp_avg"]
            assert tuple(whole.shape) == tuple(entry["shape"])
    for case in (0, 1):
        restored = [per_rank[r][len(zeros) + case] for r in range(2)]
        for rank in restored:
            assert rank["gap"] == {"param": 0.0, "exp_avg": 0.0, "exp_avg_sq": 0.0}, rank["gap"]
        compared = sorted(n for rank in restored for n in rank["names"])
        assert compared == restored[0]["saved_names"]


def test_a_tied_embedding_on_two_pipeline_stages_is_written_once(
    tmp_path: Path, email_shard: Shard, bpe_model: Path
) -> None:
    """pp=2 dp=2 ZeRO 1, gpt2 (the embedding tied to the head on the last stage: two stages'
    partitions cut it differently): saved, and restored exactly at tp=2 dp=2."""
    common = ["train.steps=2", "checkpoint.save_interval=2", "model.style=gpt2"]
    layout = ["parallel.pp=2", "parallel.dp=2", "parallel.zero_stage=1"]
    layout += ["train.micro_batch_size=1", "train.grad_accum_steps=2"]
    saved = tmp_path / "pp2/checkpoints/global_step2"
    resume = [f"checkpoint.resume={saved}", "parallel.tp=2", "parallel.dp=2"]
    runs = [
        ("train", _args(tmp_path / "pp2", email_shard, bpe_model, *common, *layout)),
        ("restored", _args(tmp_path / "tp2", email_shard, bpe_model, *common, *resume)),
    ]
    per_rank = run_on_ranks(4, run_all, runs)
    restored = [per_rank[r][1] for r in range(4)]
    for rank in restored:
        assert rank["gap"] == {"param": 0.0, "exp_avg": 0.0, "exp_avg_sq": 0.0}, rank["gap"]
    assert sorted(n for rank in restored for n in rank["names"]) == restored[0]["saved_names"]
    written = _written(io.Checkpoint.open(saved))
    total = sum(
        math.prod(e["shape"]) for e in io.Checkpoint.open(saved).manifest["tensors"].values()
    )
    assert sum(written.values()) == total, (written, total)


def test_experts_split_over_ep_and_tp_are_saved_by_the_slice_rule(
    tmp_path: Path, email_shard: Shard, bpe_model: Path
) -> None:
    """MoE at ep=2 x tp=2 x dp=2 (ZeRO 1; stacked experts cut on dim 0 by ep and on their
    partition_dim by tp): every element written once, restored exactly at tp=1 dp=4 ep=1."""
    moe = ["model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.shared_experts=1"]
    common = ["train.steps=2", "checkpoint.save_interval=2", *moe]
    layout = ["parallel.tp=2", "parallel.dp=2", "parallel.ep=2", "parallel.zero_stage=1"]
    layout.append("train.micro_batch_size=2")
    saved = tmp_path / "ep2tp2/checkpoints/global_step2"
    resume = [f"checkpoint.resume={saved}", "parallel.dp=4", "parallel.zero_stage=1"]
    resume.append("train.micro_batch_size=1")
    runs = [
        ("train", _args(tmp_path / "ep2tp2", email_shard, bpe_model, *common, *layout)),
        ("restored", _args(tmp_path / "dp4", email_shard, bpe_model, *common, *resume)),
    ]
    per_rank = run_on_ranks(4, run_all, runs)
    restored = [per_rank[r][1] for r in range(4)]
    for rank in restored:
        assert rank["gap"] == {"param": 0.0, "exp_avg": 0.0, "exp_avg_sq": 0.0}, rank["gap"]
    assert sorted(n for rank in restored for n in rank["names"]) == restored[0]["saved_names"]
    ckpt = io.Checkpoint.open(saved)
    total = sum(math.prod(e["shape"]) for e in ckpt.manifest["tensors"].values())
    assert sum(_written(ckpt).values()) == total
    experts = [n for n in ckpt.manifest["tensors"] if ".experts." in n]
    assert experts and all(len(ckpt.manifest["tensors"][n]["pieces"]) >= 4 for n in experts)


def test_range_boxes_tile_a_flat_range_in_order() -> None:
    """Every flat range of a 3-d box becomes boxes that, read in order, are those elements."""
    sizes = (3, 4, 5)
    whole = torch.arange(math.prod(sizes)).view(sizes)
    for start in range(0, 60, 7):
        for stop in range(start, 61, 11):
            boxes = shards.range_boxes(sizes, start, stop)
            assert len(boxes) <= 2 * len(sizes) - 1
            parts = [
                whole[tuple(slice(o, o + n) for o, n in zip(off, size))].reshape(-1)
                for off, size in boxes
            ]
            got = torch.cat(parts) if parts else torch.empty(0, dtype=whole.dtype)
            assert torch.equal(got, torch.arange(start, stop)), (start, stop, boxes)


def test_flat_fragments_of_tp_boxes_read_back_by_any_box() -> None:
    """A (6, 10) tensor held as two column halves (tp=2), each cut into flat ranges mid-row
    (ZeRO partitions): every box read back from the pieces equals the tensor's."""
    whole = torch.arange(60, dtype=torch.float32).view(6, 10)
    files: dict[str, torch.Tensor] = {}
    pieces = []
    for half in (0, 1):
        box = ((0, 5 * half), (6, 5))
        local = whole[:, 5 * half : 5 * half + 5].reshape(-1)
        for i, (start, stop) in enumerate([(0, 7), (7, 23), (23, 30)]):
            file = f"model-{half}{i}.pt"
            files[file] = local[start:stop].clone()
            held = shards.Held("w", (6, 10), box, 0, 30)
            pieces += shards.pieces_of(held, [(start, stop)], file)
    assert max(len(shards.range_boxes((6, 5), a, b)) for a, b in [(7, 23)]) == 3
    stored = shards.Stored("w", (6, 10), pieces, lambda file, name: files[file])
    assert torch.equal(stored.whole(), whole)
    for offsets, sizes in [((0, 0), (6, 10)), ((1, 3), (4, 4)), ((5, 9), (1, 1)), ((2, 0), (3, 7))]:
        want = whole[tuple(slice(o, o + n) for o, n in zip(offsets, sizes))]
        assert torch.equal(stored.box(offsets, sizes), want), (offsets, sizes)
    assert torch.equal(stored[1:5, 3:7], whole[1:5, 3:7])  # as local_part indexes it
    assert torch.equal(stored[2:4], whole[2:4])
    with pytest.raises(TypeError, match="boxes only"):
        stored[::2]
    with pytest.raises(io.CheckpointError, match="cover 55 of the 60"):
        shards.Stored("w", (6, 10), pieces[1:], lambda file, name: files[file]).whole()


def test_fragments_that_do_not_tile_are_refused() -> None:
    box = ((0, 0), (4, 4))
    held = [[shards.Held("w", (4, 4), box, 0, 8)], [shards.Held("w", (4, 4), box, 8, 12)]]
    with pytest.raises(io.CheckpointError, match="hold 12 of its 16 elements"):
        shards.assign(held, 0)
    other = ((2, 0), (2, 4))
    held[1] = [shards.Held("w", (4, 4), other, 0, 8)]
    with pytest.raises(io.CheckpointError, match="overlapping boxes"):
        shards.assign(held, 0)


def test_differently_partitioned_replicas_are_written_once() -> None:
    """A tied embedding on two pipeline stages: each stage's ZeRO partitions cut it elsewhere
    (ranks 0, 1: [0, 10), [10, 16); ranks 2, 3: [0, 6), [6, 16)); with a norm every rank holds
    whole: every element is written by exactly one rank."""
    box = ((0, 0), (4, 4))
    cuts = [(0, 10), (10, 16), (0, 6), (6, 16)]
    held = [
        [shards.Held("embed", (4, 4), box, a, b), shards.Held("norm", (4,), ((0,), (4,)), 0, 4)]
        for a, b in cuts
    ]
    for name, numel in (("embed", 16), ("norm", 4)):
        written = [shards.assign(held, r).get(name, []) for r in range(4)]
        elements = sorted(i for ranges in written for a, b in ranges for i in range(a, b))
        assert elements == list(range(numel)), (name, written)
        for r, ranges in enumerate(written):  # only what the rank holds
            a, b = cuts[r] if name == "embed" else (0, 4)
            assert all(a <= start and stop <= b for start, stop in ranges), (name, r, ranges)


def _v1_copy(root: Path, run_dir: Path, shard: Shard, bpe_model: Path) -> Path:
    """The format 1 fixture, its config's data and tokenizer pointed at this test's (the tensor
    files and the index are as the old code wrote them; the manifest vouches for the edits)."""
    folder = root / V1.name
    shutil.copytree(V1, folder)
    config = yaml.safe_load((folder / "config.yaml").read_text())
    config["data"].update(prefixes=[shard.prefix], tokenizer=str(bpe_model))
    config["data"]["cache_dir"] = str(run_dir / "cache")
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    run_state = json.loads((folder / "run_state.json").read_text())
    run_state["tokenizer_sha256"] = hashlib.sha256(bpe_model.read_bytes()).hexdigest()
    (folder / "run_state.json").write_text(json.dumps(run_state))
    manifest = json.loads((folder / "manifest.json").read_text())
    for name in ("config.yaml", "run_state.json"):
        data = (folder / name).read_bytes()
        manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_a_version_1_checkpoint_still_loads(
    tmp_path: Path, email_shard: Shard, bpe_model: Path
) -> None:
    """The fixture written by the code before sharding: verified, read whole and by boxes
    equal to torch.load of its files, and restored exactly at tp=2 (ZeRO 0)."""
    ckpt = io.verified(V1)
    assert ckpt.manifest["version"] == 1
    tensors = ckpt.tensors(optimizer=True)
    index = ckpt.manifest["tensors"]
    for name, entry in index.items():
        model = torch.load(V1 / entry["file"], weights_only=True)[name]
        optim = torch.load(V1 / entry["file"].replace("model-", "optim-"), weights_only=True)
        assert torch.equal(tensors[name]["param"], model), name
        for kind in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(tensors[name][kind], optim[name][kind]), (name, kind)
        rows = model.shape[0] // 2
        box = tensors[name].stored("param").box((rows,) + (0,) * (model.dim() - 1),
                                                (rows,) + tuple(model.shape[1:]))  # fmt: skip
        assert torch.equal(box, model[rows : 2 * rows]), name
    folder = _v1_copy(tmp_path / "copy", tmp_path / "tp2", email_shard, bpe_model)
    resume = [f"checkpoint.resume={folder}", "parallel.tp=2", "train.steps=4"]
    args = _args(tmp_path / "tp2", email_shard, bpe_model, *resume, "train.micro_batch_size=4")
    restored = run_on_ranks(2, run_all, [("restored", args)])
    for rank in restored:
        assert rank[0]["gap"] == {"param": 0.0, "exp_avg": 0.0, "exp_avg_sq": 0.0}, rank
    assert sorted(n for rank in restored for n in rank[0]["names"]) == sorted(index)
