"""Reading a ``generate`` call: its generation config, its model inputs, and what is refused.

Speculative decoding replaces greedy search and multinomial sampling. It supports ``max_new_tokens``
/ ``max_length``, ``min_new_tokens`` / ``min_length``, ``eos_token_id``, ``pad_token_id``, sampling
with ``temperature``, ``top_k``, ``top_p`` and ``min_p``, ``max_time``, ``output_scores``,
``output_logits``, ``return_dict_in_generate`` and a streamer (batch 1). Any option that changes the
search, processes scores by the tokens before them (a tree verifies many prefixes at once), or asks
for what a tree forward does not give (attentions, hidden states) is refused with the option's name
and what to do, never ignored.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn
from transformers import GenerationConfig

from vtoken import UnsupportedInputError

# generation-config fields and the neutral values speculative decoding accepts
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "num_beams": (1, None),
    "num_beam_groups": (1, None),
    "num_return_sequences": (1, None),
    "penalty_alpha": (None,),
    "top_h": (None,),
    "typical_p": (1.0, None),
    "epsilon_cutoff": (0.0, None),
    "eta_cutoff": (0.0, None),
    "dola_layers": (None,),
    "repetition_penalty": (1.0, None),
    "encoder_repetition_penalty": (1.0, None),
    "no_repeat_ngram_size": (0, None),
    "bad_words_ids": (None,),
    "force_words_ids": (None,),
    "sequence_bias": (None,),
    "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "exponential_decay_length_penalty": (None,),
    "guidance_scale": (None, 1.0),
    "watermarking_config": (None,),
    "stop_strings": (None,),
    "prompt_lookup_num_tokens": (None,),
    "assistant_early_exit": (None,),
    "output_attentions": (False, None),
    "output_hidden_states": (False, None),
    "use_cache": (True, None),
    "cache_implementation": (None, "dynamic"),
}

# generate() arguments that are not model inputs
REFUSED_ARGUMENTS = (
    "logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn", "assistant_model",
    "negative_prompt_ids", "negative_prompt_attention_mask", "synced_gpus", "assistant_tokenizer",
    "tokenizer", "custom_generate",
)  # fmt: skip


def parse_generate(
    model: nn.Module, args: tuple, kwargs: dict[str, Any]
) -> tuple[GenerationConfig, dict[str, Any]]:
    """The call's generation config (the model's, updated by the call) and its model inputs.

    Raises:
        UnsupportedInputError: an option speculative decoding cannot honour (see the module).
    """
    kwargs = dict(kwargs)
    if len(args) > 1:
        raise UnsupportedInputError(
            "spec_decoding: pass generate's options by keyword (only input_ids positionally)."
        )
    if args:
        kwargs["input_ids"] = args[0]
    config = copy.deepcopy(kwargs.pop("generation_config", None) or model.generation_config)
    inputs = config.update(**kwargs)
    for name in REFUSED_ARGUMENTS:
        if inputs.get(name) is not None:
            raise UnsupportedInputError(
                f"spec_decoding does not support generate(..., {name}=...); detach the plugin (or set "
                "spec_decoding.enabled=False) to use it."
            )
    for name, neutral in NEUTRAL.items():
        value = getattr(config, name, None)
        if value not in neutral:
            raise UnsupportedInputError(
                f"spec_decoding does not support {name}={value!r}; leave it at "
                f"{neutral[0]!r}, or detach the plugin (or set spec_decoding.enabled=False) to use it."
            )
    if inputs.get("input_ids") is None:
        raise UnsupportedInputError(
            "spec_decoding needs input_ids (with pixel_values), not inputs_embeds alone."
        )
    cache = inputs.get("past_key_values", inputs.get("cache"))
    if cache is not None and cache.get_seq_length() > 0:
        raise UnsupportedInputError(
            "spec_decoding starts from an empty cache; do not pass a filled past_key_values."
        )
    streamer = inputs.get("streamer")
    if streamer is not None and inputs["input_ids"].shape[0] > 1:
        raise UnsupportedInputError(
            "spec_decoding streams batch size 1 only (as transformers' streamers do)."
        )
    if config.max_new_tokens is None and config.max_length is None:
        raise UnsupportedInputError("spec_decoding needs max_new_tokens (or max_length).")
    return config, inputs
