"""``vtoken eval vqa``: accuracy per family, loyalty and costs of a plugin stack on a VQA JSONL file."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vtoken.loading import load_model


def _eval_vqa(args: argparse.Namespace) -> int:
    import vtoken
    from vtoken.bench.provenance import provenance
    from vtoken.cli import default_model
    from vtoken.eval.vqa import evaluate, load_jsonl

    plugins = vtoken.create_plugins([*args.plugin, *args.config], overrides=args.set)
    items = load_jsonl(args.data, limit=args.limit)
    args.model = args.model or default_model()
    model, processor = load_model(args.model, device=args.device, dtype=args.dtype)
    stacks = {"plugged": plugins} if plugins else {}
    result = evaluate(model, processor, items, stacks, args.batch_size, args.max_new_tokens, args.metric)
    print(result.format())
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        data = {"model": args.model, "provenance": provenance(args.device), **result.to_dict()}
        Path(args.out).write_text(json.dumps(data, indent=2))
    return 0


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
    add_device_args(vqa)
    vqa.set_defaults(fn=_eval_vqa)
