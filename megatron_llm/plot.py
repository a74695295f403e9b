"""Loss curves of one or more runs as a PNG.

    python -m megatron_llm.plot runs/default runs/tp2 -o curves.png

Each RUN_DIR is a run's logging.dir holding metrics.jsonl (or the path of such a file): one
JSON record per line with "step" and "loss", and "val_loss" on evaluation steps. Training loss
is drawn as a line, validation loss as dots joined by a dashed line of the same color, one color
per run, against the step. --smooth A draws an exponential moving average of the training loss
(weight A of the past, 0 = raw; the raw curve stays, faint). Lines cut short by a crash are
skipped; a step logged twice (a resumed run) keeps its last record. Needs matplotlib
(`pip install matplotlib`). Exit status: 0 ok, 2 missing or empty metrics, or no matplotlib.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any


class PlotError(ValueError):
    """A run whose metrics cannot be plotted, naming the file."""


def read_metrics(run: str | Path) -> list[dict[str, Any]]:
    """The records of a run, by step (the last record of a step wins)."""
    path = Path(run)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise PlotError(f"{path}: no such file; give a run's logging.dir or its metrics.jsonl")
    by_step: dict[int, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
            by_step[int(record["step"])] = record
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue  # a line cut short by a crash, or not a step record
    if not any("loss" in r for r in by_step.values()):
        raise PlotError(f"{path}: no record with a 'step' and a 'loss'")
    return [by_step[s] for s in sorted(by_step)]


def series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["step"], float(r[key])) for r in records if isinstance(r.get(key), int | float)]
    return [s for s, _ in pairs], [v for _, v in pairs]


def smooth(values: list[float], weight: float) -> list[float]:
    out, avg = [], None
    for v in values:
        if math.isfinite(v):
            avg = v if avg is None else weight * avg + (1 - weight) * v
        out.append(avg if avg is not None else v)
    return out


def labels_for(runs: list[str]) -> list[str]:
    """Each run's folder name, or its whole path where names repeat."""
    names = [Path(r).parent.name if r.endswith(".jsonl") else Path(r).name for r in runs]
    return [n if names.count(n) == 1 else r for n, r in zip(names, runs)]


def plot(runs: list[str], out: str | Path, smoothing: float = 0.0, title: str | None = None) -> str:
    """Writes the PNG; returns a one-line summary per run."""
    try:
        import matplotlib
    except ImportError:
        raise PlotError("matplotlib is not installed: pip install matplotlib") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=110)
    lines = []
    for i, (run, label) in enumerate(zip(runs, labels_for(runs))):
        records = read_metrics(run)
        color = f"C{i % 10}"
        steps, loss = series(records, "loss")
        if smoothing:
            ax.plot(steps, loss, color=color, alpha=0.25, linewidth=0.8)
            ax.plot(steps, smooth(loss, smoothing), color=color, label=f"{label} loss")
        else:
            ax.plot(steps, loss, color=color, linewidth=1.2, label=f"{label} loss")
        val_steps, val = series(records, "val_loss")
        if val:
            ax.plot(val_steps, val, "o--", color=color, markersize=4, label=f"{label} val_loss")
        last_val = f", val_loss {val[-1]:.4f}" if val else ""
        lines.append(f"{label}: {len(steps)} steps, last loss {loss[-1]:.4f}{last_val}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title or "loss")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, format="png")
    plt.close(fig)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_llm.plot",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run dirs or metrics.jsonl")
    parser.add_argument("-o", "--output", default="curves.png", help="PNG to write")
    parser.add_argument("--smooth", type=float, default=0.0, help="EMA weight in [0, 1)")
    parser.add_argument("--title", help="plot title (default 'loss')")
    args = parser.parse_args(argv)
    if not 0.0 <= args.smooth < 1.0:
        parser.error(f"--smooth={args.smooth}: must be in [0, 1)")
    try:
        summary = plot(args.runs, args.output, args.smooth, args.title)
    except (PlotError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{summary}\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
