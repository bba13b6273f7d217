"""The ``vtoken`` command line."""

from __future__ import annotations

import pytest

from vtoken.cli import main


def test_info_lists_plugins_and_families(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "passthrough" in out and "LlavaForConditionalGeneration" in out and "transformers" in out


def test_run_prints_both_answers_and_reports(capsys):
    code = main(
        [
            "run",
            "--model",
            "tiny:qwen2_vl",
            "--plugin",
            "passthrough",
            "--set",
            "passthrough.scale=1.0",
            "--max-new-tokens",
            "3",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "baseline:" in out and "[no plugins]" in out and "plugged:" in out and "[passthrough]" in out
    assert "metric" in out and "prefill GFLOPs" in out and "KV cache" in out


def test_run_with_a_saved_model_directory(tmp_path, capsys):
    from vtoken.tiny import build_tiny

    model, processor = build_tiny("paligemma")
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert main(["run", "--model", str(tmp_path), "--max-new-tokens", "2"]) == 0
    assert "(paligemma)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--image", "/does/not/exist.png"], "does not exist"),
        (["--plugin", "nope"], "Unknown plugin 'nope'"),
        (["--model", "/no/such/dir"], "never downloads"),
        (["--model", "tiny:gpt"], "Unknown tiny family"),
        (["--question", "  "], "question is empty"),
        (["--set", "passthrough.scale=-1", "--plugin", "passthrough"], "passthrough.scale must be in"),
    ],
)
def test_run_bad_inputs_give_one_line_errors(argv, message, capsys):
    assert main(["run", *argv]) == 2
    assert message in capsys.readouterr().err


def test_run_rejects_a_file_that_is_not_an_image(tmp_path, capsys):
    bogus = tmp_path / "notes.png"
    bogus.write_text("not an image")
    assert main(["run", "--image", str(bogus)]) == 2
    assert "not an image file" in capsys.readouterr().err


def test_bench_speed_quick_writes_ratios(tmp_path, capsys):
    out = tmp_path / "speed.json"
    code = main(
        [
            "bench",
            "speed",
            "--plugin",
            "token_pruning",
            "--quick",
            "--repeats",
            "1",
            "--threads",
            "1",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    import json

    result = json.loads(out.read_text())
    assert result["repeats"] == 1 and 0 < result["prefill_flops_ratio"] < 1
    assert 0 < result["kv_bytes_ratio"] < 1 and result["prefill_ratio"] > 0
    assert "FLOPs predict" in capsys.readouterr().out


def test_bench_speed_needs_exactly_one_plugin(capsys):
    assert main(["bench", "speed", "--quick"]) == 2
    assert "one plugin" in capsys.readouterr().err


def test_demo_outside_a_source_checkout_says_what_to_do(tmp_path, monkeypatch, capsys):
    import vtoken.cli

    monkeypatch.setattr(vtoken.cli, "DEMO_APP", tmp_path / "demos" / "gradio_app.py")
    assert main(["demo"]) == 2
    assert "make demo" in capsys.readouterr().err


def test_demo_command_launches_the_app_file(monkeypatch):
    import vtoken.cli

    pytest.importorskip("gradio", reason="needs the demo extra")
    calls = []
    app = vtoken.cli.DEMO_APP
    assert app.is_file()
    monkeypatch.setattr("gradio.Blocks.launch", lambda self, **kw: calls.append(kw))
    assert main(["demo", "--model", "tiny:llava", "--port", "7999"]) == 0
    assert calls == [{"server_name": "127.0.0.1", "server_port": 7999}]
