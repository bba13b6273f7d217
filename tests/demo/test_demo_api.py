"""The demo through its HTTP API (gradio_client): answers, heatmap, costs, and friendly errors."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

gradio_client = pytest.importorskip("gradio_client", reason="needs the demo extra: pip install -e '.[demo]'")

TOKEN_PRUNING = [True, "fastv", 0.25, "2", 1.0, 1.0]  # attach, scorer, keep_ratio, layers, decode ratios
ZIPVL_OFF = [False, 0.975, "mixed", 4, 2, True, False, 100]  # attach, then ZipVL.knobs in order
ZIPVL_ON = [True, 0.9, "mixed", 4, 2, True, False, 100]


@pytest.fixture(scope="module")
def client(demo_url):
    return gradio_client.Client(demo_url, verbose=False)


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "in.png"
    pixels = np.random.RandomState(7).randint(0, 256, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _ask(client, path, question="what is it ?", model="tiny:llava", plugin=TOKEN_PRUNING, layer=3, zipvl=()):
    upload = gradio_client.handle_file(str(path)) if path else None
    zipvl = zipvl or ZIPVL_OFF
    return client.predict(model, upload, question, layer, *plugin, *zipvl, api_name="/ask")


def test_ask_returns_both_answers_heatmap_and_costs(client, picture):
    base, plugged, heatmap, stats, details, marks = _ask(client, picture)
    assert details is None and marks is None  # token_pruning draws no charts: its heatmap shows what it did
    assert isinstance(base, str) and isinstance(plugged, str)
    pixels = np.asarray(Image.open(heatmap))
    assert pixels.ndim == 3 and pixels.shape[1] == 384 and pixels.std() > 0
    rows = {r[0]: r for r in stats["data"]}
    _, full, kept, _ = rows["visual tokens at last layer"]
    assert int(kept) == math.ceil(int(full) * 0.25)
    assert float(rows["prefill GFLOPs"][3]) < 1.0
    assert float(rows["KV cache after prefill (KiB)"][3]) < 1.0  # the prompt's cache shrinks
    assert rows["KV cache per generated token (KiB)"][3] == "1.000"  # each new token adds the same
    assert float(rows["decode GFLOPs per token"][1]) > 0 and int(rows["decode steps"][1]) > 0
    assert float(rows["time to first token (ms)"][1]) > 0
    assert rows["peak GPU memory (MiB)"][1:] == ["not measured (CPU)", "not measured (CPU)", "-"]


def test_without_plugins_both_answers_agree(client, picture):
    base, plugged, _, stats, _, _ = _ask(client, picture, plugin=[False, "fastv", 0.25, "2", 1.0, 1.0])
    assert base == plugged
    assert {r[0]: r for r in stats["data"]}["prefill GFLOPs"][3] == "1.000"


def test_zipvl_shows_its_per_layer_ratios_and_cache_by_precision(client, picture):
    off = [False, "fastv", 0.25, "2", 1.0, 1.0]
    _, _, _, stats, details, _ = _ask(client, picture, plugin=off, zipvl=ZIPVL_ON)
    assert float({r[0]: r for r in stats["data"]}["KV cache after prefill (KiB)"][3]) < 0.25
    pixels = np.asarray(Image.open(details))
    assert pixels.ndim == 3 and pixels.shape[1] > pixels.shape[0] and pixels.std() > 0  # two charts


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"path": None}, "Upload an image"),
        ({"question": "   "}, "question is empty"),
        ({"model": "/etc"}, "not in the list of choices"),  # only the offered models, never a folder
        ({"plugin": [True, "fastv", 0.25, "one", 1.0, 1.0]}, "comma-separated integers"),
        ({"plugin": [True, "fastv", 0.25, "0", 1.0, 1.0]}, "must start at 1 or later"),
    ],
)
def test_bad_inputs_give_a_friendly_message(client, picture, kwargs, message):
    kwargs = {"path": picture, **kwargs}
    with pytest.raises(Exception, match=message):
        _ask(client, **kwargs)


def test_huge_and_non_image_uploads_are_refused(app):
    gr = pytest.importorskip("gradio")
    knobs = app.plugin_knobs(("token_pruning",))
    values = [False] + [0] * len(knobs["token_pruning"])
    models = app.Models(("tiny:llava",))
    with pytest.raises(gr.Error, match="16 megapixels"):
        app.compare(models, "tiny:llava", Image.new("RGB", (5000, 4000)), "what ?", 0, knobs, values)
    with pytest.raises(gr.Error, match="not an image"):
        app.compare(models, "tiny:llava", "notes.txt", "what ?", 0, knobs, values)


def test_every_loadable_plugin_has_a_panel(app):
    from vtoken.registry import BUILTIN_PLUGINS, available_plugins

    panels = app.plugin_knobs()
    assert set(BUILTIN_PLUGINS) <= set(panels) <= set(available_plugins())
    assert "broken_import" not in panels  # the test suite's deliberately broken third-party plugin


def test_the_about_text_says_what_the_bundled_model_is(app):
    from vtoken.zoo.card import BUNDLED_MODEL_NOTE

    assert BUNDLED_MODEL_NOTE in app.ABOUT and "indicative only" in app.TIMING_NOTE


def test_speculative_decoding_marks_the_accepted_draft_tokens(app):
    """On the bundled model (its draft is trained): the plugged answer equals the baseline, the
    marked view spells it with draft and target pieces, the chart shows tokens per round."""
    knobs = app.plugin_knobs(("spec_decoding",))
    values = [True, "chain", 10, 7, 60, 0.5, "gate"]  # attach, then SpecDecoding.knobs in order
    assert len(values) == 1 + len(knobs["spec_decoding"])
    models = app.Models(("synth-llava-tiny",))
    scene = Image.open(app.sample_scenes(Path(tempfile.mkdtemp()))[0][0])
    question = "describe the scene ."
    base, plugged, _, stats, details, marks, _ = app.compare(
        models, "synth-llava-tiny", scene, question, 0, knobs, values
    )
    assert plugged == base and len(base.split()) > 8
    assert "".join(text for text, _ in marks).strip() == plugged
    assert {"draft", "target"} <= {label for _, label in marks}
    assert details is not None
    rows = {r[0]: r for r in stats}
    assert float(rows["decode wall time per token (ms)"][2]) > 0


def test_region_proposal_draws_its_map_and_crop_beside_the_answer(app):
    """On the bundled model with its trained twig: the details image shows the overlay."""
    knobs = app.plugin_knobs(("region_proposal",))
    values = [True, "twig", 0.15, 1, None, 0.0]  # attach, then RegionProposal.knobs in order
    assert len(values) == 1 + len(knobs["region_proposal"])
    models = app.Models(("synth-llava-tiny",))
    scene = Image.open(app.sample_scenes(Path(tempfile.mkdtemp()))[0][0])
    base, plugged, _, _, details, _, _ = app.compare(
        models, "synth-llava-tiny", scene, "what colour is the star ?", 0, knobs, values
    )
    assert details is not None and plugged.strip() and base.strip()
    gated = [True, "twig", 0.15, 1, 0.5, 0.1]  # the gate and the search, from the widgets
    answer, details = app.compare(
        models, "synth-llava-tiny", scene, "what colour is the star ?", 0, knobs, gated
    )[1::3]
    assert answer.strip() == base.strip() and details is not None  # sure of a colour: the single view
    values[1] = "none"  # no proposal: nothing to draw (and no chart)
    assert (
        app.compare(models, "synth-llava-tiny", scene, "what colour is the star ?", 0, knobs, values)[4]
        is None
    )


def test_rollout_view_plays_both_episodes(client):
    pytest.importorskip("vtoken.robot.envs")
    base, plugged, table = client.predict(
        "vtoken/TabletopPush-v0", "push the blue cube to the left", 3, 4, *TOKEN_PRUNING, *ZIPVL_OFF,
        api_name="/rollout",
    )  # fmt: skip
    rows = {r[0]: r for r in table["data"]}
    assert rows["steps"][1:3] == ["4", "4"]  # cut to 4 steps
    assert (
        float(rows["visual tokens kept (mean over layers and calls)"][2])
        < 64
        == float(rows["visual tokens kept (mean over layers and calls)"][1])
    )
    for path in (base, plugged):
        with Image.open(path) as gif:
            assert gif.n_frames >= 1 and gif.size[1] == 256


def test_rollout_view_refuses_a_wrong_instruction(client):
    pytest.importorskip("vtoken.robot.envs")
    with pytest.raises(gradio_client.exceptions.AppError, match="is not an instruction of"):
        client.predict(
            "vtoken/TabletopPush-v0", "fly away", 0, 4, *TOKEN_PRUNING, *ZIPVL_OFF, api_name="/rollout"
        )
