"""python -m megatron_llm.plot: loss curves of several runs as a PNG."""

import json
import math
import struct

import pytest

from megatron_llm import plot


def write_run(run, steps, scale, val_every=10):
    run.mkdir(parents=True)
    with (run / "metrics.jsonl").open("w") as f:
        for step in range(1, steps + 1):
            record = {"step": step, "loss": scale * (5 + math.exp(-step / 20)), "lr": 1e-3}
            if step % val_every == 0:
                record["val_loss"] = record["loss"] + 0.1
            f.write(json.dumps(record) + "\n")
        f.write('{"step": 41, "lo')  # a line cut short by a crash


def test_png_for_two_runs(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="pip install matplotlib (setup.py lists it)")
    write_run(tmp_path / "a", 40, 1.0)
    write_run(tmp_path / "b", 30, 1.1, val_every=1000)  # no validation records
    out = tmp_path / "curves.png"
    assert (
        plot.main([str(tmp_path / "a"), str(tmp_path / "b" / "metrics.jsonl"), "-o", str(out)]) == 0
    )
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 500 and height > 300 and len(data) > 20_000
    text = capsys.readouterr().out
    assert "a: 40 steps" in text and "val_loss" in text and "b: 30 steps" in text
    assert plot.main([str(tmp_path / "a"), "--smooth", "0.9", "-o", str(tmp_path / "s.png")]) == 0


def test_missing_metrics_is_an_error(tmp_path, capsys):
    assert plot.main([str(tmp_path), "-o", str(tmp_path / "x.png")]) == 2
    assert "metrics.jsonl: no such file" in capsys.readouterr().err
