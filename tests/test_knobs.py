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
