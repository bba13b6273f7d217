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


@pytest.mark.parametrize("spec", ["tiny:llava", "synth-llava-tiny"])
def test_run_in_bfloat16_end_to_end(spec, capsys):
    argv = ["run", "--model", spec, "--plugin", "token_pruning", "--dtype", "bfloat16", "--device", "cpu"]
    assert main([*argv, "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "plugged:" in out and "time to first token" in out and "not measured (CPU)" in out


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("vtoken: error: ") and err.count("\n") == 1, err
    return err


def test_a_folder_without_a_model_is_a_one_line_error(tmp_path, capsys):
    assert main(["run", "--model", str(tmp_path)]) == 2
    assert "holds no config.json" in _one_line_error(capsys)
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')  # a config, but no VLM
    assert main(["run", "--model", str(tmp_path)]) == 2
    assert f"Cannot load a vision-language model from {tmp_path}" in _one_line_error(capsys)


def test_malformed_yaml_in_config_or_set_is_a_one_line_error(tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text("plugins:\n  - name: token_pruning\n    layers: [2, 3\n")
    assert main(["run", "--config", str(broken)]) == 2
    assert "broken.yaml is not valid YAML (line" in _one_line_error(capsys)
    assert main(["run", "--plugin", "token_pruning", "--set", "token_pruning.layers=[2"]) == 2
    assert "is not valid YAML" in _one_line_error(capsys)


@pytest.mark.parametrize(
    ("device", "message"),
    [("tpu", "Unknown device 'tpu'"), ("cuda:x", "Unknown device"), ("cuda:99", "cuda:99")],
)
def test_unknown_or_absent_devices_are_refused(device, message, capsys):
    assert main(["run", "--model", "tiny:llava", "--device", device]) == 2
    assert message in _one_line_error(capsys)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("command", [["run"], ["eval", "vqa", "--data", "x.jsonl"], ["bench", "accuracy"]])
def test_cuda_without_a_gpu_is_refused_not_run_on_the_cpu(command, capsys):
    assert main([*command, "--model", "tiny:llava", "--device", "cuda"]) == 2
    assert "torch sees no CUDA GPU" in _one_line_error(capsys)


def test_device_and_dtype_options_on_every_model_command():
    from vtoken.cli import build_parser

    parser = build_parser()
    for argv in (
        ["run"],
        ["eval", "vqa", "--data", "d"],
        ["bench"],
        ["bench", "speed"],
        ["bench", "accuracy"],
    ):
        args = parser.parse_args([*argv, "--device", "cuda:1", "--dtype", "float16"])
        assert (args.device, args.dtype) == ("cuda:1", "float16")
        assert (parser.parse_args(argv).device, parser.parse_args(argv).dtype) == ("cpu", "auto")
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["run", "--dtype", "float8"])
    assert exc.value.code == 2


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
    assert result["prefill_ratios"] == [result["prefill_ratio"]] and result["provenance"]["commit"]
    out = capsys.readouterr()
    assert "FLOPs predict" in out.out and "min / median / max" in out.out and "1 torch threads" in out.out
    assert "language model 8 x 256" in out.out and "torch threads: 1" in out.err


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
    monkeypatch.setattr("gradio.Blocks.launch", lambda self, **kw: calls.append((self, kw)))
    argv = ["demo", "--model", "tiny:llava", "--port", "7999", "--dtype", "bfloat16"]
    assert main([*argv, "--allow-model-dir", str(app.parent)]) == 0
    ((demo, kwargs),) = calls
    assert kwargs == {"server_name": "127.0.0.1", "server_port": 7999}
    menu = next(b for b in demo.blocks.values() if getattr(b, "label", "") == "model")
    assert [c[0] for c in menu.choices][-1] == str(app.parent)  # the folder named at launch
