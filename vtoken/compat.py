"""What differs between the transformers releases vtoken supports (see ``SUPPORTED_TRANSFORMERS``).

- The cache argument: transformers 5.25 renamed ``past_key_values`` to ``cache`` in every model's
  ``forward`` and in ``generate`` (the old name still works with a deprecation warning, but when both
  are given the new one wins). Hooks that read or swap the cache go through :func:`cache_argument`.
- The checkpoint layout of LLaVA-style models: releases before 5.23 name the weights differently
  (see :func:`vtoken.zoo.load`, which loads the bundled models strictly on every release).
"""

from __future__ import annotations

import inspect
from typing import Any

import transformers
from packaging.version import Version

SUPPORTED_TRANSFORMERS = ("5.2.0", "5.25.0")
"""Oldest and newest transformers releases the test suite verifies (``.ci/run`` runs both)."""

CACHE_ARGUMENTS = ("cache", "past_key_values")
"""Names a model's ``forward`` or ``generate`` may receive its KV cache under, newest first."""

TRANSFORMERS_VERSION = Version(transformers.__version__)


def cache_argument(function: Any) -> str:
    """The name ``function`` (a model's ``forward``) takes its cache under in this release."""
    parameters = inspect.signature(function).parameters
    return next((name for name in CACHE_ARGUMENTS if name in parameters), "past_key_values")


def pop_cache(kwargs: dict[str, Any]) -> Any:
    """Remove and return the cache from call ``kwargs`` under either name (``None`` if absent).

    When both names are set, the newer one wins, as in transformers 5.25.
    """
    found = {name: kwargs.pop(name) for name in CACHE_ARGUMENTS if name in kwargs}
    return next((cache for cache in found.values() if cache is not None), None)


def find_cache(kwargs: dict[str, Any]) -> Any:
    """The cache in call ``kwargs`` under either name, without removing it."""
    return next((kwargs[name] for name in CACHE_ARGUMENTS if kwargs.get(name) is not None), None)
