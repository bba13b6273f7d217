"""The spec_decoding benchmark's own machinery, on a few prompts (its figures come from the full run)."""

from __future__ import annotations

import torch
from vtoken_plugins.spec_decoding.bench import (
    INFERENCE_MODE,
    SETTINGS,
    _decoded,
    description_prompts,
    projection,
    run_speed,
)
from vtoken_plugins.spec_decoding.plugin import SpecDecoding

from vtoken.bench.shapes import QUICK
from vtoken.loading import load_model


def test_decoded_counts_tokens_after_the_first_up_to_the_end_of_sequence():
    new = torch.tensor([[5, 6, 3, 0, 0], [5, 6, 7, 8, 9]])
    assert _decoded(new, torch.tensor([3])) == 2 + 4


def test_speed_run_checks_outputs_and_reports_every_arm():
    model, processor = load_model("synth-llava-tiny")
    items = description_prompts(processor, "test", 2)
    result = run_speed(model, processor, items, 1, {"chain-d5": SETTINGS["chain-d5"]}, 1, 24, peers=True)
    assert {"greedy", INFERENCE_MODE, "chain-d5", "prompt-lookup", "assisted-1layer"} <= set(result)
    for arm in (INFERENCE_MODE, "chain-d5", "prompt-lookup", "assisted-1layer"):
        assert result[arm]["equal_to_greedy"] and result[arm]["decode_s"] > 0
    assert result["chain-d5"]["tokens_per_round"] > 2 and result["greedy"]["speedup"] == 1.0
    assert result[INFERENCE_MODE]["speedup_over_inference_mode"] == 1.0


def test_projection_prices_draft_and_verify_against_a_decode_step():
    out = projection({"chain-d5": 5.0}, {"chain-d5": SETTINGS["chain-d5"]}, repeats=1, shape=QUICK)
    priced = out["settings"]["chain-d5"]
    assert (
        priced["verify_over_step"] > 0 and priced["draft_over_step"] > 0 and priced["projected_speedup"] > 0
    )


def test_the_suite_speed_bench_leaves_it_out_with_the_reason():
    """`vtoken bench` times plugins on a random-weight model, which has no trained draft."""
    from vtoken.bench.speed import run_speed_all

    skipped: dict[str, str] = {}
    plugins = {"spec": SpecDecoding(SETTINGS["chain-d5"]), "off": SpecDecoding(enabled=False)}
    timed = run_speed_all(plugins, QUICK, repeats=1, skipped=skipped)
    assert set(timed) == {"off"} and set(skipped) == {"spec"} and "No trained draft" in skipped["spec"]
