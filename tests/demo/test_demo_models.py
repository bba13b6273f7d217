"""The demo's model menu (only what was offered at launch), layer slider and option help texts."""

from __future__ import annotations

import pytest

gr = pytest.importorskip("gradio", reason="needs the demo extra: pip install -e '.[demo]'")


@pytest.fixture(scope="module")
def two_layer_folder(tmp_path_factory):
    """A saved tiny LLaVA whose language model has 2 decoder layers (the tiny ones have 4)."""
    from vtoken.tiny import build_tiny

    model, processor = build_tiny("llava")
    model.model.language_model.layers = model.model.language_model.layers[:2]
    model.config.text_config.num_hidden_layers = 2
    folder = tmp_path_factory.mktemp("two_layers")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


def test_only_bundled_tiny_and_launch_folders_are_offered(app, two_layer_folder, tmp_path):
    offered = app.offered_models(two_layer_folder, [str(tmp_path)])
    assert offered[-2:] == (two_layer_folder, str(tmp_path))
    assert "tiny:llava" in offered and "synth-llava-tiny" in offered
    assert app.offered_models("tiny:qwen2_vl") == app.offered_models()  # names add no folder
    with pytest.raises(gr.Error, match="not one of this demo's models"):
        app.Models(offered).load("/etc")
    with pytest.raises(app.vtoken.ConfigError, match="nor a local model folder"):
        app.offered_models("/no/such/folder")
    with pytest.raises(app.vtoken.ConfigError, match="nor a local model folder"):
        app.main(["--allow-model-dir", "/no/such/folder"])


def test_layer_slider_follows_the_models_decoder_layers(app, two_layer_folder, tmp_path):
    models = app.Models(app.offered_models(two_layer_folder))
    assert app.layer_slider(models, "tiny:llava").maximum == 3
    assert app.layer_slider(models, two_layer_folder).maximum == 1
    demo = app.build_demo(two_layer_folder, samples=tmp_path, plugins=("token_pruning",), models=models)
    slider = next(
        b for b in demo.blocks.values() if getattr(b, "label", "") == "decoder layer of the heatmap"
    )
    assert (slider.minimum, slider.maximum, slider.value) == (0, 1, 1)
    dropdown = next(b for b in demo.blocks.values() if getattr(b, "label", "") == "model")
    assert [c[0] for c in dropdown.choices] == list(models.choices)
    on_pick = next(f for f in demo.fns.values() if (dropdown._id, "change") in f.targets)
    assert [o._id for o in on_pick.outputs] == [slider._id]  # picking a model resizes the slider
    assert on_pick.fn("tiny:llava").maximum == 3


def test_option_help_is_markdown_without_docstring_markup(app, tmp_path):
    demo = app.build_demo("tiny:llava", samples=tmp_path, plugins=("token_pruning",))
    infos = {b.label: b.info for b in demo.blocks.values() if getattr(b, "info", None)}
    assert {"scorer", "keep_ratio", "layers"} <= set(infos)
    for info in infos.values():
        assert "``" not in info and ":mod:" not in info and info.count("`") % 2 == 0
        assert len(info) <= 302
    assert "`1.0` is the do-nothing setting" in infos["keep_ratio"]
    assert infos["scorer"].endswith(" …") and '`"fastv"`' in infos["scorer"]


def test_short_help_cuts_after_a_clause_outside_parentheses(app):
    text = "first clause (with; inner. marks); second clause; " + "x" * 400
    assert app.short_help(text, 60) == "first clause (with; inner. marks); second clause …"
    assert app.short_help("short.", 60) == "short."


def test_a_launch_model_that_cannot_load_stops_the_launch_with_one_line(tmp_path, capsys):
    from vtoken.cli import main

    assert main(["demo", "--model", str(tmp_path)]) == 2  # a folder, but no model in it
    err = capsys.readouterr().err
    assert err.startswith("vtoken: error: ") and "holds no config.json" in err and err.count("\n") == 1
