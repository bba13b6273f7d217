"""``vtoken eval vqa``: accuracy per family, loyalty and costs of a plugin stack on a VQA JSONL file;
``vtoken eval rollout``: a VLA policy's success and costs under plugin stacks, on the same seeds."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vtoken.loading import load_model


def _eval_vqa(args: argparse.Namespace) -> int:
    import vtoken
    from vtoken.bench.provenance import provenance
    from vtoken.cli import default_model
    from vtoken.eval.vqa import evaluate, evaluate_sharded, load_jsonl

    specs = [*args.plugin, *args.config]
    plugins = vtoken.create_plugins(specs, overrides=args.set)  # bad plugins fail before any work
    items = load_jsonl(args.data, limit=args.limit)
    args.model = args.model or default_model()
    if args.workers > 1 or args.ray_address:
        stacks = {"plugged": (specs, args.set)} if plugins else {}
        result = evaluate_sharded(
            args.model, items, stacks, args.batch_size, args.max_new_tokens, args.metric,
            workers=args.workers, ray_address=args.ray_address, device=args.device, dtype=args.dtype,
            threads=args.threads,
        )  # fmt: skip
    else:
        model, processor = load_model(args.model, device=args.device, dtype=args.dtype)
        stacks = {"plugged": plugins} if plugins else {}
        result = evaluate(model, processor, items, stacks, args.batch_size, args.max_new_tokens, args.metric)
    print(result.format())
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        data = {"model": args.model, "provenance": provenance(args.device), **result.to_dict()}
        Path(args.out).write_text(json.dumps(data, indent=2))
    return 0


def _eval_rollout(args: argparse.Namespace) -> int:
    import torch

    from vtoken.bench.provenance import provenance
    from vtoken.robot.conditions import conditions_from_args
    from vtoken.robot.evaluation import evaluate_rollouts, write_outputs

    conditions = conditions_from_args(args.condition, args.conditions, args.plugin, args.config, args.set)
    result = evaluate_rollouts(
        args.model, args.env, conditions, args.episodes, seed0=args.seed0, workers=args.workers,
        ray_address=args.ray_address, shard_size=args.shard_size, gifs=args.gifs, out_dir=args.out_dir,
        threads=args.threads, device=args.device, dtype=args.dtype, env_kwargs=_env_kwargs(args.env_arg),
        compare=[_pair(text) for text in args.compare],
    )  # fmt: skip
    print(result.format())
    if args.out_dir:
        torch.set_num_threads(args.threads)  # provenance records the threads each job ran with
        facts = provenance(args.device) | {"workers": args.workers, "ray_address": args.ray_address}
        for path in write_outputs(result, args.out_dir, facts):
            print(f"wrote {path}")
    return 0


def _env_kwargs(items: list[str]) -> tuple[tuple[str, object], ...]:
    """``["max_steps=20", ...]`` -> ``(("max_steps", 20), ...)`` (values parsed as YAML)."""
    from vtoken.config import parse_yaml
    from vtoken.errors import ConfigError

    pairs = []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--env-arg {item!r} must look like name=value, e.g. max_steps=20")
        pairs.append((key.strip(), parse_yaml(raw, "--env-arg")))
    return tuple(pairs)


def _pair(text: str) -> tuple[str, str]:
    """``"smoother25:fastv25"`` -> ``("smoother25", "fastv25")``."""
    from vtoken.errors import ConfigError

    a, sep, b = text.partition(":")
    if not sep or not a.strip() or not b.strip():
        raise ConfigError(f"--compare {text!r} must look like A:B, two condition names")
    return a.strip(), b.strip()


def _add_rollout(evals: argparse._SubParsersAction) -> None:
    from vtoken.cli import add_device_args, add_plugin_args

    rollout = evals.add_parser(
        "rollout", help="a VLA policy's success, latency and costs under plugin stacks, same seeds"
    )
    rollout.add_argument(
        "--model", default="tabletop-vla-tiny",
        help="bundled VLA, exported folder, .pt checkpoint, or expert / random (scripted baselines)",
    )  # fmt: skip
    rollout.add_argument("--env", default="vtoken/TabletopReach-v0", help="registered task id")
    rollout.add_argument(
        "--env-arg", action="append", default=[], metavar="NAME=VALUE",
        help="keyword argument of the env (repeatable), e.g. max_steps=20 or camera=topview",
    )  # fmt: skip
    rollout.add_argument("--episodes", type=int, default=50, help="episodes per condition")
    rollout.add_argument("--seed0", type=int, default=0, help="first seed (seeds seed0 ... seed0+episodes-1)")
    rollout.add_argument(
        "--condition", action="append", default=[], metavar="NAME=SPEC[,SPEC...]",
        help="a plugin stack: plugin names, YAML files, plugin.field=value (repeatable)",
    )  # fmt: skip
    rollout.add_argument(
        "--conditions", action="append", default=[], metavar="FILE",
        help="YAML with a 'conditions:' mapping from names to plugin lists (repeatable)",
    )  # fmt: skip
    rollout.add_argument(
        "--compare", action="append", default=[], metavar="A:B",
        help="also compare condition A with condition B seed by seed (repeatable)",
    )  # fmt: skip
    add_plugin_args(rollout)
    add_parallel_args(rollout)
    rollout.add_argument("--shard-size", type=int, help="seeds per job (default: even split, at most 25)")
    rollout.add_argument("--threads", type=int, default=1, help="torch threads per job (default 1)")
    rollout.add_argument("--gifs", type=int, default=0, help="GIFs of the first N episodes per condition")
    rollout.add_argument(
        "--out-dir",
        help="write results.json, success.png, gifs/ and episodes/ here; a rerun into it resumes",
    )
    add_device_args(rollout)
    rollout.set_defaults(fn=_eval_rollout)


def add_parallel_args(parser: argparse.ArgumentParser) -> None:
    """``--workers`` and ``--ray-address`` (:mod:`vtoken.eval.executors`)."""
    parser.add_argument("--workers", type=int, default=1, help="worker processes on this machine")
    parser.add_argument(
        "--ray-address",
        help="run the jobs on this Ray cluster: auto, ray://host:10001, or local (start one here)",
    )


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``eval`` (with ``vqa``) to the main CLI's ``subparsers``."""
    from vtoken.bench.cli import add_metric_arg
    from vtoken.cli import add_device_args, add_plugin_args

    evals = subparsers.add_parser("eval", help="evaluations").add_subparsers(dest="eval", required=True)
    vqa = evals.add_parser("vqa", help="accuracy per family, loyalty and costs on a VQA JSONL file")
    vqa.add_argument("--model", help="bundled name, local directory or tiny:<family> (default: as run)")
    vqa.add_argument(
        "--data", required=True, help="JSONL with image, question, answer[, family, bbox, metric, headline]"
    )
    add_metric_arg(vqa)
    add_plugin_args(vqa)
    vqa.add_argument("--limit", type=int, help="only the first N questions")
    vqa.add_argument("--batch-size", type=int, default=16)
    vqa.add_argument("--max-new-tokens", type=int, default=64)
    vqa.add_argument("--out", help="write the result as JSON here")
    add_parallel_args(vqa)
    vqa.add_argument("--threads", type=int, help="torch threads per worker job (default: torch's)")
    add_device_args(vqa)
    vqa.set_defaults(fn=_eval_vqa)
    _add_rollout(evals)
