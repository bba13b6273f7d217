"""vtoken demo: ask a VLM about an image with and without token-efficiency plugins, side by side.

Launch with ``vtoken demo`` (or ``make demo``); ``--model`` picks the default model. Every plugin in
vtoken's registry appears with the options it lists in ``Plugin.knobs``, so a new plugin shows up
here without touching this file. Requests are queued: one generation runs at a time.
"""

from __future__ import annotations

import argparse
import functools
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image

import vtoken
from vtoken.ask import Answer, ask, kept_heatmap
from vtoken.knobs import Knob, config_knobs
from vtoken.loading import SAMPLE_QUESTION, load_model
from vtoken.registry import available_plugins, get_plugin_class

logger = logging.getLogger(__name__)
MAX_PIXELS = 4096 * 4096  # larger uploads are refused before any work is done
SAMPLE_SEEDS = (0, 1, 2, 3, 5, 8)
SAMPLE_QUESTIONS = (
    "what colour is the circle ?",
    "how many red objects are there ?",
    "describe the scene .",
)


@functools.lru_cache(maxsize=2)
def _model(spec: str):
    return load_model(spec)


def model_choices() -> list[str]:
    """Bundled models first, then the tiny random-weight ones (any local directory also works)."""
    from vtoken import zoo
    from vtoken.tiny import TINY_FAMILIES

    return [*zoo.available(), *(f"tiny:{f}" for f in TINY_FAMILIES)]


def plugin_knobs(names: Sequence[str] = ()) -> dict[str, list[Knob]]:
    """The main options of ``names`` (default: every registered plugin that loads), by plugin."""
    table = {}
    for name in names or available_plugins():
        try:
            cls = get_plugin_class(name)
            table[name] = config_knobs(cls.config_class, cls.knobs)
        except vtoken.VTokenError as exc:
            logger.warning("demo: leaving out plugin %s: %s", name, exc)
    return table


def sample_scenes(folder: Path) -> list[list[str]]:
    """``[image path, question]`` examples from the synthetic test split, written to ``folder``."""
    from vtoken.zoo.questions import sample
    from vtoken.zoo.scenes import split_seed

    examples = []
    for k, seed in enumerate(SAMPLE_SEEDS):
        scene, _ = sample(split_seed("test", seed))
        path = folder / f"scene_{seed}.png"
        if not path.exists():
            Image.fromarray(scene.image).save(path)
        examples.append([str(path), SAMPLE_QUESTIONS[k % len(SAMPLE_QUESTIONS)]])
    return examples


def build_stack(knobs: dict[str, list[Knob]], values: Sequence[Any]) -> list[vtoken.Plugin]:
    """Plugins from the flat widget values: per plugin, ``enabled`` then its knobs in order."""
    stack, i = [], 0
    for name, plugin_knobs_ in knobs.items():
        enabled, settings = values[i], values[i + 1 : i + 1 + len(plugin_knobs_)]
        i += 1 + len(plugin_knobs_)
        if enabled:
            options = {k.name: k.parse(v) for k, v in zip(plugin_knobs_, settings)}
            stack.append(vtoken.create_plugin(name, **options))
    return stack


def stats_rows(base: Answer, plugged: Answer) -> list[list[str]]:
    """``[metric, baseline, plugged, plugged / baseline]`` rows."""
    b, p = base.report, plugged.report
    pairs = [
        ("visual tokens at last layer", b.visual_last_layer, p.visual_last_layer, "{:.0f}"),
        ("prefill GFLOPs", b.prefill_flops.total / 1e9, p.prefill_flops.total / 1e9, "{:.4g}"),
        ("decode GFLOPs", b.decode_flops.total / 1e9, p.decode_flops.total / 1e9, "{:.4g}"),
        ("KV cache (KiB)", b.kv_bytes / 1024, p.kv_bytes / 1024, "{:.1f}"),
        ("prefill (ms)", b.prefill_s * 1e3, p.prefill_s * 1e3, "{:.1f}"),
        ("decode (ms)", b.decode_s * 1e3, p.decode_s * 1e3, "{:.1f}"),
    ]
    return [[name, fmt.format(x), fmt.format(y), f"{y / x:.3f}" if x else "-"] for name, x, y, fmt in pairs]


def compare(spec: str, image: Any, question: str, layer: int, knobs, values, max_new_tokens: int = 48):
    """Baseline and plugged answers, the heatmap at ``layer`` and the stats table.

    Raises:
        gr.Error: with a user-facing message for any bad input (never a stack trace).
    """
    if image is None:
        raise gr.Error("Upload an image or pick one of the sample scenes first.")
    if not isinstance(image, Image.Image):
        raise gr.Error("That file is not an image vtoken can read; upload a PNG or JPEG.")
    if image.width * image.height > MAX_PIXELS:
        raise gr.Error(f"The image is {image.width}x{image.height}; please upload one under 16 megapixels.")
    if not (question or "").strip():
        raise gr.Error("The question is empty: ask something about the image.")
    try:
        model, processor = _model(spec.strip())
        stack = build_stack(knobs, values)
        base = ask(model, processor, image, question, (), max_new_tokens)
        plugged = ask(model, processor, image, question, stack, max_new_tokens)
    except (vtoken.VTokenError, ValueError, OSError) as exc:
        raise gr.Error(str(exc)) from None
    layer = min(max(int(layer), 0), plugged.kept.shape[0] - 1)
    heatmap = kept_heatmap(image, plugged.kept[layer], plugged.grid)
    return base.text, plugged.text, heatmap, stats_rows(base, plugged), (image, plugged)


def redraw(layer: int, last) -> Image.Image | None:
    """The heatmap of the last result at another decoder layer."""
    if last is None:
        return None
    image, plugged = last
    layer = min(max(int(layer), 0), plugged.kept.shape[0] - 1)
    return kept_heatmap(image, plugged.kept[layer], plugged.grid)


def _knob_widget(knob: Knob):
    label, info = knob.name, knob.help[:300]
    if knob.kind == "choice":
        return gr.Dropdown(list(knob.choices), value=knob.default, label=label, info=info)
    if knob.kind == "bool":
        return gr.Checkbox(value=knob.default, label=label, info=info)
    if knob.kind == "ints":
        return gr.Textbox(value=", ".join(map(str, knob.default)), label=label, info=info)
    if knob.kind == "float" and 0.0 <= knob.default <= 1.0:
        return gr.Slider(0.01, 1.0, value=knob.default, step=0.01, label=label, info=info)
    return gr.Number(value=knob.default, label=label, info=info, precision=0 if knob.kind == "int" else None)


def build_demo(
    default_model: str | None = None, samples: Path | None = None, plugins: Sequence[str] = ()
) -> gr.Blocks:
    """The demo app (call ``.queue().launch()`` on it).

    Args:
        default_model: the model preselected (default: the bundled model, else ``tiny:llava``).
        samples: folder for the sample scene images (default: a new temporary folder).
        plugins: the plugins offered, in panel order (default: every registered plugin).
    """
    from vtoken.cli import default_model as fallback

    knobs = plugin_knobs(plugins)
    samples = samples or Path(tempfile.mkdtemp(prefix="vtoken_demo_"))
    with gr.Blocks(title="vtoken demo") as demo:
        gr.Markdown("# vtoken\nThe same question, unplugged and with token-efficiency plugins attached.")
        with gr.Row():
            with gr.Column():
                model = gr.Dropdown(
                    model_choices(), value=default_model or fallback(), allow_custom_value=True,
                    label="model", info="a bundled name, tiny:<family>, or a local HF model directory",
                )  # fmt: skip
                image = gr.Image(type="pil", label="image", sources=["upload", "clipboard"])
                question = gr.Textbox(value=SAMPLE_QUESTION, label="question", elem_id="question")
                gr.Examples(sample_scenes(samples), inputs=[image, question], label="sample scenes")
                values = []
                for name, plugin_knobs_ in knobs.items():
                    with gr.Accordion(name, open=True):
                        values.append(gr.Checkbox(value=name == "token_pruning", label=f"attach {name}"))
                        values.extend(_knob_widget(k) for k in plugin_knobs_)
                button = gr.Button("Ask", variant="primary")
            with gr.Column():
                base = gr.Textbox(label="answer without plugins", elem_id="answer_base")
                plugged = gr.Textbox(label="answer with plugins", elem_id="answer_plugged")
                layer = gr.Slider(0, 63, value=3, step=1, label="decoder layer of the heatmap")
                heatmap = gr.Image(label="visual tokens kept (dropped patches dimmed)", elem_id="heatmap")
                stats = gr.Dataframe(
                    headers=["metric", "baseline", "plugged", "ratio"], label="costs", elem_id="stats"
                )
        last = gr.State(None)

        def run(spec, img, text, at, *widget_values):
            return compare(spec, img, text, at, knobs, widget_values)

        outputs = [base, plugged, heatmap, stats, last]
        button.click(run, [model, image, question, layer, *values], outputs, api_name="ask")
        layer.change(redraw, [layer, last], heatmap, api_visibility="private")
    return demo


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="default model (bundled name, tiny:<family> or a directory)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    build_demo(args.model).queue(default_concurrency_limit=1).launch(
        server_name=args.host, server_port=args.port
    )


if __name__ == "__main__":
    main()
