"""``vtoken bench`` (the whole benchmark), ``vtoken bench speed``, ``accuracy`` and ``peers``.

Wired into the main CLI by :func:`add_commands`; every run prints and records the command that
reproduces it, the torch threads, the machine and the git commit (:mod:`vtoken.bench.provenance`).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch

from vtoken.eval.scoring import DEFAULT_METRIC, METRICS
from vtoken.loading import load_model

OUT_DIR = "runs/bench"
PEERS_PYTHON = ".venv-peers/bin/python"
#: Options of ``vtoken bench`` a results header repeats when they differ from these defaults.
COMMAND_DEFAULTS = {
    "data": None, "plugin": [], "per_family": None, "repeats": None, "threads": 0, "shape": None,
    "device": "cpu", "dtype": "auto", "out_dir": OUT_DIR,
}  # fmt: skip


def bench_command(args: argparse.Namespace) -> str:
    """The ``vtoken bench`` command line that reproduces a run (options at their defaults omitted)."""
    words = ["vtoken bench", *(["--quick"] if args.quick else []), f"--model {args.model}"]
    for key, default in COMMAND_DEFAULTS.items():
        value = getattr(args, key)
        for one in value if isinstance(value, list) else [value]:
            if value != default:
                words.append(f"--{key.replace('_', '-')} {one}")
    return " ".join(words)


def bench_header(args: argparse.Namespace, result) -> str:
    """The ``results.md`` header: the command, what the figures are, where they were measured."""
    from vtoken import zoo
    from vtoken.zoo.card import BUNDLED_MODEL_NOTE

    acc, plan, where = result.accuracy, result.plan, result.provenance
    data = f"`{args.data}`" if args.data else "the bundled model's test split"
    own = [f"`{f}`" for f in acc.families if f not in acc.headline_families]
    lines = [f"`{bench_command(args)}`: {acc.items} questions of {data}, {len(acc.accuracy) - 1} settings."]
    if args.model in zoo.available():
        lines.append(f"> {BUNDLED_MODEL_NOTE}")
    lines.append(
        "Accuracy: per family, exact match after normalisation (lines marked `synthetic_objects`: "
        "object F1 of descriptions); the headline is the mean over the families "
        f"{', '.join(f'`{f}`' for f in acc.headline_families)}"
        + (f" ({', '.join(own)} reported on its own: it needs a crop the split does not give)" if own else "")
        + "; retention = plugged / unplugged headline; loyalty = agreement with the unplugged answers; "
        "in brackets 95% bootstrap intervals over questions (2,000 resamples, paired for retention), "
        "with the question counts in the column titles. Costs on this model, per question; decode runs "
        "until a batch's longest answer ends, so end-of-generation totals also measure answer length."
    )
    if result.speed:
        lines.append(
            f"Speed: {plan.shape.describe()} (only the token count is LLaVA-1.5's unless `--shape "
            f"llava-1.5-7b`); {plan.repeats} interleaved repetitions after 1 discarded warm-up."
        )
    for part, reasons in result.skipped.items():
        if reasons:
            left = "; ".join(f"`{label}`: {reason}" for label, reason in reasons.items())
            lines.append(f"Not in the {part} tables (could not attach there): {left}")
    dirty = f" with {len(where['dirty'])} uncommitted files" if where["dirty"] else ""
    commit = (where["commit"] or "unknown")[:12]
    lines.append(f"Machine: {where['machine']}. Code: commit {commit}{dirty}.")
    return "\n\n".join(lines)


def _bench(args: argparse.Namespace) -> int:
    from vtoken.bench.shapes import SHAPES
    from vtoken.bench.suite import FULL, QUICK_PLAN, run_bench, write_bench
    from vtoken.cli import default_model
    from vtoken.eval.vqa import load_jsonl

    plan = QUICK_PLAN if args.quick else FULL
    plan = replace(
        plan,
        per_family=args.per_family or plan.per_family,
        repeats=args.repeats or plan.repeats,
        shape=SHAPES[args.shape] if args.shape else plan.shape,
        device=args.device,
        dtype=args.dtype,
        threads=args.threads,
    )
    _threads(args.threads)
    args.model = args.model or default_model()
    model, processor = load_model(args.model, device=args.device, dtype=args.dtype)
    items = load_jsonl(args.data) if args.data else None
    result = run_bench(model, processor, args.model, plan, tuple(args.plugin), items, Path(args.cache))
    header = bench_header(args, result)
    paths = write_bench(result, args.out_dir, header)
    print((Path(args.out_dir) / "results.md").read_text())
    for path in paths:
        print(f"wrote {path}", file=sys.stderr)
    return 0


def _threads(threads: int) -> None:
    """Set torch's intra-op threads (0: keep torch's default) and say how many run."""
    if threads:
        torch.set_num_threads(threads)
    print(f"torch threads: {torch.get_num_threads()}", file=sys.stderr)


def _bench_speed(args: argparse.Namespace) -> int:
    import vtoken
    from vtoken.bench.provenance import provenance
    from vtoken.bench.shapes import SHAPES
    from vtoken.bench.speed import run_speed

    plugins = vtoken.create_plugins([*args.plugin, *args.config], overrides=args.set)
    if len(plugins) != 1:
        raise vtoken.ConfigError("vtoken bench speed times one plugin: give one --plugin or --config.")
    _threads(args.threads)
    shape = SHAPES[args.shape or ("quick" if args.quick else "small")]
    result = run_speed(plugins[0], shape, args.repeats, device=args.device, dtype=args.dtype)
    print(f"model: {shape.describe()}\n{result.format()}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        data = {"provenance": provenance(args.device), **asdict(result)}
        Path(args.out).write_text(json.dumps(data, indent=2))
    return 0


def _bench_accuracy(args: argparse.Namespace) -> int:
    from vtoken.bench.accuracy import run_accuracy, split_items
    from vtoken.bench.provenance import provenance
    from vtoken.bench.report import write_report
    from vtoken.eval.vqa import load_jsonl

    model, processor = load_model(args.model, device=args.device, dtype=args.dtype)
    items = load_jsonl(args.data) if args.data else split_items(Path(args.cache), args.per_family)
    result = run_accuracy(
        model, processor, items, args.plugin, args.batch_size, args.max_new_tokens, args.metric
    )
    header = f"`vtoken bench accuracy --model {args.model}`, {result.items} questions"
    extra = {"model": args.model, "provenance": provenance(args.device)}
    for path in write_report(result, args.out_dir, header, extra):
        print(f"wrote {path}", file=sys.stderr)
    print(result.format())
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``bench`` (with ``speed`` and ``accuracy``) to the main CLI's ``subparsers``."""
    from vtoken.cli import add_device_args, add_plugin_args

    bench = subparsers.add_parser(
        "bench",
        help="every plugin's main settings vs the unplugged model: accuracy, loyalty, costs, speed",
        description="Without a subcommand: the whole benchmark (accuracy and costs on the bundled "
        "model's test split, speed on a random-weight model with LLaVA-1.5's token count), written "
        "to --out-dir.",
    )
    bench.add_argument("--quick", action="store_true", help="10 questions per family, small speed model")
    bench.add_argument("--model", help="bundled name or local directory (default: the bundled model)")
    bench.add_argument("--plugin", action="append", default=[], help="only these plugins (repeatable)")
    bench.add_argument("--data", help="VQA JSONL file instead of the bundled test split")
    bench.add_argument("--per-family", type=int, help="test questions per family (default 300, quick 10)")
    bench.add_argument("--repeats", type=int, help="timed speed repetitions (default 5, quick 3)")
    _add_threads_arg(bench)
    bench.add_argument("--cache", default="runs/data", help="where the test split is written")
    bench.add_argument("--out-dir", default=OUT_DIR, help="results.md, results.json and plots go here")
    add_device_args(bench)
    _add_shape_arg(bench)
    bench.set_defaults(fn=_bench)
    sub = bench.add_subparsers(dest="bench")
    speed = sub.add_parser(
        "speed",
        help="prefill/decode time of a plugin vs the unplugged model (random-weight model with "
        "LLaVA-1.5's token count; a discarded warm-up, interleaved repetitions, min/median/max)",
    )
    add_plugin_args(speed)
    speed.add_argument("--repeats", type=int, default=5)
    speed.add_argument("--quick", action="store_true", help="a small model (seconds, not minutes)")
    _add_threads_arg(speed)
    add_device_args(speed)
    _add_shape_arg(speed)
    speed.add_argument("--out", help="write the result as JSON here")
    speed.set_defaults(fn=_bench_speed)
    _add_accuracy(sub, add_device_args)
    _add_peers(sub)


def _add_peers(sub: argparse._SubParsersAction) -> None:
    peers = sub.add_parser(
        "peers",
        help="kvpress's presses against zipvl and token_pruning at the same KV budgets, on the bundled "
        "test split (runs in .venv-peers: make peers-venv)",
        description="Runs `python -m vtoken.bench.peers` in the peers environment (kvpress needs "
        "transformers < 5.3 and patches transformers' attention functions when imported).",
    )
    from vtoken.bench.peers import add_peers_options

    add_peers_options(peers)
    peers.add_argument("--python", default=PEERS_PYTHON, help="the peers environment's interpreter")
    peers.set_defaults(fn=_bench_peers)


def _bench_peers(args: argparse.Namespace) -> int:
    import subprocess

    from vtoken.bench.peers import KVPRESS_VERSION
    from vtoken.errors import VTokenError

    if not Path(args.python).is_file():
        raise VTokenError(
            f"No peers environment at {args.python}: build it with `make peers-venv` (kvpress "
            f"{KVPRESS_VERSION} and transformers 5.2.0 layered over .venv), or pass --python."
        )
    from vtoken.bench.peers import peers_argv

    return subprocess.call([args.python, "-m", "vtoken.bench.peers", *peers_argv(args)])


def _add_accuracy(sub: argparse._SubParsersAction, add_device_args) -> None:
    acc = sub.add_parser(
        "accuracy",
        help="every plugin's main settings vs the unplugged model on "
        "the bundled test split (or --data JSONL): accuracy, loyalty, costs",
    )
    acc.add_argument("--model", default="synth-llava-tiny", help="bundled name or local directory")
    acc.add_argument("--plugin", action="append", default=[], help="only these plugins (repeatable)")
    acc.add_argument("--data", help="VQA JSONL file instead of the bundled test split")
    add_metric_arg(acc)
    acc.add_argument("--per-family", type=int, default=300, help="test-split questions per family")
    acc.add_argument("--cache", default="runs/data", help="where the test split is written")
    acc.add_argument("--batch-size", type=int, default=32)
    acc.add_argument("--max-new-tokens", type=int, default=64)
    acc.add_argument("--out-dir", default=OUT_DIR, help="results.md, results.json and plots go here")
    add_device_args(acc)
    acc.set_defaults(fn=_bench_accuracy)


def add_metric_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--metric",
        default=DEFAULT_METRIC,
        choices=list(METRICS),
        help="score of questions whose JSONL line names no metric: exact (normalised exact match, the "
        "default), token_f1 (for long answers) or synthetic_objects (the bundled scenes' descriptions)",
    )


def _add_threads_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")


def _add_shape_arg(parser: argparse.ArgumentParser) -> None:
    from vtoken.bench.shapes import SHAPES

    parser.add_argument(
        "--shape",
        choices=list(SHAPES),
        help="random-weight model of the speed measurement: small (LLaVA-1.5's 576 visual tokens, "
        "2 x 256 tower, 16 x 768 language model; the default), quick, long (4,096 visual tokens, "
        "8 x 768 language model: attention weighs), or llava-1.5-7b (LLaVA-1.5-7B's real shape, "
        "24 x 1024 tower, 32 x 4096 language model; a GPU)",
    )
