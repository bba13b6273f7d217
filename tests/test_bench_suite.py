"""``vtoken bench``: every setting against the unplugged model, table, JSON and plots."""

from __future__ import annotations

import json

import numpy as np
from conftest import image
from PIL import Image
from vtoken_plugins.token_pruning import TokenPruning

from vtoken.cli import main


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
    assert main([*argv, "--plugin", "token_pruning", "--repeats", "1", "--out-dir", str(out)]) == 0
    result = json.loads((out / "results.json").read_text())
    runnable = {f"token_pruning:{k}" for k in TokenPruning.bench_settings() if not k.startswith("learned")}
    assert set(result["accuracy"]["accuracy"]) == {"baseline"} | runnable
    assert set(result["speed"]) == runnable  # every setting timed against the baseline
    for speed in result["speed"].values():
        assert speed["prefill_ratio"] > 0 and speed["repeats"] == 1 and 0 < speed["prefill_flops_ratio"] < 1
    table = (out / "results.md").read_text()
    assert table.startswith("`vtoken bench --quick --model tiny:llava`") and "Machine:" in table
    assert table.count("\n| token_pruning:") == len(runnable)
    for plot in ("accuracy.png", "costs.png", "speed.png"):  # real, non-blank images
        pixels = np.asarray(Image.open(out / plot).convert("L"), dtype=float)
        assert pixels.size > 100_000 and pixels.std() > 10
    printed = capsys.readouterr().out
    assert "| token_pruning:fastv@25% |" in printed and "decode step time" in printed
