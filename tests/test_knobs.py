"""Plugin knobs: widget descriptions derived from config dataclasses."""

from __future__ import annotations

import pytest
from vtoken_plugins.token_pruning import TokenPruning, TokenPruningConfig

from vtoken import ConfigError
from vtoken.knobs import config_knobs


def test_token_pruning_knobs_follow_the_config():
    knobs = {k.name: k for k in config_knobs(TokenPruningConfig, TokenPruning.knobs)}
    assert list(knobs) == list(TokenPruning.knobs)
    assert knobs["scorer"].kind == "choice" and "fastv" in knobs["scorer"].choices
    assert knobs["scorer"].default == "fastv"
    assert (knobs["keep_ratio"].kind, knobs["keep_ratio"].default) == ("float", 0.25)
    assert knobs["layers"].kind == "ints" and knobs["layers"].parse("1, 3") == (1, 3)
    assert knobs["keep_ratio"].help.startswith("fraction of each row's visual tokens kept")
    assert "FastV" in knobs["scorer"].help and "fraction of each row" not in knobs["scorer"].help


def test_knob_errors_name_the_problem():
    with pytest.raises(ConfigError, match="no field 'nope'"):
        config_knobs(TokenPruningConfig, ("nope",))
    with pytest.raises(ConfigError, match="No widget"):
        config_knobs(TokenPruningConfig, ("predictors",))
    layers = config_knobs(TokenPruningConfig, ("layers",))[0]
    with pytest.raises(ConfigError, match="comma-separated integers"):
        layers.parse("two")


def test_an_optional_int_is_an_int_knob_whose_empty_value_is_none():
    from vtoken_plugins.temporal_smoother import TemporalSmootherConfig

    knob = config_knobs(TemporalSmootherConfig, ("action_layer",))[0]
    assert (knob.kind, knob.default) == ("int", None)
    assert knob.parse(None) is None and knob.parse("") is None and knob.parse(2.0) == 2


def test_an_optional_float_is_a_float_knob_whose_empty_value_is_none():
    from vtoken_plugins.region_proposal import RegionProposalConfig

    knob = config_knobs(RegionProposalConfig, ("confidence_gate",))[0]
    assert (knob.kind, knob.default) == ("float", None)
    assert knob.parse(None) is None and knob.parse("") is None and knob.parse("0.5") == 0.5


def test_every_registered_plugins_knobs_have_their_docstring_help():
    from vtoken.registry import available_plugins, get_plugin_class

    built_in = [name for name, target in available_plugins().items() if target.startswith("vtoken_plugins.")]
    assert len(built_in) >= 5
    for name in built_in:
        plugin = get_plugin_class(name)
        for knob in config_knobs(plugin.config_class, plugin.knobs):
            assert knob.help, f"{name}.{knob.name} has no entry in its config's Args section"
    from vtoken_plugins.region_proposal import RegionProposalConfig

    grouped = {k.name: k.help for k in config_knobs(RegionProposalConfig, ("threshold", "max_boxes"))}
    assert grouped["threshold"] == grouped["max_boxes"] and "post-processing" in grouped["threshold"]
