"""Inspect, verify and convert checkpoints.

    python -m megatron_llm.checkpoint list runs/x/checkpoints
    python -m megatron_llm.checkpoint verify runs/x/checkpoints [--step N]
    python -m megatron_llm.checkpoint export-hf runs/x/checkpoints out/hf [--step N]
    python -m megatron_llm.checkpoint import-hf out/hf runs/y/checkpoints [CONFIG] [a.b=value ...]

A checkpoint argument is a checkpoint folder (``global_step<N>``) or a checkpoint dir (its
``latest``, or --step N). ``import-hf`` writes a weights-only checkpoint (step 0, no optimizer
state) with a run config whose ``model`` section comes from the HF folder; start training from it
with ``deepspeed launch/pretrain.sh CONFIG checkpoint.resume=<that folder>``.
Exit status: 0 ok, 1 a checkpoint failed verification, 2 bad arguments or unusable input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

from megatron_llm.atomic import WriteFailed, building_dir
from megatron_llm.checkpoint import hf, io, shards
from megatron_llm.config import ConfigError, from_dict, load_config
from megatron_llm.config import _apply_override as apply_override
from megatron_llm.data.tokenizer import TokenizerError
from megatron_llm.model import hf_names


def cmd_list(args: argparse.Namespace) -> int:
    rows = []
    for path in sorted(io.candidates(args.dir), key=lambda c: io.step_of(c) or 0):
        try:
            rows.append(io.describe(io.Checkpoint.open(path)))
        except (io.CheckpointError, OSError, json.JSONDecodeError) as e:
            rows.append({"tag": path.name, "error": str(e)})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    latest = io.read_latest(Path(args.dir))
    print(f"{'tag':<22}{'step':>8}{'tokens':>14}  {'layout':<22}{'size':>10}  saved")
    for r in rows:
        if "error" in r:
            print(f"{r['tag']:<22}  unreadable: {r['error']}")
            continue
        lay = r["layout"]
        layout = f"tp{lay['tp']} pp{lay['pp']} dp{lay['dp']} z{lay['zero']}"
        mark = " <- latest" if r["tag"] == latest else ""
        tokens = f"{r['tokens_seen']:,}" if r["tokens_seen"] is not None else "-"
        print(
            f"{r['tag']:<22}{r['step']:>8}{tokens:>14}  {layout:<22}"
            f"{r['bytes'] / 2**20:>8.1f}MB  {r['saved_at']}{mark}"
        )
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    ckpt = io.resolve(args.path, args.step)
    problems = ckpt.problems(checksums=True)
    for p in problems:
        print(f"FAIL {p}")
    if not problems:
        n = len(ckpt.manifest["files"])
        print(f"OK {ckpt.path}: {n} files match the manifest's sizes and digests")
    return 1 if problems else 0


def _run_config(ckpt: io.Checkpoint) -> Any:
    return from_dict(ckpt.config(), source=str(ckpt.path / "config.yaml"))


def cmd_export(args: argparse.Namespace) -> int:
    import transformers

    from megatron_llm.data.hf_export import write_tokenizer

    ckpt = io.verified(args.path, args.step, verify=not args.no_verify_ckpt)
    cfg = _run_config(ckpt)
    weights = ckpt.weights()
    tokenizer = None if args.no_tokenizer else _tokenizer(cfg.data.tokenizer)
    rows = weights["embed.weight"].shape[0]
    vocab = hf.export_vocab_size(cfg.model, rows, tokenizer.vocab_size if tokenizer else None)
    out = Path(args.out)
    with building_dir(out) as tmp:  # the folder appears whole, or not at all
        # The tokenizer first: a tokenizer that cannot be expressed stops the export early.
        ids = write_tokenizer(tokenizer, tmp, cfg.model.seq_length) if tokenizer else {}
        config = hf.hf_config(cfg.model, vocab, ids)
        cls = getattr(transformers, hf.class_name(cfg.model))
        model = cls(config)
        hf.check_state(
            model,
            hf_names.to_hf(cfg.model, hf.trim_vocab(weights, vocab)),
            config.tie_word_embeddings,
        )
        model.generation_config.update(
            bos_token_id=ids.get("bos"), eos_token_id=ids.get("eos"), pad_token_id=ids.get("pad")
        )
        model.save_pretrained(tmp)
        (tmp / "megatron_llm.json").write_text(
            json.dumps(
                {"checkpoint": str(ckpt.path), "step": ckpt.step, "eod": ids.get("eos")}, indent=2
            )
            + "\n"
        )
    trimmed = f", vocabulary trimmed from {rows} to {vocab} rows" if vocab < rows else ""
    print(f"exported {ckpt.path} (step {ckpt.step}) to {out} as {cls.__name__}{trimmed}")
    return 0


def _tokenizer(path: str) -> Any:
    """The run's tokenizer; without it the export would give transformers no way to read text."""
    from megatron_llm.data.tokenizer import Tokenizer

    if not path or not Path(path).exists():
        raise hf.ConversionError(
            f"data.tokenizer={path!r} of the checkpoint's config is not found; pass --no-tokenizer "
            "to export the weights alone (with the padded vocabulary)"
        )
    return Tokenizer(path)


def cmd_import(args: argparse.Namespace) -> int:
    import transformers

    hf_dir = Path(args.hf_dir)
    hf_cfg = transformers.AutoConfig.from_pretrained(hf_dir)
    fields = hf.model_fields(hf_cfg)  # refuses what our model cannot express, naming the field
    raw = load_config(args.config, args.overrides).to_dict()
    # The model is the HF model's; model.* overrides on the command line (seq_length, dropout,
    # ...) still apply on top.
    raw["model"] = fields
    for item in args.overrides:
        if item.startswith("model."):
            apply_override(raw, item)
    if not raw["data"]["tokenizer"] and (hf_dir / "tokenizer.json").is_file():
        raw["data"]["tokenizer"] = str(hf_dir.resolve() / "tokenizer.json")
    cfg = from_dict(raw, source=f"{hf_dir} + {args.config or 'defaults'}")
    _require_safetensors(hf_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        hf_dir, dtype=torch.float32, use_safetensors=True
    )
    state = model.state_dict()
    weights = hf_names.from_hf(cfg.model, state)
    hf.check_all_converted(state, weights, bool(hf_cfg.tie_word_embeddings))
    if "pos_embed.weight" in weights:
        table = weights["pos_embed.weight"]
        if cfg.model.seq_length > table.shape[0]:
            raise hf.ConversionError(
                f"model.seq_length={cfg.model.seq_length} exceeds the {table.shape[0]} learned "
                "positions of the HF model"
            )
        weights["pos_embed.weight"] = table[: cfg.model.seq_length].clone()
    # Training builds the embedding with the padded vocabulary: pad it here, once.
    weights = hf.pad_vocab(weights, hf.padded_rows(cfg.model, cfg.parallel.tp))
    path = write_weights_only(Path(args.out), weights, cfg.to_dict())
    print(f"imported {hf_dir} into {path}; train from it with checkpoint.resume={path}")
    return 0


def _require_safetensors(hf_dir: Path) -> None:
    # pytorch_model.bin is a pickle: loading one could run code from whoever made the folder.
    if not any(hf_dir.glob("*.safetensors")):
        raise hf.ConversionError(
            f"{hf_dir}: no *.safetensors weights; pytorch_model.bin files are pickles and are "
            "never loaded (they could run code). Convert on a machine you trust: "
            "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(new_dir)"
        )


def write_weights_only(root: Path, weights: dict[str, torch.Tensor], config: dict) -> Path:
    """A step-0 checkpoint holding model weights only (fresh optimizer when loaded)."""
    tmp = io.new_tmp_dir(root, 0)
    writer = io.FolderWriter(tmp)
    writer.tensors("model-00000.pt", weights)
    run_state = {"step": 0, "consumed_samples": 0, "tokens_seen": 0}
    writer.text("run_state.json", json.dumps(run_state, indent=2) + "\n")
    writer.text("config.yaml", yaml.safe_dump(config, sort_keys=False))
    return io.finish(
        tmp,
        root,
        step=0,
        layout={"tp": 1, "pp": 1, "dp": 1, "world_size": 1, "zero": 0},
        optimizer=False,
        tensors={
            n: {"shape": list(t.shape), "pieces": shards.whole_pieces("model-00000.pt", t.shape)}
            for n, t in weights.items()
        },
        files=writer.entries(),
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_llm.checkpoint",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="the checkpoints in a dir: step, tokens, layout, size")
    p.add_argument("dir")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(fn=cmd_list)
    p = sub.add_parser("verify", help="check every file against the manifest (sizes, sha256)")
    p.add_argument("path", help="a checkpoint folder or a checkpoint dir")
    p.add_argument("--step", type=int, help="in a checkpoint dir: this step instead of latest")
    p.set_defaults(fn=cmd_verify)
    p = sub.add_parser("export-hf", help="write a transformers folder (GPT-2 or Llama)")
    p.add_argument("path", help="a checkpoint folder or a checkpoint dir")
    p.add_argument("out", help="output folder (replaced if it exists)")
    p.add_argument("--step", type=int, help="in a checkpoint dir: this step instead of latest")
    p.add_argument(
        "--no-tokenizer", action="store_true", help="weights and config only (no tokenizer files)"
    )
    p.add_argument(
        io.NO_VERIFY_FLAG, dest="no_verify_ckpt", action="store_true", help=io.NO_VERIFY_HELP
    )
    p.set_defaults(fn=cmd_export)
    p = sub.add_parser("import-hf", help="a weights-only checkpoint from a transformers folder")
    p.add_argument("hf_dir")
    p.add_argument("out", help="checkpoint dir to write global_step0 into")
    p.add_argument("config", nargs="?", help="run config YAML for the non-model sections")
    p.add_argument("overrides", nargs="*", help="section.field=value overrides")
    p.set_defaults(fn=cmd_import)
    args = parser.parse_args(argv)
    if args.command == "import-hf" and args.config and "=" in args.config:
        args.overrides.insert(0, args.config)
        args.config = None
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return args.fn(args)
    except (
        io.CheckpointError,
        hf.ConversionError,
        ConfigError,
        TokenizerError,
        WriteFailed,
        OSError,
    ) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        print(
            f"error: {e}; export-hf and import-hf need `pip install transformers`", file=sys.stderr
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
