"""The ``vtoken`` command: info, run, bench (speed, accuracy), eval (vqa) and zoo (train, export)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path

import torch
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

    bundled = zoo.available()
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
    from vtoken.ask import ask

    plugins = vtoken.create_plugins([*args.plugin, *args.config], overrides=args.set)  # before a long load
    image = load_image(args.image)
    args.model = args.model or default_model()
    model, processor = load_model(args.model, device=args.device, dtype=args.dtype)
    family = vtoken.resolve_family(model).name
    runs = {"baseline": []} if not plugins else {"baseline": [], "plugged": plugins}
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


def _emit(table: str, data: dict, out: str | None) -> int:
    """Print a result table and, with ``out``, write its data as JSON."""
    print(table)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(data, indent=2))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from vtoken.bench.speed import SHAPES
    from vtoken.bench.suite import FULL, QUICK_PLAN, markdown_table, run_bench, write_bench
    from vtoken.eval.vqa import load_jsonl

    plan = QUICK_PLAN if args.quick else FULL
    plan = replace(
        plan,
        per_family=args.per_family or plan.per_family,
        repeats=args.repeats or plan.repeats,
        shape=SHAPES[args.shape] if args.shape else plan.shape,
        device=args.device,
        dtype=args.dtype,
    )
    args.model = args.model or default_model()
    model, processor = load_model(args.model, device=args.device, dtype=args.dtype)
    items = load_jsonl(args.data) if args.data else None
    result = run_bench(model, processor, args.model, plan, tuple(args.plugin), items, Path(args.cache))
    header = (
        f"`{_bench_command(args)}`: {result.accuracy.items} questions; speed on a random-weight LLaVA with "
        f"{plan.shape.visual_tokens} visual tokens (576: LLaVA-1.5's token shape), {plan.repeats} "
        f"interleaved repetitions, medians; ratios are plugged / unplugged. Machine: {machine(args.device)}."
    )
    for path in write_bench(result, args.out_dir, header):
        print(f"wrote {path}", file=sys.stderr)
    print(header + "\n\n" + markdown_table(result))
    return 0


def _bench_command(args: argparse.Namespace) -> str:
    """The ``vtoken bench`` command line that reproduces a run (options left at defaults omitted)."""
    command = "vtoken bench" + (" --quick" if args.quick else "") + f" --model {args.model}"
    defaults = {"shape": None, "device": "cpu", "dtype": "auto"}
    return command + "".join(
        f" --{k} {getattr(args, k)}" for k, v in defaults.items() if getattr(args, k) != v
    )


def machine(device: str = "cpu") -> str:
    """The hardware a measurement ran on: the CPU, and the GPU when ``device`` uses one."""
    import os
    import platform

    cores, threads = os.cpu_count(), torch.get_num_threads()
    cpu = f"{platform.machine()}, {cores} CPU cores, torch {version('torch')}, {threads} threads"
    if device == "cpu" or not torch.cuda.is_available():
        return cpu
    gpu = torch.device(device if device.startswith("cuda") else "cuda")
    return f"{torch.cuda.get_device_name(gpu)} (CUDA {torch.version.cuda}), {cpu}"


def _bench_speed(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    import vtoken
    from vtoken.bench.speed import SHAPES, run_speed

    plugins = vtoken.create_plugins([*args.plugin, *args.config], overrides=args.set)
    if len(plugins) != 1:
        raise vtoken.ConfigError("vtoken bench speed times one plugin: give one --plugin or --config.")
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = SHAPES[args.shape or ("quick" if args.quick else "small")]
    result = run_speed(plugins[0], shape, args.repeats, device=args.device, dtype=args.dtype)
    return _emit(result.format(), asdict(result), args.out)


def _bench_accuracy(args: argparse.Namespace) -> int:
    from vtoken.bench.accuracy import run_accuracy, split_items
    from vtoken.bench.report import write_report
    from vtoken.eval.vqa import load_jsonl

    args.model = args.model or default_model()
    model, processor = load_model(args.model, device=args.device, dtype=args.dtype)
    items = load_jsonl(args.data) if args.data else split_items(Path(args.cache), args.per_family)
    result = run_accuracy(model, processor, items, args.plugin, args.batch_size, args.max_new_tokens)
    header = f"`vtoken bench accuracy --model {args.model}`, {result.items} questions"
    for path in write_report(result, args.out_dir, header):
        print(f"wrote {path}", file=sys.stderr)
    print(result.format())
    return 0


def _eval_vqa(args: argparse.Namespace) -> int:
    import vtoken
    from vtoken.eval.vqa import evaluate, load_jsonl

    plugins = vtoken.create_plugins([*args.plugin, *args.config], overrides=args.set)
    items = load_jsonl(args.data, limit=args.limit)
    args.model = args.model or default_model()
    model, processor = load_model(args.model, device=args.device, dtype=args.dtype)
    stacks = {"plugged": plugins} if plugins else {}
    result = evaluate(model, processor, items, stacks, args.batch_size, args.max_new_tokens)
    return _emit(result.format(), result.to_dict(), args.out)


def _add_plugin_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--plugin", action="append", default=[], help="plugin name (repeatable)")
    parser.add_argument("--config", action="append", default=[], help="YAML config file (repeatable)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="PLUGIN.FIELD=VALUE",
        help="override one config field (repeatable)",
    )


def _add_device_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help=f"where the model runs: {DEVICE_HELP} (default: cpu)")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=list(DTYPES),
        help="model weights' dtype (default: auto, the checkpoint's; float32 for tiny models)",
    )


def _add_shape_arg(parser: argparse.ArgumentParser) -> None:
    from vtoken.bench.speed import SHAPES

    parser.add_argument(
        "--shape",
        choices=list(SHAPES),
        help="random-weight model of the speed measurement: small (LLaVA-1.5's 576 visual tokens, "
        "16 x 768 language model; the default), quick, or llava-1.5-7b (LLaVA-1.5-7B's real shape; a GPU)",
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
    _add_plugin_args(run)
    _add_device_args(run)
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
    _add_device_args(demo)
    demo.add_argument("--port", type=int, default=7860)
    demo.add_argument("--host", default="127.0.0.1")
    demo.set_defaults(fn=_demo)
    bench_parser = sub.add_parser(
        "bench",
        help="every plugin's main settings vs the unplugged model: accuracy, loyalty, costs, speed",
        description="Without a subcommand: the whole benchmark (accuracy and costs on the bundled "
        "model's test split, speed on a random-weight LLaVA-1.5-shaped model), written to --out-dir.",
    )
    bench_parser.add_argument(
        "--quick", action="store_true", help="a few minutes: 10 questions per family, small speed model"
    )
    bench_parser.add_argument("--model", help="bundled name or local directory (default: the bundled model)")
    bench_parser.add_argument("--plugin", action="append", default=[], help="only these plugins (repeatable)")
    bench_parser.add_argument("--data", help="VQA JSONL file instead of the bundled test split")
    bench_parser.add_argument(
        "--per-family", type=int, help="test-split questions per family (default 300, quick 10)"
    )
    bench_parser.add_argument(
        "--repeats", type=int, help="interleaved speed repetitions (default 5, quick 3)"
    )
    bench_parser.add_argument("--cache", default="runs/data", help="where the test split is written")
    bench_parser.add_argument(
        "--out-dir", default="runs/bench", help="results.md, results.json and plots go here"
    )
    _add_device_args(bench_parser)
    _add_shape_arg(bench_parser)
    bench_parser.set_defaults(fn=_bench)
    bench = bench_parser.add_subparsers(dest="bench")
    speed = bench.add_parser(
        "speed",
        help="prefill/decode time of a plugin vs the unplugged model "
        "(random-weight LLaVA-1.5 token shape, interleaved repetitions, medians)",
    )
    _add_plugin_args(speed)
    speed.add_argument("--repeats", type=int, default=5)
    speed.add_argument("--quick", action="store_true", help="a small model (seconds, not minutes)")
    speed.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    _add_device_args(speed)
    _add_shape_arg(speed)
    speed.add_argument("--out", help="write the result as JSON here")
    speed.set_defaults(fn=_bench_speed)
    acc = bench.add_parser(
        "accuracy",
        help="every plugin's main settings vs the unplugged model on "
        "the bundled test split (or --data JSONL): accuracy, loyalty, costs",
    )
    acc.add_argument("--model", default="synth-llava-tiny", help="bundled name or local directory")
    acc.add_argument("--plugin", action="append", default=[], help="only these plugins (repeatable)")
    acc.add_argument("--data", help="VQA JSONL file instead of the bundled test split")
    acc.add_argument("--per-family", type=int, default=300, help="test-split questions per family")
    acc.add_argument("--cache", default="runs/data", help="where the test split is written")
    acc.add_argument("--batch-size", type=int, default=32)
    acc.add_argument("--max-new-tokens", type=int, default=64)
    acc.add_argument("--out-dir", default="runs/bench", help="results.md, results.json and plots go here")
    _add_device_args(acc)
    acc.set_defaults(fn=_bench_accuracy)
    evals = sub.add_parser("eval", help="evaluations").add_subparsers(dest="eval", required=True)
    vqa = evals.add_parser("vqa", help="accuracy per family, loyalty and costs on a VQA JSONL file")
    vqa.add_argument("--model", help="bundled name, local directory or tiny:<family> (default: as run)")
    vqa.add_argument("--data", required=True, help="JSONL with image, question, answer[, family, bbox]")
    _add_plugin_args(vqa)
    vqa.add_argument("--limit", type=int, help="only the first N questions")
    vqa.add_argument("--batch-size", type=int, default=16)
    vqa.add_argument("--max-new-tokens", type=int, default=64)
    vqa.add_argument("--out", help="write the result as JSON here")
    _add_device_args(vqa)
    vqa.set_defaults(fn=_eval_vqa)
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
