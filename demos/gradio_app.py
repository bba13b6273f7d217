"""vtoken demo: ask a VLM about an image with and without token-efficiency plugins, side by side;
and run a robot episode with a bundled VLA unplugged and plugged, side by side.

Launch with ``vtoken demo`` (or ``make demo``); ``--model`` picks the default model. Visitors choose
among the bundled models, the tiny random-weight ones and the local folders named at launch
(``--model``, ``--allow-model-dir``): never any other folder the server can read. Every plugin in
vtoken's registry appears with the options it lists in ``Plugin.knobs``, so a new plugin shows up
here without touching this file. Requests are queued: one generation or episode runs at a time.
The robot rollout tab needs the robot extra (``pip install -e '.[robot]'``).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import io
import logging
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
from PIL import Image

import vtoken
from vtoken.ask import TIMING_NOTE, Answer, ask_pair, kept_heatmap
from vtoken.knobs import Knob, config_knobs
from vtoken.loading import DEVICE_HELP, DTYPES, SAMPLE_QUESTION, load_model, resolve_device
from vtoken.metrics import NOT_MEASURED
from vtoken.registry import available_plugins, get_plugin_class
from vtoken.zoo.card import BUNDLED_MODEL_NOTE

logger = logging.getLogger(__name__)
ABOUT = (
    "# vtoken\nThe same question, unplugged and with token-efficiency plugins attached.\n\n"
    f"*About the bundled model.* {BUNDLED_MODEL_NOTE}"
)
MAX_PIXELS = 4096 * 4096  # larger uploads are refused before any work is done
SAMPLE_SEEDS = (0, 1, 2, 3, 5, 8)
SAMPLE_QUESTIONS = (
    "what colour is the circle ?",
    "how many red objects are there ?",
    "describe the scene .",
)


@functools.lru_cache(maxsize=2)
def _load(spec: str, device: str, dtype: str):
    return load_model(spec, device=device, dtype=dtype)


@dataclass(frozen=True)
class Models:
    """The models the demo offers, and where they run.

    Args:
        choices: model specs a visitor may pick (nothing else is ever loaded).
        device: ``--device`` of the loaded models.
        dtype: ``--dtype`` of the loaded models.
    """

    choices: tuple[str, ...]
    device: str = "cpu"
    dtype: str = "auto"

    def get(self, spec: str):
        """``(model, processor)`` of an offered ``spec`` (the last two stay loaded).

        Raises:
            vtoken.UnsupportedModelError: ``spec`` is not offered, or holds no loadable model.
        """
        if spec not in self.choices:
            raise vtoken.UnsupportedModelError(
                f"{spec!r} is not one of this demo's models; whoever starts the demo can offer a local "
                "folder with --model or --allow-model-dir."
            )
        return _load(spec, self.device, self.dtype)

    def load(self, spec: str):
        """:meth:`get` for a visitor's request: any failure becomes a message, never a trace.

        Raises:
            gr.Error: ``spec`` is not offered, or cannot be loaded.
        """
        try:
            return self.get(spec)
        except (vtoken.VTokenError, ValueError, OSError) as exc:
            raise gr.Error(str(exc)) from None


def offered_models(model: str | None = None, allow_dirs: Sequence[str] = ()) -> tuple[str, ...]:
    """Bundled models, then the tiny random-weight ones, then the folders named at launch.

    Args:
        model: ``--model``: a bundled name, ``tiny:<family>`` or a model folder.
        allow_dirs: ``--allow-model-dir`` folders.

    Raises:
        vtoken.ConfigError: ``model`` is neither offered nor a folder, or a folder does not exist.
    """
    from vtoken import zoo
    from vtoken.tiny import TINY_FAMILIES

    builtin = (*zoo.available("vlm"), *(f"tiny:{f}" for f in TINY_FAMILIES))
    folders = [*([model] if model and model not in builtin else []), *allow_dirs]
    for folder in folders:
        if not Path(folder).is_dir():
            raise vtoken.ConfigError(
                f"Model {folder!r} is neither a bundled name ({', '.join(zoo.available()) or 'none'}), "
                f"nor tiny:<family> ({', '.join(TINY_FAMILIES)}), nor a local model folder."
            )
    return tuple(dict.fromkeys([*builtin, *folders]))


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


#: The cost table's rows: name, the value of a report (``None``: not measured), its format.
STATS: tuple[tuple[str, Callable[[vtoken.Report], float | None], str], ...] = (
    ("visual tokens at last layer", lambda r: r.visual_last_layer, "{:.0f}"),
    ("decode steps", lambda r: r.decode_steps, "{:.0f}"),
    ("prefill GFLOPs", lambda r: r.prefill_flops.total / 1e9, "{:.4g}"),
    ("decode GFLOPs per token", lambda r: r.decode_flops_per_token / 1e9, "{:.4g}"),
    ("KV cache after prefill (KiB)", lambda r: r.prefill_kv_bytes / 1024, "{:.1f}"),
    ("KV cache per generated token (KiB)", lambda r: r.kv_bytes_per_token / 1024, "{:.2f}"),
    ("KV cache at end (KiB)", lambda r: r.kv_bytes / 1024, "{:.1f}"),
    ("prefill (ms)", lambda r: r.prefill_s * 1e3, "{:.1f}"),
    ("decode (ms)", lambda r: r.decode_s * 1e3, "{:.1f}"),
    ("decode wall time per token (ms)", lambda r: _scaled(r.decode_per_token_s, 1e3), "{:.2f}"),
    ("time to first token (ms)", lambda r: _scaled(r.first_token_s, 1e3), "{:.1f}"),
    ("peak GPU memory (MiB)", lambda r: _scaled(r.peak_memory_bytes, 2**-20), "{:.1f}"),
)


def stats_rows(base: Answer, plugged: Answer) -> list[list[str]]:
    """``[metric, baseline, plugged, plugged / baseline]`` rows."""
    rows = []
    for name, value, fmt in STATS:
        x, y = value(base.report), value(plugged.report)
        ratio = f"{y / x:.3f}" if x and y is not None else "-"
        rows.append([name, _cell(x, fmt), _cell(y, fmt), ratio])
    return rows


def _scaled(value: float | None, factor: float) -> float | None:
    return None if value is None else value * factor


def _cell(value: float | None, fmt: str) -> str:
    return NOT_MEASURED if value is None else fmt.format(value)


def charts_image(plugins: Sequence[vtoken.Plugin]) -> Image.Image | None:
    """The attached plugins' :meth:`~vtoken.Plugin.charts` of the last generation, one bar chart
    each, side by side (``None`` when no plugin has any)."""
    charts = [(title, bars) for plugin in plugins for title, bars in plugin.charts().items() if bars]
    if not charts:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(charts), figsize=(4.2 * len(charts), 3.2), squeeze=False)
    for ax, (title, bars) in zip(axes[0], charts):
        ax.bar(list(bars), list(bars.values()), color="tab:blue")
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", labelrotation=45, labelsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return Image.open(buffer)


def side_by_side(images: Sequence[Image.Image | None], height: int = 288) -> Image.Image | None:
    """The given images scaled to one height and joined left to right (``None`` when none)."""
    images = [i.resize((max(1, round(i.width * height / i.height)), height)) for i in images if i is not None]
    if not images:
        return None
    out = Image.new("RGB", (sum(i.width for i in images), height), "white")
    for x, picture in zip(np.cumsum([0] + [i.width for i in images[:-1]]), images):
        out.paste(picture.convert("RGB"), (int(x), 0))
    return out


def compare(
    models: Models, spec: str, image: Any, question: str, layer: int, knobs, values, max_new_tokens: int = 48
):
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
    model, processor = models.load(spec)
    try:
        stack = build_stack(knobs, values)
        base, plugged = ask_pair(model, processor, image, question, stack, max_new_tokens)
    except (vtoken.VTokenError, ValueError, OSError) as exc:
        raise gr.Error(str(exc)) from None
    layer = min(max(int(layer), 0), plugged.kept.shape[0] - 1)
    heatmap = kept_heatmap(image, plugged.kept[layer], plugged.grid)
    details = side_by_side([o for p in stack if (o := p.overlay(image)) is not None] + [charts_image(stack)])
    marks = token_marks(processor, stack)
    return base.text, plugged.text, heatmap, stats_rows(base, plugged), details, marks, (image, plugged)


def token_marks(processor, plugins: Sequence[vtoken.Plugin]) -> list[tuple[str, str | None]] | None:
    """The plugged answer piece by piece with the plugins' :meth:`~vtoken.Plugin.token_marks` labels
    (e.g. draft tokens the target accepted), or ``None`` when no plugin labels tokens."""
    marks = next((m for p in plugins if (m := p.token_marks())), None)
    if not marks:
        return None
    ids, pieces, before = [], [], ""
    for token, label in marks:
        ids.append(token)
        text = processor.batch_decode([ids], skip_special_tokens=True)[0]
        pieces.append((text[len(before) :], label))
        before = text
    return [(text, label) for text, label in pieces if text]


def redraw(layer: int, last) -> Image.Image | None:
    """The heatmap of the last result at another decoder layer."""
    if last is None:
        return None
    image, plugged = last
    layer = min(max(int(layer), 0), plugged.kept.shape[0] - 1)
    return kept_heatmap(image, plugged.kept[layer], plugged.grid)


def layer_slider(models: Models, spec: str) -> gr.Slider:
    """The heatmap slider's range for ``spec``: its decoder layers, the last one selected."""
    last = vtoken.locate_parts(models.load(spec)[0]).num_layers - 1
    return gr.Slider(minimum=0, maximum=last, value=last, step=1)


def short_help(text: str, limit: int = 300) -> str:
    """``text`` (Markdown) whole if it fits in ``limit`` characters, else cut after its last clause
    (``;`` or ``.``) that fits and lies outside any parenthesis and code span, with an ellipsis."""
    if len(text) <= limit:
        return text
    balanced = lambda s: s.count("(") == s.count(")") and s.count("`") % 2 == 0  # noqa: E731
    cuts = [m.start() for m in re.finditer(r"[;.] ", text[:limit]) if balanced(text[: m.start()])]
    head = text[: cuts[-1]] if cuts else text[:limit].rsplit(" ", 1)[0]
    return head + " …"


def _knob_widget(knob: Knob):
    label, info = knob.name, short_help(knob.help)
    if knob.kind == "choice":
        return gr.Dropdown(list(knob.choices), value=knob.default, label=label, info=info)
    if knob.kind == "bool":
        return gr.Checkbox(value=knob.default, label=label, info=info)
    if knob.kind == "ints":
        return gr.Textbox(value=", ".join(map(str, knob.default)), label=label, info=info)
    if knob.kind == "float" and knob.default is not None and 0.0 <= knob.default <= 1.0:
        low = 0.0 if knob.default == 0.0 else 0.01  # a share; 0 where 0 is the default (off)
        return gr.Slider(low, 1.0, value=knob.default, step=0.01, label=label, info=info)
    return gr.Number(value=knob.default, label=label, info=info, precision=0 if knob.kind == "int" else None)


def plugin_panels(knobs: dict[str, list[Knob]], attached: str) -> list:
    """One folded panel per plugin (``attached``'s open and ticked): the flat widget list that
    :func:`build_stack` reads."""
    values = []
    for name, plugin_knobs_ in knobs.items():
        with gr.Accordion(name, open=name == attached):
            values.append(gr.Checkbox(value=name == attached, label=f"attach {name}"))
            values.extend(_knob_widget(k) for k in plugin_knobs_)
    return values


def play_episode(models: Models, task: str, instruction: str, seed, max_steps, knobs, values):
    """The rollout view's two episodes: GIF paths and the comparison table.

    Raises:
        gr.Error: with a user-facing message for any bad input.
    """
    from vtoken.robot.showcase import run_showcase

    if seed is None or seed < 0 or seed != int(seed):
        raise gr.Error("The seed must be a whole number >= 0.")
    if max_steps is not None and (max_steps < 0 or max_steps != int(max_steps)):
        raise gr.Error("Max steps must be a whole number >= 0 (0: the task's own length).")
    try:
        stack = build_stack(knobs, values)
        out = tempfile.mkdtemp(prefix="vtoken_rollout_")
        shown = run_showcase(
            task, instruction, int(seed), stack, out, int(max_steps or 0) or None, models.device, models.dtype
        )
    except (vtoken.VTokenError, ValueError, OSError) as exc:
        raise gr.Error(str(exc)) from None
    return str(shown.base_gif), str(shown.plugged_gif), shown.rows()


def rollout_tab(models: Models, knobs: dict[str, list[Knob]]) -> None:
    """Pick a task, an instruction and a seed; watch the bundled VLA unplugged and plugged."""
    if any(importlib.util.find_spec(m) is None for m in ("mujoco", "gymnasium")):
        gr.Markdown("The robot rollout view needs the robot extra: `pip install -e '.[robot]'`.")
        return
    from vtoken.robot.showcase import instructions, task_models

    tasks = list(task_models())
    gr.Markdown(
        "One episode of the task's bundled VLA (1.6M parameters, trained here) unplugged and one with "
        "the plugins below, same scene. GIFs: the frame | the kept visual tokens | the plugin's maps."
    )
    with gr.Row():
        with gr.Column():
            task = gr.Dropdown(tasks, value=tasks[0], label="task")
            first = instructions(tasks[0])  # a custom value reaches run_showcase, which names the valid ones
            instruction = gr.Dropdown(first, value=first[0], label="instruction", allow_custom_value=True)
            seed = gr.Number(value=0, precision=0, label="seed (draws the scene)")
            steps = gr.Slider(0, 150, value=0, step=1, label="max steps (0: the task's own length)")
            button = gr.Button("Run an episode", variant="primary")
            default = "temporal_smoother" if "temporal_smoother" in knobs else next(iter(knobs), "")
            values = plugin_panels(knobs, default)
        with gr.Column():
            with gr.Row():
                base = gr.Image(label="unplugged", type="filepath", elem_id="rollout_base")
                plugged = gr.Image(label="with plugins", type="filepath", elem_id="rollout_plugged")
            table = gr.Dataframe(
                headers=["metric", "unplugged", "plugged", "ratio"], label="episode", elem_id="rollout_stats"
            )
            gr.Markdown(TIMING_NOTE)

    def run(*args):
        return play_episode(models, *args[:4], knobs, args[4:])

    def choices(env_id):
        options = instructions(env_id)
        return gr.Dropdown(choices=options, value=options[0])

    button.click(run, [task, instruction, seed, steps, *values], [base, plugged, table], api_name="rollout")
    task.change(choices, task, instruction, api_visibility="private")


def build_demo(
    default_model: str | None = None,
    samples: Path | None = None,
    plugins: Sequence[str] = (),
    models: Models | None = None,
) -> gr.Blocks:
    """The demo app (call ``.queue().launch()`` on it).

    Args:
        default_model: the model preselected (default: the bundled model, else ``tiny:llava``).
        samples: folder for the sample scene images (default: a new temporary folder).
        plugins: the plugins offered, in panel order (default: every registered plugin).
        models: the models offered and where they run (default: the bundled and tiny ones and
            ``default_model``'s folder, on the CPU).
    """
    from vtoken.cli import default_model as fallback

    default_model = default_model or fallback()
    models = models or Models(offered_models(default_model))
    knobs = plugin_knobs(plugins)
    samples = samples or Path(tempfile.mkdtemp(prefix="vtoken_demo_"))
    with gr.Blocks(title="vtoken demo") as demo, gr.Tabs():
        with gr.Tab("ask about an image"):
            _ask_tab(models, knobs, samples, default_model)
        with gr.Tab("robot rollout"):
            rollout_tab(models, knobs)
    return demo


def _ask_tab(models: Models, knobs: dict[str, list[Knob]], samples: Path, default_model: str) -> None:
    """Ask about an image unplugged and plugged: answers, heatmap, costs, the plugins' drawings."""
    gr.Markdown(ABOUT)
    with gr.Row():
        with gr.Column():
            model = gr.Dropdown(
                list(models.choices), value=default_model, label="model",
                info="bundled, `tiny:<family>` (random weights), or a folder named when the demo started",
            )  # fmt: skip
            image = gr.Image(type="pil", label="image", sources=["upload", "clipboard"])
            question = gr.Textbox(value=SAMPLE_QUESTION, label="question", elem_id="question")
            gr.Examples(sample_scenes(samples), inputs=[image, question], label="sample scenes")
            button = gr.Button("Ask", variant="primary")  # above the plugin panels: in view
            values = plugin_panels(knobs, "token_pruning")
        with gr.Column():
            base = gr.Textbox(label="answer without plugins", elem_id="answer_base")
            plugged = gr.Textbox(label="answer with plugins", elem_id="answer_plugged")
            last = vtoken.locate_parts(models.get(default_model)[0]).num_layers - 1
            layer = gr.Slider(0, last, value=last, step=1, label="decoder layer of the heatmap")
            heatmap = gr.Image(label="visual tokens kept (dropped patches dimmed)", elem_id="heatmap")
            stats = gr.Dataframe(
                headers=["metric", "baseline", "plugged", "ratio"], label="costs", elem_id="stats"
            )
            details = gr.Image(
                label="plugin details (last generation: what the plugins found, their charts)",
                elem_id="details",
            )
            marks = gr.HighlightedText(
                label="answer with plugins, token by token (spec_decoding: the draft's accepted tokens)",
                elem_id="marks", combine_adjacent=True, color_map={"draft": "green", "target": "gray"},
            )  # fmt: skip
            gr.Markdown(TIMING_NOTE)
    last = gr.State(None)

    def run(spec, img, text, at, *widget_values):
        return compare(models, spec, img, text, at, knobs, widget_values)

    outputs = [base, plugged, heatmap, stats, details, marks, last]
    button.click(run, [model, image, question, layer, *values], outputs, api_name="ask")
    layer.change(redraw, [layer, last], heatmap, api_visibility="private")

    def slider_for(spec):
        return layer_slider(models, spec)

    model.change(slider_for, model, layer, api_visibility="private")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="default model (bundled name, tiny:<family> or a directory)")
    parser.add_argument(
        "--allow-model-dir", action="append", default=[], metavar="DIR", help="another folder to offer"
    )
    parser.add_argument("--device", default="cpu", help=DEVICE_HELP)
    parser.add_argument("--dtype", default="auto", choices=list(DTYPES))
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    models = Models(offered_models(args.model, args.allow_model_dir), resolve_device(args.device), args.dtype)
    build_demo(args.model, models=models).queue(default_concurrency_limit=1).launch(
        server_name=args.host, server_port=args.port
    )


if __name__ == "__main__":
    main()
