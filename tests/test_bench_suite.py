"""``vtoken bench``: every setting against the unplugged model, table, JSON and plots."""

from __future__ import annotations

import json
import subprocess
from importlib.metadata import version
from pathlib import Path

import numpy as np
from conftest import image
from PIL import Image
from vtoken_plugins.token_pruning import TokenPruning

from vtoken.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _dataset(tmp_path):
    rows = []
    for k in range(3):
        image(k, 40, 48 + k).save(tmp_path / f"img{k}.png")
        row = {"image": f"img{k}.png", "question": "what colour ?", "answer": "red", "family": "colour"}
        rows.append(row)
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_bench_quick_writes_table_json_and_plots_for_every_setting(tmp_path, capsys):
    out = tmp_path / "bench"
    argv = ["bench", "--quick", "--model", "tiny:llava", "--data", str(_dataset(tmp_path))]
    argv += ["--plugin", "token_pruning", "--repeats", "2", "--threads", "1", "--out-dir", str(out)]
    assert main(argv) == 0
    result = json.loads((out / "results.json").read_text())
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    where = result["provenance"]
    assert where["commit"] == head and where["threads"] == 1 and "1 torch threads" in where["machine"]
    assert where["versions"]["torch"] == version("torch") and where["versions"]["transformers"]
    runnable = {f"token_pruning:{k}" for k in TokenPruning.bench_settings() if not k.startswith("learned")}
    assert set(result["accuracy"]["accuracy"]) == {"baseline"} | runnable
    assert set(result["speed"]) == runnable  # every setting timed against the baseline
    learned = {f"token_pruning:{k}" for k in TokenPruning.bench_settings()} - runnable
    assert learned and set(result["skipped"]["accuracy"]) == learned and not result["skipped"]["speed"]
    for speed in result["speed"].values():
        assert speed["repeats"] == 2 and speed["warmup"] == 1 and speed["threads"] == 1
        assert len(speed["prefill_ratios"]) == len(speed["decode_step_ratios"]) == 2
        assert min(speed["prefill_ratios"]) <= speed["prefill_ratio"] <= max(speed["prefill_ratios"])
        assert 0 < speed["prefill_flops_ratio"] < 1 and 0 < speed["prefill_kv_ratio"] < 1
    table = (out / "results.md").read_text()
    assert table.startswith("`vtoken bench --quick --model tiny:llava --data ") and "Machine:" in table
    assert "--repeats 2 --threads 1 --out-dir" in table.splitlines()[0] and f"commit {head[:12]}" in table
    assert "language model 8 x 256" in table  # the speed model's real shape
    left_out = next(line for line in table.splitlines() if line.startswith("Not in the accuracy tables"))
    assert all(f"`{label}`: " in left_out for label in learned)  # with the reason, not only a log line
    assert table.count("\n| token_pruning:") == 4 * len(runnable)  # quality, families, costs, speed
    speed_row = next(
        line
        for line in table.splitlines()
        if line.startswith("| token_pruning:fastv@25% | ") and " / " in line
    )
    assert speed_row.count(" / ") >= 4  # min / median / max of prefill and decode-step ratios
    for plot in ("accuracy.png", "costs.png", "speed.png"):  # real, non-blank images
        pixels = np.asarray(Image.open(out / plot).convert("L"), dtype=float)
        assert pixels.size > 100_000 and pixels.std() > 10
    captured = capsys.readouterr()
    assert "| token_pruning:fastv@25% |" in captured.out and "decode step time" in captured.out
    assert "torch threads: 1" in captured.err
