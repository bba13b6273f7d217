"""The ``vtoken`` command: info, run, demo; bench (:mod:`vtoken.bench.cli`), eval (:mod:`vtoken.eval.cli`)
and zoo (:mod:`vtoken.zoo.cli`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path

from tqdm.auto import tqdm

from vtoken.errors import VTokenError
from vtoken.loading import (
    DEVICE_HELP,
    DTYPES,
    SAMPLE_IMAGE,
    SAMPLE_QUESTION,
    load_image,
    load_model,
    resolve_device,
)
from vtoken.metrics import compare


def default_model() -> str:
    """The bundled trained model when one is installed, else a tiny random-weight LLaVA."""
    from vtoken import zoo

    bundled = zoo.available("vlm")
    return bundled[0] if bundled else "tiny:llava"


def _info(args: argparse.Namespace) -> int:
    from vtoken.families import FAMILIES
    from vtoken.registry import available_plugins

    print("vtoken", version("vtoken"))
    for pkg in ("torch", "transformers"):
        print(f"{pkg:<13}{version(pkg)}")
    print("\nPlugins:")
    for name, target in available_plugins().items() or {"(none installed)": ""}.items():
        print(f"  {name:<22}{target}")
    print("\nModel families:")
    for spec in FAMILIES.values():
        print(f"  {spec.name:<12}{', '.join(spec.architectures)}  [rope={spec.rope}, mask={spec.mask}]")
    return 0


def _run(args: argparse.Namespace) -> int:
    import vtoken
    from vtoken.ask import TIMING_NOTE, ask, warm_up

    plugins = vtoken.create_plugins([*args.plugin, *args.config], overrides=args.set)  # before a long load
    image = load_image(args.image)
    args.model = args.model or default_model()
    model, processor = load_model(args.model, device=args.device, dtype=args.dtype)
    family = vtoken.resolve_family(model).name
    runs = {"baseline": []} if not plugins else {"baseline": [], "plugged": plugins}
    warm_up(model, processor, image, args.question, plugins)
    results = {
        label: ask(model, processor, image, args.question, runs[label], args.max_new_tokens)
        for label in tqdm(runs, desc="generating", disable=not sys.stderr.isatty())
    }
    print(f"model:    {args.model} ({family})\nquestion: {args.question}")
    for label, answer in results.items():
        names = ", ".join(p.name for p in runs[label]) or "no plugins"
        print(f"{label + ':':<10}{answer.text}   [{names}]")
    print()
    print(compare({label: answer.report for label, answer in results.items()}))
    print(f"\n{TIMING_NOTE}")
    return 0


DEMO_APP = Path(__file__).resolve().parents[1] / "demos" / "gradio_app.py"


def load_demo_app():
    """The demo app module (``demos/gradio_app.py`` of a source checkout, which needs gradio)."""
    import importlib.util

    if not DEMO_APP.is_file():
        raise VTokenError(
            f"The demo app lives in a source checkout ({DEMO_APP} is missing; demos/ is not installed "
            "with the package): clone the repository and run `make demo`."
        )
    if importlib.util.find_spec("gradio") is None:
        raise VTokenError("The demo needs gradio: pip install -e '.[demo]' (or `make demo`).")
    spec = importlib.util.spec_from_file_location("vtoken_demo_app", DEMO_APP)
    app = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = app  # as an import would: dataclasses look their module up there
    spec.loader.exec_module(app)
    return app


def _demo(args: argparse.Namespace) -> int:
    app = load_demo_app()
    argv = ["--port", str(args.port), "--host", args.host, "--device", args.device, "--dtype", args.dtype]
    argv += ["--model", args.model] if args.model else []
    for folder in args.allow_model_dir:
        argv += ["--allow-model-dir", folder]
    app.main(argv)
    return 0


def add_plugin_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--plugin", action="append", default=[], help="plugin name (repeatable)")
    parser.add_argument("--config", action="append", default=[], help="YAML config file (repeatable)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="PLUGIN.FIELD=VALUE",
        help="override one config field (repeatable)",
    )


def add_device_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help=f"where the model runs: {DEVICE_HELP} (default: cpu)")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=list(DTYPES),
        help="model weights' dtype (default: auto, the checkpoint's; float32 for tiny models)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vtoken", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="list plugins, model families and versions").set_defaults(fn=_info)
    run = sub.add_parser("run", help="answer one question about one image, with and without plugins")
    run.add_argument(
        "--model",
        help="bundled name, local directory or tiny:<family> (default: the bundled model, else tiny:llava)",
    )
    run.add_argument("--image", default=str(SAMPLE_IMAGE), help="image file (default: a sample scene)")
    run.add_argument("--question", default=SAMPLE_QUESTION)
    add_plugin_args(run)
    add_device_args(run)
    run.add_argument("--max-new-tokens", type=int, default=32)
    run.set_defaults(fn=_run)
    demo = sub.add_parser("demo", help="the Gradio demo app (from a source checkout)")
    demo.add_argument("--model", help="default model (bundled name, tiny:<family> or a directory)")
    demo.add_argument(
        "--allow-model-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="a local model directory visitors may pick (repeatable; --model's directory is allowed too)",
    )
    add_device_args(demo)
    demo.add_argument("--port", type=int, default=7860)
    demo.add_argument("--host", default="127.0.0.1")
    demo.set_defaults(fn=_demo)
    from vtoken.bench.cli import add_commands as add_bench
    from vtoken.eval.cli import add_commands as add_eval

    add_bench(sub)
    add_eval(sub)
    from vtoken.zoo.cli import add_commands

    add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; vtoken's own errors (bad inputs, models, configs, devices) print one line
    ``vtoken: error: ...`` and exit 2, anything else is a bug and keeps its traceback."""
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "device", None):
            resolve_device(args.device)  # refuse an absent GPU before any work
        return args.fn(args)
    except VTokenError as exc:
        print("vtoken: error: " + " ".join(str(exc).split()), file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
