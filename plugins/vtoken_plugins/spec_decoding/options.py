"""Reading a ``generate`` call: its generation config, its model inputs, and what is refused.

Speculative decoding only replaces greedy search, so any option that changes the search, the scores
of a step in ways the verifier does not reproduce, or what ``generate`` returns is refused with the
option's name and what to do, never ignored.
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
    "do_sample": (False, None),
    "penalty_alpha": (None,),
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
    "min_length": (0, None),
    "min_new_tokens": (None, 0),
    "exponential_decay_length_penalty": (None,),
    "guidance_scale": (None, 1.0),
    "watermarking_config": (None,),
    "stop_strings": (None,),
    "prompt_lookup_num_tokens": (None,),
    "assistant_early_exit": (None,),
    "output_attentions": (False, None),
    "output_hidden_states": (False, None),
    "output_scores": (False, None),
    "output_logits": (False, None),
    "return_dict_in_generate": (False, None),
    "max_time": (None,),
    "use_cache": (True, None),
    "cache_implementation": (None, "dynamic"),
}

# generate() arguments that are not model inputs
REFUSED_ARGUMENTS = (
    "logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn", "assistant_model", "streamer",
    "negative_prompt_ids", "negative_prompt_attention_mask", "synced_gpus", "assistant_tokenizer", "tokenizer",
    "custom_generate",
)  # fmt: skip


def parse_generate(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[GenerationConfig, dict[str, Any]]:
    """The call's generation config (the model's, updated by the call) and its model inputs.

    Raises:
        UnsupportedInputError: an option speculative decoding cannot honour (see the module).
    """
    kwargs = dict(kwargs)
    if len(args) > 1:
        raise UnsupportedInputError("spec_decoding: pass generate's options by keyword (only input_ids positionally).")
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
                f"spec_decoding runs greedy decoding and does not support {name}={value!r}; leave it at "
                f"{neutral[0]!r}, or detach the plugin (or set spec_decoding.enabled=False) to use it."
            )
    if inputs.get("input_ids") is None:
        raise UnsupportedInputError("spec_decoding needs input_ids (with pixel_values), not inputs_embeds alone.")
    cache = inputs.get("past_key_values", inputs.get("cache"))
    if cache is not None and cache.get_seq_length() > 0:
        raise UnsupportedInputError("spec_decoding starts from an empty cache; do not pass a filled past_key_values.")
    if config.max_new_tokens is None and config.max_length is None:
        raise UnsupportedInputError("spec_decoding needs max_new_tokens (or max_length).")
    return config, inputs
