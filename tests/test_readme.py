"""The README's plugin example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from conftest import make_inputs, tiny

import vtoken

README = Path(__file__).parents[1] / "README.md"


def test_readme_pruner_example_runs_and_prunes():
    blocks = re.findall(r"```python\nimport torch, vtoken\n(.*?)```", README.read_text(), re.S)
    code = next(b for b in blocks if "class LastTokenPruner" in b)
    namespace = {"torch": torch, "vtoken": vtoken}
    exec(code, namespace)
    model, processor = tiny("llava")
    inputs = make_inputs("llava", processor, batch=True)
    with vtoken.attach(model, namespace["LastTokenPruner"]()) as session:
        model.generate(**inputs, max_new_tokens=3, do_sample=False)
        kept = session.report().visual_per_layer
    assert kept[:2] == [48, 48] and kept[2:] == [16, 16]  # 8 of each row's tokens from layer 2 on
