"""`vtoken bench peers`: kvpress against zipvl and token_pruning. The kvpress runs need the peers
environment (`make peers-venv`; .ci/run runs this file there); the rest runs everywhere."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest

from vtoken.bench import peers
from vtoken.bench.peers_report import peers_table, write_peers_report
from vtoken.cli import main

needs_kvpress = pytest.mark.skipif(
    importlib.util.find_spec("kvpress") is None,
    reason="kvpress lives in the peers environment: make peers-venv, then "
    ".venv-peers/bin/python -m pytest tests/test_peers.py",
)


def test_cli_forwards_every_option_and_names_the_missing_environment(capsys):
    parser = argparse.ArgumentParser()
    peers.add_peers_options(parser)
    args = parser.parse_args(["--per-family", "7", "--press", "knorm", "--threads", "1"])
    forwarded = parser.parse_args(peers.peers_argv(args))
    assert vars(forwarded) == vars(args)
    assert main(["bench", "peers", "--python", "/nonexistent/python"]) == 2
    assert "make peers-venv" in capsys.readouterr().err


def test_unknown_press_is_refused():
    with pytest.raises(Exception, match="Unknown press 'h2o'"):
        peers.make_press("h2o", 0.5)


@pytest.fixture(scope="module")
def bundled():
    from vtoken.bench.accuracy import split_items
    from vtoken.loading import load_model

    model, processor = load_model("synth-llava-tiny")
    items = [i for i in split_items(Path("runs/data"), 10) if i.headline][::5]  # 12 questions, 6 families
    return model, processor, items


@needs_kvpress
def test_the_kvpress_loop_without_a_press_answers_as_generate(bundled):
    model, processor, items = bundled
    for item in items:
        ours = peers.answer_plugged(model, processor, item, [], 64)
        loop = peers.answer_pressed(model, processor, item, None, 64)
        assert loop.text == ours.text and loop.report.decode_steps == ours.report.decode_steps
        assert loop.report.prefill_kv_bytes == ours.report.prefill_kv_bytes


@needs_kvpress
@pytest.mark.parametrize("name", peers.PRESS_NAMES)
def test_each_press_holds_its_share_of_the_prompt_cache(bundled, name):
    model, processor, items = bundled
    full = peers.answer_pressed(model, processor, items[0], None, 4).report.prefill_kv_bytes
    pressed = peers.answer_pressed(model, processor, items[0], peers.make_press(name, 0.5), 4)
    assert pressed.report.prefill_kv_bytes / full == pytest.approx(0.5, abs=0.01)


@needs_kvpress
def test_a_small_run_writes_the_table_and_the_plot(bundled, tmp_path):
    model, processor, items = bundled
    result, budgets = peers.run_peers(model, processor, items[:4], presses=("knorm",), max_new_tokens=8)
    assert result["loyalty"]["kvpress:no-press"]["value"] == 1.0
    assert 0 < budgets["zipvl:zipvl-evict@0.96"] < budgets["zipvl:zipvl-mixed@0.975"] < 0.5
    assert {f"kvpress:knorm@{s:.2f}" for s in (0.5, 0.25)} <= set(result["accuracy"])
    text = write_peers_report(result, tmp_path, "vtoken bench peers")
    assert "| zipvl:zipvl-mixed@0.975 |" in text and (tmp_path / "peers.png").stat().st_size > 0


def test_table_orders_settings_by_the_cache_they_hold():
    estimate = {"value": 0.9, "low": 0.8, "high": 1.0, "n": 10}
    costs = {"kv_prefill_mib": 0.5, "kv_end_mib": 0.6}
    labels = ["baseline", "kvpress:knorm@0.25", "zipvl:zipvl-mixed@0.975"]
    result = {
        "accuracy": {k: {"headline": estimate} for k in labels},
        "retention": {k: estimate for k in labels},
        "loyalty": {k: estimate for k in labels},
        "costs": {k: costs for k in labels},
        "budget": {"kvpress:knorm@0.25": 0.25, "zipvl:zipvl-mixed@0.975": 0.14},
    }
    rows = [line.split(" | ")[0].strip("| ") for line in peers_table(result).splitlines()[2:]]
    assert rows == ["baseline", "kvpress:knorm@0.25", "zipvl:zipvl-mixed@0.975"]
