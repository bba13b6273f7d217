"""The VQA harness: loading, scoring, loyalty and the ``vtoken eval vqa`` command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import image, tiny
from vtoken_plugins.token_pruning import TokenPruning

import vtoken
from vtoken.cli import main
from vtoken.eval.scoring import normalize
from vtoken.eval.vqa import VQAItem, _answer, evaluate, evaluate_sharded, load_jsonl, score


def _dataset(tmp_path, answers, families=None):
    rows = []
    for k, answer in enumerate(answers):
        png = tmp_path / f"img{k}.png"
        image(k, 40 + k, 48).save(png)
        family = families[k] if families else "colour"
        rows.append(
            {"image": png.name, "question": "what colour is the circle ?", "answer": answer, "family": family}
        )
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_accuracy_and_loyalty_on_a_hand_made_dataset(tmp_path):
    model, processor = tiny("llava")
    probe = load_jsonl(_dataset(tmp_path, ["?"] * 5))
    truth = _answer(model, processor, "llava", probe, 3)  # what the unplugged model says
    # three right, two wrong, in two families
    refs = truth[:3] + ["not an answer", "nope"]
    items = load_jsonl(_dataset(tmp_path, refs, ["a", "a", "b", "b", "b"]))
    pruner = TokenPruning(scorer="random", keep_ratio=0.1, layers=(0,))
    result = evaluate(model, processor, items, {"plugged": [pruner]}, batch_size=2, max_new_tokens=3)
    values = {name: e.value for name, e in result.accuracy["baseline"].items()}
    assert values == {
        "a": 1.0,
        "b": pytest.approx(1 / 3),
        "headline": pytest.approx(2 / 3),
    }  # mean of families
    assert result.families == {"a": 2, "b": 3} and result.accuracy["baseline"]["headline"].n == 5
    plugged = [a for i in range(0, 5, 2) for a in _answer_with(model, processor, items[i : i + 2], pruner)]
    agree = sum(normalize(p) == normalize(t) for p, t in zip(plugged, truth, strict=True)) / 5
    assert result.loyalty["baseline"].value == 1.0 and result.loyalty["plugged"].value == pytest.approx(agree)
    assert result.answers["plugged"] == plugged
    assert {k: e.value for k, e in result.accuracy["plugged"].items()} == score(items, plugged)
    retention = result.retention["plugged"].value
    assert retention == pytest.approx(score(items, plugged)["headline"] / (2 / 3))
    costs = result.costs
    assert costs["plugged"]["visual_tokens_last_layer"] < costs["baseline"]["visual_tokens_last_layer"]
    assert costs["baseline"]["visual_tokens"] == 16 and costs["plugged"]["prefill_gflops"] > 0


def _answer_with(model, processor, items, plugin):
    with vtoken.attach(model, plugin):
        return _answer(model, processor, "llava", items, 3)


def test_score_uses_each_lines_metric():
    description = "there are 1 objects : top left small red circle ."
    items = [
        VQAItem(Path("x.png"), "q", "Red.", "colour"),
        VQAItem(Path("x.png"), "q", description, "describe", metric="synthetic_objects"),
        VQAItem(Path("x.png"), "q", "a red circle", "caption"),
    ]
    result = score(
        items, ["red", "there are 1 objects : top left small red circle , top large red star .", "red"]
    )
    assert result == {
        "caption": 0.0,
        "colour": 1.0,
        "describe": pytest.approx(2 / 3),
        "headline": pytest.approx(5 / 9),
    }
    assert score(items[2:], ["red"], "token_f1")["caption"] == pytest.approx(2 / 3)  # --metric token_f1


def test_bad_datasets_are_explained(tmp_path):
    with pytest.raises(vtoken.UnsupportedInputError, match="does not exist"):
        load_jsonl(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "a.png", "question": "q"}\n')
    with pytest.raises(vtoken.UnsupportedInputError, match="bad.jsonl:1: .*'answer'"):
        load_jsonl(bad)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(vtoken.UnsupportedInputError, match="no questions"):
        load_jsonl(empty)


def test_eval_vqa_command_smoke_20_items(tmp_path, capsys):
    data = _dataset(tmp_path, ["red"] * 20)
    out = tmp_path / "result.json"
    code = main(
        [
            "eval",
            "vqa",
            "--model",
            "tiny:qwen2_vl",
            "--data",
            str(data),
            "--plugin",
            "token_pruning",
            "--max-new-tokens",
            "2",
            "--batch-size",
            "8",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    result = json.loads(out.read_text())
    assert result["items"] == 20 and set(result["accuracy"]) == {"baseline", "plugged"}
    loyalty = result["loyalty"]["plugged"]
    assert loyalty["low"] <= loyalty["value"] <= loyalty["high"] and loyalty["n"] == 20
    assert len(result["provenance"]["commit"]) == 40 and result["provenance"]["versions"]["torch"]
    assert "loyalty" in capsys.readouterr().out


def test_bench_accuracy_runs_every_setting_and_skips_what_cannot_run(tmp_path, capsys):
    from vtoken_plugins.token_pruning import TokenPruning

    data = _dataset(tmp_path, ["red"] * 4)
    out = tmp_path / "bench"
    code = main(
        [
            "bench",
            "accuracy",
            "--model",
            "tiny:llava",
            "--data",
            str(data),
            "--plugin",
            "token_pruning",
            "--max-new-tokens",
            "2",
            "--out-dir",
            str(out),
        ]
    )
    assert code == 0
    result = json.loads((out / "results.json").read_text())
    table = (out / "results.md").read_text()
    assert table.count("\n| token_pruning:") == 3 * (len(result["accuracy"]) - 1)  # quality, families, costs
    for plot in ("accuracy.png", "costs.png"):  # real PNG files with content
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / plot).stat().st_size > 5000
    runnable = {f"token_pruning:{k}" for k in TokenPruning.bench_settings() if not k.startswith("learned")}
    assert set(result["accuracy"]) == {"baseline"} | runnable  # no predictors trained for tiny:llava
    dense = result["costs"]["baseline"]["visual_tokens"]
    for label in runnable:
        assert result["costs"][label]["visual_tokens_last_layer"] < dense


def test_eval_vqa_in_bfloat16_reports_first_token_time_and_no_cpu_memory_figure(tmp_path, capsys):
    data, out = _dataset(tmp_path, ["red"] * 4), tmp_path / "result.json"
    argv = ["eval", "vqa", "--model", "tiny:llava", "--data", str(data), "--plugin", "token_pruning"]
    assert main([*argv, "--dtype", "bfloat16", "--max-new-tokens", "2", "--out", str(out)]) == 0
    costs = json.loads(out.read_text())["costs"]
    for label in ("baseline", "plugged"):
        assert costs[label]["first_token_ms"] > 0 and costs[label]["peak_gpu_mib"] is None
    printed = capsys.readouterr().out
    assert "first_token_ms" in printed and "not measured (CPU)" in printed


def test_sharded_vqa_in_processes_and_on_ray_equals_one_process(tmp_path, ray_cluster):
    """Shards of whole batches give the single-process answers, scores and token counts."""
    items = load_jsonl(_dataset(tmp_path, ["red", "blue", "green", "red", "blue"]))
    model, processor = tiny("llava")
    pruner = TokenPruning(scorer="fastv", keep_ratio=0.25)
    one = evaluate(model, processor, items, {"plugged": [pruner]}, batch_size=2, max_new_tokens=3)
    stacks = {"plugged": (["token_pruning"], ["token_pruning.scorer=fastv", "token_pruning.keep_ratio=0.25"])}
    for executor in ({"workers": 2}, {"ray_address": ray_cluster}):
        sharded = evaluate_sharded("tiny:llava", items, stacks, 2, 3, shard_batches=1, threads=1, **executor)
        assert sharded.answers == one.answers and sharded.scores == one.scores
        for label in ("baseline", "plugged"):
            for key in ("visual_tokens", "visual_tokens_last_layer", "prefill_gflops", "decode_steps"):
                assert sharded.costs[label][key] == pytest.approx(one.costs[label][key]), (label, key)
