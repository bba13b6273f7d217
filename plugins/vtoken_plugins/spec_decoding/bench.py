"""Benchmark of ``spec_decoding`` on the bundled model's scene descriptions, against plain greedy
decoding and transformers' own speculative methods, plus a projection to a larger shape.

Measured (``python -m vtoken_plugins.spec_decoding.bench``, CPU, one thread by default):

- decode wall time of each setting against plain greedy ``generate`` on the same prompt batches,
  run interleaved (one discarded warm-up, then ``repeats`` rounds rotating the order). The decode
  time of a call is its wall time minus that of a ``max_new_tokens=1`` call on the same batch
  (the prefill, identical in every arm); a speculative arm's draft work is inside it;
- committed tokens per round (accepted drafts + the bonus token, EAGLE's accepted length) and
  accepted drafts per round; whether every output equals plain greedy's (lossless check);
- plain greedy decoding under ``torch.inference_mode``, the mode the speculative rounds run in
  (plain ``generate`` runs under ``no_grad``, with autograd's view and version tracking): the part of
  a speedup that the mode alone gives;
- peers at batch 1 (transformers refuses batch > 1 for both): prompt-lookup decoding and assisted
  generation with a one-layer truncation of the target as the assistant (same vision tower and
  tokenizer; a weak but training-free peer: no trained small VLM exists for this model);
- a projection: on a random-weight model with LLaVA-1.5's token count (``vtoken.bench.shapes.SMALL``),
  the time of a draft step and of a verify forward of ``N`` tokens relative to a decode step, and the
  speedup they imply at the accepted length measured here (labelled a projection: real drafts for
  that model do not exist, and the loop's own overhead is left out);

The scaling curve (accepted length against training steps) is :mod:`.scaling`'s.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

import vtoken
from vtoken_plugins.spec_decoding.config import SpecDecodingConfig
from vtoken_plugins.spec_decoding.plugin import SpecDecoding

# plain greedy decoding under ``torch.inference_mode`` (the speculative loop's rounds run in it; plain
# ``generate`` runs under ``no_grad``): how much of a speedup the mode alone would give
INFERENCE_MODE = "greedy-inference-mode"

SETTINGS: dict[str, SpecDecodingConfig] = {
    "chain-d5": SpecDecodingConfig(tree="chain", depth=5),
    "chain-d7": SpecDecodingConfig(tree="chain", depth=7),
    "chain-d10-stop0.5": SpecDecodingConfig(tree="chain", depth=10, stop_below=0.5),
    "tree-k2d8n12": SpecDecodingConfig(top_k=2, depth=8, total_tokens=12),
    "tree-k4d6n16": SpecDecodingConfig(top_k=4, depth=6, total_tokens=16),
    "eagle2-k10d6n60": SpecDecodingConfig(),
}


def description_prompts(processor, split: str, count: int) -> list[Any]:
    """The first ``count`` scene-description items of ``split``."""
    from vtoken.zoo.evaluate import split_items

    items = [it for it in split_items(split, max(count, 1) * 8) if it.family == "describe"]
    return items[:count]


def _batches(processor, items: list, size: int) -> list[dict[str, torch.Tensor]]:
    from vtoken.zoo.data import encode

    return [encode(processor, items[i : i + size], with_answers=False) for i in range(0, len(items), size)]


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def truncated_assistant(model: torch.nn.Module, layers: int = 1) -> torch.nn.Module:
    """A copy of ``model`` keeping its first ``layers`` decoder layers (vision tower and head shared
    in kind, copied in memory): a training-free assistant for transformers' assisted generation."""
    assistant = copy.deepcopy(model)
    language = vtoken.locate_parts(assistant).language_model
    language.layers = language.layers[:layers]
    assistant.config.get_text_config().num_hidden_layers = layers
    return assistant.eval()


def run_speed(
    model, processor, items: list, batch_size: int, settings: dict[str, SpecDecodingConfig], repeats: int,
    new_tokens: int, peers: bool,
) -> dict[str, Any]:  # fmt: skip
    """Interleaved decode timings of every arm over the batches of ``items`` (see the module).
    Every arm times its ``generate`` call alone (a speculative arm attaches its plugin first,
    untimed: users attach once and generate many times)."""
    batches = _batches(processor, items, batch_size)
    arms: dict[str, Callable[[dict], tuple[float, Any]]] = {
        "greedy": _plain_arm(model, max_new_tokens=new_tokens),
        INFERENCE_MODE: _inference_mode(_plain_arm(model, max_new_tokens=new_tokens)),
    }
    for label, config in settings.items():
        arms[label] = _spec_arm(model, config, new_tokens)
    if peers and batch_size == 1:
        assistant = truncated_assistant(model)
        arms["prompt-lookup"] = _plain_arm(model, max_new_tokens=new_tokens, prompt_lookup_num_tokens=5)
        arms["assisted-1layer"] = _plain_arm(model, max_new_tokens=new_tokens, assistant_model=assistant)
    prefill = _plain_arm(model, max_new_tokens=1)
    times = {label: [[] for _ in batches] for label in [*arms, "prefill"]}
    stats = {label: {"equal": True, "accepted": [], "drafted": [], "draft_s": 0.0} for label in arms}
    reference = [None] * len(batches)
    order = list(arms)
    total = (repeats + 1) * len(batches)
    with torch.no_grad(), tqdm(total=total, desc=f"spec bench b{batch_size}") as bar:
        for rep in range(repeats + 1):
            for i, batch in enumerate(batches):
                rotated = order[rep % len(order) :] + order[: rep % len(order)]
                for label in ["prefill", *rotated]:
                    seconds, out = (prefill if label == "prefill" else arms[label])(batch)
                    if rep == 0:
                        if label == "greedy":
                            reference[i] = out
                        continue  # the warm-up
                    times[label][i].append(seconds)
                    if label != "prefill":
                        _check(stats[label], out, reference[i], arms[label])
                bar.update()
    eos = torch.tensor(model.generation_config.eos_token_id).flatten()
    decoded = sum(_decoded(r[:, len(b["input_ids"][0]) :], eos) for r, b in zip(reference, batches))
    return _summary(times, stats, decoded)


def _decoded(new: torch.Tensor, eos: torch.Tensor) -> int:
    """Tokens per row after the first, up to the first end-of-sequence (included), summed."""
    ended = torch.isin(new, eos).int().cumsum(1)
    real = (ended == 0) | ((ended == 1) & torch.isin(new, eos))
    return int((real.sum(1) - 1).clamp(min=0).sum())


def _inference_mode(arm: Callable[[dict], tuple[float, Any]]) -> Callable[[dict], tuple[float, Any]]:
    def run(batch: dict) -> tuple[float, Any]:
        with torch.inference_mode():
            return arm(batch)

    return run


def _plain_arm(model, **options: Any) -> Callable[[dict], tuple[float, Any]]:
    return lambda batch: _timed(functools.partial(model.generate, **batch, **options))


def _spec_arm(model, config: SpecDecodingConfig, new_tokens: int) -> Callable[[dict], tuple[float, Any]]:
    def arm(batch: dict) -> tuple[float, Any]:
        with vtoken.attach(model, SpecDecoding(config)) as session:
            seconds, out = _timed(functools.partial(model.generate, **batch, max_new_tokens=new_tokens))
            arm.extras = session.report().extras["spec_decoding"]
        return seconds, out

    arm.extras = None
    return arm


def _check(stats: dict, out: torch.Tensor, reference: torch.Tensor, arm: Any) -> None:
    stats["equal"] &= bool(torch.equal(out, reference))
    extras = getattr(arm, "extras", None)
    if extras:
        stats["accepted"].append(extras["accepted_per_round"])
        stats["drafted"].append(extras["drafted_per_round"])
        stats["draft_s"] += extras["draft_s"]


def _summary(times: dict, stats: dict, decoded: int) -> dict[str, Any]:
    """Medians over repetitions of the summed decode time, with per-repetition speedups' range."""
    repeats, count = len(times["greedy"][0]), len(times["greedy"])

    def decode(label: str, rep: int) -> float:
        return sum(times[label][i][rep] - times["prefill"][i][rep] for i in range(count))

    out: dict[str, Any] = {"repeats": repeats, "batches": count, "decoded_tokens": decoded,
                           "threads": torch.get_num_threads()}  # fmt: skip
    base = [decode("greedy", r) for r in range(repeats)]
    mode = [decode(INFERENCE_MODE, r) for r in range(repeats)] if INFERENCE_MODE in stats else None
    for label in stats:
        own = [decode(label, r) for r in range(repeats)]
        speedups = [b / o for b, o in zip(base, own)]
        over_mode = None if mode is None else statistics.median(m / o for m, o in zip(mode, own))
        accepted = stats[label]["accepted"]
        mean_accepted = statistics.mean(accepted) if accepted else None
        out[label] = {
            "decode_s": statistics.median(own),
            "decode_s_range": [min(own), max(own)],
            "speedup": statistics.median(speedups),
            "speedup_range": [min(speedups), max(speedups)],
            "speedup_over_inference_mode": over_mode,  # against plain greedy in the loop's mode
            "tokens_per_s": decoded / statistics.median(own),
            "accepted_per_round": mean_accepted,
            "tokens_per_round": None if mean_accepted is None else mean_accepted + 1,
            "drafted_per_round": statistics.mean(stats[label]["drafted"]) if accepted else None,
            "equal_to_greedy": stats[label]["equal"],
            "draft_share": stats[label]["draft_s"] / max(sum(own), 1e-9) if accepted else None,
        }
    return out


def projection(
    tokens_per_round: dict[str, float],
    settings: dict[str, SpecDecodingConfig],
    repeats: int = 5,
    shape: Any = None,
    drafted: dict[str, float] | None = None,
) -> dict:
    """Draft-step and verify costs on the random-weight ``small`` shape, relative to a decode step,
    and the speedup they imply at each setting's measured tokens per round (see the module). A
    chain that stops early (``stop_below``) is costed at its measured mean length (``drafted``:
    draft tokens per round), rounded, instead of its depth."""
    from transformers import DynamicCache

    from vtoken.bench.shapes import SMALL, build_inputs, build_model
    from vtoken.compat import cache_argument
    from vtoken_plugins.spec_decoding.draft import DraftModel, DraftSpec

    shape = shape or SMALL
    model, inputs = build_model(shape), build_inputs(shape)
    draft = DraftModel(DraftSpec.from_target(model)).eval()
    head = model.get_output_embeddings()

    def median(fn: Callable[[], Any]) -> float:
        fn()
        return statistics.median(_timed(fn)[0] for _ in range(repeats))

    name = cache_argument(model.forward)  # "cache" from transformers 5.25 on
    with torch.no_grad():
        cache = DynamicCache()
        model(**inputs, **{name: cache}, use_cache=True)
        length = cache.get_seq_length()

        def forward(q: int) -> Callable[[], Any]:
            ids = inputs["input_ids"][:, -q:]
            mask = torch.ones(1, 1, q, length + q, dtype=torch.bool)

            def run() -> None:
                model(input_ids=ids, attention_mask=mask, position_ids=torch.arange(length, length + q)[None],
                      **{name: cache}, use_cache=True)  # fmt: skip
                for layer in cache.layers:
                    layer.keys, layer.values = layer.keys[:, :, :length], layer.values[:, :, :length]

            return run

        step = median(forward(1))
        past = (torch.randn(1, draft.spec.kv_heads, 120, draft.spec.head_dim),) * 2

        def draft_step(q: int) -> Callable[[], Any]:
            x = torch.randn(1, q, draft.spec.hidden_size)
            mask = torch.ones(1, q, 120 + q, dtype=torch.bool)
            return lambda: head(draft(x, x, None, torch.full((1, q), 120), mask, past)[0]).topk(max(q, 1))

        out = {"shape": shape.describe(), "decode_step_s": step, "settings": {}}
        for label, config in settings.items():
            top_k, depth, total = config.shape
            if config.stop_below > 0 and drafted and drafted.get(label):
                depth = max(1, round(drafted[label]))
                total = depth + 1
            verify, drafting = median(forward(total)), median(draft_step(top_k))
            tau = tokens_per_round.get(label)
            round_s = verify + depth * drafting
            out["settings"][label] = {
                "verify_over_step": verify / step,
                "draft_over_step": drafting / step,
                "projected_speedup": None if tau is None else tau * step / round_s,
            }
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="synth-llava-tiny")
    parser.add_argument("--prompts", type=int, default=48, help="test-split descriptions")
    parser.add_argument("--batch-sizes", default="1,4")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--out", default="demos/results/spec_decoding")
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--no-projection", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from vtoken.loading import load_model

    model, processor = load_model(args.model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    items = description_prompts(processor, "test", args.prompts)
    settings = {k: SETTINGS[k] for k in args.settings.split(",")}
    results: dict[str, Any] = {"model": args.model, "prompts": len(items), "new_tokens": args.new_tokens}
    for size in (int(s) for s in args.batch_sizes.split(",")):
        results[f"batch{size}"] = run_speed(
            model, processor, items, size, settings, args.repeats, args.new_tokens, not args.no_peers
        )
    if not args.no_projection:
        measured = {k: v for k, v in results["batch1"].items() if isinstance(v, dict) and k in settings}
        taus = {k: v["tokens_per_round"] for k, v in measured.items()}
        drafted = {k: v["drafted_per_round"] for k, v in measured.items()}
        results["projection"] = projection(taus, settings, drafted=drafted)
    (out / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
