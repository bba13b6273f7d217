"""The README's benchmark table and plots are `vtoken bench`'s own output, committed beside it."""

import json
import re
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PLOTS = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", README)


def test_readme_shows_bench_plots():
    assert {Path(p).name for p in PLOTS} >= {"accuracy.png", "costs.png", "speed.png"}


def test_each_readme_plot_is_a_real_image_beside_its_data():
    for plot in PLOTS:
        path = ROOT / plot
        pixels = np.asarray(Image.open(path).convert("L"), dtype=float)
        assert pixels.size > 100_000 and pixels.std() > 10, f"{plot} is blank"
        data = json.loads((path.parent / "results.json").read_text())
        accuracy = data["accuracy"]["accuracy"]
        assert "baseline" in accuracy and len(accuracy) > 1, f"no settings behind {plot}"
        assert all(0.0 <= v <= 1.0 for run in accuracy.values() for v in run.values())
        assert data["speed"] and all(s["prefill_ratio"] > 0 for s in data["speed"].values())


def test_readme_table_is_the_committed_bench_table():
    folders = {(ROOT / p).parent for p in PLOTS}
    assert len(folders) == 1
    results = (folders.pop() / "results.md").read_text()
    command = results.splitlines()[0]
    assert command.startswith("`vtoken bench") and command in README
    rows = [line for line in results.splitlines() if line.startswith("| ")]
    assert len(rows) > 3 and all(row in README for row in rows)
