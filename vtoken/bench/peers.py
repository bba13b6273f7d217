"""A peer side by side: kvpress's presses against ``zipvl`` and ``token_pruning`` at the same KV budgets.

kvpress (NVIDIA, https://github.com/NVIDIA/kvpress) is the best-known KV-cache compression library
for transformers models. It knows nothing of images: its presses score every prompt entry alike and
drop the lowest-scoring share (``compression_ratio``) of each layer's prompt cache right after the
prefill (which they do not shorten). Here it runs on the bundled VLM exactly as documented,
``with press(model): model(...)`` for the prefill, then a greedy loop that gives new tokens their
true positions (as kvpress's own pipeline does: the compressed cache is shorter than the prompt).

One run, the same questions, batch size 1 for every setting (kvpress compresses batches to one
length per layer and does not handle padding), one metric:

1. the unplugged model through ``generate`` and through the kvpress loop without a press (a check:
   the two must answer alike);
2. ``zipvl``'s bench settings (both cache modes, both thresholds) and ``token_pruning``'s decode-time
   thinning, measuring the share of the unplugged KV cache each holds: after the prefill for
   ``zipvl`` (what it compresses), at the end for the thinning (which acts while decoding);
3. every press at each of those shares as its budget (``compression_ratio = 1 - share``), plus 0.5
   and 0.25.

kvpress 0.5.5 needs transformers < 5.3 and replaces transformers' attention functions when imported,
so it lives in its own virtual environment (``make peers`` builds ``.venv-peers``: transformers 5.2.0
and kvpress layered over ``.venv``); ``vtoken bench peers`` runs this module there.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

import vtoken
from vtoken.eval.vqa import RunStats, VQAItem, result_of
from vtoken.loading import build_prompt, load_image, to_model
from vtoken.metrics import cache_bytes

logger = logging.getLogger(__name__)

KVPRESS_VERSION = "0.5.5"
EXTRA_BUDGETS = (0.5, 0.25)
#: the presses compared, by name: a factory from ``compression_ratio``. SnapKV and PyramidKV read
#: the attention of the prompt's last ``window_size`` tokens: 16 here (their default 64 would be
#: 40% of a bundled prompt of ~155 tokens).
PRESS_NAMES = ("snapkv", "pyramidkv", "expected_attention", "tova", "knorm", "streaming_llm")


def make_press(name: str, compression_ratio: float) -> Any:
    """A kvpress press by name (imports kvpress: call only in its environment)."""
    if name not in PRESS_NAMES:
        raise vtoken.ConfigError(f"Unknown press {name!r}; known: {', '.join(PRESS_NAMES)}.")
    import kvpress

    factories: dict[str, Callable[[float], Any]] = {
        "snapkv": lambda r: kvpress.SnapKVPress(compression_ratio=r, window_size=16),
        "pyramidkv": lambda r: kvpress.PyramidKVPress(compression_ratio=r, window_size=16),
        "expected_attention": lambda r: kvpress.ExpectedAttentionPress(compression_ratio=r),
        "tova": lambda r: kvpress.TOVAPress(compression_ratio=r),
        "knorm": lambda r: kvpress.KnormPress(compression_ratio=r),
        "streaming_llm": lambda r: kvpress.StreamingLLMPress(compression_ratio=r),
    }
    return factories[name](compression_ratio)


def our_settings() -> dict[str, list[vtoken.Plugin]]:
    """vtoken's KV-compressing settings: zipvl's bench settings and token_pruning's decode thinning
    (the prompt's visual KV of layers >= 2 thinned to 25% and the generated KV to 50% after 8 steps)."""
    from vtoken_plugins.token_pruning import TokenPruning
    from vtoken_plugins.zipvl import ZipVL

    settings = {f"zipvl:{label}": [ZipVL(config)] for label, config in ZipVL.bench_settings().items()}
    thinning = TokenPruning(keep_ratio=1.0, layers=(2,), decode_visual_ratio=0.25, decode_keep_ratio=0.5)
    settings["token_pruning:decode-thinning"] = [thinning]
    return settings


@dataclass
class Answer:
    text: str
    report: vtoken.Report


def _inputs(model, processor, item: VQAItem) -> dict:
    family = vtoken.resolve_family(model).name
    prompt = build_prompt(processor, family, item.question)
    inputs = to_model(processor(images=[[load_image(item.image)]], text=[prompt], return_tensors="pt"), model)
    inputs.pop("labels", None)
    return inputs


def answer_plugged(
    model, processor, item: VQAItem, plugins: Sequence[vtoken.Plugin], max_new_tokens: int
) -> Answer:
    """Greedy ``generate`` with ``plugins`` attached (none: the unplugged model)."""
    inputs = _inputs(model, processor, item)
    with vtoken.attach(model, list(plugins)) as session, torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        report = session.report()
    text = processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]
    return Answer(" ".join(text.split()), report)


def answer_pressed(model, processor, item: VQAItem, press: Any, max_new_tokens: int) -> Answer:
    """Greedy answer with kvpress: the prefill under ``press`` (``None``: no press), then one token
    per step at its true position (the compressed cache is shorter than the prompt)."""
    from transformers import DynamicCache

    inputs = _inputs(model, processor, item)
    length, cache = inputs["input_ids"].shape[1], DynamicCache()
    eos = set(_eos_ids(model))
    with torch.no_grad():
        with press(model) if press is not None else contextlib.nullcontext():
            logits = model(**inputs, past_key_values=cache, use_cache=True).logits[:, -1]
        prefill_bytes, tokens = cache_bytes(cache), []
        for step in range(max_new_tokens):
            token = logits.argmax(-1)
            tokens.append(int(token))
            if int(token) in eos or step == max_new_tokens - 1:
                break
            position = torch.tensor([[length + step]], device=token.device)
            logits = model(input_ids=token[:, None], past_key_values=cache, position_ids=position).logits[
                :, -1
            ]
    report = vtoken.Report(family=vtoken.resolve_family(model).name, batch_size=1, prompt_tokens=length)
    report.decode_steps, report.prefill_kv_bytes, report.kv_bytes = (
        len(tokens) - 1,
        prefill_bytes,
        cache_bytes(cache),
    )
    text = processor.batch_decode([tokens], skip_special_tokens=True)[0]
    return Answer(" ".join(text.split()), report)


def _eos_ids(model) -> list[int]:
    eos = model.generation_config.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos or [])


def _run(items, answer: Callable[[VQAItem], Answer], label: str) -> RunStats:
    stats = RunStats()
    for item in tqdm(items, desc=label, unit="q", leave=False):
        got = answer(item)
        stats.answers.append(got.text)
        stats.reports.append(got.report)
    return stats


def budget_share(stats: RunStats, baseline: RunStats, at_end: bool) -> float:
    """The share of the unplugged KV cache a run holds (after the prefill, or at the end)."""
    pick = (lambda r: r.kv_bytes) if at_end else (lambda r: r.prefill_kv_bytes)
    return sum(map(pick, stats.reports)) / sum(map(pick, baseline.reports))


def run_peers(
    model,
    processor,
    items: Sequence[VQAItem],
    presses: Sequence[str] = PRESS_NAMES,
    max_new_tokens: int = 64,
    metric_name: str = "exact",
) -> tuple[dict[str, Any], dict[str, float]]:
    """Every setting on ``items``; returns the :class:`~vtoken.eval.vqa.VQAResult` as a dict (with a
    ``"budget"`` per label: the share of the unplugged cache it holds) and the budgets used."""
    runs: dict[str, tuple[list, RunStats]] = {}
    runs["baseline"] = (
        [],
        _run(items, lambda i: answer_plugged(model, processor, i, [], max_new_tokens), "baseline"),
    )
    runs["kvpress:no-press"] = (
        [],
        _run(items, lambda i: answer_pressed(model, processor, i, None, max_new_tokens), "no press"),
    )
    base, budgets = runs["baseline"][1], {}
    for label, plugins in our_settings().items():
        stats = _run(
            items, lambda i, p=plugins: answer_plugged(model, processor, i, p, max_new_tokens), label
        )
        runs[label] = (plugins, stats)
        budgets[label] = budget_share(stats, base, at_end=label.startswith("token_pruning"))
    shares = sorted({round(b, 2) for b in budgets.values()} | set(EXTRA_BUDGETS), reverse=True)
    for name in presses:
        for share in shares:
            press = make_press(name, 1.0 - share)
            label = f"kvpress:{name}@{share:.2f}"
            runs[label] = (
                [],
                _run(items, lambda i, p=press: answer_pressed(model, processor, i, p, max_new_tokens), label),
            )
            budgets[label] = budget_share(runs[label][1], base, at_end=False)
    result = result_of(items, runs, metric_name).to_dict()
    result["budget"] = budgets
    return result, {k: v for k, v in budgets.items() if not k.startswith("kvpress")}


#: ``--option``: (type, default, help) of the peers run, shared with ``vtoken bench peers``.
OPTIONS: dict[str, tuple[type, Any, str]] = {
    "model": (str, "synth-llava-tiny", "bundled name or local directory"),
    "per-family": (int, 50, "test questions per headline family"),
    "max-new-tokens": (int, 64, "answer length limit"),
    "cache": (str, "runs/data", "where the test split is written"),
    "out-dir": (str, "runs/peers", "peers.md, peers.json and peers.png go here"),
    "threads": (int, 0, "torch threads (0: torch's default)"),
}


def add_peers_options(parser: argparse.ArgumentParser) -> None:
    for name, (kind, default, text) in OPTIONS.items():
        parser.add_argument(f"--{name}", type=kind, default=default, help=f"{text} (default: {default})")
    parser.add_argument("--press", action="append", default=[], help=f"only these: {', '.join(PRESS_NAMES)}")


def peers_argv(args: argparse.Namespace) -> list[str]:
    """The command line of :func:`main` for parsed ``args`` (``vtoken bench peers`` forwards it)."""
    argv = []
    for name in OPTIONS:
        argv += [f"--{name}", str(getattr(args, name.replace("-", "_")))]
    for press in args.press:
        argv += ["--press", press]
    return argv


def main(argv: Sequence[str] | None = None) -> int:
    import kvpress  # noqa: F401  (fails early outside the peers environment)

    from vtoken.bench.accuracy import split_items
    from vtoken.bench.peers_report import write_peers_report
    from vtoken.loading import load_model

    parser = argparse.ArgumentParser(description="kvpress presses against zipvl and token_pruning")
    add_peers_options(parser)
    args = parser.parse_args(argv)
    logging.getLogger("kvpress").setLevel(logging.ERROR)  # warns on every prefill that LLaVA is untested
    if args.threads:
        torch.set_num_threads(args.threads)
    model, processor = load_model(args.model)
    items = [i for i in split_items(Path(args.cache), args.per_family) if i.headline]
    result, _ = run_peers(model, processor, items, args.press or PRESS_NAMES, args.max_new_tokens)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = {k: v for k, v in result.items() if k not in ("answers", "scores")}
    (out / "peers.json").write_text(json.dumps(summary, indent=1, default=str))
    (out / "peers_answers.json").write_text(json.dumps({k: result[k] for k in ("answers", "scores")}))
    command = " ".join(["vtoken bench peers", *(sys.argv[1:] if argv is None else argv)])
    print(write_peers_report(result, out, command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
