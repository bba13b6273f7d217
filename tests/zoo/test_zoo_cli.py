"""``vtoken zoo`` command line: parsing and the split export."""

import argparse
import json

import pytest

from vtoken.zoo.cli import add_commands, main


def _parse(argv):
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_train_flags_reach_the_configs():
    args = _parse(
        ["zoo", "train", "--steps", "7", "--no-per-question-loss", "--text-layers", "2", "--resume"]
    )
    assert args.steps == 7 and args.per_question_loss is False and args.text_layers == 2 and args.resume


def test_export_split_command(tmp_path):
    with pytest.raises(SystemExit) as done:
        main(["zoo", "export-split", str(tmp_path / "t.jsonl"), "--per-family", "1", "--split", "val"])
    assert done.value.code == 0
    rows = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert len(rows) == 7 and all((tmp_path / r["image"]).is_file() for r in rows)
