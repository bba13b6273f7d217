"""``vtoken zoo`` commands: ``train``, ``export`` and ``export-split``.

Wire into the main CLI with ``add_commands(subparsers)``; also runnable as
``python -m vtoken.zoo.cli zoo train ...``.
"""

from __future__ import annotations

import argparse
from dataclasses import fields

from vtoken.zoo.config import TrainConfig
from vtoken.zoo.model import ZooModelConfig


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``zoo`` command (with ``train``, ``export``, ``export-split``) to ``subparsers``."""
    zoo = subparsers.add_parser("zoo", help="train and export the bundled synthetic-scene VLM")
    sub = zoo.add_subparsers(dest="zoo_command", required=True)
    train = sub.add_parser("train", help="train (or --resume) the bundled tiny LLaVA")
    add_dataclass_flags(train, TrainConfig, skip={"model"})
    add_dataclass_flags(train, ZooModelConfig, skip=set())
    train.add_argument("--resume", action="store_true", help="continue from RUN_DIR/last.pt")
    train.set_defaults(fn=_run_train)

    export = sub.add_parser("export", help="write a checkpoint as a loadable model folder")
    export.add_argument("--run-dir", default=TrainConfig.run_dir)
    export.add_argument("--name", default="synth-llava-tiny")
    export.add_argument("--out", default=None, help="folder (default: vtoken/zoo/models/NAME)")
    export.add_argument("--test-per-family", type=int, default=300)
    export.set_defaults(fn=_run_export)

    split = sub.add_parser("export-split", help="write a synthetic split as JSONL + PNG images")
    split.add_argument("out", help="JSONL path; images go to a folder beside it")
    split.add_argument("--split", default="test", choices=["train", "val", "test"])
    split.add_argument("--per-family", type=int, default=300)
    split.set_defaults(fn=_run_export_split)


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, skip: set[str]) -> None:
    defaults = cls()
    for f in fields(cls):
        if f.name in skip:
            continue
        value = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        else:
            parser.add_argument(flag, type=type(value), default=value)


def _run_train(args: argparse.Namespace) -> int:
    from vtoken.zoo.train import train

    model = ZooModelConfig(**{f.name: getattr(args, f.name) for f in fields(ZooModelConfig)})
    names = [f.name for f in fields(TrainConfig) if f.name != "model"]
    cfg = TrainConfig(model=model, **{n: getattr(args, n) for n in names})
    train(cfg, resume=args.resume)
    return 0


def _run_export(args: argparse.Namespace) -> int:
    from vtoken.zoo.export import export_checkpoint

    print(f"wrote {export_checkpoint(args.run_dir, args.name, args.out, args.test_per_family)}")
    return 0


def _run_export_split(args: argparse.Namespace) -> int:
    from vtoken.zoo.export import export_split

    path = export_split(args.out, args.split, args.per_family)
    print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> None:
    """Stand-alone entry point: ``python -m vtoken.zoo.cli zoo train ...``."""
    parser = argparse.ArgumentParser(prog="vtoken")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    raise SystemExit(args.fn(args))


if __name__ == "__main__":
    main()
